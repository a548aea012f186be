"""Chat data for fine-tuning: conversations in the OpenAI/HF `messages` format.

Sources: the embedded default (docstring -> function pairs mined from the standard library with
`ast`), JSONL with `messages` or alpaca fields (`instruction`, optional `input`, `output`), or a
hub dataset. Every conversation is checked: roles known, contents strings, at least one
assistant turn. A bad line is an error naming file and line, or, with `skip_bad`, counted.
"""

from __future__ import annotations

import ast
import json
import logging
import textwrap
from collections.abc import Iterator

from pipeline.config.data import ChatDataSpec
from pipeline.data.jsonl import read_jsonl
from pipeline.data.sources import (
    is_val,
    read_text,
    resolve_paths,
    stdlib_files,
    stream_hf_dataset,
)
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")
ROLES = ("system", "user", "assistant")
MIN_SUMMARY_WORDS = 3  # "days" or "year (1-9999)" name a property, they do not ask for anything


def to_messages(row: dict, spec: ChatDataSpec) -> list[dict]:
    """A conversation from one record, or ValueError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    fmt = spec.format
    if fmt == "auto":
        fmt = "messages" if spec.messages_field in row else "alpaca" if "instruction" in row else None
        if fmt is None:
            raise ValueError(f"no {spec.messages_field!r} or 'instruction' field (found {sorted(row)})")
    if fmt == "alpaca":
        if not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise ValueError("alpaca records need string 'instruction' and 'output' fields")
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    else:
        messages = row.get(spec.messages_field)
        if not isinstance(messages, list):
            raise ValueError(f"{spec.messages_field!r} must be a list of {{role, content}} objects")
    return check_messages(messages)


def check_messages(messages: list) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': a string}}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise ValueError("the conversation has no assistant turn to learn from")
    return out


def _jsonl_conversations(spec: ChatDataSpec, counts: dict) -> Iterator[list[dict]]:
    fix = "fix the line or set finetune.data.skip_bad=true to skip such lines"
    for path in resolve_paths(spec.paths, "**/*.jsonl", "JSONL chat", "finetune.data.paths"):
        yield from read_jsonl(path, lambda row: to_messages(row, spec), fix, spec.skip_bad, counts)


def _hf_conversations(spec: ChatDataSpec, counts: dict) -> Iterator[list[dict]]:
    for i, row in enumerate(stream_hf_dataset(spec.name, spec.config, spec.split, "finetune.data.name")):
        try:
            yield to_messages(row, spec)
        except ValueError as e:
            if not spec.skip_bad:
                raise PipelineError(
                    f"dataset {spec.name!r} row {i}: {e}; set finetune.data.skip_bad=true to skip."
                ) from None
            counts["bad"] += 1


def stdlib_conversations(max_code_chars: int) -> Iterator[list[dict]]:
    """(docstring summary -> function source) pairs from the standard library."""
    for _, conv in stdlib_conversations_by_file(max_code_chars):
        yield conv


def code_request(name: str, summary: str) -> str:
    """The quickstart's user turn. The name follows a space, as it does after `def`: a byte-level
    BPE splits "`name" and " name" into different tokens, and small models copied the first,
    writing `defname(` (a quarter of the answers before this format)."""
    return f"Write a Python function named {name}: {summary}"


def _with_summary_docstring(lines: list[str], node: ast.FunctionDef, summary: str) -> str | None:
    """The function's source with its docstring cut to the one-line summary, or None where it
    cannot be cut cleanly. Prose paragraphs are where small models loop ("the number of the
    number of ..."), and the answer is shorter to learn and to write whole."""
    doc, rest = node.body[0], node.body[1:]
    if "\\" in summary or not rest or doc.lineno == node.lineno or rest[0].lineno <= doc.end_lineno:
        return None  # a docstring alone or sharing a line; a backslash's escape would change meaning re-quoted
    body = lines[doc.end_lineno : node.end_lineno]  # from the line after the docstring: comments stay
    while body and not body[0].strip():
        body.pop(0)
    indent = body[0][: len(body[0]) - len(body[0].lstrip())]
    head = "".join(lines[node.lineno - 1 : doc.lineno - 1])
    code = textwrap.dedent(head + f'{indent}"""{summary}"""\n' + "".join(body)).rstrip()
    try:
        ast.parse(code)  # a summary ending in a quote or a backslash would not
    except SyntaxError:
        return None
    return code if code.startswith(("def ", "async def ")) else None


def stdlib_conversations_by_file(max_code_chars: int) -> Iterator[tuple[str, list[dict]]]:
    """(source file text, conversation) pairs: the file decides the split, as in pretraining, so
    no validation answer is a function the pretrained model saw in its training split."""
    for path in stdlib_files():
        source = read_text(path)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines(keepends=True)  # ast.get_source_segment re-splits per call: too slow
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            if node.end_lineno - node.lineno > max_code_chars // 10:
                continue
            doc = ast.get_docstring(node)
            summary = " ".join((doc or "").strip().split("\n\n")[0].split())
            if len(summary.split()) < MIN_SUMMARY_WORDS:
                continue
            code = _with_summary_docstring(lines, node, summary)
            if code is None or len(code) > max_code_chars:
                continue
            yield (
                source,
                [
                    {"role": "user", "content": code_request(node.name, summary)},
                    {"role": "assistant", "content": code},
                ],
            )


def load_conversations(spec: ChatDataSpec) -> tuple[list[list[dict]], list[list[dict]], dict]:
    """(train, val, counts): a deterministic split by a hash of each conversation (of its source
    file for the stdlib pairs, the same rule and fraction as the pretraining corpus's split)."""
    counts = {"bad": 0}
    if spec.source == "stdlib":
        keyed = stdlib_conversations_by_file(spec.max_code_chars)
    else:
        convs = _jsonl_conversations(spec, counts) if spec.source == "jsonl" else _hf_conversations(spec, counts)
        keyed = ((json.dumps(conv, sort_keys=True), conv) for conv in convs)
    train, val = [], []
    for key, conv in keyed:
        train_full = bool(spec.max_examples) and len(train) >= spec.max_examples
        if is_val(key, spec.val_fraction):
            if len(val) < spec.max_val_examples:
                val.append(conv)
        elif not train_full:
            train.append(conv)
        if train_full and len(val) >= spec.max_val_examples:  # the split is by file: val may come late
            break
    if counts["bad"]:
        log.warning("finetune data: skipped %d malformed records (finetune.data.skip_bad=true)", counts["bad"])
    where = ", ".join(spec.paths) or spec.name or spec.source
    if not train:
        raise PipelineError(f"no training conversations in {where}; check finetune.data.paths.")
    if not val:
        raise PipelineError(
            f"no validation conversations in {where} ({len(train)} in all); add data or raise "
            "finetune.data.val_fraction."
        )
    return train, val, counts
