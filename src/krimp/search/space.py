"""A search space in YAML: a base recipe plus ``search:``, alternative stage lists with choices.

::

    model: builtin:smollm2
    data: {...}
    goal: {max_quality_drop: 0.05}      # the budget: a constraint on every trial
    search:
      objectives: [quality_drop, size, latency]
      candidates:                       # one is picked per trial (the parameter 'recipe')
        int8-dynamic: [{method: int8-dynamic}]
        rtn:  [{method: rtn,  bits: {choice: [3, 4, 8]}, group_size: {choice: [32, 128]}}]
        gptq: [{method: gptq, bits: {choice: [3, 4]},    group_size: {choice: [64, 128]}}]
      constraints:                      # combinations never worth a trial
        - {when: {gptq.0.bits: 3}, require: {gptq.0.group_size: [64]}}

A value ``{choice: [...]}`` is categorical; ``{low: a, high: b}`` (with ``step`` or ``log``) is numeric.
Parameters are named ``CANDIDATE.STAGE.FIELD`` (nested fields joined by dots).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import pydantic

from krimp.errors import KrimpError, unknown_key_message
from krimp.recipe import Recipe, find_recipe, read_recipe

OBJECTIVES = ("quality_drop", "size", "latency")


class Rule(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    when: dict[str, Any]
    require: dict[str, list[Any]]


class SearchSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    objectives: list[Literal["quality_drop", "size", "latency"]] = list(OBJECTIVES)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    candidates: dict[str, list[dict[str, Any]]] = pydantic.Field(default_factory=dict)
    constraints: list[Rule] = pydantic.Field(default_factory=list)
    remeasure: bool = True  # re-time front members whose latency was taken beside another worker


def _is_param(v: Any) -> bool:
    return isinstance(v, dict) and ("choice" in v or ("low" in v and "high" in v))


def _params(node: Any, prefix: str) -> dict[str, dict]:
    """Parameter name -> its spec, for every choice inside a stage template."""
    if _is_param(node):
        return {prefix: node}
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_params(v, f"{prefix}.{k}"))
    return out


def _fill(node: Any, prefix: str, values: dict[str, Any]) -> Any:
    if _is_param(node):
        return values[prefix]
    if isinstance(node, dict):
        return {k: _fill(v, f"{prefix}.{k}", values) for k, v in node.items()}
    return copy.deepcopy(node)


class Space:
    """The base recipe, the search settings, and how a trial's parameters become a recipe."""

    def __init__(self, base: dict, spec: SearchSpec, where: str = "search"):
        self.base, self.spec, self.where = base, spec, where
        if not spec.candidates:
            raise KrimpError(
                f"{where}: the search space is empty; add at least one entry under "
                "search.candidates (a name and its list of stages)"
            )
        self.params = {name: {} for name in spec.candidates}
        for name, stages in spec.candidates.items():
            if not isinstance(stages, list):
                raise KrimpError(f"{where}.candidates.{name}: expected a list of stages")
            for i, st in enumerate(stages):
                for p, ps in _params(st, f"{name}.{i}").items():
                    self.params[name][p] = self._check_param(p, ps)
        known = {p for d in self.params.values() for p in d}
        for r in spec.constraints:
            for p in list(r.when) + list(r.require):
                if p not in known:
                    raise KrimpError(unknown_key_message(p, f"{where}.constraints", known))
        for name in spec.candidates:  # every candidate's first point must be a valid recipe
            self.recipe(name, {p: self._first(ps) for p, ps in self.params[name].items()})

    def _check_param(self, p: str, ps: dict) -> dict:
        if "choice" in ps:
            if set(ps) != {"choice"} or not isinstance(ps["choice"], list) or not ps["choice"]:
                raise KrimpError(f"{self.where}: {p}: 'choice' needs a non-empty list and nothing beside it")
        elif not set(ps) <= {"low", "high", "step", "log"} or ps["low"] >= ps["high"]:
            raise KrimpError(f"{self.where}: {p}: a range needs low < high (and optionally step or log)")
        return ps

    @staticmethod
    def _first(ps: dict) -> Any:
        return ps["choice"][0] if "choice" in ps else ps["low"]

    def recipe(self, candidate: str, values: dict[str, Any]) -> dict:
        """The full recipe (a dict) for one point of the space; KrimpError if it is not valid."""
        stages = [_fill(st, f"{candidate}.{i}", values) for i, st in enumerate(self.spec.candidates[candidate])]
        d = {**copy.deepcopy(self.base), "stages": stages}
        Recipe.from_dict(d, where=f"{self.where}.candidates.{candidate}")
        return d

    def sample(self, trial) -> tuple[str, dict[str, Any]]:
        """(candidate, parameter values) suggested by an Optuna trial."""
        cand = trial.suggest_categorical("recipe", list(self.spec.candidates))
        values = {}
        for p, ps in self.params[cand].items():
            if "choice" in ps:
                values[p] = trial.suggest_categorical(p, ps["choice"])
            elif isinstance(ps["low"], int) and isinstance(ps["high"], int) and not ps.get("log"):
                values[p] = trial.suggest_int(p, ps["low"], ps["high"], step=ps.get("step") or 1)
            else:
                values[p] = trial.suggest_float(p, ps["low"], ps["high"], step=ps.get("step"), log=bool(ps.get("log")))
        return cand, values

    def violated(self, values: dict[str, Any]) -> str | None:
        """The first constraint these values break, said in words, or None."""
        for r in self.spec.constraints:
            if all(values.get(k) == v for k, v in r.when.items()):
                for k, allowed in r.require.items():
                    if k in values and values[k] not in allowed:
                        return f"{k}={values[k]} is not allowed when {r.when} (allowed: {allowed})"
        return None

    def fingerprint(self) -> str:
        """Identifies the space, so a study is never resumed with a different one."""
        blob = json.dumps({"base": self.base, "search": self.spec.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_space(path: str | Path) -> Space:
    p = find_recipe(path, "search recipe")
    d = read_recipe(p, "search recipe")
    if not isinstance(d, dict) or "search" not in d:
        raise KrimpError(f"{p.name}: a search recipe needs a 'search:' section with candidates")
    if d.get("stages"):
        raise KrimpError(f"{p.name}: put stages under search.candidates, not at the top level")
    raw = d.pop("search") or {}
    d.pop("stages", None)
    if not isinstance(raw, dict):
        raise KrimpError(f"{p.name}: 'search' must be a mapping")
    for k in raw:
        if k not in SearchSpec.model_fields:
            raise KrimpError(unknown_key_message(str(k), f"{p.name}.search", SearchSpec.model_fields))
    try:
        spec = SearchSpec(**raw)
    except pydantic.ValidationError as e:
        from krimp.config import format_validation_error

        raise KrimpError(format_validation_error(e, f"{p.name}.search", SearchSpec.model_fields)) from None
    base = Recipe.from_dict({**d, "stages": []}, where=p.name)  # the base alone must be valid
    if base.resources.max_memory is not None or base.resources.stream is True:
        raise KrimpError(
            f"{p.name}: krimp search times every trial, and a streamed run is not timed: drop "
            "resources.max_memory and resources.stream from a search recipe"
        )
    return Space(d, spec, f"{p.name}.search")
