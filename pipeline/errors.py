"""The one exception type users see: a sentence naming the input and the fix, no traceback."""


class PipelineError(Exception):
    """A problem with the user's input or run directory; the CLI prints it as one line."""
