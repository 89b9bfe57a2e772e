"""The data package's error type, on its own so that every data module can raise it."""


class DataError(ValueError):
    """Bad dataset input; the message names the file and row/field at fault."""
