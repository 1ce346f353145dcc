"""Recipes: an ordered list of compression stages plus data, evaluation, goal and export settings.

A recipe is YAML on disk and the same thing in Python::

    model: builtin:minilm
    data: {source: builtin:python-docs, calib_samples: 128, eval_samples: 512}
    goal: {max_quality_drop: 0.01, min_cosine: 0.99}
    stages:
      - method: int8-dynamic
        per_channel: true
        ignore: ["*embeddings*"]

Unknown keys are reported with their place and the closest valid key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from krimp.config import BaseConfig, format_validation_error
from krimp.errors import KrimpError, closest, read_utf8, unknown_key_message


class _Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Section):
    """Where calibration and evaluation data come from. Calibration and evaluation never overlap:
    when both come from one source, items (files for a folder of files) are split between them.
    A list of sources is a mix: each source is split in the same halves as alone, calibration uses
    only their calibration halves and evaluation only their evaluation halves (language models
    take an equal share of windows from each source)."""

    source: str | list[str] | None = None  # default: the task's builtin set; a list mixes sources
    calib_source: str | list[str] | None = None  # overrides `source` for calibration
    eval_source: str | list[str] | None = None  # overrides `source` for evaluation
    calib_samples: int = pydantic.Field(64, ge=1)
    eval_samples: int = pydantic.Field(256, ge=1)
    seq_len: int = pydantic.Field(128, ge=2)  # tokens per text sample (a window for language models)
    stride: int | None = pydantic.Field(None, ge=1)  # language-model evaluation windows start every
    # `stride` tokens (default seq_len: disjoint); overlapping windows score only their new tokens
    image_size: int = pydantic.Field(224, ge=8)  # pixels per side for image models
    text_field: str = "text"  # column / key holding text in .csv / .jsonl
    label_field: str = "label"  # column / key holding labels, if any
    seed: int = 0


class EnergySpec(_Section):
    """The power and price model used when no energy counter can be read (an estimate)."""

    watts_per_core: float = pydantic.Field(5.0, gt=0)  # busy server core incl. share of uncore
    usd_per_core_hour: float = pydantic.Field(0.048, gt=0)  # one vCPU of an on-demand cloud VM


class EvalSpec(_Section):
    batch: int = pydantic.Field(8, ge=1)
    seq_len: int = pydantic.Field(128, ge=2)  # tokens per sample for latency runs
    threads: int = pydantic.Field(2, ge=1)
    warmup: int = pydantic.Field(5, ge=0)
    repeats: int = pydantic.Field(20, ge=3)  # timed runs per model, at least (krimp.eval.timing)
    timing_budget_s: float = pydantic.Field(30.0, gt=0)  # more rounds until the medians settle, up to this
    bootstrap: int = pydantic.Field(1000, ge=100)
    top_k: int = pydantic.Field(10, ge=1)  # retrieval agreement depth for embeddings
    energy: EnergySpec = EnergySpec()


class Goal(_Section):
    """An accuracy budget. Quality drop is absolute for accuracy (0.01 = one point), relative for
    perplexity (0.01 = +1%), and 1 - mean cosine for embedding models without labels."""

    max_quality_drop: float | None = pydantic.Field(None, ge=0)
    min_cosine: float | None = pydantic.Field(None, le=1)
    min_retrieval_agreement: float | None = pydantic.Field(None, ge=0, le=1)
    min_top1_agreement: float | None = pydantic.Field(None, ge=0, le=1)
    max_kl: float | None = pydantic.Field(None, ge=0)
    max_size_ratio: float | None = pydantic.Field(None, gt=0)
    min_speedup: float | None = pydantic.Field(None, gt=0)


class ExportSpec(_Section):
    formats: list[str] = pydantic.Field(default_factory=lambda: ["onnx"])

    @pydantic.field_validator("formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        from krimp.export.formats import known_formats

        known = known_formats()
        for f in v:  # checked when the recipe is read, not after an hour of stages
            if f not in known:
                hint = closest(f, known)
                raise ValueError(
                    f"unknown format '{f}'"
                    + (f"; did you mean '{hint}'?" if hint else "")
                    + f" (known: {', '.join(known)})"
                )
        return v

    opset: int = pydantic.Field(17, ge=17)
    rtol: float = pydantic.Field(1e-3, gt=0)  # allowed max |onnx - torch| / max |torch| after export
    # fuse BERT-like encoders (attention, layer norm, GELU) before ONNX stages: true, false, or "auto"
    # (keep the fused graph only where it runs faster than the plain one here, in float32)
    optimize: bool | Literal["auto"] = "auto"


class Recipe(_Section):
    model: str | None = None
    task: str | None = None  # embedding | classification | causal-lm | image-classification
    trust_remote_code: bool = False
    data: DataSpec = DataSpec()
    eval: EvalSpec = EvalSpec()
    goal: Goal = Goal()
    export: ExportSpec = ExportSpec()
    stages: list[Any] = pydantic.Field(default_factory=list)

    @pydantic.field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        from krimp.models.tasks import TASKS

        if v is not None and v not in TASKS:
            hint = closest(v, TASKS)
            raise ValueError(
                f"unknown task '{v}'" + (f"; did you mean '{hint}'?" if hint else "") + f" (known: {', '.join(TASKS)})"
            )
        return v

    @pydantic.field_validator("stages")
    @classmethod
    def _build_stages(cls, v: list[Any]) -> list[BaseConfig]:
        from krimp.methods import config_from_dict  # loads every method package: only when stages are read

        return [s if isinstance(s, BaseConfig) else config_from_dict(s, f"stages[{i}]") for i, s in enumerate(v)]

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude={"stages"})
        d["stages"] = [s.to_dict() for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise KrimpError(f"{where}: expected a mapping at the top level, got {type(d).__name__}")
        if "search" in d:
            raise KrimpError(f"{where} is a search recipe (it has a 'search:' section): run `krimp search {where}`")
        _check_keys(d, cls, where)
        try:
            return cls(**d)
        except pydantic.ValidationError as e:
            raise KrimpError(format_validation_error(e, where, cls.model_fields)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise KrimpError(f"recipe not found: {p}")
        try:
            d = yaml.safe_load(read_utf8(p))
        except yaml.YAMLError as e:
            raise KrimpError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(d or {}, where=p.name)


def _check_keys(d: dict, model: type[pydantic.BaseModel], where: str) -> None:
    """Walk nested sections so an unknown key is named with its full place."""
    for k, v in d.items():
        if k not in model.model_fields:
            raise KrimpError(unknown_key_message(str(k), where, model.model_fields))
        ann = model.model_fields[k].annotation
        if isinstance(ann, type) and issubclass(ann, _Section) and isinstance(v, dict):
            _check_keys(v, ann, f"{where}.{k}")
