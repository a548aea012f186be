"""What a stage is given: the run's specs, its up-to-date inputs, its output dir and fingerprint."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.artifacts import Artifact
from pipeline.config.run import RunSpecs


@dataclass
class StageContext:
    specs: RunSpecs
    inputs: dict[str, Artifact]
    out: Path
    fingerprint: str  # hash of this stage's config and its inputs' content
    checkpoint_fingerprint: str = ""  # the same without the train keys that leave the weights as they are
    started: float = field(default_factory=time.time)  # when the stage began (a time budget counts from here)

    def training_job(
        self,
        model,
        spec,
        token_pieces: list[bytes] | None,
        batch,
        eval_batches,
        flops_per_token=None,
        fixed_shapes: bool = True,
        objective=None,
    ):
        """The TrainingJob the training stages hand to run_training, from this context;
        token_pieces (bpb.token_byte_strings) give each token's bytes, for bits per byte;
        objective: what a step minimises instead of next-token loss (TrainingJob.objective)."""
        import torch

        from pipeline.train.loop import Tracking, TrainingJob

        logger = self.specs.logger
        return TrainingJob(
            model=model,
            spec=spec,
            out_dir=self.out,
            fingerprint=self.checkpoint_fingerprint or self.fingerprint,
            train_batch=batch,
            eval_batches=eval_batches,
            flops_per_token=flops_per_token,
            # exact; no float64 on MPS
            token_bytes=torch.tensor([len(p) for p in token_pieces], dtype=torch.float32) if token_pieces else None,
            resume=self.specs.resume,
            tracking=Tracking(tuple(logger.trackers), logger.project, asdict(spec)),
            fixed_shapes=fixed_shapes,
            started=self.started,
            objective=objective,
        )
