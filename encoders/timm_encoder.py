"""Adapter for any timm architecture (``timm:<arch>``), features taken through ``forward_intermediates``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import EncoderInfo, as_pair, fit_channels, resolve_layer


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


def build_timm_encoder(
    arch: str,
    *,
    weights: str | None = None,
    layer: int = -1,
    keep_cls: bool = False,
    in_chans: int = 3,
    image_size: int | tuple[int, int] | None = None,
    license: str | None = None,
    **model_kwargs: Any,
) -> TimmEncoder:
    """``timm:<arch>``: random init, or weights from a local file (``weights=``); never a download.

    ``in_chans`` other than 3 widens the patch embedding; with ``weights`` timm adapts the pretrained RGB kernel
    (``adapt_input_conv``: the RGB filters are repeated over the new channels and rescaled by 3/C, so the response to
    a grey input is unchanged). Extra keyword arguments go to ``timm.create_model``.
    """
    import timm

    if not timm.is_model(arch):
        near = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        raise KeyError(f"timm has no architecture {arch!r}" + (f"; similar: {', '.join(near)}" if near else ""))
    kwargs: dict[str, Any] = dict(num_classes=0, in_chans=in_chans, **model_kwargs)
    if image_size is not None:
        kwargs["img_size"] = as_pair(image_size)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"timm weights {str(path)!r} do not exist. mmdomain never downloads: save the checkpoint locally "
                "(e.g. model.safetensors from the model's page) and pass its path as weights="
            )
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model = timm.create_model(arch, **kwargs)

    num_layers = len(model.feature_info)
    block_index, is_last = resolve_layer(layer, num_layers, f"timm:{arch}")
    if not hasattr(model, "forward_intermediates"):
        raise TypeError(f"timm:{arch} has no forward_intermediates; pick an architecture that supports feature extraction")
    # Drop the blocks after the selected one (and the final norm unless the last block is chosen): they would be
    # computed and held in memory for nothing.
    model.prune_intermediate_layers([block_index], prune_norm=not is_last, prune_head=True)

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
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    info = EncoderInfo(
        modality="image",
        embed_dim=embed_dim,
        input_size=input_size,
        patch_size=patch,
        channels=in_chans,
        mean=fit_channels(tuple(cfg["mean"]), in_chans),
        std=fit_channels(tuple(cfg["std"]), in_chans),
        source=f"timm:{arch}",
        license=license or (pretrained_cfg.get("license") if weights else None) or ("see the weights' model card" if weights else "n/a (random init)"),
        layer=layer,
        num_prefix_tokens=num_prefix if keep_cls else 0,
    )
    return TimmEncoder(model, info, block_index, is_last, keep_cls)
