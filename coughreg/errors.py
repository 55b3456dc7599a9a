"""The one exception type users see: every message names the file, key or URI at fault."""


class CoughPipelineError(Exception):
    """An error the user can fix: a bad config key, a missing file, a bad URI, a corrupt input."""


class ConfigError(CoughPipelineError):
    """The experiment config is wrong: the message names the file and the key."""


class StorageError(CoughPipelineError):
    """Object storage or a local path could not be read or written: the message names the URI."""


class AudioDecodeError(CoughPipelineError):
    """A recording could not be decoded: the message names the file."""
