"""Flat token shards on disk: `<split>_NNNN.bin` (uint16/uint32) plus `index.json`.

Documents are concatenated with EOS after each one. Shards are memory-mapped for training, so
the corpus never has to fit in RAM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 - 1 else np.dtype(np.uint32)


class ShardWriter:
    """Append token arrays to numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._count = 0

    def _open_next(self):
        self.close()
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._file = open(self.out_dir / name, "wb")
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self._count >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self._count
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.tobytes())
            self._count += len(part)
            self.shards[-1]["tokens"] += len(part)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_index(out_dir: Path, dtype: np.dtype, vocab_size: int, eos_id: int, splits: dict[str, list[dict]]) -> None:
    index = {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos_id, "splits": splits}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


@dataclass
class TokenShards:
    """The memory-mapped shards of one split."""

    arrays: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)


def open_split(data_dir: Path, split: str) -> TokenShards:
    index = json.loads((data_dir / INDEX).read_text())
    dtype = np.dtype(index["dtype"])
    arrays = [
        np.memmap(data_dir / s["file"], dtype=dtype, mode="r")
        for s in index["splits"][split]
        if s["tokens"] > 0
    ]
    return TokenShards(arrays)
