"""Stage `pairs`: preference pairs the chain makes itself (preference.data.source=self). Prompts of
the fine-tuning training split are answered greedily by the fine-tuned model; an answer that fails
the eval's checks (it does not parse, or does not define the function asked for) becomes a pair's
rejected side and the reference solution its chosen side: on-policy negatives, made from artifacts
the run already has. No eval task's prompt or function enters a pair. Answers are never run."""

from __future__ import annotations

import ast
import json
import logging
import random

from tqdm.auto import tqdm

from pipeline.config.run import Sampling
from pipeline.data.conversations import load_conversations
from pipeline.device import has_accelerator
from pipeline.errors import PipelineError
from pipeline.eval.scoring import score
from pipeline.eval.tasks import CodeTask, eval_suites, held_out_config
from pipeline.model.inference import format_prompt, generate_batch, load_model, trained_model
from pipeline.stages.context import StageContext

NAME = "pairs"
DIR = "pairs"  # runs/<name>/pairs/pairs.jsonl
DISTRIBUTED = False  # the main process generates
KEEPS_WORK = False
UNTRACKED = ()
EVAL_PROMPTS = 10**6  # every eval task is excluded, not only the ones an eval would score
log = logging.getLogger("pipeline")


def upstream(specs) -> list[str]:
    return ["finetune"]


def config_slice(specs) -> dict:
    return {"pairs": {**vars(specs.preference.pairs)}, "seed": specs.seed, "held_out": held_out_config(specs)}


def eval_exclusions(specs) -> tuple[set[str], set[str]]:
    """(prompts, function names) of every task the eval could ask (any eval.max_prompts): none
    may enter a pair."""
    tasks = [t for suite in eval_suites(specs, EVAL_PROMPTS).values() for t in suite]
    return {t.messages[0]["content"] for t in tasks}, {t.name for t in tasks}


def candidate_tasks(specs) -> list[tuple[CodeTask, str]]:
    """(task, reference solution) for up to pairs.prompts prompts of the fine-tuning training
    split, sampled by the run's seed, none of them an eval task's."""
    if specs.finetune.data.source != "stdlib":
        raise PipelineError(
            "preference.data.source=self makes pairs from the stdlib fine-tuning data (finetune.data.source="
            "stdlib); with other chat data give pairs: preference.data.source=jsonl preference.data.paths=[...]."
        )
    train, _, _ = load_conversations(specs.finetune.data)
    prompts, names = eval_exclusions(specs)
    out = []
    for user, reference in train:
        name = ast.parse(reference["content"]).body[0].name
        if user["content"] not in prompts and name not in names:
            out.append((CodeTask(name, [user]), reference["content"]))
    n = min(specs.preference.pairs.prompts, len(out))
    return random.Random(specs.seed).sample(out, n)


def failure(answer: str, task: CodeTask) -> str | None:
    """Why an answer fails the eval's static checks, or None if it passes them."""
    verdict = score(answer, task, timeout=0, execute=False)
    if not verdict["parses"]:
        return "does not parse"
    return None if verdict["defines"] else f"does not define {task.name}"


def run(ctx: StageContext) -> dict:
    spec = ctx.specs.preference.pairs
    choice = trained_model(ctx.inputs["finetune"].path)
    tasks = candidate_tasks(ctx.specs)
    model, tokenizer = load_model(choice, ctx.specs.finetune.trust_remote_code, "auto" if has_accelerator() else "fp32")
    greedy = Sampling(max_new_tokens=spec.max_new_tokens, temperature=0)
    pairs, reasons = [], {}
    for i in tqdm(range(0, len(tasks), spec.batch_size), desc="pairs", leave=False, disable=None):
        batch = tasks[i : i + spec.batch_size]
        texts = [format_prompt(tokenizer, t.messages, True) for t, _ in batch]
        for (task, reference), out in zip(batch, generate_batch(model, tokenizer, texts, greedy, True)):
            why = failure(out["completion"], task)
            if why is None or not out["completion"].strip():
                continue
            key = "parse" if why.endswith("parse") else "define"
            reasons[key] = reasons.get(key, 0) + 1
            pairs.append(
                {
                    "prompt": task.messages,
                    "chosen": [{"role": "assistant", "content": reference}],
                    "rejected": [{"role": "assistant", "content": out["completion"]}],
                    "function": task.name,
                    "why": why,
                }
            )
    with open(ctx.out / "pairs.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    log.info(
        "pairs: %d of %d greedy answers of %s fail the eval's checks (%s): %d pairs -> %s",
        len(pairs),
        len(tasks),
        choice.describe(),
        ", ".join(f"{n} do not {k}" for k, n in sorted(reasons.items())) or "none",
        len(pairs),
        ctx.out / "pairs.jsonl",
    )
    if not pairs:
        raise PipelineError(
            f"every answer of {choice.describe()} passes the eval's checks, so there is no rejected answer to "
            f"learn from; raise preference.pairs.prompts or give pairs (preference.data.source=jsonl)."
        )
    return {"model": choice.describe(), "prompts": len(tasks), "pairs": len(pairs), "failures": reasons}
