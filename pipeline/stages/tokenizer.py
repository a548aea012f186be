"""Stage `tokenizer`: train byte-level BPE on the corpus' training split; save an HF tokenizer dir."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
from tqdm.auto import tqdm

from pipeline.data.encode import encode_documents
from pipeline.data.sources import split_documents, take_bytes, utf8_len
from pipeline.errors import PipelineError
from pipeline.model.tokenizer import to_hf_tokenizer, train_bpe
from pipeline.stages.context import StageContext
from pipeline.train.memory import peak_rss_gb

NAME = "tokenizer"
DIR = "tokenizer"  # runs/<name>/tokenizer/
DISTRIBUTED = False  # the main process trains it
KEEPS_WORK = False  # a rebuild starts over
UNTRACKED = ()
log = logging.getLogger("pipeline")
VAL_SAMPLE_BYTES = 20 * 2**20  # enough validation text for a stable bytes/token figure


def upstream(specs) -> list[str]:
    return []


def config_slice(specs) -> dict:
    return {"data": asdict(specs.data), "tokenizer": asdict(specs.tokenizer)}


def run(ctx: StageContext) -> dict:
    data, spec = ctx.specs.data, ctx.specs.tokenizer
    t0 = time.time()
    stats = {"docs": 0, "bytes": 0}
    files: dict = {}

    def counted(docs):
        with tqdm(desc="tokenizer: reading corpus", unit="B", unit_scale=True, leave=False, disable=None) as bar:
            for doc in docs:
                n = utf8_len(doc)
                stats["docs"] += 1
                stats["bytes"] += n
                bar.update(n)
                yield doc

    tok = train_bpe(
        counted(take_bytes(split_documents(data, "train", files), spec.max_train_bytes)),
        spec.vocab_size,
        spec.min_frequency,
    )
    if stats["docs"] == 0:
        raise PipelineError(
            "the training split is empty (every document fell into validation); "
            "add more documents or lower data.val_fraction."
        )
    to_hf_tokenizer(tok, spec.model_max_length).save_pretrained(ctx.out)

    val_docs = list(take_bytes(split_documents(data, "val"), VAL_SAMPLE_BYTES))
    val_bytes = sum(utf8_len(d) for d in val_docs)
    val_tokens = sum(len(a) for ids in encode_documents(tok.encode_batch_fast, val_docs, np.uint32) for a in ids)
    secs = time.time() - t0
    facts = {
        "vocab_size": tok.get_vocab_size(),
        "train_docs": stats["docs"],
        "train_bytes": stats["bytes"],
        "val_bytes_per_token": round(val_bytes / val_tokens, 4) if val_tokens else None,
        "seconds": round(secs, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        **files,  # binary_skipped / non_utf8_replaced, when any
    }
    log.info(
        "tokenizer: %d-token BPE from %.1f MB of %d docs in %.1fs (%.1f MB/s, peak RSS %.2f GB), %s bytes/token "
        "on val -> %s",
        facts["vocab_size"],
        stats["bytes"] / 1e6,
        stats["docs"],
        secs,
        stats["bytes"] / 1e6 / secs,
        facts["peak_rss_gb"],
        facts["val_bytes_per_token"],
        ctx.out,
    )
    return facts
