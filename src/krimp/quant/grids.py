"""Which grid each weight of a language model gets in a weight-only stage: the recipe's (bits, group
size, symmetry, per-layer overrides, the head's own keys) or, with ``gguf_type``, the GGML type
llama-quantize gives the tensor (:mod:`krimp.quant.ggml`); and the rounding of the output head (and an
untied token embedding) to theirs. Used by the ``rtn``, ``gptq`` and ``awq`` stages of
:mod:`krimp.quant.llm`."""

from __future__ import annotations

from torch import nn

from krimp.quant.ggml import GRIDS, SUPER, layer_types, type_of
from krimp.quant.wq import WQSpec, rtn, set_quantized


class Grids:
    """The grid of each weight a stage quantizes (``cfg``: an ``rtn`` / ``gptq`` / ``awq`` stage's config):
    the recipe's (``cfg.spec_for``, the head's ``head_bits`` / ``head_group_size``) or, with
    ``gguf_type``, llama-quantize's type for the tensor."""

    def __init__(self, cfg, module: nn.Module):
        self.cfg = cfg
        self.types = layer_types(module, cfg.gguf_type) if cfg.gguf_type else None
        head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        self.head_path = next((k for k, m in module.named_modules() if m is head), None) if head is not None else None

    def _typed(self, path: str | None) -> WQSpec | None:
        return GRIDS.get(self.types.get(path, "float")) if path else None

    def spec(self, name: str, width: int | None = None) -> WQSpec | None:
        if self.types is None:
            return self.cfg.spec_for(name, width)
        return self._typed(name) if self.cfg.spec_for(name) else None

    def head(self) -> WQSpec | None:
        if self.types is None:
            return WQSpec(self.cfg.head_bits, self.cfg.head_group_size, True) if self.cfg.head_bits else None
        return self._typed(self.head_path)

    def embedding(self, module: nn.Module) -> WQSpec | None:
        """An untied token embedding's grid: llama.cpp quantizes it in a ``gguf_type`` file, krimp's own
        grids leave it in float."""
        if self.types is None:
            return None
        path = next((k for k, m in module.named_modules() if m is module.get_input_embeddings()), None)
        return self._typed(path) if path != self.head_path else None

    def counts(self) -> dict[str, int]:
        """Tensors per GGML type (``gguf_type`` only)."""
        out: dict[str, int] = {}
        for t in (self.types or {}).values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))


def quantize_head(module: nn.Module, grids: Grids) -> dict:
    """Round the output head (and so the tied embedding) to its grid (the recipe's ``head_bits`` in
    symmetric groups of ``head_group_size``, None: one scale per output channel; or its GGML type), and
    an untied token embedding where the grid plan has one for it (``gguf_type``)."""
    from krimp.models.lazy import lazy_of

    def weight(m):
        w = m.weight.detach()
        return lazy_of(module).tensor(m.weight) if w.is_meta else w  # a streamed model's, still in its file

    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    spec = grids.head()
    out = {}
    if spec is not None and head is not None and isinstance(head, nn.Linear):
        set_quantized(head, rtn(weight(head), spec))
        tied = head.weight is module.get_input_embeddings().weight
        grid = f"groups of {spec.group_size}" if spec.group_size else "per channel"
        name = grids.types[grids.head_path] if grids.types else f"{spec.bits}-bit, {grid}"
        out["head"] = name + (" (tied to the token embedding)" if tied else "")
    emb_spec = grids.embedding(module)
    if emb_spec is not None:
        emb = module.get_input_embeddings()
        set_quantized(emb, rtn(weight(emb), emb_spec))
        out["token_embedding"] = type_of(emb_spec, emb.weight.shape[1])
    return out


def ragged_notes(grids: Grids, linears: dict[str, nn.Linear]) -> list[str]:
    """The report's line for each linear whose width the grid does not divide into whole groups."""
    out = []
    for name, lin in linears.items():
        if grids.types is not None:
            if lin.in_features % SUPER and name in grids.types:
                t = grids.types[name]
                out.append(f"{name}: width {lin.in_features} is not a multiple of 256: {t} in place of a K type")
            continue
        spec = grids.spec(name, lin.in_features)
        asked = grids.spec(name)
        if spec and spec.group_size != asked.group_size:
            out.append(
                f"{name}: width {lin.in_features}: groups of {spec.group_size} (adjusted from {asked.group_size})"
            )
        if spec and spec.group_size and lin.in_features % spec.group_size:
            out.append(
                f"{name}: width {lin.in_features} is not a multiple of group {spec.group_size}; "
                f"its last group has {lin.in_features % spec.group_size} columns"
            )
    return out
