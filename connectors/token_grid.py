"""Square token grids: the side of a grid from a token count (refused with the fix when it is not one), and the
reshapes between ``[B, N, D]`` tokens and ``[B, D, side, side]`` maps that the grid connectors convolve and pool."""
from __future__ import annotations

import math

import torch

from .errors import ConnectorOptionError


def square_side(num_tokens: int, connector: str) -> int:
    """The side of the square grid ``num_tokens`` tokens form, or a ConnectorOptionError saying why they do not."""
    side = math.isqrt(num_tokens)
    if num_tokens < 1 or side * side != num_tokens:
        raise ConnectorOptionError(
            f"{connector} needs a square token grid; got {num_tokens} tokens, which is no square (a CLS or register token "
            "in front of the patches makes it one more: drop it with the encoder option keep_cls=False, or change the input size)"
        )
    return side


def to_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """``[B, side*side, D]`` row-major tokens -> ``[B, D, side, side]``."""
    b, _, d = tokens.shape
    return tokens.transpose(1, 2).reshape(b, d, side, side)


def to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``[B, D, H, W]`` -> ``[B, H*W, D]`` row-major tokens."""
    return feature_map.flatten(2).transpose(1, 2)
