"""Stage `prepare`: tokenize the corpus, in one pass, into memory-mappable train/val token shards."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from pipeline.data.shards import ShardWriter, token_dtype, write_index
from pipeline.data.sources import corpus_bytes, labelled_documents, utf8_len
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


def _batches(labelled, batch_bytes: int):
    batch, size = [], 0
    for item in labelled:
        batch.append(item)
        size += len(item[1])
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_corpus(tok: Tokenizer, labelled, writers: dict[str, ShardWriter], eos_id: int,
                    total_bytes: int | None = None) -> dict:
    """One pass: encode (is validation, document) pairs in parallel batches (Rust threads) and
    append each document, with EOS after it, to its split's shards. Memory is one batch."""
    counts = {split: {"docs": 0, "bytes": 0, "tokens": 0} for split in writers}
    with tqdm(desc="prepare", total=total_bytes, unit="B", unit_scale=True, leave=False, disable=None) as bar:
        for batch in _batches(labelled, BATCH_BYTES):
            encodings = tok.encode_batch([doc for _, doc in batch], add_special_tokens=False)
            for split, writer in writers.items():
                mine = [(doc, e) for (val, doc), e in zip(batch, encodings) if val == (split == "val")]
                if not mine:
                    continue
                ids = np.concatenate([np.array(e.ids + [eos_id], dtype=writer.dtype) for _, e in mine])
                writer.write(ids)
                nbytes = sum(utf8_len(doc) for doc, _ in mine)
                c = counts[split]
                c["docs"], c["bytes"], c["tokens"] = c["docs"] + len(mine), c["bytes"] + nbytes, c["tokens"] + len(ids)
                bar.update(nbytes)
    for writer in writers.values():
        writer.close()
    return counts


def run(ctx: StageContext) -> dict:
    tok = Tokenizer.from_file(str(ctx.inputs["tokenizer"].path / "tokenizer.json"))
    vocab_size, eos_id = tok.get_vocab_size(), tok.token_to_id(EOS)
    dtype = token_dtype(vocab_size)
    t0 = time.time()
    data = ctx.specs.data
    writers = {split: ShardWriter(ctx.out, split, dtype, ctx.specs.prepare.shard_tokens) for split in ("train", "val")}
    counts = tokenize_corpus(tok, labelled_documents(data), writers, eos_id, corpus_bytes(data))
    facts, splits = {"vocab_size": vocab_size, "dtype": dtype.name, **counts}, {}
    for split, writer in writers.items():
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
