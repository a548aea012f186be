"""Run stages like `make`: build a missing, incomplete or stale upstream, reuse a complete one.

An artifact is trusted only through its manifest, which is written last and atomically and
lists every file with its checksum. Before a stage is rebuilt its manifest is removed, so a
crash mid-build leaves an artifact that the next run sees as incomplete and rebuilds.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from accelerate import PartialState
from omegaconf import OmegaConf

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
from pipeline.stages import STAGES

log = logging.getLogger("pipeline")


def forced(cfg, name: str) -> bool:
    """`force=true` redoes every stage this command runs; `force=[pretrain]` only those named."""
    force = cfg.force
    if isinstance(force, bool):
        return force
    return name in (force if not isinstance(force, str) else [force])


class Runner:
    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.state = PartialState()
        self.done: dict[str, Artifact] = {}

    def ensure(self, name: str) -> Artifact:
        """The up-to-date artifact of stage `name`, building it (and its upstream) if needed."""
        if name in self.done:
            return self.done[name]
        stage = STAGES[name]
        inputs = {up: self.ensure(up) for up in stage.upstream(self.cfg)}
        out = self.run_dir / getattr(stage, "DIR", name)
        config = OmegaConf.to_container(OmegaConf.create(stage.config_slice(self.cfg)), resolve=True)
        self.state.wait_for_everyone()
        status = artifact_state(out, canonical_hash(config), inputs)
        if status == "complete" and not forced(self.cfg, name):
            log.info("%s: up to date (%s)", name, out)
            artifact = Artifact(name, out, read_manifest(out))  # artifact_state just verified its files
        else:
            reason = "forced" if status == "complete" else status
            log.info("%s: building (%s)", name, reason)
            self._build(stage, config, inputs, out, keep_work=status == "incomplete")
            artifact = load_artifact(out, name, f"rerun `pipeline stage={name}`")
        self.done[name] = artifact
        return artifact

    def _build(self, stage, config: dict, inputs: dict[str, Artifact], out: Path, keep_work: bool) -> None:
        distributed = getattr(stage, "DISTRIBUTED", False)
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
        if distributed or self.state.is_main_process:
            facts = stage.run(self.cfg, inputs, out)
        if self.state.is_main_process:
            facts = dict(facts or {}, wall_seconds=round(time.time() - t0, 2))
            manifest = build_manifest(stage.NAME, config, inputs, facts, out, getattr(stage, "UNTRACKED", ()))
            write_json_atomic(out / MANIFEST, manifest)
        self.state.wait_for_everyone()
