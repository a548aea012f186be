"""Stopping cleanly: SIGTERM (a scheduler's time limit) or Ctrl-C ends training at a step boundary."""

from __future__ import annotations

import signal


class StopSignal:
    """Remember SIGTERM/SIGINT; the loop checkpoints and stops at the next step boundary."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
