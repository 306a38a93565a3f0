"""The one exception type that means "the user gave us something wrong", and the did-you-mean its messages use."""

import difflib


class SftError(Exception):
    """A user error: printed as one clear paragraph by the CLI, with a non-zero exit and no traceback.

    The message says what is wrong, where (file, line, row, key) and what was expected.
    """


def did_you_mean(word: str, options: list[str] | set[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `options`, or "" when none is close."""
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
