"""Held-out code tasks: "write function `name`" prompts from documented functions of the
validation-split stdlib files, each with the doctests of the function's original docstring."""

from __future__ import annotations

import ast
import doctest
from dataclasses import dataclass

from pipeline.data.conversations import stdlib_conversations_by_file
from pipeline.data.sources import is_val


@dataclass
class CodeTask:
    name: str  # the function asked for
    messages: list[dict]  # the prompt (a user turn)
    doctests: str  # the reference docstring when it holds >>> examples, else ""


def held_out_tasks(val_fraction: float, max_code_chars: int, limit: int) -> list[CodeTask]:
    """Tasks from documented functions of the validation-split stdlib files (the files neither
    pretraining nor fine-tuning trained on), in a fixed order, each function name once."""
    tasks, names, docs = [], set(), {}
    for text, conv in stdlib_conversations_by_file(max_code_chars):
        if not is_val(text, val_fraction):
            continue
        user, reference = conv
        node = ast.parse(reference["content"]).body[0]
        if node.name in names:  # datetime's classes share method names: one prompt per name
            continue
        names.add(node.name)
        if text not in docs:  # the answer's docstring is cut to its summary: the doctests are in the file
            docs = {text: _docstrings(text)}
        summary = ast.get_docstring(node)
        doc = next((d for d in docs[text].get(node.name, []) if " ".join(d.split()).startswith(summary)), "")
        tasks.append(CodeTask(node.name, [user], runnable_doctests(doc)))
        if len(tasks) >= limit:
            break
    return tasks


def runnable_doctests(doc: str) -> str:
    """The docstring if it holds a doctest example that runs, else "" (secrets' examples are all
    `+SKIP`: their output is random, so there is nothing to score)."""
    examples = doctest.DocTestParser().get_examples(doc) if ">>>" in doc else []
    return doc if any(not ex.options.get(doctest.SKIP) for ex in examples) else ""


def _docstrings(source: str) -> dict[str, list[str]]:
    """Function name -> the docstrings of the functions of that name in a source file."""
    out: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
            out.setdefault(node.name, []).append(ast.get_docstring(node))
    return out
