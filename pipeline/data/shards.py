"""Flat token shards on disk, one pair per chunk of the corpus: `train_NNNNN.bin` and
`val_NNNNN.bin` (uint16/uint32), then `chunk_NNNNN.json`, then at the end `index.json`.

Documents are concatenated with EOS after each one. A chunk's shards are written under temporary
names and renamed before its record is written, so a chunk is done exactly when its record exists
and names the fingerprint of the run that wrote it: a killed prepare resumes at the first chunk
without one. Shards are memory-mapped for training, so the corpus never has to fit in RAM.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import write_json_atomic
from pipeline.errors import PipelineError

INDEX = "index.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 - 1 else np.dtype(np.uint32)


def _record_path(out_dir: Path, chunk: int) -> Path:
    return out_dir / f"chunk_{chunk:05d}.json"


def _chunk_of(record_path: Path) -> int:
    return int(record_path.stem.split("_")[1])


def finished_chunks(out_dir: Path, fingerprint: str) -> dict[int, dict]:
    """{chunk: record} of the chunks already finished under this fingerprint (an interrupted run's)."""
    records = {_chunk_of(p): chunk_record(out_dir, _chunk_of(p), fingerprint) for p in out_dir.glob("chunk_*.json")}
    return {chunk: r for chunk, r in records.items() if r is not None}


def chunk_record(out_dir: Path, chunk: int, fingerprint: str) -> dict | None:
    """The record of a chunk finished by a run with this fingerprint, else None."""
    try:
        record = json.loads(_record_path(out_dir, chunk).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == fingerprint else None


class ChunkWriter:
    """Appends token arrays to one chunk's shard files (one per split); `seal` makes them final."""

    def __init__(self, out_dir: Path, chunk: int, dtype: np.dtype, fingerprint: str):
        self.out_dir, self.chunk, self.dtype, self.fingerprint = out_dir, chunk, dtype, fingerprint
        self.counts = {split: {"docs": 0, "bytes": 0, "tokens": 0} for split in SPLITS}
        self._files = {split: open(self._path(split, partial=True), "wb") for split in SPLITS}

    def _path(self, split: str, partial: bool = False) -> Path:
        return self.out_dir / f"{split}_{self.chunk:05d}.bin{'.partial' if partial else ''}"

    def write(self, split: str, tokens: np.ndarray, docs: int, nbytes: int) -> None:
        self._files[split].write(tokens.astype(self.dtype, copy=False).tobytes())
        c = self.counts[split]
        c["docs"], c["bytes"], c["tokens"] = c["docs"] + docs, c["bytes"] + nbytes, c["tokens"] + len(tokens)

    def seal(self, stream_hash: str) -> dict:
        """Rename the shards into place (empty ones are dropped), then write the chunk's record;
        `stream_hash` identifies the corpus text up to the chunk's end (see encode.Chunks)."""
        record = {"fingerprint": self.fingerprint, "stream_hash": stream_hash}
        for split, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            partial, final = self._path(split, partial=True), self._path(split)
            if self.counts[split]["tokens"]:
                os.replace(partial, final)
            else:
                partial.unlink()
            record[split] = {"file": final.name, **self.counts[split]}
        write_json_atomic(_record_path(self.out_dir, self.chunk), record)
        return record


def collect(out, count: int, fingerprint: str) -> tuple[dict, dict]:
    """The per-split shard lists for the index and the per-split totals, from the chunk records."""
    splits, totals = {s: [] for s in SPLITS}, {s: {"docs": 0, "bytes": 0, "tokens": 0} for s in SPLITS}
    for chunk in range(count):
        record = chunk_record(out, chunk, fingerprint)
        if record is None:
            raise PipelineError(
                f"{out} has no record of chunk {chunk} after every process finished; with several nodes, "
                "run.root must be on a filesystem all of them share."
            )
        for split in SPLITS:
            part = record[split]
            if part["tokens"]:
                splits[split].append({"file": part["file"], "tokens": part["tokens"]})
            totals[split] = {k: totals[split][k] + part[k] for k in totals[split]}
    for split in SPLITS:
        if totals[split]["docs"] == 0:
            raise PipelineError(
                f"the {split} split is empty ({totals['train']['docs']} documents in all); add documents, "
                "change data.val_fraction, or set data.separator to cut files into documents (e.g. '\\n\\n')."
            )
    return splits, totals


def remove_leftovers(out, shards: set[str], count: int) -> None:
    """Delete what an interrupted run of another config left: shards the index does not list,
    records of chunks past the end, partial files."""
    for path in out.iterdir():
        name = path.name
        stale_record = name.startswith("chunk_") and _chunk_of(path) >= count
        unlisted_shard = path.suffix == ".bin" and name not in shards
        if name.startswith(".") or name.endswith(".partial") or unlisted_shard or stale_record:
            path.unlink()


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
    arrays = [np.memmap(data_dir / s["file"], dtype=dtype, mode="r") for s in index["splits"][split] if s["tokens"] > 0]
    return TokenShards(arrays)
