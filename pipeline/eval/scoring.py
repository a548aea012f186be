"""Scoring an answer to a code task: does it parse as Python, define the function asked for, and
pass the original docstring's doctests, run in a subprocess with a timeout and the network
switched off."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

from pipeline.eval.tasks import CodeTask


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
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _RUNNER],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
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
        if with_tests
        else None,
    }
