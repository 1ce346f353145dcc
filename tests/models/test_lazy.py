"""Streaming: a decoder read from its files one block at a time gives exactly the model the in-memory
path gives, holds one block's float weights at a time, and is chosen (or refused) by --max-memory."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_lms import QUICK_RUN, save_with_texts, tiny_lm

import krimp
from krimp.budget import parse_bytes
from krimp.errors import KrimpError
from krimp.eval.runtime import StreamedEngine, TorchEngine
from krimp.export.safetensors_io import save_packed
from krimp.methods import method_for
from krimp.models.lazy import SafetensorsReader, lazy_of
from krimp.models.readers import load_hf, load_lazy
from krimp.quant.llm import AWQConfig, GPTQConfig, RTNConfig
from krimp.recipe import Recipe
from krimp.stage import StageContext


@pytest.fixture(scope="module")
def folders(tmp_path_factory, byte_bpe):
    """Two tiny decoders stored as bf16 safetensors: Llama with its own head, Qwen3 with a tied one."""
    out = {}
    for name, tied in (("llama", False), ("qwen3", True)):
        d = tmp_path_factory.mktemp(name)
        items = save_with_texts(tiny_lm(name, tie_word_embeddings=tied).to(torch.bfloat16), d, byte_bpe)
        out[name] = (d, items)
    return out


def _feeds(task, items):
    f = task.encode(items[:4], 16)
    return [{k: v for k, v in f.items() if k in ("input_ids", "attention_mask")}]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "cfg",
    [RTNConfig(), RTNConfig(head_bits=None), GPTQConfig(group_size=32), AWQConfig(group_size=32, loss_windows=1)],
)
def test_streamed_method_writes_the_in_memory_file(folders, name, cfg, tmp_path):
    d, items = folders[name]
    files = {}
    for how, loader in (("memory", lambda: load_hf(d, "causal-lm", False)), ("streamed", lambda: load_lazy(d))):
        h = loader()
        if how == "streamed":  # as a streamed run does: one window through the float model first (its hooks
            # run in inference mode; what they load must stay changeable, AWQ scales the norms in place)
            StreamedEngine(h.module, h.task, variant="float").run(_feeds(h.task, items)[0])
        mod, _ = method_for(cfg).apply_torch(h.module, cfg, StageContext(h.task, _feeds(h.task, items), 2))
        if how == "streamed":
            lazy = lazy_of(mod)
            lazy.release_outside()
            # what is left in float32 is outside the blocks, or a norm: every block linear is codes only
            linears = [m for b in lazy.blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
            assert linears and all(m.weight.is_meta and m.krimp_wq is not None for m in linears)
        save_packed(mod, tmp_path / how)
        files[how] = load_file(tmp_path / how / "model.safetensors")
    a, b = files["memory"], files["streamed"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_streamed_forward_matches_the_model(folders, name):
    d, items = folders[name]
    ref, h = load_hf(d, "causal-lm", False), load_lazy(d)
    feed = _feeds(h.task, items)[0]
    want = TorchEngine(ref.module, ref.task).run(feed)
    assert np.array_equal(StreamedEngine(h.module, h.task, variant="float").run(feed), want)
    # compressed: the streamed model's logits are the in-memory compressed model's
    cfg = GPTQConfig(group_size=32)
    for m in (ref.module, h.module):
        method_for(cfg).apply_torch(m, cfg, StageContext(h.task, [feed], 2))
    lazy_of(h.module).release_outside()
    got = StreamedEngine(h.module, h.task, variant="current").run(feed)
    assert np.array_equal(got, TorchEngine(ref.module, ref.task).run(feed))
    # the float side again after compression: the file's model, not the codes
    assert np.array_equal(StreamedEngine(h.module, h.task, variant="float").run(feed), want)
    assert all(p.is_meta for b in lazy_of(h.module).blocks for n, p in b.named_parameters() if "proj" in n)


@pytest.mark.slow
def test_compress_streamed_run_report(folders, tmp_path):
    d, items = folders["llama"]
    recipe = {
        **QUICK_RUN,
        "export": {"formats": ["safetensors"]},
        "resources": {"stream": True},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32}],
    }
    r = krimp.compress(str(d), recipe, tmp_path / "s", data=items)
    plain = krimp.compress(str(d), {**recipe, "resources": {"stream": False}}, tmp_path / "m", data=items)
    assert r["memory"]["path"] == "streamed" and plain["memory"]["path"] == "in-memory"
    assert r["memory"]["peak_rss_bytes"] > 0 and r["memory"]["estimate_bytes"]["streamed"] > 0
    assert r["compressed"]["latency_ms_p50"] is None and r["ratios"]["speedup_p50"] is None
    # the same held-out windows, the same model: the same figures
    for side in ("baseline", "compressed"):
        assert r[side]["quality"] == plain[side]["quality"]
    assert r["compressed"]["fidelity"] == plain["compressed"]["fidelity"]
    a, b = load_file(tmp_path / "s" / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "not timed" in (tmp_path / "s" / "report.md").read_text()
    # the streamed folder reloads as a model, with its codes
    from krimp.models import load_model
    from krimp.quant.wq import quantized_layers

    assert len(quantized_layers(load_model(str(tmp_path / "s")).module)) == 2 * 7 + 1  # 7 linears a block, the head


def _gguf_tensors(path):
    import gguf

    return {t.name: (int(t.tensor_type), bytes(t.data)) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize(
    ("name", "source"),
    [("llama", "folder"), ("llama", "gguf"), pytest.param("qwen3", "folder", marks=pytest.mark.slow)],
)
def test_streamed_exports_are_the_in_memory_files(folders, name, source, tmp_path):
    """From a Hugging Face folder or from a GGUF file (read block by block by GGUFTensors), a streamed
    run writes the GGUF and safetensors files the in-memory run writes, and its GGUF passes the same
    read-back check."""
    d, items = folders[name]  # Llama: its own head, llama.cpp's interleaved rotary rows; Qwen3: a tied head
    if source == "gguf":  # the float model as GGUF, its metadata and tokenizer carried over from there
        from krimp.export.gguf import export_gguf

        h = load_hf(d, "causal-lm", False)
        export_gguf(h.module, None, tmp_path / "float.gguf", float_type="f32", tokenizer=h.task.tokenizer)
        src = tmp_path / "float.gguf"
    else:
        src = d
    recipe = {
        **QUICK_RUN,
        "export": {"formats": ["safetensors", "gguf", "onnx"]},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32, "head_bits": 8}],
    }
    r = {}
    for how, stream in (("s", True), ("m", False)):
        r[how] = krimp.compress(str(src), {**recipe, "resources": {"stream": stream}}, tmp_path / how, data=items)
    assert r["s"]["memory"]["path"] == "streamed" and r["m"]["memory"]["path"] == "in-memory"
    a, b = _gguf_tensors(tmp_path / "s" / "model.gguf"), _gguf_tensors(tmp_path / "m" / "model.gguf")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    # F32 norms, Q4_0 blocks, a Q8_0 head; Llama's embedding of its own in F16
    assert {t for t, _ in a.values()} == ({0, 1, 2, 8} if name == "llama" else {0, 2, 8})
    check = r["s"]["exports"]["gguf"]["check"]
    assert check["transformers_max_rel_error"] < 1e-4 and check["tokenizer_same_ids"]
    sa, sb = load_file(tmp_path / "s" / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # ONNX: the graph traced without its weights, each written in turn as external data: the in-memory
    # run's model (MatMulNBits from the same codes), with no float baseline file beside it
    from krimp.eval.runtime import OrtEngine

    assert {a["role"] for a in r["s"]["artifacts"] if a["format"] == "onnx"} == {"compressed"}
    nb, nb_m = r["s"]["exports"]["nbits"], r["m"]["exports"]["nbits"]
    assert nb["matmul_nbits"] == 2 * 7 + 1 == nb_m["matmul_nbits"]
    assert nb["embedding_fp16"] == (name == "qwen3") == nb_m["embedding_fp16"]  # a tied table from its codes
    import onnx

    inits = onnx.load(tmp_path / "s" / "model.onnx", load_external_data=False).graph.initializer
    assert inits and all(t.data_location == onnx.TensorProto.EXTERNAL for t in inits)  # every weight in the .data
    length = sum(int(dict((e.key, e.value) for e in t.external_data)["length"]) for t in inits)
    assert length == (tmp_path / "s" / "model.onnx.data").stat().st_size
    feed = _feeds(load_hf(d, "causal-lm", False).task, items)[0]
    got, want = (OrtEngine(tmp_path / how / "model.onnx", 2).run(feed) for how in ("s", "m"))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_a_streamed_run_may_write_one_format_and_reports_its_size(folders, fmt, tmp_path):
    d, items = folders["qwen3"]
    recipe = {**QUICK_RUN, "export": {"formats": [fmt]}, "resources": {"stream": True}}
    r = krimp.compress(str(d), {**recipe, "stages": [{"method": "rtn", "group_size": 32}]}, tmp_path / "o", data=items)
    (art,) = r["artifacts"]
    assert art["format"] == fmt and r["compressed"]["size_bytes"] == art["bytes"] > 0
    assert sorted(p.name for p in (tmp_path / "o").glob("model.*")) == (
        ["model.onnx", "model.onnx.data"] if fmt == "onnx" else ["model.gguf"]
    )


@pytest.mark.slow
def test_max_memory_chooses_streaming_or_refuses_before_loading(folders, tmp_path):
    from krimp.budget import estimates, shape_of_folder

    d, items = folders["llama"]
    recipe = {**QUICK_RUN, "export": {"formats": ["safetensors"]}, "stages": [{"method": "rtn", "group_size": 32}]}
    est = estimates(shape_of_folder(d), Recipe.from_dict(recipe))
    assert est["streamed"] < est["in_memory"]
    between = (est["streamed"] + est["in_memory"]) // 2
    r = krimp.compress(str(d), {**recipe, "resources": {"max_memory": between}}, tmp_path / "a", data=items)
    assert r["memory"]["path"] == "streamed" and r["memory"]["budget_bytes"] == between
    r = krimp.compress(str(d), {**recipe, "resources": {"max_memory": "100GB"}}, tmp_path / "b", data=items)
    assert r["memory"]["path"] == "in-memory"
    with pytest.raises(KrimpError, match="even streamed block by block"):
        krimp.compress(str(d), {**recipe, "resources": {"max_memory": "1MB"}}, tmp_path / "c", data=items)
    assert not (tmp_path / "c").exists()
    ov = {**recipe, "export": {"formats": ["openvino"]}, "resources": {"max_memory": between}}
    with pytest.raises(KrimpError, match=r"streaming writes safetensors.*not openvino"):
        krimp.compress(str(d), ov, tmp_path / "d", data=items)
    with pytest.raises(KrimpError, match=r"resources.stream: streaming writes safetensors.* \(export.formats\)$"):
        krimp.compress(str(d), {**recipe, "export": {"formats": []}, "resources": {"stream": True}}, tmp_path / "f")
    with pytest.raises(KrimpError, match="resources.stream: streaming runs one stage"):
        krimp.compress(
            str(d), {**recipe, "stages": [{"method": "magnitude"}], "resources": {"stream": True}}, tmp_path / "e"
        )


def test_resources_settings_are_checked_when_read():
    assert parse_bytes("3GB") == 3 * 10**9 and parse_bytes("1.5GiB") == int(1.5 * 2**30) and parse_bytes(512) == 512
    for bad in ({"max_memory": "lots"}, {"device": "gpu"}, {"stream": "maybe"}):
        with pytest.raises(KrimpError, match="resources"):
            Recipe.from_dict({"resources": bad})
    assert Recipe.from_dict({"resources": {"device": "cuda:1", "max_memory": "8GB"}}).resources.device == "cuda:1"


def test_reader_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    t = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64), "c": torch.zeros(0)}
    save_file(t, tmp_path / "x.safetensors")
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert all(torch.equal(r.read(k), v) and r.read(k).dtype == v.dtype for k, v in t.items())


def test_one_by_one_writer_is_read_by_safetensors(tmp_path):
    from krimp.export.safetensors_io import write_one_by_one

    made = []
    t = {
        "x": torch.randn(4, 3),
        "later": (torch.uint8, (5,), lambda: made.append(1) or torch.arange(5, dtype=torch.uint8)),
        "h": torch.ones(2, dtype=torch.float16),
    }
    write_one_by_one(tmp_path / "y.safetensors", t, {"format": "test"})
    back = load_file(tmp_path / "y.safetensors")
    assert made == [1] and torch.equal(back["x"], t["x"]) and torch.equal(back["later"], torch.arange(5).byte())
    assert torch.equal(back["h"], t["h"])
    bad = {"z": (torch.float32, (2,), lambda: torch.zeros(3))}
    with pytest.raises(RuntimeError, match="announced"):
        write_one_by_one(tmp_path / "z.safetensors", bad, {})
    assert json.loads((tmp_path / "y.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")["__metadata__"]


def test_device_is_resolved_or_refused_in_one_line(monkeypatch):
    from krimp.device import resolve_device

    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(KrimpError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda:0" and resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(KrimpError, match="numbered 0 to 1"):
        resolve_device("cuda:2")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cli_device_without_gpu_exits_2(folders, tmp_path):
    import subprocess
    import sys

    d, _ = folders["llama"]
    cmd = [sys.executable, "-m", "krimp.cli.main", "compress", "--model", str(d), "--method", "gptq"]
    p = subprocess.run([*cmd, "--device", "cuda", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode == 2 and "sees no CUDA GPU" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x").exists()


def test_a_gguf_is_planned_from_its_header_and_refused_for_an_architecture_krimp_does_not_name(tmp_path):
    import gguf

    from krimp.budget import plan, shape_of

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "stablelm")
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.zeros((320, 64), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((128, 64), np.float32))
    w.add_tensor("blk.1.ffn_up.weight", np.zeros((128, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = shape_of(tmp_path / "x.gguf")
    assert (s.params, s.outside, s.block, s.blocks, s.hidden, s.ffn, s.vocab) == (36864, 20480, 8192, 2, 64, 128, 320)
    recipe = Recipe.from_dict({"stages": [{"method": "gptq"}], "resources": {"stream": True}})
    with pytest.raises(KrimpError, match=r"resources.stream: streaming reads GGUF files .*not 'stablelm'"):
        plan(recipe, tmp_path / "x.gguf")
