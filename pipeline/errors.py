"""The one exception type users see: a sentence naming the input and the fix, no traceback."""


class PipelineError(Exception):
    """A problem with the user's input or run directory; the CLI prints it as one line."""


class TrainingStopped(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved and the run can be resumed."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"stopped at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint
