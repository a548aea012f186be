"""Training checkpoints: `checkpoints/step_NNNNNN/` = accelerate state + trainer_state.json.

A checkpoint is written into `.tmp-step_NNNNNN/`, its files are checksummed into
`trainer_state.json`, and only then renamed into place. On resume the newest checkpoint whose
files match their checksums and whose fingerprint matches this run's config is used; a damaged
one is skipped with a warning, so a kill -9 mid-save never costs more than one interval.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from pipeline.artifacts import list_files, verify_files, write_json_atomic

log = logging.getLogger("pipeline")
STATE_FILE = "trainer_state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def write_checkpoint_state(tmp: Path, final: Path, state: dict, keep: int) -> None:
    """Main process, after every rank has saved into `tmp`: seal, publish, prune old ones."""
    state = dict(state, files=list_files(tmp))
    write_json_atomic(tmp / STATE_FILE, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(final.parent.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_valid_state(ckpt: Path, fingerprint: str) -> dict | None:
    """trainer_state of an intact checkpoint of this run, else None (with the reason logged)."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError):
        log.warning("checkpoint %s has no readable %s; skipping it", ckpt, STATE_FILE)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s belongs to a different config; skipping it", ckpt)
        return None
    problem = verify_files(ckpt, state.get("files", {}))
    if problem:
        log.warning("checkpoint %s is damaged (%s); falling back to an older one", ckpt, problem)
        return None
    return state


def latest_checkpoint(root: Path, fingerprint: str) -> tuple[Path, dict] | None:
    for ckpt in sorted(root.glob("step_*"), reverse=True):
        state = read_valid_state(ckpt, fingerprint)
        if state is not None:
            return ckpt, state
    return None


def clear_temps(root: Path) -> None:
    for tmp in root.glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
