"""Stage `eval`: how often the model's answers are working code. Two task sets ask "Write a Python
function named NAME: ...": documented functions of stdlib files no training split held (with their
doctests where they have runnable ones), and the project's own tasks with hidden tests. Greedy
answers are scored for parsing and defining the function; with eval.execute=true they are also
run against the tests in the sandbox (pass@1). The fine-tuned model and its base are both scored,
so the manifest says what fine-tuning bought."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

from tqdm.auto import tqdm

from pipeline.config.run import Sampling
from pipeline.config.stages import chat_model_stage
from pipeline.device import has_accelerator
from pipeline.eval.sandbox import probe
from pipeline.eval.scoring import score, summarize
from pipeline.eval.tasks import CodeTask, eval_suites, held_out_config
from pipeline.model.gguf_import import local_model_dir
from pipeline.model.inference import (
    ModelChoice,
    format_prompt,
    generate_batch,
    load_model,
    resolve_model,
    trained_model,
)
from pipeline.stages.context import StageContext

NAME = "eval"
DIR = "eval"  # runs/<name>/eval/
DISTRIBUTED = False  # the main process scores
KEEPS_WORK = False  # a rebuild starts over
UNTRACKED = ()
ENABLE = (
    "answers were not run: set eval.execute=true to run them against their tests in the sandbox "
    "(README, Answer quality)"
)
NO_STDLIB_TASKS = (
    "eval: no stdlib task: no stdlib file is held out by every training split (with data.separator a "
    "file is held out only when all its parts are); the functions set is scored alone"
)
log = logging.getLogger("pipeline")


def upstream(specs) -> list[str]:
    return [] if specs.eval.model else [chat_model_stage(specs)]


def config_slice(specs) -> dict:
    return {"eval": asdict(specs.eval), "held_out": held_out_config(specs)}


def _targets(ctx: StageContext) -> dict[str, ModelChoice]:
    e = ctx.specs.eval
    if e.model:
        return {"model": resolve_model(e.model)}
    trained = ctx.inputs[chat_model_stage(ctx.specs)].path
    run_dir = ctx.out.parent
    targets = {"finetuned": trained_model(trained)}
    if e.base:
        base = local_model_dir(ctx.specs.finetune.base) if ctx.specs.finetune.base else str(run_dir / "pretrain/model")
        targets["base"] = ModelChoice(base, None, "base", chat=False)
    return targets


def _answers(model, tokenizer, tasks: list[CodeTask], e, desc: str) -> list[str]:
    chat = bool(tokenizer.chat_template)  # a base without a template is given the request as text
    greedy = Sampling(max_new_tokens=e.max_new_tokens, temperature=0)
    answers = []
    for i in tqdm(range(0, len(tasks), e.batch_size), desc=desc, leave=False, disable=None):
        batch = tasks[i : i + e.batch_size]
        texts = [format_prompt(tokenizer, t.messages if chat else t.messages[0]["content"] + "\n", chat) for t in batch]
        answers += [r["completion"] for r in generate_batch(model, tokenizer, texts, greedy, chat)]
    return answers


def _score_suite(ctx, label: str, suite: str, tasks: list[CodeTask], answers: list[str]) -> dict:
    e = ctx.specs.eval
    scores = [score(a, t, e.timeout_seconds, e.execute) for a, t in zip(answers, tasks)]
    with open(ctx.out / f"answers_{label}_{suite}.jsonl", "w") as f:
        for t, a, s in zip(tasks, answers, scores):
            f.write(json.dumps({"function": t.name, "prompt": t.messages[0]["content"], "answer": a, **s}) + "\n")
    return summarize(scores)


def run(ctx: StageContext) -> dict:
    e = ctx.specs.eval
    suites = eval_suites(ctx.specs)
    # weights: fixed unless set (a CPU's fp32-or-bf16 timing race would make two runs score differently)
    dtype = e.dtype if e.dtype != "auto" or has_accelerator() else "fp32"
    facts = {"tasks": {k: len(v) for k, v in suites.items()}, "execute": e.execute}
    facts["sandbox"] = _sandbox(e) if e.execute else "not run (eval.execute=false)"
    if not suites["stdlib"]:
        log.warning(NO_STDLIB_TASKS)
    for label, choice in _targets(ctx).items():
        model, tokenizer = load_model(choice, e.trust_remote_code, dtype)
        facts[label] = {"model": choice.describe(), "dtype": str(model.dtype).removeprefix("torch.")}
        for suite, tasks in suites.items():
            answers = _answers(model, tokenizer, tasks, e, f"eval {label} {suite}")
            facts[label][suite] = _score_suite(ctx, label, suite, tasks, answers)
        del model
    for label in _targets_in(facts):
        log.info("eval: %s: %s", label, describe_shares(facts[label]))
    if not e.execute:
        log.info("eval: %s", ENABLE)
    return facts


def _sandbox(e) -> dict:
    """The sandbox's layers here, checked on a right and a wrong answer before any is scored."""
    layers, unavailable = probe(e.timeout_seconds)
    log.info("eval: answers that define the function run in the sandbox: %s", ", ".join(layers))
    if unavailable:
        log.warning(
            "eval: sandbox layers unavailable on this machine: %s (README, Answer quality, says what that leaves open)",
            "; ".join(unavailable),
        )
    return {"layers": list(layers), "unavailable": list(unavailable)}


def _targets_in(facts: dict) -> list[str]:
    return [k for k, v in facts.items() if isinstance(v, dict) and "model" in v]


def describe_shares(model_facts: dict) -> str:
    """ "stdlib 64 prompts: 80% parse, 40% define, pass@1 10% of 12 tested; functions ..." """
    parts = []
    for suite in ("stdlib", "functions"):
        s = model_facts.get(suite)
        if not s or not s["prompts"]:
            continue
        text = f"{suite} {s['prompts']} prompts: {s['parses']:.0%} parse, {s['defines']:.0%} define"
        if s["pass_at_1"] is not None:
            text += f", pass@1 {s['pass_at_1']:.0%} of {s['tested']} tested"
        parts.append(text)
    return "; ".join(parts)
