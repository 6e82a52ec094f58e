"""Trainable connectors between an encoder and an LLM: tensors in, tensors out; imports neither encoders nor mmdomain.

    >>> from connectors import create_connector
    >>> proj = create_connector("mlp", in_dim=768, out_dim=896, depth=2)   # LLaVA-1.5's mlp2x_gelu
"""
from __future__ import annotations

from . import avg_pool, c_abstractor, depth_pool, frame_stack, ldp, linear, mlp, perceiver, pixel_shuffle, qformer  # noqa: F401  (registers the built-in connectors)
from ._registry import check_connector, create_connector, keeps_prefix, list_connectors, register_connector
from .base import Connector
from .errors import ConnectorOptionError

__all__ = ["Connector", "ConnectorOptionError", "check_connector", "create_connector", "keeps_prefix", "list_connectors", "register_connector"]
