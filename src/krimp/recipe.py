"""Recipes: an ordered list of compression stages plus data, evaluation, goal and export settings.

A recipe is YAML on disk and the same thing in Python::

    model: builtin:minilm
    data: {source: builtin:python-docs, calib_samples: 128, eval_samples: 512}
    goal: {max_quality_drop: 0.01, min_cosine: 0.99}
    stages:
      - method: int8-dynamic
        per_channel: true
        ignore: ["*embeddings*"]

Unknown keys are reported with their place and the closest valid key. Recipes shipped with krimp
(``src/krimp/recipes/``, inside the installed package) are named without a path or suffix:
``krimp compress minilm-int8 --out runs/x``; ``krimp recipes`` lists them.
"""

from __future__ import annotations

from importlib.resources import files
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
    text_field: str = "text"  # column / key holding text in .csv / .jsonl / .parquet
    # how a .txt file is cut into items: one per line, or per blank-line-separated paragraph
    # (default: lines; paragraphs for a language model, which reads running text)
    text_unit: Literal["line", "paragraph"] | None = None
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
    # where ONNX models are measured, the goal checked and the fallback ranked: ONNX Runtime, or
    # OpenVINO (the ONNX file compiled for its CPU plugin; export.formats: [openvino] writes its IR)
    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    # OpenVINO's inference precision: f32, or bf16 on CPUs with bf16 instructions (faster, not float32's
    # results); ONNX Runtime computes in the graph's own types
    precision: Literal["f32", "bf16"] = "f32"
    warmup: int = pydantic.Field(5, ge=0)
    repeats: int = pydantic.Field(20, ge=3)  # timed runs per model, at least (krimp.eval.timing)
    timing_budget_s: float = pydantic.Field(30.0, gt=0)  # more rounds until the medians settle, up to this
    bootstrap: int = pydantic.Field(1000, ge=100)
    top_k: int = pydantic.Field(10, ge=1)  # retrieval agreement depth for embeddings
    energy: EnergySpec = EnergySpec()

    @pydantic.model_validator(mode="after")
    def _precision_on_openvino(self):
        if self.precision != "f32" and self.runtime != "openvino":
            raise ValueError("eval.precision bf16 is OpenVINO's setting: add eval.runtime: openvino, or leave it out")
        return self


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
    # the MLX folder's scales and float tensors: float16 (Apple silicon's native type, mlx_lm's usual) or
    # float32 (exact, and the fast type of MLX on a Linux CPU, whose float16 quantized kernels are ~50x slower)
    mlx_dtype: Literal["float16", "float32"] = "float16"
    # the GenAI folder's MatMulNBits accuracy_level: 4 (the model builder's CPU default: activations rounded
    # to int8 inside the op, fastest) or 1 (float32 activations: the folder computes krimp's model exactly)
    genai_accuracy_level: Literal[1, 2, 3, 4] = 4


class ResourcesSpec(_Section):
    """What the run may use of the machine. ``max_memory`` (``8GB``, ``3.5GiB``): the run is planned to
    stay under it: in memory when it fits, else streamed block by block (``stream: auto``; layer-wise
    weight-only methods on a Hugging Face folder: krimp.models.lazy), else refused before it starts
    with the estimate. ``stream: true`` streams whatever the budget."""

    max_memory: str | int | None = None
    stream: bool | Literal["auto"] = "auto"
    # where calibration runs: auto (a CUDA GPU when there is one), cpu, cuda, cuda:N
    device: str = "auto"

    @pydantic.field_validator("max_memory")
    @classmethod
    def _size(cls, v):
        from krimp.budget import parse_bytes

        if v is not None and parse_bytes(v) <= 0:
            raise ValueError("must be more than 0")
        return v

    @pydantic.field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"'{v}' is not a device: auto, cpu, cuda or cuda:N")
        return v


class Recipe(_Section):
    model: str | None = None
    task: str | None = None  # embedding | classification | causal-lm | image-classification
    trust_remote_code: bool = False
    data: DataSpec = DataSpec()
    eval: EvalSpec = EvalSpec()
    goal: Goal = Goal()
    export: ExportSpec = ExportSpec()
    resources: ResourcesSpec = ResourcesSpec()
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

    @pydantic.model_validator(mode="after")
    def _gguf_types_go_to_gguf(self):
        typed = [s for s in self.stages if getattr(s, "gguf_type", None)]
        other = [f for f in self.export.formats if f != "gguf"]
        if typed and (other or "gguf" not in self.export.formats):  # checked when read, not after the stages
            where = f"not {', '.join(other)}" if other else "and the recipe exports none"
            raise ValueError(
                f"stage {typed[0].method} has gguf_type {typed[0].gguf_type}: llama.cpp's types go to GGUF only, "
                f"{where}: set export.formats: [gguf]"
            )
        return self

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
        """A recipe file, or a shipped recipe by name (``minilm-int8``)."""
        p = find_recipe(path)
        return cls.from_dict(read_recipe(p), where=p.name)


_SECTIONS = ("data", "eval", "goal", "export", "resources")


def read_recipe(name: str | Path, what: str = "recipe") -> dict[str, Any]:
    """The mapping in a recipe file (a path, or a shipped recipe's name), not yet validated."""
    p = find_recipe(name, what)
    try:
        d = yaml.safe_load(read_utf8(p))
    except yaml.YAMLError as e:
        raise KrimpError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return d or {}


def parse_value(text: str) -> Any:
    """A setting given on the command line, read as YAML reads it (4, 0.5, true, [a, b], null), except
    that ``2:4`` stays a string (YAML 1.1 would read it as a base-60 number)."""
    if ":" in text and not text.lstrip().startswith(("[", "{")):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_settings(d: dict[str, Any], settings: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """A copy of recipe mapping ``d`` with ``settings`` applied: ``section.key`` (``data.seq_len``,
    ``goal.max_quality_drop``, ``eval.energy.watts_per_core``) or a top-level key (``model``, ``task``)
    sets that place; a bare field name (``bits``, ``damp``) sets it in every stage whose method has it,
    and is an error when none has."""
    import copy

    from krimp.methods import REGISTRY

    d = copy.deepcopy(d)
    for key, value in settings.items():
        head, _, rest = key.partition(".")
        if head in Recipe.model_fields and head != "stages":
            if not rest:
                d[head] = value
                continue
            node = d.setdefault(head, {}) if isinstance(d.get(head), dict) or head not in d else None
            if node is None:
                raise KrimpError(f"{where}: cannot set {key}: '{head}' is not a section")
            *path, last = rest.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
            continue
        stages = [s for s in d.get("stages") or [] if isinstance(s, dict)]
        known = {s.get("method"): REGISTRY[s["method"]][0].model_fields for s in stages if s.get("method") in REGISTRY}
        hit = [s for s in stages if key in known.get(s.get("method"), {})]
        if not hit:
            names = ", ".join(map(str, known)) or "none"
            fields = sorted({f for fs in known.values() for f in fs} | {f"{k}.*" for k in _SECTIONS})
            hint = closest(key, fields)
            raise KrimpError(
                f"{where}: no stage has a setting '{key}' (stages: {names})"
                + (f"; did you mean '{hint}'?" if hint else f"; settings there are: {', '.join(fields)}")
            )
        for s in hit:
            s[key] = value
    return d


#: the recipes that come with krimp, inside the installed package
RECIPES_DIR = Path(str(files("krimp") / "recipes"))


def shipped_recipes() -> dict[str, Path]:
    """The recipes that come with krimp: name -> file."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """What a recipe does: the first sentence of the comment at its top."""
    words = []
    for line in read_utf8(path).splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text or text.startswith("krimp "):
            break
        words.append(text)
    first = " ".join(words)
    end = first.find(". ")
    first = first if end < 0 else first[: end + 1]
    return first if len(first) <= 120 else first[:117].rsplit(" ", 1)[0].rstrip(",;:(") + " ..."


def find_recipe(name: str | Path, what: str = "recipe") -> Path:
    """A recipe file: ``name`` as a path when it is one, else a recipe shipped with krimp by name
    (``minilm-int8``); one clear line when it is neither."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = shipped_recipes()
    if p.parent == Path(".") and p.suffix in ("", ".yaml") and p.stem in shipped and not p.exists():
        return shipped[p.stem]
    if p.is_dir():
        raise KrimpError(f"{what} {p} is a folder; give a YAML file or the name of a shipped recipe")
    hint = closest(p.stem, shipped) if p.parent == Path(".") else None
    extra = f"; did you mean '{hint}'?" if hint else " (`krimp recipes` lists the shipped ones)"
    raise KrimpError(f"{what} not found: {p} is not a file nor a recipe shipped with krimp{extra}")


def _check_keys(d: dict, model: type[pydantic.BaseModel], where: str) -> None:
    """Walk nested sections so an unknown key is named with its full place."""
    for k, v in d.items():
        if k not in model.model_fields:
            raise KrimpError(unknown_key_message(str(k), where, model.model_fields))
        ann = model.model_fields[k].annotation
        if isinstance(ann, type) and issubclass(ann, _Section) and isinstance(v, dict):
            _check_keys(v, ann, f"{where}.{k}")
