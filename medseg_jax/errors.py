"""The one exception type for user mistakes.

A `MedsegError` carries one line: what went wrong, which file or config key, and what to do. The CLI prints it and
exits with code 2 and no traceback. Any other exception is a bug and keeps its traceback.
"""


class MedsegError(Exception):
    """A problem with the user's input (file, dataset, config key), reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


_MAX_ERROR_DETAIL = 200


def short_error(error: BaseException) -> str:
    """An exception as one short line (its type and message, whitespace folded, cut at 200 characters), to end a
    MedsegError about a file that a library could not read."""
    text = " ".join(str(error).split()) or "no details"
    if len(text) > _MAX_ERROR_DETAIL:
        text = text[:_MAX_ERROR_DETAIL] + "..."
    return f"{type(error).__name__}: {text}"
