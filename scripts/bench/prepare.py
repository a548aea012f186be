"""Tokenization throughput and memory of the prepare stage.

    python scripts/bench/prepare.py                                  # the stdlib corpus, an 8k BPE
    python scripts/bench/prepare.py --data text --paths corpus/ --tokenizer runs/exp1/tokenizer
    python scripts/bench/prepare.py --generate-gb 2                  # + peak RSS of `pipeline stage=prepare`

Prints one JSON object: MB/s of raw `tokenizers` batch encoding (`encode_batch`, and
`encode_batch_fast`, which skips character offsets) over documents already in memory; of the
prepare writer on the same documents (encode + EOS + split routing + shard writes); of the whole
prepare pass reading the corpus from disk; their ratios to the fastest raw call; and the CPU.
With --generate-gb N it writes an N GB text file (the corpus above, repeated with a different first
line per copy, documents separated), runs the real `pipeline stage=prepare` on it in a child process, and reports the
child's wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, device_name, run_child  # also puts the repo on sys.path

from pipeline.config.data import CorpusSpec
from pipeline.data.encode import BATCH_BYTES, Chunks, encode_chunks
from pipeline.data.sources import labelled_documents, take_bytes, utf8_len
from pipeline.model.tokenizer import EOS, train_bpe

SEPARATOR = "<|doc|>"  # between documents of a generated corpus file (never in the stdlib sources)


def best_mb_per_s(fn, mb: float, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return mb / min(times)


def throughput(spec: CorpusSpec, tok, repeats: int) -> dict:
    eos, dtype = tok.token_to_id(EOS), np.dtype(np.uint16)
    docs = list(labelled_documents(spec))
    mb = sum(utf8_len(d) for _, d in docs) / 1e6

    def raw(method):
        encode = getattr(tok, method)
        return lambda: [
            encode([d for _, d in batch], add_special_tokens=False)
            for _, batch in Chunks(docs, 2**62, BATCH_BYTES, lambda c: True)
        ]

    def write(labelled):
        with tempfile.TemporaryDirectory() as out:
            encode_chunks(tok, Chunks(labelled, 64 * 2**20, BATCH_BYTES, lambda c: True), Path(out), dtype, eos, "b")

    figures = {
        name: best_mb_per_s(fn, mb, repeats)
        for name, fn in (
            ("raw_encode_batch", raw("encode_batch")),
            ("raw_encode_batch_fast", raw("encode_batch_fast")),
            ("prepare_in_memory", lambda: write(iter(docs))),
            ("prepare_from_disk", lambda: write(labelled_documents(spec))),
        )
    }
    fastest = max(figures["raw_encode_batch"], figures["raw_encode_batch_fast"])
    return {
        "mb": round(mb, 2),
        **{f"{k}_mb_per_s": round(v, 2) for k, v in figures.items()},
        "in_memory_vs_fastest_raw": round(figures["prepare_in_memory"] / fastest, 3),
        "from_disk_vs_fastest_raw": round(figures["prepare_from_disk"] / fastest, 3),
        "from_disk_vs_encode_batch": round(figures["prepare_from_disk"] / figures["raw_encode_batch"], 3),
    }


def generate_corpus(spec: CorpusSpec, path: Path, gb: float) -> int:
    """One text file (like TinyStories' train.txt) of the corpus repeated, documents separated."""
    docs = [d for _, d in labelled_documents(spec)]
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < gb * 1e9:
            text = "".join(f"# copy {copy}\n{d}{SEPARATOR}" for d in docs)
            f.write(text)
            written, copy = written + utf8_len(text), copy + 1
    return written


def prepare_at_scale(spec: CorpusSpec, gb: float) -> dict:
    """The real CLI on a generated corpus: the tokenizer stage first (on a 20 MB sample), then
    `stage=prepare` alone in a child process whose own peak RSS is read with wait4."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work).resolve()
        nbytes = generate_corpus(spec, work / "corpus.txt", gb)
        args = [
            sys.executable,
            "-m",
            "pipeline",
            "run.name=bench",
            f"run.root={work}/runs",
            "data=text",
            f"data.paths=[{work}/corpus.txt]",
            f"data.separator='{SEPARATOR}'",
            "tokenizer.max_train_bytes=20000000",
        ]
        subprocess.run([*args, "stage=tokenizer"], check=True, cwd=REPO, capture_output=True)
        _, wall, peak_gb = run_child([*args, "stage=prepare"], "pipeline stage=prepare", cwd=REPO)
        facts = json.loads((work / "runs/bench/data/manifest.json").read_text())["facts"]
    return {
        "generated_gb": round(nbytes / 1e9, 2),
        "prepare_wall_s": round(wall, 1),
        "prepare_mb_per_s": round(nbytes / 1e6 / wall, 2),
        "chunks": facts["chunks"],
        "tokens": facts["train"]["tokens"] + facts["val"]["tokens"],
        "prepare_peak_rss_gb": round(peak_gb, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="stdlib", help="stdlib | text | jsonl")
    p.add_argument("--paths", nargs="*", default=[])
    p.add_argument("--tokenizer", help="a tokenizer.json or HF tokenizer dir (default: train an 8k BPE on 20 MB)")
    p.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    p.add_argument("--generate-gb", type=float, help="also prepare a generated corpus of this many GB with the CLI")
    args = p.parse_args()

    spec = CorpusSpec(source=args.data, paths=args.paths)
    if args.tokenizer:
        from tokenizers import Tokenizer

        path = Path(args.tokenizer)
        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    else:
        tok = train_bpe(take_bytes((d for _, d in labelled_documents(spec)), 20 * 2**20), 8192)
    result = {
        "corpus": args.data,
        "device": device_name_cpu(),
        **throughput(spec, tok, args.repeats),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
    }
    if args.generate_gb:
        result.update(prepare_at_scale(spec, args.generate_gb))
    print(json.dumps(result))


def device_name_cpu() -> str:
    import torch

    return device_name(torch.device("cpu"))


if __name__ == "__main__":
    main()
