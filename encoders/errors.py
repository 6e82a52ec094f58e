"""The errors raised while building an encoder: one base, ``EncoderError``, whose messages name the thing and the fix.

Each subclass also keeps the built-in type that the same failure raised before these classes existed (``KeyError``
for an unknown name, ``FileNotFoundError`` for a missing local path, ``TypeError`` for an unknown option,
``ValueError`` for a value that cannot be used), so code that catches the old type keeps working.
"""
from __future__ import annotations


class EncoderError(Exception):
    """An encoder that cannot be built from what the user gave; the message says what and how to fix it."""


class UnknownEncoderError(EncoderError, KeyError):
    """A name that no registry entry, library or adapter can build (an encoder, architecture or model type)."""

    def __str__(self) -> str:
        # KeyError's own str() wraps the message in quotes, as if it were a dictionary key.
        return str(self.args[0]) if self.args else ""


class EncoderNotFoundError(EncoderError, FileNotFoundError):
    """A local model directory or weights file that does not exist, or is not what the encoder needs."""


class EncoderOptionError(EncoderError, ValueError):
    """An option whose value cannot be used (a layer out of range, options that contradict each other)."""


class UnknownOptionError(EncoderError, TypeError, ValueError):
    """An option the encoder's builder does not take. ``TypeError`` as for any unexpected keyword argument;
    ``ValueError`` too, so a schema validator (pydantic) reports it as a bad value instead of crashing."""


class RandomInitError(EncoderError, ValueError):
    """The encoder would start from random weights and the user did not ask for that with ``random_init=True``."""


class WeightsFileError(EncoderError, ValueError):
    """A weights file that cannot be read: a pickle torch refuses to load, a truncated or corrupt file."""


class WeightsMismatchError(EncoderError, ValueError):
    """Weights that read fine but do not fit the architecture: keys missing or of another shape."""


__all__ = [
    "EncoderError", "EncoderNotFoundError", "EncoderOptionError", "RandomInitError", "UnknownEncoderError",
    "UnknownOptionError", "WeightsFileError", "WeightsMismatchError",
]
