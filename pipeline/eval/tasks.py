"""The eval's two task sets, both asking "Write a Python function named NAME: SUMMARY":

- stdlib: documented functions of standard-library files that no training stage saw (held out by
  pretraining's split and by fine-tuning's, with the same function they use), each with the
  doctests of the function's original docstring where it has runnable ones;
- functions: tasks written for this project (functional_tasks.jsonl), none from the standard
  library, each with hidden assert tests that a working answer passes.
"""

from __future__ import annotations

import ast
import doctest
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.data import CorpusSpec
from pipeline.data.conversations import code_request, stdlib_conversations_by_file
from pipeline.data.sources import is_val

FUNCTION_TASKS = Path(__file__).with_name("functional_tasks.jsonl")


@dataclass(frozen=True)
class CodeTask:
    name: str  # the function asked for
    messages: list[dict]  # the prompt (a user turn)
    doctests: str = ""  # stdlib: the reference docstring when it holds runnable >>> examples
    tests: str = ""  # functions: hidden assert lines

    @property
    def checkable(self) -> bool:
        return bool(self.doctests or self.tests)


def held_out(text: str, corpus: CorpusSpec, chat_val_fraction: float) -> bool:
    """Whether no training split holds any of this file: fine-tuning splits the stdlib pairs by
    file, pretraining (when its corpus is the stdlib) splits documents (the file, or its parts at
    data.separator), both by is_val."""
    if not is_val(text, chat_val_fraction):
        return False
    if corpus.source != "stdlib":
        return True
    parts = text.split(corpus.separator) if corpus.separator else [text]
    return all(is_val(part, corpus.val_fraction) for part in parts if part.strip())


def held_out_tasks(corpus: CorpusSpec, chat_val_fraction: float, max_code_chars: int, limit: int) -> list[CodeTask]:
    """Tasks from documented functions of held-out stdlib files, in a fixed order, each name once.
    A function copied into a file that was trained on (its prompt is a training pair's) is left
    out too."""
    candidates, trained, names, docs, verdicts = [], set(), set(), {}, {}
    for text, conv in stdlib_conversations_by_file(max_code_chars):
        if text not in verdicts:
            verdicts = {text: held_out(text, corpus, chat_val_fraction)}  # a file's pairs come together
        user, reference = conv
        if not verdicts[text]:
            trained.add(user["content"])
            continue
        node = ast.parse(reference["content"]).body[0]
        if node.name in names:  # datetime's classes share method names: one prompt per name
            continue
        names.add(node.name)
        if text not in docs:  # the answer's docstring is cut to its summary: the doctests are in the file
            docs = {text: _docstrings(text)}
        summary = ast.get_docstring(node)
        doc = next((d for d in docs[text].get(node.name, []) if " ".join(d.split()).startswith(summary)), "")
        candidates.append(CodeTask(node.name, [user], doctests=runnable_doctests(doc)))
    return [t for t in candidates if t.messages[0]["content"] not in trained][:limit]


def eval_suites(specs, limit: int | None = None) -> dict[str, list[CodeTask]]:
    """The eval's task sets for a run's specs, at most `limit` (eval.max_prompts) tasks each."""
    chat, limit = specs.finetune.data, specs.eval.max_prompts if limit is None else limit
    return {
        "stdlib": held_out_tasks(specs.data, chat.val_fraction, chat.max_code_chars, limit),
        "functions": function_tasks(limit),
    }


def held_out_config(specs) -> dict:
    """What decides which stdlib files the eval holds out (for the config hash of stages that read them)."""
    chat, corpus = specs.finetune.data, specs.data
    return {
        "chat_val_fraction": chat.val_fraction,
        "max_code_chars": chat.max_code_chars,
        "corpus_source": corpus.source,
        "corpus_val_fraction": corpus.val_fraction,
        "separator": corpus.separator,
    }


def function_tasks(limit: int) -> list[CodeTask]:
    """The project's own tasks with hidden tests, in file order."""
    rows = [json.loads(line) for line in FUNCTION_TASKS.read_text().splitlines() if line.strip()]
    return [
        CodeTask(r["name"], [{"role": "user", "content": code_request(r["name"], r["summary"])}], tests=r["tests"])
        for r in rows[:limit]
    ]


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
