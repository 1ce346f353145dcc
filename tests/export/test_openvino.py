"""OpenVINO: ONNX models measured on OpenVINO (eval.runtime), the IR export checked in OpenVINO, and
static INT8 for a text encoder that OpenVINO runs as INT8 (a tiny random BERT; seconds)."""

import json

import numpy as np
import onnx
import pytest

import krimp
from krimp.errors import KrimpError

pytest.importorskip("openvino")

QUICK = {
    "data": {"calib_samples": 16, "eval_samples": 16, "seq_len": 32},
    "eval": {"seq_len": 32, "batch": 4, "repeats": 3, "warmup": 1, "bootstrap": 100, "timing_budget_s": 1},
}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    cfg = tf.BertConfig(
        vocab_size=minilm.task.tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    tf.BertModel(cfg).save_pretrained(folder)
    minilm.task.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_static_int8_encoder_measured_and_exported_on_openvino(tiny_bert, tmp_path):
    recipe = {
        **QUICK,
        "eval": {**QUICK["eval"], "runtime": "openvino"},
        "export": {"formats": ["openvino"]},
        "stages": [
            {"method": "smoothquant", "alpha": 0.75, "scope": "all"},
            {"method": "int8-static", "fallback": False, "embeddings": "int8"},
        ],
    }
    out = tmp_path / "run"
    r = krimp.compress(str(tiny_bert), recipe, out)
    assert r["compressed"]["runtime"] == "openvino" and r["baseline"]["runtime"] == "openvino"
    assert r["compressed"]["inference_precision"] == "f32"
    smooth, static = r["stages"]
    assert smooth["smoothed_pairs"] == 2 * 4  # q/k/v, FFN input, attention output, FFN output per layer
    assert static["attention_probs_float"] == 2
    assert static["weight_rounding"]["method"] == "gptq" and static["weight_rounding"]["convs"] == 2 * 6
    assert static["weight_rounding"]["error_vs_nearest"] < 1
    # projections' inputs only: no MatMul output is rounded to a per-tensor grid, no attention probabilities
    g = onnx.load(str(out / "model.onnx")).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    assert not [n for n in g.node if n.op_type == "QuantizeLinear" and made_by.get(n.input[0]) in ("MatMul", "Softmax")]
    assert sum(made_by.get(n.input[0]) == "Mul" for n in g.node if n.op_type == "QuantizeLinear") >= 2 * 3
    # query and key: symmetric int8, quantized before their Reshape/Transpose (where OpenVINO's INT8 attention
    # looks for them); the embedding tables: int8 rows behind a DequantizeLinear
    inits = {t.name: t for t in g.initializer}
    nodes = {n.output[0]: n for n in g.node}
    qk = [
        n
        for n in g.node
        if n.op_type == "DequantizeLinear" and any(r.op_type == "Reshape" and r.input[0] == n.output[0] for r in g.node)
    ]
    assert len(qk) == 2 * 2 and all(inits[n.input[2]].data_type == onnx.TensorProto.INT8 for n in qk)
    tables = [nodes[n.input[0]] for n in g.node if n.op_type == "Gather" and n.input[0] in nodes]
    assert len([t for t in tables if t.op_type == "DequantizeLinear"]) == 3  # words, positions, token types
    assert all(inits[t.input[0]].data_type == onnx.TensorProto.INT8 for t in tables if t.op_type == "DequantizeLinear")
    ov = next(a for a in r["artifacts"] if a["format"] == "openvino")
    assert ov["path"] == "openvino/model.xml" and (out / "openvino" / "model.bin").exists()
    assert ov["bytes"] == sum(f.stat().st_size for f in (out / "openvino").iterdir())
    assert ov["check"]["openvino_ir_max_rel_error"] <= 1e-4 and np.isfinite(ov["check"]["onnxruntime_max_rel_error"])
    # the IR is a model krimp reads back: task and tokenizer from the run folder, evaluated on OpenVINO
    ev = krimp.evaluate(
        str(out / "openvino" / "model.xml"), reference=str(out / "baseline.onnx"), samples=8, seq_len=32
    )
    assert ev["runtime"] == "openvino" and ev["task"] == "embedding"
    assert ev["fidelity"]["cosine"]["value"] > 0.9
    b = krimp.bench(str(out / "openvino" / "model.xml"), batch=2, seq=32, repeats=3, warmup=1)
    assert b["runtime"] == "openvino" and b["size_bytes"] == ov["bytes"] and b["latency_ms_p50"] > 0
    assert json.loads((out / "report.json").read_text())["artifacts"][-1]["check"] == ov["check"]


def test_openvino_computes_the_onnx_model_and_names_a_missing_input(tmp_path, minilm):
    import torch

    from krimp.eval.runtime import OrtEngine, OvEngine, onnx_engine

    lin = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU())
    p = tmp_path / "m.onnx"
    torch.onnx.export(lin, (torch.zeros(2, 8),), str(p), input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False)
    x = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    assert isinstance(onnx_engine(p, runtime="openvino"), OvEngine) and isinstance(onnx_engine(p), OrtEngine)
    assert np.allclose(OvEngine(p).run(x), OrtEngine(p).run(x), atol=1e-5)
    assert np.allclose(OvEngine(p.read_bytes()).run(x), OrtEngine(p).run(x), atol=1e-5)  # a fallback try's bytes
    with pytest.raises(KrimpError, match="input 'x'"):
        OvEngine(p).run({"y": x["x"]})


def test_bf16_is_an_openvino_setting_and_an_ir_is_read_not_compressed():
    from krimp.recipe import Recipe

    with pytest.raises(KrimpError, match="eval.runtime: openvino"):
        Recipe.from_dict({"eval": {"precision": "bf16"}})
    assert Recipe.from_dict({"eval": {"runtime": "openvino", "precision": "bf16"}}).eval.precision == "bf16"


@pytest.mark.slow
def test_weight_only_codes_reach_openvino_as_compressed_weights(byte_bpe, tmp_path):
    """krimp's 4-bit codes (ONNX Runtime's MatMulNBits) become OpenVINO's compressed weights; the tied
    embedding is read from the 8-bit head's codes (the ONNX file keeps a float16 copy for its Gather), so
    the IR is smaller than the ONNX file and computes what ONNX Runtime does up to that copy's rounding."""
    from tiny_lms import GQA, QUICK_RUN, save_with_texts, tiny_lm

    folder = tmp_path / "tied-llama"
    items = save_with_texts(tiny_lm("llama", tie_word_embeddings=True), folder, byte_bpe)
    recipe = {
        **QUICK_RUN,
        "eval": {**QUICK_RUN["eval"], "runtime": "openvino"},
        "export": {"formats": ["openvino"]},
        "stages": [
            {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False, "head_bits": 8, "head_group_size": None}
        ],
    }
    r = krimp.compress(str(folder), recipe, tmp_path / "run", data=items)
    assert r["stages"][0]["head"] == "8-bit, per channel (tied to the token embedding)"
    onnx_art = next(a for a in r["artifacts"] if a["format"] == "onnx" and a["role"] == "compressed")
    ov = next(a for a in r["artifacts"] if a["format"] == "openvino")
    table = GQA["vocab_size"] * GQA["hidden_size"]
    weights = (tmp_path / "run" / "openvino" / "model.bin").stat().st_size  # (the .xml text is most of a tiny IR)
    assert weights < onnx_art["bytes"] - 1.5 * table
    import openvino

    ir = openvino.Core().read_model(str(tmp_path / "run" / "openvino" / "model.xml"))
    shape = [GQA["vocab_size"], GQA["hidden_size"]]
    floats = [
        o
        for o in ir.get_ordered_ops()
        if o.get_type_name() == "Constant"
        and list(o.get_output_shape(0)) == shape
        and o.get_output_element_type(0).is_real()
    ]
    assert not floats  # the float16 copy of the tied table is gone: the Gather reads the head's codes
    assert ov["check"]["onnxruntime_max_rel_error"] < 1e-3 and ov["check"]["onnxruntime_top1_agreement"] == 1.0
    assert ov["check"]["openvino_ir_max_rel_error"] <= 1e-4
    assert r["compressed"]["runtime"] == "openvino" and np.isfinite(r["compressed"]["quality"]["perplexity"]["value"])


def test_scales_become_float16_only_where_exact():
    import openvino as ov
    import openvino.opset13 as ops

    from krimp.export.ov_model import half_scales

    codes = ops.constant(np.arange(8, dtype=np.uint8).reshape(2, 4))
    exact = ops.constant(np.array([[0.5], [0.25]], np.float32))
    inexact = ops.constant(np.array([[0.1], [0.3]], np.float32))
    x = ops.parameter([3, 4], np.float32)
    outs = [ops.matmul(x, ops.multiply(ops.convert(codes, "f32"), s), False, True) for s in (exact, inexact)]
    model = ov.Model(outs, [x])
    assert half_scales(model) == 1
    kinds = sorted(
        o.get_output_element_type(0).get_type_name() for o in model.get_ordered_ops() if o.get_type_name() == "Constant"
    )
    assert kinds.count("f16") == 1 and kinds.count("f32") == 1


def test_zero_points_and_per_channel_scales_are_stored_compactly():
    """OpenVINO's ONNX reader makes some MatMulNBits zero points float32 and tiles a per-channel scale
    over blocks: stored again as 4-bit integers and once per row, the decompression is the same."""
    import openvino as ov
    import openvino.opset13 as ops

    from krimp.export.ov_model import compact_decompressions

    rng = np.random.default_rng(0)
    codes = ops.constant(rng.integers(0, 16, (4, 3, 8)).astype(np.uint8), dtype=ov.Type.u4)
    zp = rng.integers(0, 16, (4, 3, 1)).astype(np.float32)
    scale = np.repeat(rng.random((4, 1, 1)).astype(np.float32), 3, axis=1)  # one per row, tiled over 3 blocks
    w = ops.multiply(ops.subtract(ops.convert(codes, "f32"), ops.constant(zp)), ops.constant(scale))
    x = ops.parameter([2, 24], np.float32)
    model = ov.Model([ops.matmul(x, ops.reshape(w, [4, 24], False), False, True)], [x])
    feed = rng.random((2, 24)).astype(np.float32)
    before = ov.Core().compile_model(model, "CPU")(feed)[0]
    assert compact_decompressions(model) == 2
    consts = {
        (o.get_output_element_type(0).get_type_name(), tuple(o.get_output_shape(0)))
        for o in model.get_ordered_ops()
        if o.get_type_name() == "Constant"
    }
    assert ("u4", (4, 3, 1)) in consts and ("f32", (4, 1, 1)) in consts and ("f32", (4, 3, 1)) not in consts
    assert np.array_equal(ov.Core().compile_model(model, "CPU")(feed)[0], before)


def test_equal_small_constants_are_stored_once():
    import openvino as ov
    import openvino.opset13 as ops

    from krimp.export.ov_model import share_small_constants

    x = ops.parameter([2, 6], np.float32)
    outs = [
        ops.reshape(ops.multiply(x, ops.constant(np.float32(k))), ops.constant(np.array([3, 4])), False) for k in (2, 3)
    ]
    model = ov.Model(outs, [x])
    feed = np.arange(12, dtype=np.float32).reshape(2, 6)
    before = [r.copy() for r in ov.Core().compile_model(model, "CPU")(feed).values()]
    assert share_small_constants(model) == 1  # the two shapes [3, 4]; the two factors differ
    after = list(ov.Core().compile_model(model, "CPU")(feed).values())
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
