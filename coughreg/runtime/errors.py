"""The one exception type users see: every message names the file, key or URI at fault.

The base class and the audio error live with the scoring package (``coughreg.scoring.errors``),
which runs on its own inside every scorer folder; they are the same classes here.
"""

from coughreg.scoring.errors import AudioDecodeError, CoughPipelineError

__all__ = ["AudioDecodeError", "ConfigError", "CoughPipelineError", "StorageError"]


class ConfigError(CoughPipelineError):
    """The experiment config is wrong: the message names the file and the key."""


class StorageError(CoughPipelineError):
    """Object storage or a local path could not be read or written: the message names the URI."""
