"""LoRA SFT side by side, one after the other on this machine: pipeline's finetune stage and TRL's
SFTTrainer + PEFT, on the same base, the same chat JSONL (the quickstart's docstring -> function
pairs), the same batch shape, LoRA rank, precision and steps, training only the assistant's tokens:
both padding each batch to its longest example, or both packing (--packing). The base is a random
one (a conf/model/ shape with pipeline's tokenizer and chat template), or --base: a local HF model
directory or a .gguf file (imported as `pipeline` imports it). TRL runs with its own defaults but
for these settings (so it recomputes activations, its default; pipeline decides by memory). Prints
JSON: non-padding input tokens/s of training after the warm-up steps, each process's peak RSS and
wall time, and the loss of the first step.

    pip install trl                                          # TRL is not a dependency of pipeline
    python scripts/bench/trl_compare.py --trl-python "$(which python)" --precision no
    python scripts/bench/trl_compare.py --trl-python "$(which python)" --base SmolLM2-135M-Instruct.Q4_1.gguf \
        --seq-len 512 --micro-batch 8 --rank 32 --steps 12 --warmup 3 --packing
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from itertools import islice
from pathlib import Path

from common import (  # also puts the repo on sys.path
    REPO,
    device_name,
    model_spec,
    run_child,
)

from pipeline.data.conversations import stdlib_conversations
from pipeline.data.sources import read_text, stdlib_files
from pipeline.model.build import build_model, count_params, hf_config
from pipeline.model.gguf_import import local_model_dir
from pipeline.model.tokenizer import to_hf_tokenizer, train_bpe


def make_base(path: Path, model: str, vocab: int, seq_len: int) -> int:
    docs = (read_text(f) or "" for f in islice(stdlib_files(), 400))
    tok = to_hf_tokenizer(train_bpe(docs, vocab), seq_len)
    net = build_model(hf_config(model_spec(model), len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), 0)
    net.save_pretrained(path)
    tok.save_pretrained(path)
    return count_params(net)


def pipeline_figures(metrics: Path, warmup: int) -> dict:
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "tokens_per_s" in r and "step" in r]
    first, last = rows[warmup - 1], rows[-1]
    seen = (last["tokens_seen"] - first["tokens_seen"]) / (last["train_seconds"] - first["train_seconds"])
    return {"tokens_per_s": round(seen, 1), "first_loss": round(rows[0]["loss"], 4)}


def existing_base(path: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--trl-python", required=True, help="python of an environment with trl, peft, transformers")
    p.add_argument("--model", default="small", help="a conf/model/*.yaml name for a random base")
    p.add_argument("--base", help="instead: a local HF causal-LM directory or a .gguf file")
    p.add_argument("--packing", action="store_true", help="both pack conversations into full rows")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--conversations", type=int, default=3000)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = local_model_dir(args.base) if args.base else str(work / "base")
        params = existing_base(base) if args.base else make_base(work / "base", args.model, args.vocab, args.seq_len)
        data = work / "chat.jsonl"
        convs = islice(stdlib_conversations(800), args.conversations)
        data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
        shape = dict(
            steps=args.steps,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            rank=args.rank,
            precision=args.precision,
            packing=args.packing,
        )

        _, wall, rss = run_child(
            [
                sys.executable,
                "-m",
                "pipeline",
                "stage=finetune",
                f"run.root={work}",
                "run.name=bench",
                f"finetune.base={base}",
                f"finetune.packing={str(args.packing).lower()}",
                "finetune.data.source=jsonl",
                f"finetune.data.paths=[{data}]",
                "finetune.data.val_fraction=0.01",
                "finetune.data.max_val_examples=16",
                "finetune.merge=false",
                f"finetune.lora.r={args.rank}",
                f"finetune.lora.alpha={2 * args.rank}",
                f"finetune.train.max_steps={args.steps}",
                "finetune.train.time_budget=null",
                f"finetune.train.seq_len={args.seq_len}",
                f"finetune.train.micro_batch_size={args.micro_batch}",
                f"finetune.train.batch_tokens={args.seq_len * args.micro_batch}",
                "finetune.train.lr=2e-4",
                f"finetune.train.mixed_precision={args.precision}",
                "finetune.train.log_every=1",
                "finetune.train.eval_every=0",
                "finetune.train.ckpt_every=0",
            ],
            "pipeline finetune",
            cwd=REPO,
            stderr=sys.stderr,
        )
        ours = {
            **pipeline_figures(work / "bench/finetune/metrics.jsonl", args.warmup),
            "wall_s": round(wall, 1),
            "peak_rss_gb": round(rss, 3),
        }

        out, wall, rss = run_child(
            [
                args.trl_python,
                str(REPO / "scripts/bench/trl_sft.py"),
                "--base",
                base,
                "--data",
                str(data),
                "--out",
                str(work / "trl"),
                "--precision",
                args.precision,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--seq-len",
                str(args.seq_len),
                "--micro-batch",
                str(args.micro_batch),
                "--rank",
                str(args.rank),
                *(["--packing"] if args.packing else []),
            ],
            "TRL SFTTrainer",
            stderr=sys.stderr,
        )
        trl = {**json.loads(out.strip().splitlines()[-1]), "wall_s": round(wall, 1), "peak_rss_gb": round(rss, 3)}

    import torch

    print(
        json.dumps(
            {
                "device": device_name(torch.device("cpu")),
                "model": args.base or args.model,
                "params": params,
                **shape,
                "pipeline": ours,
                "trl": trl,
                "tokens_per_s_ratio": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
