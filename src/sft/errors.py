"""The one exception type that means "the user gave us something wrong"."""


class SftError(Exception):
    """A user error: printed as one clear paragraph by the CLI, with a non-zero exit and no traceback.

    The message says what is wrong, where (file, line, row, key) and what was expected.
    """
