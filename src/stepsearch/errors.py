"""User-facing errors: raised for bad input, printed by the CLI as one clear line (no traceback)."""


class StepSearchError(Exception):
    """An error the user can fix (bad file, bad field, bad flag). The message says how."""


class ConfigError(StepSearchError, ValueError):
    """A setting has a value outside its allowed set (named in the message)."""


class DataError(StepSearchError):
    """Bad input data: the message names the file, the line or field, and the reason."""


class RetrievalError(StepSearchError):
    """The retriever or its index cannot serve the request."""


class JavaNotFoundError(StepSearchError):
    """No Java >= 21 runtime could be found for Pyserini."""
