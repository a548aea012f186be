"""Stage `generate`: sample completions for a file of prompts (or built-in ones) into samples.jsonl."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.config.stages import chat_model_stage
from pipeline.data.prompts import read_prompts
from pipeline.model import inference
from pipeline.stages.context import StageContext

NAME = "generate"
DIR = "generate"  # runs/<name>/generate/
DISTRIBUTED = False  # the main process generates
KEEPS_WORK = False  # a rebuild starts over
UNTRACKED = ()
log = logging.getLogger("pipeline")
CHAT_PROMPTS = [
    "Write a Python function named reverse_list: Return a new list with the items in reverse order.",
    "Write a Python function named is_palindrome: Return True if the string reads the same backwards.",
    "Write a Python function named read_lines: Return the lines of a text file without newlines.",
    "Write a Python function named flatten: Flatten a list of lists into one list.",
]
COMPLETION_PROMPTS = ["def ", "import os\n\n\ndef ", 'class Stack:\n    """', "    def __init__(self"]


def upstream(specs) -> list[str]:
    return [] if specs.generate.model else [chat_model_stage(specs)]


def config_slice(specs) -> dict:
    out = {"generate": asdict(specs.generate)}
    prompts = specs.generate.prompts
    if prompts and Path(prompts).is_file():
        out["prompts_size"] = Path(prompts).stat().st_size  # an edited prompts file reruns the stage
    return out


def run(ctx: StageContext) -> dict:
    g = ctx.specs.generate
    if g.model:
        choice = inference.resolve_model(g.model, g.adapter)
    else:
        choice = inference.trained_model(ctx.inputs[chat_model_stage(ctx.specs)].path)
    chat = g.chat_mode(choice.chat)
    model, tokenizer = inference.load_model(choice, g.trust_remote_code, g.dtype)
    prompts = read_prompts(g.prompts) if g.prompts else (CHAT_PROMPTS if chat else COMPLETION_PROMPTS)
    log.info(
        "generate: %d prompts with %s (%s, %s mode)",
        len(prompts),
        choice.describe(),
        choice.kind,
        "chat" if chat else "completion",
    )
    records = []
    for i in tqdm(range(0, len(prompts), g.batch_size), desc="generate", leave=False, disable=None):
        batch = prompts[i : i + g.batch_size]
        texts = [inference.format_prompt(tokenizer, p, chat) for p in batch]
        templated = chat or any(isinstance(p, list) for p in batch)
        for prompt, rec in zip(batch, inference.generate_batch(model, tokenizer, texts, g.sampling(), templated)):
            records.append({"prompt": prompt, **rec})
    with open(ctx.out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for r in records[: g.show]:
        shown = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
        log.info("generate: %r ->\n%s", shown[:200], r["completion"])
    tokens = sum(r["completion_tokens"] for r in records)
    log.info("generate: %d completions, %d tokens -> %s", len(records), tokens, ctx.out / "samples.jsonl")
    return {
        "model": choice.model_dir,
        "adapter": choice.adapter_dir,
        "kind": choice.kind,
        "chat": chat,
        "prompts": len(records),
        "completion_tokens": tokens,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
