"""Run stages like `make`: build a missing, incomplete or stale upstream, reuse a complete one.

An artifact is trusted only through its manifest, which is written last and atomically and
lists every file with its checksum. Before a stage is rebuilt its manifest is removed, so a
crash mid-build leaves an artifact that the next run sees as incomplete and rebuilds. Every
decision is appended to `<run>/history.jsonl` (stage, built or reused, why, seconds).

With run.shared_upstream=true (what `pipeline -m` sets) a missing or stale artifact that a
sibling run dir already holds complete, with the same config and the same inputs, is linked
instead of rebuilt: a sweep trains its tokenizer once. Linked artifacts are read, never written:
a rebuild replaces the link with a directory of this run's own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
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
from pipeline.errors import PipelineError
from pipeline.specs import RunSpecs
from pipeline.stages import finetune, generate, prepare, pretrain, tokenizer
from pipeline.stages.context import StageContext

STAGES = {m.NAME: m for m in (tokenizer, prepare, pretrain, finetune, generate)}
ORDER = list(STAGES)
HISTORY = "history.jsonl"
log = logging.getLogger("pipeline")


def forced(force, name: str) -> bool:
    """`force=true` redoes every stage this command runs; `force=[pretrain]` only those named."""
    if isinstance(force, bool):
        return force
    return name in (force if not isinstance(force, str) else [force])


class Runner:
    def __init__(self, specs: RunSpecs, run_dir: Path, force=False, shared_upstream: bool = False):
        self.specs, self.run_dir, self.force, self.shared = specs, run_dir, force, shared_upstream
        self.state = PartialState()
        self.done: dict[str, Artifact] = {}

    def _identity(self, stage) -> tuple[Path, dict, str]:
        """(output dir, resolved config slice as the manifest stores it, its hash)."""
        config = json.loads(json.dumps(stage.config_slice(self.specs), default=str))
        return self.run_dir / getattr(stage, "DIR", stage.NAME), config, canonical_hash(config)

    def _twin(self, out: Path, config_hash: str, inputs: dict[str, Artifact]) -> Path | None:
        """With shared_upstream: a sibling run's complete artifact of the same config and inputs."""
        if not self.shared or not self.run_dir.parent.is_dir():
            return None
        for sibling in sorted(self.run_dir.parent.iterdir()):
            candidate = sibling / out.name
            if sibling == self.run_dir or candidate.is_symlink() or not candidate.is_dir():
                continue
            try:
                if artifact_state(candidate, config_hash, inputs) == "complete":
                    return candidate
            except PipelineError:  # a damaged sibling is not ours to judge
                continue
        return None

    def current(self, name: str) -> Artifact | None:
        """The complete, up-to-date artifact of `name` (this run's or a twin's), or None; builds nothing."""
        stage = STAGES[name]
        inputs = {up: self.current(up) for up in stage.upstream(self.specs)}
        if None in inputs.values():
            return None
        out, _, config_hash = self._identity(stage)
        if forced(self.force, name):
            return None
        if artifact_state(out, config_hash, inputs) == "complete":
            return Artifact(name, out, read_manifest(out))
        twin = self._twin(out, config_hash, inputs)
        return Artifact(name, twin, read_manifest(twin)) if twin else None

    def up_to_date(self, stage: str) -> bool:
        """Whether `pipeline stage=STAGE` would only reuse artifacts."""
        return all(self.current(name) for name in (ORDER if stage == "all" else [stage]))

    def ensure(self, name: str) -> Artifact:
        """The up-to-date artifact of stage `name`, building it (and its upstream) if needed."""
        if name in self.done:
            return self.done[name]
        stage = STAGES[name]
        inputs = {up: self.ensure(up) for up in stage.upstream(self.specs)}
        out, config, config_hash = self._identity(stage)
        self.state.wait_for_everyone()
        status = artifact_state(out, config_hash, inputs)
        twin = self._twin(out, config_hash, inputs) if status != "complete" and not forced(self.force, name) else None
        t0 = time.time()
        if twin is not None:
            log.info("%s: reusing %s (same config and inputs), linked as %s", name, twin, out)
            self._link(out, twin)
            artifact, action = Artifact(name, out, read_manifest(out)), f"reused from {twin}"
        elif status == "complete" and not forced(self.force, name):
            log.info("%s: up to date (%s)", name, out)
            artifact, action = Artifact(name, out, read_manifest(out)), "reused"  # its files were just verified
        else:
            reason = "forced" if status == "complete" else status
            log.info("%s: building (%s)", name, reason)
            # Checkpoints must match both this stage's config and the content of its inputs.
            fingerprint = canonical_hash({"config": config, "inputs": {k: a.hash for k, a in inputs.items()}})
            try:
                self._build(stage, config, StageContext(self.specs, inputs, out, fingerprint), status == "incomplete")
            except BaseException as e:  # a refusal, a stop signal, Ctrl-C: the history says so too
                self._record({"stage": name, "action": f"failed ({reason}): {type(e).__name__}",
                              "seconds": round(time.time() - t0, 2)})
                raise
            artifact = load_artifact(out, name, f"rerun `pipeline stage={name}`")
            action = f"built ({reason})"
        self._record({"stage": name, "action": action, "seconds": round(time.time() - t0, 2)})
        self.done[name] = artifact
        return artifact

    def _link(self, out: Path, twin: Path) -> None:
        """Make `out` a relative link to the twin artifact (replacing a stale or partial one)."""
        if self.state.is_main_process:
            if out.is_symlink():
                out.unlink()
            elif out.exists():
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(twin, out.parent), out, target_is_directory=True)
        self.state.wait_for_everyone()

    def _build(self, stage, config: dict, ctx: StageContext, keep_work: bool) -> None:
        out = ctx.out
        if self.state.is_main_process:
            if out.is_symlink():  # a link to a twin run's artifact: never build into someone else's dir
                out.unlink()
            (out / MANIFEST).unlink(missing_ok=True)  # from here on the old artifact is untrusted
            # An interrupted run of a resumable stage keeps its checkpoints; a changed config,
            # changed inputs or force=true start it over.
            if not (keep_work and getattr(stage, "KEEPS_WORK", False)):
                shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
        self.state.wait_for_everyone()
        t0 = time.time()
        facts = None
        if getattr(stage, "DISTRIBUTED", False) or self.state.is_main_process:
            facts = stage.run(ctx)
        if self.state.is_main_process:
            facts = dict(facts or {}, wall_seconds=round(time.time() - t0, 2))
            manifest = build_manifest(stage.NAME, config, ctx.inputs, facts, out, getattr(stage, "UNTRACKED", ()))
            write_json_atomic(out / MANIFEST, manifest)
        self.state.wait_for_everyone()

    def _record(self, event: dict) -> None:
        if self.state.is_main_process:
            with open(self.run_dir / HISTORY, "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}) + "\n")
