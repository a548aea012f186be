"""Tokenization throughput: the prepare stage's one-pass writer vs raw `tokenizers` batch encoding.

    python scripts/bench/prepare.py                                  # the stdlib corpus, an 8k BPE
    python scripts/bench/prepare.py --data text --paths corpus/ --tokenizer runs/exp1/tokenizer

Prints one JSON object: MB/s of raw encode_batch over the documents already in memory, of the
prepare writer on the same in-memory documents (encode + EOS + split routing + shard writes), of
the whole prepare pass reading the corpus from disk, their ratios, peak RSS and the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from common import device_name  # also puts the repo on sys.path

from pipeline.data.shards import ShardWriter, token_dtype
from pipeline.data.sources import CorpusSpec, labelled_documents, take_bytes, utf8_len
from pipeline.model.tokenizer import EOS, train_bpe
from pipeline.stages.prepare import BATCH_BYTES, _batches, tokenize_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="stdlib", help="stdlib | text | jsonl")
    p.add_argument("--paths", nargs="*", default=[])
    p.add_argument("--tokenizer", help="a tokenizer.json or HF tokenizer dir (default: train an 8k BPE on 20 MB)")
    p.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    args = p.parse_args()

    spec = CorpusSpec(source=args.data, paths=args.paths)
    if args.tokenizer:
        from tokenizers import Tokenizer

        path = Path(args.tokenizer)
        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    else:
        tok = train_bpe(take_bytes((d for _, d in labelled_documents(spec)), 20 * 2**20), 8192)
    eos, dtype = tok.token_to_id(EOS), token_dtype(tok.get_vocab_size())
    docs = list(labelled_documents(spec))
    mb = sum(utf8_len(d) for _, d in docs) / 1e6

    def best(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return mb / min(times)

    def raw():
        for batch in _batches(docs, BATCH_BYTES):
            tok.encode_batch([d for _, d in batch], add_special_tokens=False)

    def write(labelled):
        with tempfile.TemporaryDirectory() as out:
            writers = {s: ShardWriter(Path(out), s, dtype, 100_000_000) for s in ("train", "val")}
            tokenize_corpus(tok, labelled, writers, eos)

    raw_mbs = best(raw)
    memory_mbs = best(lambda: write(iter(docs)))
    disk_mbs = best(lambda: write(labelled_documents(spec)))
    print(json.dumps({
        "corpus": args.data, "mb": round(mb, 2), "device": device_name_cpu(),
        "raw_encode_batch_mb_per_s": round(raw_mbs, 2), "prepare_in_memory_mb_per_s": round(memory_mbs, 2),
        "prepare_from_disk_mb_per_s": round(disk_mbs, 2), "in_memory_vs_raw": round(memory_mbs / raw_mbs, 3),
        "from_disk_vs_raw": round(disk_mbs / raw_mbs, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
    }))


def device_name_cpu() -> str:
    import torch

    return device_name(torch.device("cpu"))


if __name__ == "__main__":
    main()
