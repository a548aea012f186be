"""The one exception type users see: a sentence naming the input and the fix, no traceback."""


class PipelineError(Exception):
    """A problem with the user's input or run directory; the CLI prints it as one line."""


class TrainingStopped(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run can be resumed."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"stopped at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of a library's (often multi-line) error message, for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
