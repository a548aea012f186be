"""Answer-quality evaluation for code: held-out "write function `name`" prompts, each answer
scored for parsing as Python, defining the function asked for, and passing the doctests of the
original docstring, run in a subprocess with a timeout and the network switched off."""

from __future__ import annotations

import ast
import doctest
import json
import os
import re
import subprocess
import sys
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


def extract_code(answer: str) -> str:
    """The code of an answer: inside its first ``` fence if it has one, else all of it."""
    fenced = re.search(r"```(?:python)?\n(.*?)(?:```|$)", answer, re.S)
    return fenced.group(1) if fenced else answer


# Run by a fresh interpreter: no network (socket creation fails), the answer's code, then the
# reference doctests against it; prints the counts as JSON.
_RUNNER = r"""
import doctest, json, socket, sys
def _no_network(*a, **k):
    raise OSError("network disabled during evaluation")
socket.socket = _no_network
socket.create_connection = _no_network
task = json.loads(sys.stdin.read())
namespace = {"__name__": "answer"}
exec(compile(task["code"], "answer", "exec"), namespace)
test = doctest.DocTestParser().get_doctest(task["doctests"], namespace, task["name"], None, 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
result = runner.run(test, out=lambda s: None)
print(json.dumps({"failed": result.failed, "attempted": result.attempted}))
"""


def passes_doctests(code: str, task: CodeTask, timeout: float) -> bool:
    payload = json.dumps({"code": code, "doctests": task.doctests, "name": task.name})
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _RUNNER], input=payload, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return False
    if proc.returncode:
        return False
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["attempted"] > 0 and result["failed"] == 0


def score(answer: str, task: CodeTask, timeout: float) -> dict:
    """{parses, defines, doctests (None when the task has none)} for one answer."""
    code = extract_code(answer)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return {"parses": False, "defines": False, "doctests": False if task.doctests else None}
    defines = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == task.name for n in tree.body)
    doctests = None
    if task.doctests:
        doctests = defines and passes_doctests(code, task, timeout)
    return {"parses": True, "defines": defines, "doctests": doctests}


def summarize(scores: list[dict]) -> dict:
    """Shares of answers that parse, define the function, and pass their doctests."""
    n = len(scores)
    with_tests = [s for s in scores if s["doctests"] is not None]
    return {
        "prompts": n,
        "parses": round(sum(s["parses"] for s in scores) / n, 4) if n else None,
        "defines": round(sum(s["defines"] for s in scores) / n, 4) if n else None,
        "with_doctests": len(with_tests),
        "passes_doctests": round(sum(bool(s["doctests"]) for s in with_tests) / len(with_tests), 4)
        if with_tests else None,
    }


