"""Typed, frozen method configs and the one visible registry that maps a config type to its method.

Every compression method has a config (a frozen pydantic model, validated on construction) and a
method object registered against it::

    @register(DynamicInt8Config)
    class DynamicInt8: ...

A recipe stage on disk is ``{"method": "int8-dynamic", ...fields}``;
:func:`krimp.methods.config_from_dict` turns it into the config and :meth:`BaseConfig.to_dict`
turns it back, so the two round-trip.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import pydantic

from krimp.errors import KrimpError, unknown_key_message

T = TypeVar("T")


def name_matches(names: str | Iterable[str], patterns: Iterable[str]) -> bool:
    """Whether any of ``names`` matches any of ``patterns`` (shell wildcards, case-sensitive): the one
    name matcher behind every ``targets`` / ``ignore`` / ``overrides`` pattern in a recipe."""
    names = (names,) if isinstance(names, str) else tuple(names)
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


class BaseConfig(pydantic.BaseModel):
    """Base of every method config: frozen, no unknown fields, validated when built.

    ``targets`` / ``ignore`` choose the layers a stage changes (a layer is in scope when a target
    pattern matches it and no ignore pattern does). A method that cannot choose layers sets
    ``honours_targets = False`` and then refuses any pattern at parse time.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    method: ClassVar[str] = ""
    #: "torch" methods change a torch module; "onnx" methods change an exported ONNX graph.
    domain: ClassVar[str] = "torch"
    #: what a model must have for this method, any one of (krimp.verbs.model_parts): "decoder_blocks"
    #: (layer-wise methods), "encoder_layers" (BERT-like), "transformer_layers" (known heads and FFN),
    #: "convolutions"; empty: any torch model
    needs: ClassVar[tuple[str, ...]] = ()

    honours_targets: ClassVar[bool] = True

    targets: list[str] = pydantic.Field(default_factory=lambda: ["*"])
    ignore: list[str] = pydantic.Field(default_factory=list)

    @pydantic.model_validator(mode="after")
    def _patterns_honoured(self):
        if not self.honours_targets and (self.targets != ["*"] or self.ignore):
            raise ValueError(
                f"'{self.method}' works on the whole model and cannot honour targets / ignore; remove them"
            )
        return self

    def wants(self, *names: str) -> bool:
        """Whether a layer known by any of ``names`` is in this stage's scope."""
        return name_matches(names, self.targets) and not name_matches(names, self.ignore)

    def select(
        self, layers: Mapping[str, T], what: str = "layer", alias: Callable[[str], str] | None = None
    ) -> dict[str, T]:
        """The ``layers`` (name -> anything) in scope, in order. A stage that would change nothing is an
        error naming the patterns and a few names that exist (with no patterns, every layer is in scope
        and nothing is refused). ``alias`` gives a second name to match."""
        if self.targets == ["*"] and not self.ignore:
            return dict(layers)  # no patterns: the method's own choice of layers stands
        out = {n: v for n, v in layers.items() if self.wants(n, *((alias(n),) if alias else ()))}
        if not out:
            some = ", ".join(list(layers)[:4])
            raise KrimpError(
                f"{self.method}: targets {self.targets} / ignore {self.ignore} match no {what} "
                + (f"of the {len(layers)} there are (e.g. {some})" if layers else "(the model has none)")
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.model_dump(mode="json")}


#: method name -> (config class, method class). The registry is this dict; nothing else hides one.
#: It fills as method modules are imported; :mod:`krimp.methods` imports them all.
REGISTRY: dict[str, tuple[type[BaseConfig], type]] = {}


def register(cfg_cls: type[BaseConfig]):
    """Register a method class against its config class (and the config's ``method`` name)."""

    def deco(method_cls: type) -> type:
        if not cfg_cls.method:
            raise TypeError(f"{cfg_cls.__name__} has no method name")
        REGISTRY[cfg_cls.method] = (cfg_cls, method_cls)
        return method_cls

    return deco


def format_validation_error(err: pydantic.ValidationError, where: str, fields: dict) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return unknown_key_message(str(first["loc"][-1]), where, fields)
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:  # a check of the whole stage: its message says what to change
        return f"{where}: {msg}"
    return f"{where}.{loc}: {msg} (got {first.get('input')!r})"
