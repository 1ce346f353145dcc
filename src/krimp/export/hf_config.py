"""Hugging Face configs for the runtimes' own model code (mlx-lm, the ONNX Runtime GenAI builder), which
read the keys transformers wrote before version 5."""

from __future__ import annotations


def legacy_config(cfg: dict) -> dict:
    """The config keys mlx-lm's models read where transformers 5 writes newer ones: rope settings live
    in ``rope_parameters`` (per attention type for Gemma 3), mlx-lm reads ``rope_theta``,
    ``rope_local_base_freq`` and ``rope_scaling``; Gemma 3's ``layer_types`` (every 6th layer global)
    is ``sliding_window_pattern`` there."""
    lt = cfg.get("layer_types")
    if lt and "full_attention" in lt and "sliding_window_pattern" not in cfg:
        p = lt.index("full_attention") + 1
        if all((t == "full_attention") == ((i + 1) % p == 0) for i, t in enumerate(lt)):
            cfg["sliding_window_pattern"] = p
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return cfg
    full = rp.get("full_attention", rp)
    if "rope_theta" in full:
        cfg["rope_theta"] = full["rope_theta"]
    if "rope_theta" in rp.get("sliding_attention", {}):
        cfg["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    kind = full.get("rope_type", "default")
    if kind != "default":
        cfg["rope_scaling"] = {**{k: v for k, v in full.items() if k != "rope_theta"}, "type": kind}
    return cfg
