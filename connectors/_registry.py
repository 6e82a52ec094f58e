"""Exact-name registry of connector classes; duplicates are errors, unknown names suggest near matches."""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from .errors import ConnectorOptionError

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
    check_connector(name, options)
    return _BUILDERS[name](in_dim=in_dim, out_dim=out_dim, **options)


def check_connector(name: str, options: dict[str, Any]) -> None:
    """Raise what ``create_connector`` would for an unknown name (KeyError) or option (ConnectorOptionError), with
    near matches; builds nothing, so a recipe can be checked before anything loads."""
    if name not in _BUILDERS:
        near = difflib.get_close_matches(name, list(_BUILDERS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise KeyError(f"unknown connector {name!r}.{hint} Known: {', '.join(sorted(_BUILDERS))}")
    try:
        parameters = inspect.signature(_BUILDERS[name]).parameters.values()
    except (TypeError, ValueError):  # no readable signature: the call itself will report a wrong option
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in ("in_dim", "out_dim")]
    for option in options:
        if option not in accepted:
            near = difflib.get_close_matches(option, accepted, n=1, cutoff=0.6)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConnectorOptionError(f"connector {name!r} has no option {option!r}.{hint} Its options: {', '.join(accepted) or '(none)'}")


def keeps_prefix(name: str, options: dict[str, Any] | None = None) -> bool:
    """Whether connector ``name`` with ``options`` maps a prefix of its input to a prefix of its output (see
    ``Connector``), without building it. A class says so with ``keeps_prefix = True``, or with a static method
    ``keeps_prefix(options)`` when it depends on them."""
    flag = getattr(_BUILDERS.get(name), "keeps_prefix", False)
    return bool(flag(dict(options or {}))) if callable(flag) else bool(flag)


def list_connectors() -> list[str]:
    return sorted(_BUILDERS)
