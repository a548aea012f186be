"""Tokenization throughput and memory of the prepare stage.

    python scripts/bench/prepare.py                                  # the stdlib corpus, an 8k BPE
    python scripts/bench/prepare.py --data text --paths corpus/ --tokenizer runs/exp1/tokenizer
    python scripts/bench/prepare.py --generate-gb 2                  # + peak RSS of `pipeline stage=prepare`
    python scripts/bench/prepare.py --skip-throughput --generate-gb 2 --single-document --max-train-bytes -1

Prints one JSON object: MB/s of raw `tokenizers` batch encoding (`encode_batch`, and
`encode_batch_fast`, which skips character offsets) over documents already in memory; of the
prepare writer on the same documents (encode + EOS + split routing + shard writes); of the whole
prepare pass reading the corpus from disk; their ratios to the fastest raw call; and the CPU.
With --generate-gb N it writes an N GB text file (the corpus above, repeated with a different first
line per copy, documents separated, or with --single-document one document without a separator),
runs the real `pipeline stage=tokenizer`, then `stage=prepare` with one process and with two
(accelerate launch), and reports wall time, MB/s, each process' peak RSS and whether the two
launches wrote the same shards.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, device_name  # also puts the repo on sys.path

from pipeline.config.data import CorpusSpec
from pipeline.data.encode import BATCH_BYTES, Chunks, encode_chunks
from pipeline.data.sources import labelled_documents, take_bytes, utf8_len
from pipeline.model.tokenizer import EOS, train_bpe

SEPARATOR = "<|doc|>"  # between documents of a generated corpus file (never in the stdlib sources)
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH_TWO += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


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
    mb = sum(utf8_len(d) for _, d, _ in docs) / 1e6

    def raw(method):
        encode = getattr(tok, method)
        return lambda: [
            encode([d for _, d, _ in batch], add_special_tokens=False)
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


def generate_corpus(spec: CorpusSpec, path: Path, gb: float, separator: str = SEPARATOR) -> int:
    """One text file (like TinyStories' train.txt) of the corpus repeated, documents separated
    (or, with separator="", one document of that size)."""
    docs = [d for _, d, _ in labelled_documents(spec)]
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < gb * 1e9:
            text = "".join(f"# copy {copy}\n{d}{separator}" for d in docs)
            f.write(text)
            written, copy = written + utf8_len(text), copy + 1
    return written


def prepare_at_scale(spec: CorpusSpec, gb: float, single: bool, max_train_bytes: int | None) -> dict:
    """The real CLI on a generated corpus: the tokenizer stage, then `stage=prepare` with one
    process and with two (accelerate launch); each stage reports its own peak RSS per process."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work).resolve()
        nbytes = generate_corpus(spec, work / "corpus.txt", gb, "" if single else SEPARATOR)
        args = ["-m", "pipeline", f"run.root={work}/runs", "data=text", f"data.paths=[{work}/corpus.txt]"]
        args += [] if single else [f"data.separator='{SEPARATOR}'"]
        args += [f"tokenizer.max_train_bytes={max_train_bytes or 'null'}"] if max_train_bytes != -1 else []
        result = {"generated_gb": round(nbytes / 1e9, 2), "single_document": single}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args, "run.name=one", "stage=tokenizer"], check=True, cwd=REPO)
        tok = facts_of(work / "runs/one/tokenizer")
        result["tokenizer"] = {k: tok[k] for k in ("train_bytes", "seconds", "peak_rss_gb")}
        result["tokenizer"]["wall_s"] = round(time.perf_counter() - t0, 1)
        for name, launch in (("one", []), ("two", LAUNCH_TWO)):
            if name == "two":  # the same tokenizer, so that the shards can be compared
                shutil.copytree(work / "runs/one/tokenizer", work / "runs/two/tokenizer")
            t0 = time.perf_counter()
            cmd = [*(launch or [sys.executable]), *args, f"run.name={name}", "stage=prepare"]
            subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"})
            wall = time.perf_counter() - t0
            facts = facts_of(work / f"runs/{name}/data")
            result[f"prepare_{name}_process"] = {
                "wall_s": round(wall, 1),
                "mb_per_s": round(nbytes / 1e6 / wall, 2),
                "chunks": facts["chunks"],
                "tokens": facts["train"]["tokens"] + facts["val"]["tokens"],
                "peak_rss_gb_by_rank": facts["peak_rss_gb_by_rank"],
            }
        result["shards_identical"] = all(
            filecmp.cmp(f, work / "runs/two/data" / f.name, shallow=False)
            for f in (work / "runs/one/data").glob("*.bin")
        )
    return result


def facts_of(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text())["facts"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="stdlib", help="stdlib | text | jsonl")
    p.add_argument("--paths", nargs="*", default=[])
    p.add_argument("--tokenizer", help="a tokenizer.json or HF tokenizer dir (default: train an 8k BPE on 20 MB)")
    p.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    p.add_argument("--generate-gb", type=float, help="also prepare a generated corpus of this many GB with the CLI")
    p.add_argument("--single-document", action="store_true", help="... as one document: no separator")
    p.add_argument(
        "--max-train-bytes", type=int, default=20_000_000, help="tokenizer.max_train_bytes there (-1: the default)"
    )
    p.add_argument("--skip-throughput", action="store_true", help="only the generated corpus")
    args = p.parse_args()

    spec = CorpusSpec(source=args.data, paths=args.paths)
    if args.tokenizer:
        from tokenizers import Tokenizer

        path = Path(args.tokenizer)
        tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    else:
        tok = train_bpe(take_bytes((d for _, d, _ in labelled_documents(spec)), 20 * 2**20), 8192)
    result = {"corpus": args.data, "device": device_name_cpu()}
    if not args.skip_throughput:
        result.update(throughput(spec, tok, args.repeats))
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    if args.generate_gb:
        result.update(prepare_at_scale(spec, args.generate_gb, args.single_document, args.max_train_bytes))
    print(json.dumps(result))


def device_name_cpu() -> str:
    import torch

    return device_name(torch.device("cpu"))


if __name__ == "__main__":
    main()
