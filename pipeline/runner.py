"""Run stages like `make`: build a missing, incomplete or stale upstream, reuse a complete one.

An artifact is trusted only through its manifest, which is written last and atomically and
lists every file with its checksum. Before a stage is rebuilt its manifest is removed, so a
crash mid-build leaves an artifact that the next run sees as incomplete and rebuilds. Every
decision is appended to `<run>/history.jsonl` (stage, built or reused, why, seconds).

With run.shared_upstream=true (what `pipeline -m` sets) every artifact a run builds is moved to
`<run.root>/.shared/<stage>-<hash of config and inputs>/` and linked back; another run that needs
the same artifact (same config, same inputs) links to it instead of rebuilding: a sweep trains
its tokenizer once. Shared artifacts are never built into: a rebuild replaces the run's link with
a directory of its own, so no run changes what another run reads. Training checkpoints are not
shared: they stay with the run that wrote them (<run>/.checkpoints/<stage>/) and move back into
the stage's dir when it is rebuilt, so a sweep rerun with more steps resumes each run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from importlib import import_module
from pathlib import Path

from accelerate import PartialState

from pipeline.artifacts import (
    MANIFEST,
    Artifact,
    artifact_state,
    build_manifest,
    canonical_hash,
    load_artifact,
    read_manifest,
    write_json_atomic,
)
from pipeline.config.run import RunSpecs
from pipeline.config.stages import STAGE_MODULES, chain
from pipeline.config.train import math_only
from pipeline.errors import PipelineError
from pipeline.stages.base import Stage
from pipeline.stages.context import StageContext
from pipeline.train import checkpoints

STAGES: dict[str, Stage] = {name: import_module(module) for name, module in STAGE_MODULES.items()}
HISTORY = "history.jsonl"
SHARED = ".shared"  # with shared_upstream: <run.root>/.shared/<stage>-<hash>/, write-once, linked from runs
PARKED = ".checkpoints"  # <run>/.checkpoints/<stage>/: the checkpoints of a stage whose artifact is shared
log = logging.getLogger("pipeline")


def _without_nulls(config):
    if isinstance(config, dict):
        return {k: _without_nulls(v) for k, v in config.items() if v is not None}
    return [_without_nulls(v) for v in config] if isinstance(config, list) else config


def forced(force, name: str) -> bool:
    """`force=true` redoes every stage this command runs; `force=[pretrain]` only those named."""
    if isinstance(force, bool):
        return force
    return name in (force if not isinstance(force, str) else [force])


def _resumable_checkpoints(out: Path, fingerprint: str) -> list[Path]:
    return [c for c in checkpoints.checkpoints_in(out / "checkpoints") if checkpoints.fingerprint_of(c) == fingerprint]


def _clear(out: Path, keep: list[Path]) -> None:
    """Remove `out` except the paths in `keep` (and the folders holding them)."""
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in sorted(out.rglob("*"), reverse=True):  # children before their folders
        if any(path == k or k in path.parents or path in k.parents for k in keep):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()


class Runner:
    def __init__(self, specs: RunSpecs, run_dir: Path, force=False, shared_upstream: bool = False):
        self.specs, self.run_dir, self.force, self.shared = specs, run_dir, force, shared_upstream
        self.state = PartialState()
        self.done: dict[str, Artifact] = {}

    def _identity(self, stage: Stage) -> tuple[Path, dict, str]:
        """(output dir, resolved config slice as the manifest stores it, its hash). Unset (null)
        keys are left out, so adding an optional setting to the code keeps existing runs valid."""
        config = _without_nulls(json.loads(json.dumps(stage.config_slice(self.specs), default=str)))
        return self.run_dir / stage.DIR, config, canonical_hash(config)

    @staticmethod
    def _fingerprint(config: dict, inputs: dict[str, Artifact]) -> str:
        """This stage's identity: its config and the content of its inputs. Checkpoints must match
        it, and it names the stage's entry in the shared store."""
        return canonical_hash({"config": config, "inputs": {k: a.hash for k, a in inputs.items()}})

    @staticmethod
    def _checkpoint_fingerprint(config: dict, inputs: dict[str, Artifact]) -> str:
        """What a training checkpoint must match to be resumed: the config without the keys that
        leave the weights as they are (intervals, step count, micro-batch), and the inputs."""
        return canonical_hash({"config": math_only(config), "inputs": {k: a.hash for k, a in inputs.items()}})

    @staticmethod
    def _complete(path: Path, config_hash: str, inputs: dict[str, Artifact]) -> bool:
        try:
            return artifact_state(path, config_hash, inputs) == "complete"
        except PipelineError:  # damaged: not trusted, not reused
            return False

    def current(self, name: str) -> Artifact | None:
        """This run's complete, up-to-date artifact of `name` (its own dir or its link), or None;
        builds nothing."""
        stage = STAGES[name]
        inputs = {up: self.current(up) for up in stage.upstream(self.specs)}
        if None in inputs.values() or forced(self.force, name):
            return None
        out, _, config_hash = self._identity(stage)
        return Artifact(name, out, read_manifest(out)) if self._complete(out, config_hash, inputs) else None

    def up_to_date(self, stage: str) -> bool:
        """Whether `pipeline stage=STAGE` would only reuse this run's artifacts."""
        return all(self.current(name) for name in (chain(self.specs) if stage == "all" else [stage]))

    def ensure(self, name: str) -> Artifact:
        """The up-to-date artifact of stage `name`, building it (and its upstream) if needed."""
        if name in self.done:
            return self.done[name]
        stage = STAGES[name]
        inputs = {up: self.ensure(up) for up in stage.upstream(self.specs)}
        out, config, config_hash = self._identity(stage)
        self.state.wait_for_everyone()
        status = artifact_state(out, config_hash, inputs)
        fingerprint = self._fingerprint(config, inputs)
        shared = self.run_dir.parent / SHARED / f"{name}-{fingerprint}" if self.shared else None
        is_forced = forced(self.force, name)
        reuse_shared = (
            shared is not None
            and status != "complete"
            and not is_forced
            and self._complete(shared, config_hash, inputs)
        )
        self.state.wait_for_everyone()  # every rank has looked before the main one changes anything
        t0 = time.time()
        if reuse_shared:
            log.info("%s: reusing %s (same config and inputs)", name, shared)
            self._link(out, shared)
            artifact, action = Artifact(name, out, read_manifest(out)), f"reused from {shared}"
        elif status == "complete" and not is_forced:
            log.info("%s: up to date (%s)", name, out)
            artifact, action = Artifact(name, out, read_manifest(out)), "reused"  # its files were just verified
        else:
            reason = "forced" if status == "complete" else status
            log.info("%s: building (%s)", name, reason)
            try:
                context = StageContext(
                    self.specs, inputs, out, fingerprint, self._checkpoint_fingerprint(config, inputs)
                )
                self._build(stage, config, context, status == "incomplete", not is_forced)
            except BaseException as e:  # a refusal, a stop signal, Ctrl-C: the history says so too
                self._record(
                    {
                        "stage": name,
                        "action": f"failed ({reason}): {type(e).__name__}",
                        "seconds": round(time.time() - t0, 2),
                    }
                )
                raise
            if shared is not None:
                self._share(out, shared, forced=is_forced)
            artifact = load_artifact(out, name, f"rerun `pipeline stage={name}`")
            action = f"built ({reason})"
        self._record({"stage": name, "action": action, "seconds": round(time.time() - t0, 2)})
        self.done[name] = artifact
        return artifact

    def _link(self, out: Path, target: Path) -> None:
        """Make `out` a relative link to `target` (replacing whatever stale or partial `out` was)."""
        if self.state.is_main_process:
            if out.is_symlink():
                out.unlink()
            elif out.exists():
                self._park(out)  # a run's own checkpoints outlive its dir
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(target, out.parent), out, target_is_directory=True)
        self.state.wait_for_everyone()

    def _share(self, out: Path, shared: Path, forced: bool) -> None:
        """Move a freshly built artifact into the shared store and link it back; its training
        checkpoints stay with the run (parked), so that a rebuild with more steps resumes them. An
        entry already there is kept (same config and inputs); a forced build makes a new entry
        beside it, since other runs may link to the old one."""
        if self.state.is_main_process:
            shared.parent.mkdir(parents=True, exist_ok=True)
            self._park(out)
            if shared.exists() and forced:
                shared = shared.with_name(f"{shared.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            if shared.exists():
                shutil.rmtree(out)
            else:
                os.replace(out, shared)
        self._link(out, shared)  # the main process's `shared`: only it makes the link

    def _parked(self, out: Path) -> Path:
        """Where a shared artifact's training checkpoints wait for the run's next rebuild."""
        return self.run_dir / PARKED / out.name

    def _park(self, out: Path) -> None:
        if (out / "checkpoints").is_dir():
            parked = self._parked(out)
            parked.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(parked, ignore_errors=True)
            os.replace(out / "checkpoints", parked)

    def _unlink_shared(self, out: Path) -> None:
        """Replace the run's link into the shared store by a dir of its own holding the run's parked
        checkpoints and the linked artifact's metrics, so a rebuild resumes as it would unshared."""
        target = out.resolve()
        out.unlink()
        parked = self._parked(out)
        if parked.is_dir():
            out.mkdir(parents=True)
            os.replace(parked, out / "checkpoints")
            if (target / "metrics.jsonl").is_file():
                shutil.copy2(target / "metrics.jsonl", out / "metrics.jsonl")

    def _build(self, stage: Stage, config: dict, ctx: StageContext, keep_work: bool, keep_checkpoints: bool) -> None:
        out = ctx.out
        if self.state.is_main_process:
            if out.is_symlink():  # a link into the shared store: never build into it
                self._unlink_shared(out)
            (out / MANIFEST).unlink(missing_ok=True)  # from here on the old artifact is untrusted
            # An interrupted run of a resumable stage keeps its work. A changed config keeps the
            # training checkpoints it can resume (same math: a raised max_steps, other intervals)
            # and its metrics, and sets the others aside; force=true starts over.
            if not (keep_work and stage.KEEPS_WORK):
                keep = _resumable_checkpoints(out, ctx.checkpoint_fingerprint) if keep_checkpoints else []
                keep += [out / "metrics.jsonl"] if keep else []
                if keep_checkpoints:
                    others = [c for c in checkpoints.checkpoints_in(out / "checkpoints") if c not in keep]
                    checkpoints.set_aside(others, "written under other settings, which this run cannot resume")
                    keep.append(out / "checkpoints" / checkpoints.SET_ASIDE)
                _clear(out, keep=[k for k in keep if k.exists()])
            out.mkdir(parents=True, exist_ok=True)
        self.state.wait_for_everyone()
        t0 = time.time()
        facts = None
        if stage.DISTRIBUTED or self.state.is_main_process:
            facts = stage.run(ctx)
        if self.state.is_main_process:
            facts = dict(facts or {}, wall_seconds=round(time.time() - t0, 2))
            manifest = build_manifest(stage.NAME, config, ctx.inputs, facts, out, stage.UNTRACKED)
            write_json_atomic(out / MANIFEST, manifest)
        self.state.wait_for_everyone()

    def _record(self, event: dict) -> None:
        if self.state.is_main_process:
            with open(self.run_dir / HISTORY, "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}) + "\n")
