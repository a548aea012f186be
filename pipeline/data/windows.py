"""Packed fixed-length training windows over memory-mapped token shards.

Window k is tokens [k*T, k*T + T + 1) of one shard: T inputs and T shifted targets. The order
of windows is a permutation seeded by (seed, epoch), and sample g of the run (counting across
steps, ranks and micro-batches) is a pure function of g. So the data position is just the step
number: resume continues exactly, and any number of ranks reads disjoint parts of the same
global batch.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.order import EpochShuffle
from pipeline.data.shards import TokenShards
from pipeline.errors import PipelineError


class PackedWindows:
    def __init__(self, shards: TokenShards, seq_len: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        counts = [max(0, (len(a) - 1) // seq_len) for a in shards.arrays]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_windows = int(self.starts[-1])
        if self.num_windows == 0:
            raise PipelineError(
                f"the training split has {shards.num_tokens} tokens, fewer than one window of "
                f"train.seq_len={seq_len}+1; add text or lower train.seq_len."
            )
        self.order = EpochShuffle(self.num_windows, seed)

    def window(self, sample: int) -> np.ndarray:
        k = self.order(sample)
        shard = int(np.searchsorted(self.starts, k, side="right") - 1)
        offset = (k - int(self.starts[shard])) * self.seq_len
        return np.asarray(self.shards.arrays[shard][offset : offset + self.seq_len + 1], dtype=np.int64)

    def batch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.window(first_sample + j) for j in range(size)]))
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}


def eval_windows(shards: TokenShards, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The first non-overlapping (T+1)-token windows of the validation split, up to max_tokens."""
    rows = []
    for a in shards.arrays:
        for off in range(0, len(a) - seq_len, seq_len):
            if len(rows) * seq_len >= max_tokens:
                break
            rows.append(np.asarray(a[off : off + seq_len + 1], dtype=np.int64))
    if not rows:
        raise PipelineError(
            f"the validation split has {shards.num_tokens} tokens, fewer than one window of "
            f"train.seq_len={seq_len}+1; raise data.val_fraction or lower train.seq_len."
        )
    return torch.from_numpy(np.stack(rows))
