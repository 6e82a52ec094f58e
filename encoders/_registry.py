"""Exact-name registry of encoder builders, with `family:spec` names for whole source libraries."""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., Any]
    description: str


class EncoderRegistry:
    """Maps names to builder functions.

    Two kinds of entries:
    - exact names (``"tiny-vit"``): ``builder(**options)``;
    - families (``"timm"``), addressed as ``"timm:<spec>"``: ``builder(spec, **options)``, where the spec is an
      architecture name or a local path that the family understands.
    Registering a name twice is an error, so a plugin can never silently replace a built-in.
    """

    def __init__(self) -> None:
        self._exact: dict[str, _Entry] = {}
        self._families: dict[str, _Entry] = {}

    def register(self, name: str, builder: Callable[..., Any], *, family: bool = False, description: str = "") -> None:
        if not name or ":" in name:
            raise ValueError(f"encoder name {name!r} must be non-empty and must not contain ':' (':' separates a family from its spec)")
        table = self._families if family else self._exact
        if name in self._exact or name in self._families:
            raise ValueError(f"encoder {name!r} is already registered; pick another name (registered: {', '.join(self.names())})")
        table[name] = _Entry(builder, description)

    def names(self) -> list[str]:
        return sorted(self._exact) + sorted(f"{f}:<spec>" for f in self._families)

    def describe(self) -> dict[str, str]:
        out = {n: e.description for n, e in sorted(self._exact.items())}
        out.update({f"{n}:<spec>": e.description for n, e in sorted(self._families.items())})
        return out

    def create(self, name: str, **options: Any) -> Any:
        if name in self._exact:
            return self._exact[name].builder(**options)
        family, sep, spec = name.partition(":")
        if sep and family in self._families:
            if not spec:
                raise ValueError(f"encoder name {name!r} has an empty spec: write '{family}:<architecture or local path>'")
            return self._families[family].builder(spec, **options)
        candidates = list(self._exact) + [f"{f}:" for f in self._families]
        near = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
        if sep and not near:
            near = difflib.get_close_matches(family + ":", candidates, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise KeyError(f"unknown encoder {name!r}.{hint} Known: {', '.join(self.names())}")


def lazy(module: str, function: str) -> Callable[..., Any]:
    """A builder that imports its module on first use, so `import encoders` does not import timm or open_clip."""

    def build(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    build.__qualname__ = f"{module}.{function}"
    return build


REGISTRY = EncoderRegistry()
