"""The errors a person can act on: every message names the file, key or URI at fault."""


class CoughPipelineError(Exception):
    """An error the user can fix: a bad config key, a missing file, a bad URI, a corrupt input."""


class AudioDecodeError(CoughPipelineError):
    """A recording could not be decoded: the message names the file."""
