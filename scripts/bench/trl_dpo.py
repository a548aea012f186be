"""DPO with LoRA side by side, one after the other on this machine: pipeline's preference stage and
TRL's DPOTrainer + PEFT, on the same base, the same pairs (stdlib docstring -> function prompts,
the reference function chosen and another function's code rejected), the same LoRA rank, batch
of pairs, precision and steps. TRL runs with its own defaults but for these settings (so it
recomputes activations, its default; pipeline decides by memory). Prints JSON: non-padding tokens/s
of training (chosen + rejected sequences) after the warm-up steps, each process's peak RSS and wall
time, and the loss of one batch under the same weights in both (a LoRA adapter with random, non-zero
weights, so the policy differs from its reference) on the same tokens: they must agree to 1e-4.

    pip install trl                                          # TRL is not a dependency of pipeline
    python scripts/bench/trl_dpo.py --trl-python "$(which python)" --base SmolLM2-135M-Instruct.Q4_1.gguf \
        --micro-batch 8 --rank 32 --steps 8 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from itertools import islice
from pathlib import Path

from common import REPO, device_name, run_child  # also puts the repo on sys.path
from trl_compare import existing_base, pipeline_figures

from pipeline.data.conversations import stdlib_conversations
from pipeline.model.gguf_import import local_model_dir

ADAPTER_SEED = 7


def write_pairs(path: Path, count: int) -> None:
    """Prompt, its reference function (chosen) and another function's code (rejected)."""
    convs = list(islice(stdlib_conversations(800), count + 7))
    rows = [
        {"prompt": [user], "chosen": [answer], "rejected": [convs[i + 7][1]]}
        for i, (user, answer) in enumerate(convs[:count])
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def random_adapter(base: str, out: Path, rank: int) -> None:
    """A LoRA adapter on every linear layer with small random B (a policy that is not its reference)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(ADAPTER_SEED)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(out)


def full_scored_ids(ex) -> list[int]:
    """A shifted example's tokens up to its last trained one (the template's text after the
    end-of-turn token is not scored)."""
    last = max(i for i, label in enumerate(ex.labels) if label != -100)
    return ex.input_ids[: last + 1] + [ex.labels[last]]


def pipeline_batch_loss(
    base: str, adapter: Path, pairs: Path, count: int, seq_len: int, beta: float, tokens: Path
) -> float:
    """The preference objective's mean loss over the first `count` pairs, packed, in fp32; writes
    their tokens (prompt, chosen, rejected ids) for TRL to score the same ones."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.jsonl import read_jsonl
    from pipeline.data.pairs import collate_pairs, render_pairs, to_pair
    from pipeline.model.tokenizer import end_of_turn
    from pipeline.train.preference import PreferenceObjective

    tokenizer = AutoTokenizer.from_pretrained(base)
    rendered, _ = render_pairs(
        tokenizer, list(islice(read_jsonl(pairs, to_pair), count)), seq_len, end_of_turn(tokenizer)
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    with torch.no_grad():
        losses, _ = PreferenceObjective(beta)(model.eval(), collate_pairs(rendered, list(range(count)), 0, seq_len))
    rows = []
    for r in rendered:  # the scored tokens only: the prompt, then each answer through its last trained token
        chosen, rejected = (full_scored_ids(ex) for ex in (r.chosen, r.rejected))
        p = r.prompt_tokens
        rows.append({"prompt_ids": chosen[:p], "chosen_ids": chosen[p:], "rejected_ids": rejected[p:]})
    tokens.write_text(json.dumps(rows))
    return float(losses.mean())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--trl-python", required=True, help="python of an environment with trl, peft, transformers")
    p.add_argument("--base", required=True, help="a local HF causal-LM directory or a .gguf file")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8, help="pairs per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--skip-throughput", action="store_true", help="only the same-batch loss check")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = local_model_dir(args.base)
        pairs = work / "pairs.jsonl"
        write_pairs(pairs, args.pairs)
        random_adapter(base, work / "adapter", args.rank)
        ours_loss = pipeline_batch_loss(
            base, work / "adapter", pairs, args.micro_batch, args.seq_len, args.beta, work / "tokens.json"
        )
        trl_args = ["--base", base, "--data", str(pairs), "--out", str(work / "trl"), "--precision", args.precision]
        trl_args += ["--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--rank", str(args.rank)]
        trl_args += ["--beta", str(args.beta), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        out, _, _ = run_child(
            [
                args.trl_python,
                str(REPO / "scripts/bench/trl_dpo_child.py"),
                *trl_args,
                "--first-loss",
                str(work / "tokens.json"),
                "--adapter",
                str(work / "adapter"),
            ],
            "TRL DPOTrainer loss",
            stderr=sys.stderr,
        )
        trl_loss = json.loads(out.strip().splitlines()[-1])["loss"]
        result = {
            "device": device_name(__import__("torch").device("cpu")),
            "model": args.base,
            "params": existing_base(base),
            "pairs_per_step": args.micro_batch,
            "seq_len": args.seq_len,
            "rank": args.rank,
            "precision": args.precision,
            "same_batch_loss": {
                "pipeline": round(ours_loss, 6),
                "trl": round(trl_loss, 6),
                "diff": abs(ours_loss - trl_loss),
            },
        }
        if not args.skip_throughput:
            _, wall, rss = run_child(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "stage=preference",
                    f"run.root={work}",
                    "run.name=bench",
                    f"preference.base={base}",
                    "preference.data.source=jsonl",
                    f"preference.data.paths=[{pairs}]",
                    "preference.data.val_fraction=0.02",
                    "preference.data.max_val_pairs=8",
                    "preference.merge=false",
                    f"preference.beta={args.beta}",
                    "preference.sft_weight=0",  # plain DPO, as TRL's default loss
                    f"preference.lora.r={args.rank}",
                    f"preference.lora.alpha={2 * args.rank}",
                    f"preference.train.max_steps={args.steps}",
                    f"preference.train.seq_len={args.seq_len}",
                    f"preference.train.micro_batch_size={args.micro_batch}",
                    f"preference.train.batch_tokens={args.seq_len * args.micro_batch}",
                    f"preference.train.mixed_precision={args.precision}",
                    "preference.train.log_every=1",
                    "preference.train.ckpt_every=0",
                    "preference.train.lr=5e-4",
                ],
                "pipeline preference",
                cwd=REPO,
                stderr=sys.stderr,
            )
            ours = {
                **pipeline_figures(work / "bench/preference/metrics.jsonl", args.warmup),
                "wall_s": round(wall, 1),
                "peak_rss_gb": round(rss, 3),
            }
            out, wall, rss = run_child(
                [args.trl_python, str(REPO / "scripts/bench/trl_dpo_child.py"), *trl_args],
                "TRL DPOTrainer",
                stderr=sys.stderr,
            )
            trl = {**json.loads(out.strip().splitlines()[-1]), "wall_s": round(wall, 1), "peak_rss_gb": round(rss, 3)}
            result.update(
                pipeline=ours, trl=trl, tokens_per_s_ratio=round(ours["tokens_per_s"] / trl["tokens_per_s"], 3)
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
