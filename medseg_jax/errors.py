"""The one exception type for user mistakes.

A `MedsegError` carries one line: what went wrong, which file or config key, and what to do. The CLI prints it and
exits with code 2 and no traceback. Any other exception is a bug and keeps its traceback.
"""


class MedsegError(Exception):
    """A problem with the user's input (file, dataset, config key), reported as one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
