"""Exact-name registry of encoder builders, with `family:spec` names for whole source libraries."""
from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from .errors import EncoderOptionError, UnknownEncoderError, UnknownOptionError


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., Any]
    description: str
    locate: Callable[..., Any] | None = None


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

    def register(self, name: str, builder: Callable[..., Any], *, family: bool = False, description: str = "",
                 locate: Callable[..., Any] | None = None) -> None:
        if not name or ":" in name:
            raise ValueError(f"encoder name {name!r} must be non-empty and must not contain ':' (':' separates a family from its spec)")
        table = self._families if family else self._exact
        if name in self._exact or name in self._families:
            raise ValueError(f"encoder {name!r} is already registered; pick another name (registered: {', '.join(self.names())})")
        table[name] = _Entry(builder, description, locate)

    def names(self) -> list[str]:
        return sorted(self._exact) + sorted(f"{f}:<spec>" for f in self._families)

    def describe(self) -> dict[str, str]:
        out = {n: e.description for n, e in sorted(self._exact.items())}
        out.update({f"{n}:<spec>": e.description for n, e in sorted(self._families.items())})
        return out

    def create(self, name: str, **options: Any) -> Any:
        builder, family_spec = self._find(name)
        self.check_options(name, options)
        return builder(**options) if family_spec is None else builder(family_spec, **options)

    def check_options(self, name: str, options: dict[str, Any]) -> None:
        """Refuse option names the builder of ``name`` does not take, before anything is built.

        The builder's signature is the list of options; a lazy builder's module is imported to read it (adapter
        modules import only torch at top level, never their library). A builder that takes ``**kwargs`` (timm's,
        which passes them to ``timm.create_model``) accepts any further name here; it reports one it cannot use
        when it builds. Unknown encoder names are left to ``create``, so a spec can be checked before a plugin
        registers its encoder.
        """
        try:
            builder, family_spec = self._find(name)
        except UnknownEncoderError:
            return
        accepted = _option_names(builder, skip_first=family_spec is not None)
        if accepted is None:
            return
        for option in options:
            if option not in accepted:
                near = difflib.get_close_matches(option, accepted, n=1, cutoff=0.6)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise UnknownOptionError(f"encoder {name!r} has no option {option!r}.{hint} "
                                         f"Its options: {', '.join(accepted) or '(none)'}")

    def check(self, name: str, options: dict[str, Any]) -> None:
        """Everything ``create`` would refuse before building: an unknown name, unknown options and, for a family with
        a ``locate`` function, a spec or weights file that does not exist, or a random tower not asked for. Reads
        configs and file headers only."""
        builder, family_spec = self._find(name)
        self.check_options(name, options)
        entry = self._exact.get(name) if family_spec is None else self._families[name.partition(":")[0]]
        if entry is not None and entry.locate is not None:
            entry.locate(name if family_spec is None else family_spec, **options)

    def _find(self, name: str) -> tuple[Callable[..., Any], str | None]:
        """(builder, spec): spec is None for an exact name, the part after ':' for a family name."""
        if name in self._exact:
            return self._exact[name].builder, None
        family, sep, spec = name.partition(":")
        if sep and family in self._families:
            if not spec:
                raise EncoderOptionError(f"encoder name {name!r} has an empty spec: write '{family}:<architecture or local path>'")
            return self._families[family].builder, spec
        candidates = list(self._exact) + [f"{f}:" for f in self._families]
        near = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
        if sep and not near:
            near = difflib.get_close_matches(family + ":", candidates, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise UnknownEncoderError(f"unknown encoder {name!r}.{hint} Known: {', '.join(self.names())}")


def _option_names(builder: Callable[..., Any], skip_first: bool) -> list[str] | None:
    """The keyword arguments ``builder`` takes, or None when it takes any (``**kwargs``) or cannot be inspected."""
    target = builder.resolve() if hasattr(builder, "resolve") else builder
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):  # e.g. a builtin without a signature: its call will report a wrong option
        return None
    if skip_first and parameters and parameters[0].kind is not inspect.Parameter.KEYWORD_ONLY:
        parameters = parameters[1:]  # a family builder's first argument is the spec, not an option
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def lazy(module: str, function: str) -> Callable[..., Any]:
    """A builder that imports its module on first use, so `import encoders` does not import timm or open_clip."""

    def resolve() -> Callable[..., Any]:
        return getattr(importlib.import_module(module), function)

    def build(*args: Any, **kwargs: Any) -> Any:
        return resolve()(*args, **kwargs)

    build.__qualname__ = f"{module}.{function}"
    build.resolve = resolve  # type: ignore[attr-defined]  # lets check_options read the real builder's signature
    return build


REGISTRY = EncoderRegistry()
