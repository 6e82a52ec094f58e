"""mmdomain: build domain multimodal models from a pluggable encoder, a trainable connector and a local causal LM."""
from __future__ import annotations

__version__ = "0.1.0"
