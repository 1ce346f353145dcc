"""Layer-wise methods on a tiny random Llama: every linear quantized on its grid, GPTQ/AWQ closer to
the float model than RTN, SmoothQuant keeps the function, exports hold krimp's weights exactly."""

import copy

import numpy as np
import pytest
import torch

from krimp.errors import KrimpError
from krimp.methods import config_from_dict, method_for
from krimp.models import load_model
from krimp.stage import StageContext


@pytest.fixture(scope="module")
def llama(tiny_llama):
    h = load_model(tiny_llama)
    g = torch.Generator().manual_seed(0)
    # token ids drawn from a skewed distribution so activations have structure
    ids = torch.multinomial(
        torch.softmax(torch.randn(h.task.tokenizer.vocab_size, generator=g) * 2, 0),
        16 * 64,
        replacement=True,
        generator=g,
    ).reshape(16, 64)
    return h, ids


def _run(h, ids, stage):
    cfg = config_from_dict(stage)
    feeds = [{"input_ids": ids[i : i + 8].numpy(), "attention_mask": np.ones((8, 64), np.int64)} for i in (0, 8)]
    return method_for(cfg).apply_torch(copy.deepcopy(h.module), cfg, StageContext(h.task, feeds, 2))


def _kl(h, m, ids):
    with torch.no_grad():
        p = torch.log_softmax(h.module(input_ids=ids).logits, -1)
        q = torch.log_softmax(m(input_ids=ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_ragged_adjust_gives_each_layer_whole_groups(llama, method):
    """Groups of 48 on widths 64 and 128: by default each row ends in a shorter group; ``ragged: adjust``
    gives those layers groups of 32 (the largest power of two <= 48 that divides the width), said in the
    stage's fallbacks; the head keeps its own grid."""
    h, ids = llama
    stage = {"method": method, "bits": 4, "group_size": 48, "head_bits": 8, "head_group_size": None}
    m, info = _run(h, ids, {**stage, "ragged": "adjust"})
    lins = {n: mod.krimp_wq for n, mod in m.named_modules() if hasattr(mod, "krimp_wq") and n != "lm_head"}
    assert len(lins) == 2 * 7 and {qw.spec.group_size for qw in lins.values()} == {32}
    assert m.lm_head.krimp_wq.spec.group_size is None and info["head"].startswith("8-bit, per channel")
    assert any("groups of 32 (adjusted from 48)" in f for f in info["fallbacks"])
    m, info = _run(h, ids, stage)
    assert {
        mod.krimp_wq.spec.group_size for n, mod in m.named_modules() if hasattr(mod, "krimp_wq") and n != "lm_head"
    } == {48}
    assert any("its last group has" in f for f in info["fallbacks"])


@pytest.mark.slow
def test_methods_quantize_every_block_linear_and_gptq_beats_rtn(llama):
    h, ids = llama
    kls = {}
    for name in ("rtn", "gptq", "awq"):
        m, info = _run(h, ids, {"method": name, "bits": 3, "group_size": 32, "head_bits": None})
        assert info["quantized_layers"] == 2 * 7  # q k v o gate up down, two blocks
        lins = [mod for mod in m.modules() if hasattr(mod, "krimp_wq")]
        for lin in lins:
            assert int(lin.krimp_wq.codes.max()) < 8
            assert torch.equal(lin.weight.data, lin.krimp_wq.dequantize())
        kls[name] = _kl(h, m, ids[:4])
    assert kls["gptq"] < kls["rtn"] and kls["awq"] <= kls["rtn"] * 1.05


def test_overrides_ignore_and_head(llama):
    h, ids = llama
    m, info = _run(
        h,
        ids,
        {
            "method": "rtn",
            "bits": 4,
            "group_size": 32,
            "ignore": ["*.o_proj"],
            "overrides": {"*.down_proj": {"bits": 8}},
            "head_bits": 8,
        },
    )
    mods = dict(m.named_modules())
    assert not hasattr(mods["model.layers.0.self_attn.o_proj"], "krimp_wq")
    assert mods["model.layers.1.mlp.down_proj"].krimp_wq.spec.bits == 8
    assert mods["model.layers.1.mlp.up_proj"].krimp_wq.spec.bits == 4
    assert m.lm_head.krimp_wq.spec.group_size == 32 and "head" in info


def test_smoothquant_keeps_the_function(llama):
    h, ids = llama
    m, info = _run(h, ids, {"method": "smoothquant", "alpha": 0.5})
    assert info["smoothed_pairs"] == 2 * 3  # per block: norm->qkv, norm->gate/up, up->down (v->o is GQA)
    with torch.no_grad():
        a, b = h.module(input_ids=ids[:2]).logits, m(input_ids=ids[:2]).logits
    assert float((a - b).abs().max() / a.abs().max()) < 1e-4
    assert not torch.equal(m.model.layers[0].input_layernorm.weight, h.module.model.layers[0].input_layernorm.weight)


def test_no_matching_layer_is_a_clear_error(llama):
    h, ids = llama
    with pytest.raises(KrimpError, match="no linear layer matched"):
        _run(h, ids, {"method": "rtn", "targets": ["nothing.*"], "head_bits": None})


def test_model_without_decoder_blocks_is_a_clear_error(minilm):
    cfg = config_from_dict({"method": "gptq"})
    feeds = [{"input_ids": np.ones((1, 8), np.int64)}]
    with pytest.raises(KrimpError, match="no decoder blocks"):
        method_for(cfg).apply_torch(copy.deepcopy(minilm.module), cfg, StageContext(minilm.task, feeds, 2))


@pytest.mark.parametrize(
    "overrides", [{}, {"*.gate_proj": {"bits": 5}, "*.up_proj": {"bits": 6}, "*.q_proj": {"bits": 3}}]
)
def test_packed_safetensors_and_matmulnbits_hold_krimps_weights(llama, tmp_path, overrides):
    """Also with the mixed widths a sensitivity recipe writes (3/5/6 bits beside 4)."""
    from krimp.eval.runtime import OrtEngine, TorchEngine
    from krimp.export.onnx import export_onnx
    from krimp.export.onnx_nbits import to_matmul_nbits
    from krimp.export.safetensors_io import save_packed

    h, ids = llama
    m, _ = _run(h, ids, {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "overrides": overrides})
    widths = {mod.krimp_wq.spec.bits for mod in m.modules() if hasattr(mod, "krimp_wq")}
    assert widths == ({3, 4, 5, 6, 8} if overrides else {4, 8})  # the head at 8 bits by default
    save_packed(m, tmp_path / "packed", h.task.tokenizer)
    back = load_model(tmp_path / "packed").module
    for (n, a), b in zip(m.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert (tmp_path / "packed" / "model.safetensors").stat().st_size < 0.7 * sum(  # untied: the embedding stays float
        p.numel() * 4 for p in h.module.parameters()
    )
    feed = {"input_ids": ids[:2].numpy(), "attention_mask": np.ones((2, 64), np.int64)}
    export_onnx(m, h.task, feed, tmp_path / "f.onnx")
    info = to_matmul_nbits(tmp_path / "f.onnx", tmp_path / "nb.onnx", m)
    assert info["matmul_nbits"] == 14 + 1  # block linears and the head
    ref, got = TorchEngine(m, h.task).run(feed), OrtEngine(tmp_path / "nb.onnx").run(feed)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3


@pytest.mark.parametrize("propagate,forwards", [("float", 2), ("quantized", 4)])
def test_gptq_propagate_sets_forwards_per_block(llama, monkeypatch, propagate, forwards):
    from krimp.calib.layerwise import BlockRun

    calls = []
    orig = BlockRun.forward
    monkeypatch.setattr(BlockRun, "forward", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    h, ids = llama
    m, info = _run(h, ids, {"method": "gptq", "bits": 4, "group_size": 32, "propagate": propagate})
    assert len(calls) == forwards  # two blocks: one forward each, or a second after quantizing
    assert info["quantized_layers"] == 15 and _kl(h, m, ids[:4]) < 0.05


@pytest.mark.parametrize(
    "propagate,last_use,buffers",
    [("float", True, 1), ("float", False, 2), ("compressed", True, 1), ("compressed", False, 1)],
)
def test_calibrator_feeds_each_block_the_previous_blocks_outputs(llama, propagate, last_use, buffers):
    """What block i receives must be exactly what the full model gives it. The outputs are written
    over the inputs (one activation buffer) unless the method still reads the inputs after its
    statistics pass under float propagation (then two buffers, swapped block after block); keyword
    tensors equal across batches (rotary tables) are kept once."""
    from krimp.calib.layerwise import LayerwiseCalibrator

    h, ids = llama
    model = copy.deepcopy(h.module)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # inputs of each block
    seen, ptrs = [], set()

    def process(run):
        seen.append(torch.cat(run.inputs))
        ptrs.add(run.inputs[0].data_ptr())
        assert run.kwargs[1]["position_embeddings"][0] is run.kwargs[0]["position_embeddings"][0]
        run.collect(list(run.linears), {"hessian"}, last_use=last_use)
        if propagate == "float" and last_use:  # the inputs are gone: a second pass is refused
            with pytest.raises(RuntimeError, match="overwritten"):
                run.forward()
        return {}

    LayerwiseCalibrator(model, ids, batch=8, propagate=propagate).run(process)
    assert len(seen) == len(hidden) - 1
    for i, x in enumerate(seen):
        assert torch.allclose(x, hidden[i], atol=1e-5), f"block {i} got the wrong inputs"
    assert len(ptrs) == buffers


def test_collect_keeps_about_sample_rows_rows_drawn_from_every_batch(llama):
    """AWQ's loss searches read ``sample_rows`` input rows; the calibrator holds about that many
    per input (the same share of each batch), not a quarter of every batch thinned later."""
    from krimp.calib.layerwise import LayerwiseCalibrator

    h, ids = llama  # 16 windows: batches of 4 -> 4 batches
    counts = []

    def process(run):
        stats = run.collect(list(run.linears), {"sample"}, sample_rows=100)
        for st in {id(s): s for s in stats.values()}.values():
            counts.append([len(x) for x in st.sample])
            assert len(st.sample_rows(100)) == 100
        return {}

    LayerwiseCalibrator(copy.deepcopy(h.module), ids, batch=4).run(process)
    assert counts and all(c == [25, 25, 25, 25] for c in counts), counts


def test_first_position_weight_counts_each_windows_first_token_that_many_times():
    from krimp.calib.layerwise import InputStats

    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    st = InputStats()
    st.update(x, {"hessian", "sq_sum"}, 0, torch.Generator(), first_weight=9.0)
    c = torch.ones(5)
    c[0] = 9.0
    want = torch.einsum("bti,btj,t->ij", x, x, c)
    assert torch.allclose(st.hessian, want, atol=1e-5) and torch.allclose(st.sq_sum, torch.diag(want), atol=1e-5)
    assert st.rows == 15
    plain = InputStats()
    plain.update(x, {"hessian"}, 0, torch.Generator())
    assert torch.allclose(plain.hessian, torch.einsum("bti,btj->ij", x, x), atol=1e-5)


def test_awq_sink_weight_reaches_the_block_loss_and_is_validated(llama, monkeypatch):
    import krimp.quant.awq as A

    h, ids = llama
    weights = []
    err = A.block_error

    def spy(y, ref, first_weight=1.0):
        weights.append(first_weight)
        return err(y, ref, first_weight)

    monkeypatch.setattr(A, "block_error", spy)
    _run(h, ids, {"method": "awq", "bits": 4, "group_size": 32, "head_bits": None, "sink_weight": 16})
    assert weights and set(weights) == {16.0}  # every grid point of every pair's search
    with pytest.raises(KrimpError, match="sink_weight"):
        config_from_dict({"method": "awq", "sink_weight": 0.5})


def test_gptq_sink_weight_changes_the_solve_and_is_validated(llama, monkeypatch):
    import krimp.quant.gptq as G

    h, ids = llama
    seen = {}
    solve = G.gptq_solve

    def spy(W, H, spec, **kw):
        seen.setdefault("H", []).append(H.clone())
        return solve(W, H, spec, **kw)

    monkeypatch.setattr(G, "gptq_solve", spy)
    hs = {}
    for sw in (1.0, 16.0):
        seen.clear()
        _run(h, ids, {"method": "gptq", "bits": 4, "group_size": 32, "head_bits": None, "sink_weight": sw})
        hs[sw] = seen["H"][0]  # block 0's q/k/v Hessian: the same float inputs either way
    extra = hs[16.0] - hs[1.0]  # 15 more copies of the first positions' x x^T: positive semi-definite
    assert float(torch.linalg.eigvalsh(extra).min()) > -1e-3 * float(extra.diagonal().max())
    assert float(extra.diagonal().sum()) > 0.01 * float(hs[1.0].diagonal().sum())
    with pytest.raises(KrimpError, match="sink_weight"):
        config_from_dict({"method": "gptq", "sink_weight": 0.5})
