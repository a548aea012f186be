"""The batch layout of a launch: one optimizer step's global batch cut into processes x
micro-batches x accumulation steps."""

from __future__ import annotations

from typing import NamedTuple

from pipeline.config.train import TrainSpec
from pipeline.errors import PipelineError


class BatchLayout(NamedTuple):
    """How one optimizer step's global batch is cut: global = processes x micro x accumulation."""

    global_seqs: int
    micro: int
    accum: int


def batch_layout(spec: TrainSpec, world: int, micro_batch: int | None = None) -> BatchLayout:
    """The layout of spec's global token batch over `world` processes; `micro_batch` overrides
    spec.micro_batch_size (it is how "auto" is resolved)."""
    key = getattr(spec, "_key", "train")
    global_seqs = spec.batch_tokens // spec.seq_len
    if global_seqs % world:
        raise PipelineError(
            f"the global batch of {global_seqs} sequences does not split over {world} processes; "
            f"set {key}.batch_tokens to a multiple of {world * spec.seq_len}."
        )
    per_rank = global_seqs // world
    micro = min(micro_batch or spec.micro_batch_size, per_rank)
    if per_rank % micro:
        raise PipelineError(
            f"{per_rank} sequences per process is not a multiple of {key}.micro_batch_size={micro}; "
            f"pick a micro batch that divides it."
        )
    return BatchLayout(global_seqs, micro, per_rank // micro)
