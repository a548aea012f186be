"""The order in which a run visits its training items: reproducible from (seed, epoch) alone."""

from __future__ import annotations

import numpy as np


class EpochShuffle:
    """Global sample g -> item index. Each epoch is a fresh permutation of all n items, seeded by
    (seed, epoch), so sample g is a pure function of g: the data position is the step number."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, sample: int) -> int:
        epoch, i = divmod(sample, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[i])
