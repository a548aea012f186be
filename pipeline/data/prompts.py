"""Prompts for generation: a .txt file (a prompt a line) or .jsonl ({"prompt": ...} or {"messages": [...]})."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.jsonl import read_jsonl
from pipeline.errors import PipelineError


def _prompt_of(row):
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    raise ValueError("needs a 'prompt' string or a 'messages' list")


def read_prompts(path: str) -> list:
    """Prompts from a .txt (one per line) or .jsonl ({"prompt": str} or {"messages": [...]}) file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PipelineError(f"generate.prompts={path} does not exist; give a .txt or .jsonl file of prompts.")
    if p.suffix == ".jsonl":
        prompts = list(read_jsonl(p, _prompt_of))
    else:
        lines = p.read_text(encoding="utf-8", errors="replace").split("\n")
        prompts = [line.rstrip("\r") for line in lines if line.strip()]
    if not prompts:
        raise PipelineError(f"{p} has no prompts; write one prompt per line.")
    return prompts
