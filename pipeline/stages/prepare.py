"""Stage `prepare`: tokenize the corpus into memory-mappable train/val token shards."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from pipeline.data.shards import ShardWriter, token_dtype, write_index
from pipeline.data.sources import split_documents, utf8_len
from pipeline.errors import PipelineError
from pipeline.model.tokenizer import EOS
from pipeline.stages.context import StageContext

NAME = "prepare"
DIR = "data"  # runs/<name>/data/
log = logging.getLogger("pipeline")
BATCH_BYTES = 8 * 2**20  # documents are encoded in batches of about this much text


def upstream(specs) -> list[str]:
    return ["tokenizer"]


def config_slice(specs) -> dict:
    return {"data": asdict(specs.data), "shard_tokens": specs.prepare.shard_tokens}


def _batches(docs, batch_bytes: int):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_split(tok: Tokenizer, docs, writer: ShardWriter, eos_id: int, desc: str) -> dict:
    """Encode documents in parallel batches (Rust threads) and append them with EOS after each."""
    counts = {"docs": 0, "bytes": 0, "tokens": 0}
    with tqdm(desc=desc, unit="B", unit_scale=True, leave=False, disable=None) as bar:
        for batch in _batches(docs, BATCH_BYTES):
            encodings = tok.encode_batch(batch, add_special_tokens=False)
            ids = np.concatenate([np.array(e.ids + [eos_id], dtype=writer.dtype) for e in encodings])
            writer.write(ids)
            nbytes = sum(utf8_len(d) for d in batch)
            counts["docs"] += len(batch)
            counts["bytes"] += nbytes
            counts["tokens"] += len(ids)
            bar.update(nbytes)
    writer.close()
    return counts


def run(ctx: StageContext) -> dict:
    tok = Tokenizer.from_file(str(ctx.inputs["tokenizer"].path / "tokenizer.json"))
    vocab_size, eos_id = tok.get_vocab_size(), tok.token_to_id(EOS)
    dtype = token_dtype(vocab_size)
    t0 = time.time()
    facts, splits = {"vocab_size": vocab_size, "dtype": dtype.name}, {}
    for split in ("train", "val"):
        writer = ShardWriter(ctx.out, split, dtype, ctx.specs.prepare.shard_tokens)
        facts[split] = tokenize_split(tok, split_documents(ctx.specs.data, split), writer, eos_id, f"prepare: {split}")
        splits[split] = writer.shards
        if facts[split]["docs"] == 0:
            raise PipelineError(
                f"the {split} split is empty ({facts['train']['docs']} documents in all); add documents, "
                "change data.val_fraction, or set data.separator to cut files into documents (e.g. '\\n\\n')."
            )
    write_index(ctx.out, dtype, vocab_size, eos_id, splits)
    secs = time.time() - t0
    facts["seconds"] = round(secs, 2)
    total = facts["train"]["bytes"] + facts["val"]["bytes"]
    log.info(
        "prepare: %d train / %d val docs -> %.2fM / %.2fM tokens (%s) in %.1fs (%.1f MB/s) -> %s",
        facts["train"]["docs"], facts["val"]["docs"], facts["train"]["tokens"] / 1e6,
        facts["val"]["tokens"] / 1e6, dtype.name, secs, total / 1e6 / secs, ctx.out,
    )
    return facts
