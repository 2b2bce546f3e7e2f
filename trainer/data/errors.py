class DataError(ValueError):
    """A dataset problem; the message names the file or folder."""
