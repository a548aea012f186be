"""Answers measured once per machine and kept: a small JSON file under the user's cache
($XDG_CACHE_HOME/pipeline/machine.json, else ~/.cache/...), keyed by what makes the answer hold
(the CPU model and instruction set, the torch version, the thing measured). A second run on the
same machine reuses the answer instead of racing a timer again, so its results are the same."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from pipeline.artifacts import write_json_atomic


def record_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "pipeline" / "machine.json"


def machine_key() -> str:
    """The CPU model, torch's kernel level for it and the torch version."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def read_cache(path: Path) -> dict:
    """A JSON cache file ({} when it is missing or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, record: dict) -> None:
    """Write a JSON cache file atomically; one that cannot be written only costs a recomputation."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    except OSError:
        pass


def recall(what: str):
    """The answer kept for `what` on this machine, or None."""
    return read_cache(record_path()).get(machine_key(), {}).get(what)


def remember(what: str, answer) -> None:
    record = read_cache(record_path())
    record.setdefault(machine_key(), {})[what] = answer
    write_cache(record_path(), record)
