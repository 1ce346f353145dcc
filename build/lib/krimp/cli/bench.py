"""``krimp bench MODEL``: latency p50/p95, throughput, peak memory and size on the model's runtime."""

from __future__ import annotations

import json

import typer

from krimp.cli import common


def bench_cmd(
    model: str = typer.Argument(..., help="model path or builtin:NAME"),
    batch: int = typer.Option(8, "--batch"),
    seq_len: int = typer.Option(128, "--seq-len", help="tokens per sample (text models)"),
    threads: int = typer.Option(2, "--threads"),
    repeats: int = typer.Option(20, "--repeats"),
    warmup: int = typer.Option(5, "--warmup"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Benchmark a model: ONNX files in ONNX Runtime (fresh process), others in PyTorch."""
    from krimp.verbs import bench

    with common.user_errors():
        r = bench(model, batch, seq_len, threads, repeats, warmup)
    if as_json:
        common.console.print_json(json.dumps(r))
        return
    if r["runtime"] == "llama.cpp":
        rows = [
            ("runtime", "llama.cpp (llama-cpp-python)"),
            ("threads", r["threads"]),
            (f"prompt tokens/s ({r['prompt_tokens']} tokens)", f"{r['prompt_tokens_per_s']:.0f}"),
            (f"decode tokens/s ({r['decode_tokens']} tokens, greedy)", f"{r['decode_tokens_per_s']:.1f}"),
            ("peak RSS (MB)", f"{r['peak_rss_mb']:.0f}"),
            ("size on disk (MB)", f"{r['size_bytes'] / 1e6:.2f}"),
        ]
        common.console.print(common.table(f"krimp bench: {r['model']}", ["metric", "value"], rows))
        return
    rows = [
        ("runtime", r["runtime"]),
        ("inputs", r["feed_shapes"]),
        ("threads", r["threads"]),
        ("latency p50 / p95 (ms)", f"{r['latency_ms_p50']:.2f} / {r['latency_ms_p95']:.2f}"),
        ("throughput (samples/s)", f"{r['throughput_per_s']:.1f}"),
        ("peak RSS (MB)", f"{r['peak_rss_mb']:.0f}"),
        ("size on disk (MB)", f"{r['size_bytes'] / 1e6:.2f}"),
        ("energy / inference (J, estimate)", f"{r['energy_j_per_inference']:.4f}"),
        ("cost / 1M inferences (USD, estimate)", f"{r['cost_usd_per_million']:.3f}"),
    ]
    common.console.print(common.table(f"krimp bench: {r['model']}", ["metric", "value"], rows))
