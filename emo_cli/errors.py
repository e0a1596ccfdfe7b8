"""User-facing errors: one clear line, non-zero exit, no traceback."""


class EmoError(Exception):
    """A problem with the user's input or environment, reported as one line."""
