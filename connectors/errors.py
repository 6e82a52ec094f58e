"""The error connectors raise for an option that is wrong or does not fit the encoder's tokens: the user's to fix
(the message names the option and the fix), not a defect, so the CLI reports it as one line."""
from __future__ import annotations


class ConnectorOptionError(ValueError):
    """A connector option that is unknown, out of range, or does not fit the encoder's token grid."""
