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
import time
from pathlib import Path

from pipeline.artifacts import FULL_HASH_LIMIT, list_files, verify_files, write_json_atomic
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")
STATE_FILE = "trainer_state.json"
SET_ASIDE = "superseded"  # checkpoints/superseded/: kept checkpoints a changed config cannot resume


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def step_of(ckpt: Path) -> int:
    """The step a checkpoint dir holds (-1 for a name that is not step_<number>)."""
    number = ckpt.name.removeprefix("step_")
    return int(number) if number.isdigit() else -1


def checkpoints_in(root: Path) -> list[Path]:
    """The checkpoint dirs under root, oldest step first. By number, not name: past step 999,999
    the names grow a digit and "step_1000000" sorts before "step_999000"."""
    return sorted((c for c in root.glob("step_*") if step_of(c) >= 0), key=step_of)


def set_aside(ckpts: list[Path], why: str) -> None:
    """Move checkpoints this run cannot resume into checkpoints/superseded/ instead of deleting
    them (a changed setting may be changed back), and say how to free the space."""
    if not ckpts:
        return
    aside = ckpts[0].parent / SET_ASIDE
    aside.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for c in ckpts:
        dest = aside / f"{c.name}.{stamp}"
        while dest.exists():
            dest = dest.with_name(dest.name + "+")
        os.replace(c, dest)
    gb = size_of(aside) / 1e9
    log.warning(
        "kept %s (%s) in %s (%.2f GB there): `rm -r %s` frees the space; moving one back into %s "
        "(without its .%s suffix) with the earlier settings resumes it. resume=never or force=true "
        "delete instead.",
        ", ".join(c.name for c in ckpts),
        why,
        aside,
        gb,
        aside,
        aside.parent,
        stamp,
    )


def seal(tmp: Path, final: Path, state: dict, keep: int) -> None:
    """Main process, after every rank has saved into `tmp`: checksum, publish, prune old ones."""
    state = dict(state, files=list_files(tmp, hash_limit=FULL_HASH_LIMIT))  # only what a resume verifies
    write_json_atomic(tmp / STATE_FILE, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Only this run's own: another config's checkpoints (a run with other settings in the same
    # dir) are not this run's to prune, and must not push its fresh ones out by sorting later.
    # The newest one where a wsd cooldown began stays too: an extended run resumes there.
    states = {c: state_of(c) for c in checkpoints_in(final.parent)}
    mine = [c for c, s in states.items() if s.get("fingerprint") == state["fingerprint"]]
    pinned = [c for c in mine if states[c].get("cooldown_start")][-1:]
    prunable = [c for c in mine if c not in pinned]
    for old in prunable[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def size_of(ckpt: Path) -> int:
    """Bytes of a checkpoint's files."""
    return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())


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
    trained on another schedule (an extended run redoing its cooldown): they are set aside."""
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
            for c in checkpoints_in(root)
            if (path is None or step_of(c) > step_of(path)) and fingerprint_of(c) == fingerprint
        ]
        why = "trained on another schedule (step count or time budget) than this run"
        set_aside(stale, why + ("" if found else ", which starts over"))
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
    for ckpt in reversed(checkpoints_in(root)):
        state = state_of(ckpt)
        if state.get("fingerprint") == fingerprint and (usable is None or usable(state)):
            return state
    return {}


def latest(root: Path, fingerprint: str, usable=None) -> tuple[Path, dict] | None:
    """The newest intact checkpoint of this fingerprint that `usable(state)` accepts; files are
    checksummed only for a candidate (an extension may skip several multi-GB ones)."""
    for ckpt in reversed(checkpoints_in(root)):
        state = state_of(ckpt)
        if state.get("fingerprint") != fingerprint or (usable is not None and not usable(state)):
            continue
        state = read_valid_state(ckpt, fingerprint)
        if state is not None:
            return ckpt, state
    return None
