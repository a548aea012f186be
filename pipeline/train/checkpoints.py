"""Training checkpoints: `checkpoints/step_NNNNNN/` = accelerate state + trainer_state.json.

A checkpoint is written into `.tmp-step_NNNNNN/`, its files are checksummed into
`trainer_state.json`, and only then renamed into place (`seal`). On resume the newest checkpoint
whose files match their checksums and whose fingerprint matches this run's config is used; a
damaged one is skipped with a warning, so a kill -9 mid-save never costs more than one interval.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from pipeline.artifacts import list_files, verify_files, write_json_atomic
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")
STATE_FILE = "trainer_state.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def seal(tmp: Path, final: Path, state: dict, keep: int) -> None:
    """Main process, after every rank has saved into `tmp`: checksum, publish, prune old ones."""
    state = dict(state, files=list_files(tmp))
    write_json_atomic(tmp / STATE_FILE, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Only this run's own: another config's checkpoints (a run with other settings in the same
    # dir) are not this run's to prune, and must not push its fresh ones out by sorting later.
    # The newest one where a wsd cooldown began stays too: an extended run resumes there.
    states = {c: state_of(c) for c in sorted(final.parent.glob("step_*"))}
    mine = [c for c, s in states.items() if s.get("fingerprint") == state["fingerprint"]]
    pinned = [c for c in mine if states[c].get("cooldown_start")][-1:]
    prunable = [c for c in mine if c not in pinned]
    for old in prunable[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def state_of(ckpt: Path) -> dict:
    """A checkpoint's trainer_state, files not verified ({} if unreadable)."""
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def fingerprint_of(ckpt: Path) -> str | None:
    """The fingerprint a checkpoint was written under (None if unreadable)."""
    return state_of(ckpt).get("fingerprint")


def save(strategy, root: Path, state: dict, keep: int, previous: Path | None) -> Path:
    """Write checkpoint `state["step"]` (every rank calls this); returns its directory."""
    final = step_dir(root, state["step"])
    tmp = final.with_name(".tmp-" + final.name)
    strategy.wait()
    try:
        strategy.save_state(tmp)
        strategy.wait()
        if strategy.is_main:
            seal(tmp, final, state, keep)
    except OSError as e:  # disk full, quota, permissions: keep what is already on disk
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise PipelineError(
            f"could not write checkpoint {final} ({e.strerror or e}); {kept}. Free disk space or fix "
            f"permissions under {root}, then rerun to resume."
        ) from None
    strategy.wait()
    return final


def restore(strategy, root: Path, fingerprint: str, resume: str, usable=None) -> dict | None:
    """Load the newest valid checkpoint of this run (that `usable(state)` accepts) into the
    strategy's objects and return its state ({"step", "tokens_seen", ...}), or None to start
    from scratch (resume="never" clears them). This run's checkpoints past the one resumed were
    trained on another schedule (an extended run redoing its cooldown): they are removed."""
    if strategy.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for tmp in root.glob(".tmp-step_*"):
            shutil.rmtree(tmp, ignore_errors=True)
        if resume == "never":
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
    strategy.wait()
    found = latest(root, fingerprint, usable) if resume != "never" else None
    path = found[0] if found else None
    if found:
        strategy.load_state(path)
        log.info("resumed from %s (step %d)", path, found[1]["step"])
    strategy.wait()
    if strategy.is_main:  # this config's checkpoints past the one resumed are on another schedule
        stale = [
            c
            for c in sorted(root.glob("step_*"))
            if (path is None or c.name > path.name) and fingerprint_of(c) == fingerprint
        ]
        if stale:
            log.warning(
                "removing %s: trained on another schedule (step count or time budget) than this run%s",
                ", ".join(c.name for c in stale),
                "" if found else ", which starts over",
            )
        for c in stale:
            shutil.rmtree(c, ignore_errors=True)
    strategy.wait()
    return dict(found[1], path=path) if found else None


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


def peek(root: Path, fingerprint: str, usable=None) -> dict:
    """The trainer_state of this run's newest checkpoint, files not verified, or {}: enough for
    the choices a run fixes at its start (precision, a time budget's step count), which every
    checkpoint of the run shares."""
    for ckpt in sorted(root.glob("step_*"), reverse=True):
        state = state_of(ckpt)
        if state.get("fingerprint") == fingerprint and (usable is None or usable(state)):
            return state
    return {}


def latest(root: Path, fingerprint: str, usable=None) -> tuple[Path, dict] | None:
    """The newest intact checkpoint of this fingerprint that `usable(state)` accepts; files are
    checksummed only for a candidate (an extension may skip several multi-GB ones)."""
    for ckpt in sorted(root.glob("step_*"), reverse=True):
        state = state_of(ckpt)
        if state.get("fingerprint") != fingerprint or (usable is not None and not usable(state)):
            continue
        state = read_valid_state(ckpt, fingerprint)
        if state is not None:
            return ckpt, state
    return None
