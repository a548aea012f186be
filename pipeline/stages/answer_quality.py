"""Stage `eval`: how often the model's answers are working code. Held-out prompts ask for a
documented function of a validation-split stdlib file; each greedy answer is scored for parsing,
defining the function asked for, and passing the original docstring's doctests. The fine-tuned
model and its base are both scored, so the manifest says what fine-tuning bought."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from tqdm.auto import tqdm

from pipeline.config.run import Sampling
from pipeline.eval.scoring import score, summarize
from pipeline.eval.tasks import held_out_tasks
from pipeline.model.inference import (
    ModelChoice,
    format_prompt,
    generate_batch,
    load_model,
    resolve_model,
)
from pipeline.stages.context import StageContext

NAME = "eval"
DIR = "eval"  # runs/<name>/eval/
DISTRIBUTED = False  # the main process scores
KEEPS_WORK = False  # a rebuild starts over
UNTRACKED = ()
log = logging.getLogger("pipeline")


def upstream(specs) -> list[str]:
    return [] if specs.eval.model else ["finetune"]


def config_slice(specs) -> dict:
    data = specs.finetune.data
    return {
        "eval": asdict(specs.eval),
        "tasks": {"val_fraction": data.val_fraction, "max_code_chars": data.max_code_chars},
    }


def _targets(ctx: StageContext) -> dict[str, ModelChoice]:
    e = ctx.specs.eval
    if e.model:
        return {"model": resolve_model(e.model)}
    run_dir = ctx.inputs["finetune"].path.parent
    targets = {"finetuned": resolve_model(str(run_dir))}
    if e.base:
        base = ctx.specs.finetune.base or str(run_dir / "pretrain" / "model")
        targets["base"] = ModelChoice(base, None, "base", chat=False)
    return targets


def run(ctx: StageContext) -> dict:
    e, data = ctx.specs.eval, ctx.specs.finetune.data
    tasks = held_out_tasks(data.val_fraction, data.max_code_chars, e.max_prompts)
    greedy = Sampling(max_new_tokens=e.max_new_tokens, temperature=0)
    facts = {"tasks": len(tasks)}
    for label, choice in _targets(ctx).items():
        model, tokenizer = load_model(choice, e.trust_remote_code, e.dtype)
        chat = bool(tokenizer.chat_template)  # a base without a template is given the request as text
        answers = []
        for i in tqdm(range(0, len(tasks), e.batch_size), desc=f"eval {label}", leave=False, disable=None):
            batch = tasks[i : i + e.batch_size]
            texts = [
                format_prompt(tokenizer, t.messages if chat else t.messages[0]["content"] + "\n", chat) for t in batch
            ]
            answers += [r["completion"] for r in generate_batch(model, tokenizer, texts, greedy, chat)]
        scores = [score(a, t, e.timeout_seconds) for a, t in zip(answers, tasks)]
        with open(ctx.out / f"answers_{label}.jsonl", "w") as f:
            for t, a, s in zip(tasks, answers, scores):
                f.write(json.dumps({"function": t.name, "prompt": t.messages[0]["content"], "answer": a, **s}) + "\n")
        facts[label] = {
            "model": choice.describe(),
            "dtype": str(model.dtype).removeprefix("torch."),
            **summarize(scores),
        }
        del model
    log.info(
        "eval: %d held-out prompts; %s",
        len(tasks),
        "; ".join(
            f"{label} {s['parses']:.0%} parse, {s['defines']:.0%} define the function"
            + (
                f", {s['passes_doctests']:.0%} of {s['with_doctests']} pass their doctests"
                if s["with_doctests"]
                else ""
            )
            for label, s in facts.items()
            if isinstance(s, dict)
        ),
    )
    return facts
