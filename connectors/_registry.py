"""Exact-name registry of connector classes; duplicates are errors, unknown names suggest near matches."""
from __future__ import annotations

import difflib
from typing import Any, Callable

_BUILDERS: dict[str, Callable[..., Any]] = {}


def register_connector(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: ``@register_connector("mlp")``. The class takes ``in_dim``, ``out_dim`` and its options."""

    def add(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _BUILDERS:
            raise ValueError(f"connector {name!r} is already registered (by {_BUILDERS[name].__qualname__}); pick another name")
        _BUILDERS[name] = builder
        return builder

    return add


def create_connector(name: str, *, in_dim: int, out_dim: int, **options: Any) -> Any:
    """Build a connector. ``in_dim`` comes from the encoder and ``out_dim`` from the LLM (mmdomain fills both)."""
    if name not in _BUILDERS:
        near = difflib.get_close_matches(name, list(_BUILDERS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise KeyError(f"unknown connector {name!r}.{hint} Known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](in_dim=in_dim, out_dim=out_dim, **options)


def keeps_prefix(name: str) -> bool:
    """Whether connector ``name`` maps a prefix of its input to a prefix of its output (see ``Connector``), without
    building it."""
    return bool(getattr(_BUILDERS.get(name), "keeps_prefix", False))


def list_connectors() -> list[str]:
    return sorted(_BUILDERS)
