"""User-facing errors: one clear line, non-zero exit, no traceback."""


class EmoError(Exception):
    """A problem with the user's input or environment, reported as one line. Messages quote
    untrusted text (tensor names, file fields), so line breaks in it are shown escaped."""

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))
