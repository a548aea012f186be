"""One pipeline process per run directory: `<run>/.lock` holds the owner's pid, host and start time.

A second process on the same run is refused with who holds it. A lock left by a process that is
gone (same host, pid not alive) is taken over, so a kill -9 never blocks the next run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.owner, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
            return self
        raise PipelineError(f"could not take the lock {self.path}; remove it if no pipeline is running there.")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), holder["host"]
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, -1, self.owner["host"]  # unreadable: a lock cut short by a crash
        if host == self.owner["host"] and (pid < 0 or not _alive(pid)):
            log.warning("taking over %s left by process %s, which is gone", self.path, pid)
            self.path.unlink(missing_ok=True)
            return
        raise PipelineError(
            f"{self.path.parent} is in use by pipeline process {pid} on {host} since {holder.get('started', '?')}; "
            f"wait for it to finish, pick another run.name, or delete {self.path} if that process is gone."
        )

    def __exit__(self, *exc):
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        return False
