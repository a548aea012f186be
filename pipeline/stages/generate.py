"""Stage `generate`: sample completions for a file of prompts (or built-in ones) into samples.jsonl."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.inference import Sampling, format_prompt, generate_batch, load_model, resolve_model

NAME = "generate"
log = logging.getLogger("pipeline")
CHAT_PROMPTS = [
    "Write a Python function `reverse_list`: Return a new list with the items in reverse order.",
    "Write a Python function `is_palindrome`: Return True if the string reads the same backwards.",
    "Write a Python function `read_lines`: Return the lines of a text file without newlines.",
    "Write a Python function `flatten`: Flatten a list of lists into one list.",
]
COMPLETION_PROMPTS = ["def ", "import os\n\n\ndef ", "class Stack:\n    \"\"\"", "    def __init__(self"]


def upstream(cfg) -> list[str]:
    return [] if cfg.generate.model else ["finetune"]


def config_slice(cfg) -> dict:
    out = {"generate": cfg.generate}
    prompts = cfg.generate.prompts
    if prompts and Path(prompts).is_file():
        out["prompts_size"] = Path(prompts).stat().st_size  # an edited prompts file reruns the stage
    return out


def read_prompts(path: str) -> list:
    """Prompts from a .txt (one per line) or .jsonl ({"prompt": str} or {"messages": [...]}) file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PipelineError(f"generate.prompts={path} does not exist; give a .txt or .jsonl file of prompts.")
    prompts = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if p.suffix != ".jsonl":
                prompts.append(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PipelineError(f"{p}:{lineno}: not valid JSON ({e.msg}); fix or remove that line.") from None
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                prompts.append(row["messages"])
            else:
                raise PipelineError(f"{p}:{lineno}: needs a 'prompt' string or a 'messages' list.")
    if not prompts:
        raise PipelineError(f"{p} has no prompts; write one prompt per line.")
    return prompts


def run(cfg, inputs: dict, out: Path) -> dict:
    g = cfg.generate
    target = g.model or str(inputs["finetune"].path.parent)
    choice = resolve_model(target, g.adapter)
    chat = choice.chat if g.chat == "auto" else bool(g.chat)
    model, tokenizer = load_model(choice, g.trust_remote_code)
    prompts = read_prompts(g.prompts) if g.prompts else (CHAT_PROMPTS if chat else COMPLETION_PROMPTS)
    sampling = Sampling(**{f.name: g[f.name] for f in fields(Sampling)})
    log.info("generate: %d prompts with %s (%s, %s mode)", len(prompts), choice.describe(), choice.kind,
             "chat" if chat else "completion")
    records = []
    for i in tqdm(range(0, len(prompts), g.batch_size), desc="generate", leave=False, disable=None):
        batch = prompts[i : i + g.batch_size]
        texts = [format_prompt(tokenizer, p, chat) for p in batch]
        for prompt, rec in zip(batch, generate_batch(model, tokenizer, texts, sampling)):
            records.append({"prompt": prompt, **rec})
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for r in records[: g.show]:
        shown = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
        log.info("generate: %r ->\n%s", shown[:200], r["completion"])
    tokens = sum(r["completion_tokens"] for r in records)
    log.info("generate: %d completions, %d tokens -> %s", len(records), tokens, out / "samples.jsonl")
    return {
        "model": choice.model_dir, "adapter": choice.adapter_dir, "kind": choice.kind, "chat": chat,
        "prompts": len(records), "completion_tokens": tokens,
    }
