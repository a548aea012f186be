"""Run stages like `make`: build a missing, incomplete or stale upstream, reuse a complete one.

An artifact is trusted only through its manifest, which is written last and atomically and
lists every file with its checksum. Before a stage is rebuilt its manifest is removed, so a
crash mid-build leaves an artifact that the next run sees as incomplete and rebuilds. Every
decision is appended to `<run>/history.jsonl` (stage, built or reused, why, seconds).
"""

from __future__ import annotations

import json
import logging
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
    def __init__(self, specs: RunSpecs, run_dir: Path, force=False):
        self.specs, self.run_dir, self.force = specs, run_dir, force
        self.state = PartialState()
        self.done: dict[str, Artifact] = {}

    def ensure(self, name: str) -> Artifact:
        """The up-to-date artifact of stage `name`, building it (and its upstream) if needed."""
        if name in self.done:
            return self.done[name]
        stage = STAGES[name]
        inputs = {up: self.ensure(up) for up in stage.upstream(self.specs)}
        out = self.run_dir / getattr(stage, "DIR", name)
        config = json.loads(json.dumps(stage.config_slice(self.specs), default=str))  # as the manifest stores it
        config_hash = canonical_hash(config)
        self.state.wait_for_everyone()
        status = artifact_state(out, config_hash, inputs)
        t0 = time.time()
        if status == "complete" and not forced(self.force, name):
            log.info("%s: up to date (%s)", name, out)
            artifact = Artifact(name, out, read_manifest(out))  # artifact_state just verified its files
            action = "reused"
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

    def _build(self, stage, config: dict, ctx: StageContext, keep_work: bool) -> None:
        out = ctx.out
        if self.state.is_main_process:
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
