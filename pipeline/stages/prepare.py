"""Stage `prepare`: tokenize the corpus, in one pass, into memory-mappable train/val token shards.

The document stream is cut into chunks of about `prepare.shard_bytes` of text. Under a launch of
N processes, rank r tokenizes chunks r, r+N, r+2N, ... (each rank reads the stream, which costs
little next to BPE encoding, and encodes only its own chunks); rank 0 writes the index once every
rank is done. The shards do not depend on N, and a killed prepare keeps its finished chunks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import gather_object
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from pipeline.data.encode import BATCH_BYTES, Chunks, encode_chunks
from pipeline.data.shards import (
    collect,
    finished_chunks,
    remove_leftovers,
    token_dtype,
    write_index,
)
from pipeline.data.sources import corpus_bytes, labelled_documents
from pipeline.errors import PipelineError
from pipeline.model.tokenizer import EOS
from pipeline.stages.context import StageContext
from pipeline.train.memory import peak_rss_gb

NAME = "prepare"
DIR = "data"  # runs/<name>/data/
DISTRIBUTED = True  # every rank tokenizes its share of the chunks
KEEPS_WORK = True  # finished chunks survive a crash
UNTRACKED = ()
log = logging.getLogger("pipeline")


def upstream(specs) -> list[str]:
    return ["tokenizer"]


def config_slice(specs) -> dict:
    return {"data": asdict(specs.data), "shard_bytes": specs.prepare.shard_bytes}


def _progress_bar(data_spec, is_main_process: bool) -> tqdm:
    """A bytes progress bar over the whole corpus, shown on the main process only."""
    return tqdm(
        desc="prepare",
        total=corpus_bytes(data_spec),
        unit="B",
        unit_scale=True,
        leave=False,
        disable=None if is_main_process else True,
    )


def _summary(
    out: Path, secs: float, vocab_size: int, dtype, totals: dict, kept: dict, n_chunks: int, by_rank: list, world: int
) -> dict:
    """Log what prepare wrote and how fast, and return the stage's facts."""
    reused = [r for c, r in kept.items() if c < n_chunks]
    new_bytes = sum(totals[s]["bytes"] for s in totals) - sum(r[s]["bytes"] for r in reused for s in totals)
    facts = {
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        **totals,
        "chunks": n_chunks,
        "chunks_kept": len(reused),
        "chunks_by_rank": [chunks for chunks, _ in by_rank],
        "peak_rss_gb_by_rank": [rss for _, rss in by_rank],
        "processes": world,
        "seconds": round(secs, 2),
    }
    log.info(
        "prepare: %d train / %d val docs -> %.2fM / %.2fM tokens (%s, %d chunks, %d processes) in %.1fs "
        "(%.1f MB/s, peak RSS %.2f GB per process) -> %s",
        totals["train"]["docs"],
        totals["val"]["docs"],
        totals["train"]["tokens"] / 1e6,
        totals["val"]["tokens"] / 1e6,
        dtype.name,
        n_chunks,
        world,
        secs,
        new_bytes / 1e6 / secs,
        max(facts["peak_rss_gb_by_rank"]),
        out,
    )
    return facts


def run(ctx: StageContext) -> dict | None:
    state = PartialState()
    tok = Tokenizer.from_file(str(ctx.inputs["tokenizer"].path / "tokenizer.json"))
    vocab_size, eos_id, dtype = tok.get_vocab_size(), tok.token_to_id(EOS), token_dtype(tok.get_vocab_size())
    t0 = time.time()
    rank, world, fp = state.process_index, state.num_processes, ctx.fingerprint
    kept = finished_chunks(ctx.out, fp)  # of an interrupted run of this config
    state.wait_for_everyone()  # every rank has looked before any writes
    if kept:
        log.info("prepare: keeping %d finished chunks of an interrupted run", len(kept))

    def check_kept(chunk: int, stream_hash: str) -> None:
        if chunk in kept and kept[chunk]["stream_hash"] != stream_hash:
            raise PipelineError(
                f"the corpus changed since the interrupted prepare in {ctx.out} (chunk {chunk} differs); "
                "rerun with force=[prepare] to start over."
            )

    with _progress_bar(ctx.specs.data, state.is_main_process) as bar:
        chunks = Chunks(
            labelled_documents(ctx.specs.data),
            ctx.specs.prepare.shard_bytes,
            BATCH_BYTES,
            lambda c: c % world == rank and c not in kept,
            bar.update,
            check_kept,
        )
        written = encode_chunks(tok, chunks, ctx.out, dtype, eos_id, fp)
    mine = (len(written), round(peak_rss_gb(), 3))
    by_rank = gather_object([mine]) if world > 1 else [mine]
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    splits, totals = collect(ctx.out, chunks.count, fp)
    write_index(ctx.out, dtype, vocab_size, eos_id, splits)
    remove_leftovers(ctx.out, {s["file"] for parts in splits.values() for s in parts}, chunks.count)
    return _summary(ctx.out, time.time() - t0, vocab_size, dtype, totals, kept, chunks.count, by_rank, world)
