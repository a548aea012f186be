"""How long BPE training takes per amount of text: what to set `tokenizer.max_train_bytes` to.

    python scripts/bench/tokenizer.py --data text --paths .venv/lib/ --glob '**/*.py' --mb 50 200

Trains the tokenizer stage's BPE (the same `train_bpe`) on the first N MB of the corpus' training
split for each N, in a child process each, and prints one JSON object per size: seconds, MB/s and
the child's peak RSS, with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common import REPO, device_name, run_child  # also puts the repo on sys.path

CHILD = """
import sys, time
from pipeline.config.data import CorpusSpec
from pipeline.data.sources import split_documents, take_bytes, utf8_len
from pipeline.model.tokenizer import train_bpe
spec = CorpusSpec(source=sys.argv[1], paths=sys.argv[2].split(",") if sys.argv[2] else [], glob=sys.argv[3])
docs = list(take_bytes(split_documents(spec, "train"), int(sys.argv[4])))
t0 = time.perf_counter()
train_bpe(iter(docs), int(sys.argv[5]))
print(sum(map(utf8_len, docs)), time.perf_counter() - t0)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="stdlib", help="stdlib | text | jsonl")
    p.add_argument("--paths", nargs="*", default=[])
    p.add_argument("--glob", default="**/*.txt", help="files taken from a folder in --paths (text)")
    p.add_argument("--mb", nargs="+", type=float, default=[10], help="training-text sizes to time, in MB")
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args()
    import torch

    cpu = device_name(torch.device("cpu"))
    for mb in args.mb:
        out, wall, peak_gb = run_child(
            [
                sys.executable,
                "-c",
                CHILD,
                args.data,
                ",".join(args.paths),
                args.glob,
                str(int(mb * 1e6)),
                str(args.vocab_size),
            ],
            f"BPE training on {mb} MB",
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        nbytes, secs = out.split()
        print(
            json.dumps(
                {
                    "device": cpu,
                    "vocab_size": args.vocab_size,
                    "train_mb": round(int(nbytes) / 1e6, 1),
                    "bpe_seconds": round(float(secs), 1),
                    "mb_per_s": round(int(nbytes) / 1e6 / float(secs), 2),
                    "wall_s": round(wall, 1),
                    "peak_rss_gb": round(peak_gb, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
