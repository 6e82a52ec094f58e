"""Adapter for any timm architecture (``timm:<arch>``), features taken through ``forward_intermediates``."""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ._checkpoint import describe_key_mismatch, diagnose_weights, existing_weights_file
from .base import EncoderInfo, as_pair, check_random_init, declared_license, fit_channels, layers_refused, random_init_refused, resolve_layer
from .errors import UnknownEncoderError, UnknownOptionError, WeightsFileError, WeightsMismatchError

# Options of build_timm_encoder that reach timm.create_model under another name.
_RENAMED = {"img_size": "image_size"}


class TimmEncoder(nn.Module):
    """Wraps a timm model pruned after the selected layer; ``forward`` returns ``[B, N, D]`` tokens."""

    def __init__(self, model: nn.Module, info: EncoderInfo, block_index: int, is_last: bool, keep_cls: bool) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self._block_index = block_index
        self._is_last = is_last
        self._keep_cls = keep_cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = {"return_prefix_tokens": True} if self._keep_cls else {}
        (out,) = self.model.forward_intermediates(
            x, indices=[self._block_index], norm=self._is_last, stop_early=True,
            output_fmt="NCHW", intermediates_only=True, **extra,
        )
        prefix = None
        if isinstance(out, tuple):
            out, prefix = out
        tokens = out.flatten(2).transpose(1, 2)
        return torch.cat([prefix, tokens], dim=1) if prefix is not None else tokens

    def layer_blocks(self) -> list[nn.Module]:
        """The blocks (stages for a CNN) ``forward`` runs, input to output: timm's ``feature_info`` names each unit
        ``layer`` counts (``blocks.3`` for a ViT, ``stages.2`` for a ConvNeXt)."""
        return [self.model.get_submodule(f["module"]) for f in list(self.model.feature_info)[: self._block_index + 1]]

    def output_norm(self) -> nn.Module | None:
        norm = getattr(self.model, "norm", None) if self._is_last else None  # forward_intermediates(norm=...) applies model.norm
        return norm if norm is not None and any(True for _ in norm.parameters()) else None


def locate_timm_weights(arch: str, *, weights: str | None = None, random_init: bool = False, layers: Any = None, **_: Any) -> Path | None:
    """The checked local weights file of ``timm:<arch>`` (None for a deliberately random tower), or the EncoderError
    building it would raise; builds nothing, so a recipe's encoder can be checked before anything loads."""
    import timm

    source = f"timm:{arch}"
    layers_refused(source, layers)
    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        raise UnknownEncoderError(f"timm has no architecture {arch!r}" + (f"; similar: {', '.join(near)}" if near else ""))
    check_random_init(source, random_init, weights is not None)
    if weights is None:
        if not random_init:
            raise random_init_refused(source, "no weights= was given", "weights=<local file>, e.g. model.safetensors from "
                                      f"`huggingface-cli download timm/{arch}.<tag> --local-dir DIR`")
        return None
    path = existing_weights_file(weights, "timm weights")
    # timm reads the file itself; check it first, so a refused pickle or a truncated file is named as such.
    problem = diagnose_weights(path)
    if problem:
        raise WeightsFileError(f"{source}: {problem}")
    return path


def build_timm_encoder(
    arch: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    layer: int = -1,
    layers: Any = None,
    keep_cls: bool = False,
    in_chans: int = 3,
    image_size: int | tuple[int, int] | None = None,
    license: str | None = None,
    **model_kwargs: Any,
) -> TimmEncoder:
    """``timm:<arch>`` with weights from a local file (``weights=``), or ``random_init=True`` for a random tower;
    never a download.

    ``in_chans`` other than 3 widens the patch embedding; with ``weights`` timm adapts the pretrained RGB kernel
    (``adapt_input_conv``: the RGB filters are repeated over the new channels and rescaled by 3/C, so the response to
    a grey input is unchanged). Extra keyword arguments go to ``timm.create_model``.
    """
    import timm

    source = f"timm:{arch}"
    path = locate_timm_weights(arch, weights=weights, random_init=random_init, layers=layers)
    kwargs: dict[str, Any] = dict(num_classes=0, in_chans=in_chans, **model_kwargs)
    if image_size is not None:
        kwargs["img_size"] = as_pair(image_size)
    if path is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    try:
        with _missing_keys_reported_by_timm() as missing:
            model = timm.create_model(arch, **kwargs)
    except TypeError as exc:
        # timm passes unknown keyword arguments on to the model class, which raises a bare TypeError.
        named = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if not (named or model_kwargs):
            raise
        option = _RENAMED.get(named.group(1), named.group(1)) if named else None
        what = f"the option {option!r}" if option else f"the options {sorted(model_kwargs)}"
        raise UnknownOptionError(
            f"{source} does not take {what} ({exc}). Every timm encoder takes weights, random_init, layer, keep_cls, "
            f"in_chans, image_size and license; any other option goes to timm.create_model and must be an argument of "
            f"{arch}'s model class"
        ) from exc
    except RuntimeError as exc:
        if path is None or "Error(s) in loading state_dict" not in str(exc):
            raise
        raise _mismatch(source, path, describe_key_mismatch(load_error=str(exc))) from exc

    num_layers = len(model.feature_info)
    block_index, is_last = resolve_layer(layer, num_layers, f"timm:{arch}")
    if not hasattr(model, "forward_intermediates"):
        raise UnknownEncoderError(f"timm:{arch} has no forward_intermediates; pick an architecture that supports feature extraction")
    # Drop the blocks after the selected one (and the final norm unless the last block is chosen): they would be
    # computed and held in memory for nothing.
    model.prune_intermediate_layers([block_index], prune_norm=not is_last, prune_head=True)
    # Only weights the pruned model still holds matter: a checkpoint may lack what was pruned away.
    kept = model.state_dict()
    missing = [k for k in missing if k in kept]
    if path is not None and missing:
        raise _mismatch(source, path, describe_key_mismatch(missing))

    feature = model.feature_info[block_index] if hasattr(model.feature_info, "__getitem__") else None
    embed_dim = int(feature["num_chs"]) if feature else int(model.num_features)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "patch_size"):
        patch = as_pair(model.patch_embed.patch_size)
    else:
        patch = as_pair(int(feature["reduction"]))
    cfg = timm.data.resolve_model_data_config(model)
    # The pretrained config states the size the weights were trained at; an explicit image_size overrides it.
    input_size = as_pair(image_size) if image_size is not None else tuple(int(s) for s in cfg["input_size"][-2:])
    info = EncoderInfo(
        modality="image",
        embed_dim=embed_dim,
        input_size=input_size,
        patch_size=patch,
        channels=in_chans,
        mean=fit_channels(tuple(cfg["mean"]), in_chans),
        std=fit_channels(tuple(cfg["std"]), in_chans),
        source=f"timm:{arch}",
        # Not timm's pretrained_cfg licence: that describes timm's release of the weights, not the user's file.
        license=declared_license(license, path is not None),
        layer=layer,
        num_prefix_tokens=num_prefix if keep_cls else 0,
        weights=str(path) if path is not None else None,
    )
    return TimmEncoder(model, info, block_index, is_last, keep_cls)


def _mismatch(source: str, path: Any, what: str) -> WeightsMismatchError:
    return WeightsMismatchError(
        f"{source}: weights file {str(path)!r} does not fit the architecture: {what}. Check that the file is a "
        f"checkpoint of {source.partition(':')[2]} (the timm model name it was saved from), with the same options "
        "(e.g. in_chans, image_size, or extra model arguments)"
    )


class _MissingKeysFilter(logging.Filter):
    """Reads timm's "Missing keys (...) discovered" record, and lets through only records that would have been shown."""

    def __init__(self, shown_from: int) -> None:
        super().__init__()
        self.shown_from = shown_from
        self.missing: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        found = re.match(r"Missing keys \((.*)\) discovered", record.getMessage())
        if found:
            self.missing.extend(k for k in found.group(1).split(", ") if k)
        return record.levelno >= self.shown_from


@contextmanager
def _missing_keys_reported_by_timm() -> Iterator[list[str]]:
    """The keys timm reports missing after loading a pretrained file.

    With ``num_classes=0`` timm loads non-strictly (the classifier is dropped), so a checkpoint of another
    architecture "loads" into a model that stays random; timm says so only in an INFO record
    (``timm.models._builder.load_pretrained``). The logger is opened to INFO for this call, and a filter collects
    that record while passing on only what the logger would have shown anyway.
    """
    logger = logging.getLogger("timm.models._builder")
    level = logger.level
    keys = _MissingKeysFilter(logger.getEffectiveLevel())
    logger.addFilter(keys)
    logger.setLevel(min(logging.INFO, keys.shown_from))
    missing: list[str] = []
    try:
        yield missing
    finally:
        logger.setLevel(level)
        logger.removeFilter(keys)
        missing.extend(keys.missing)
