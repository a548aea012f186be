"""Scoring an answer to a code task: does it parse as Python, define the function asked for, and
(only when the user opted in to running model-written code) pass the task's tests in the sandbox."""

from __future__ import annotations

import ast
import re

from pipeline.eval.sandbox import run_answer
from pipeline.eval.tasks import CodeTask


def extract_code(answer: str) -> str:
    """The code of an answer: inside its first ``` fence if it has one, else all of it."""
    fenced = re.search(r"```(?:python)?\n(.*?)(?:```|$)", answer, re.S)
    return fenced.group(1) if fenced else answer


def score(answer: str, task: CodeTask, timeout: float, execute: bool) -> dict:
    """{parses, defines, passes[, error]} for one answer. passes is None where nothing was run: the
    task has no tests, or execution is off (what confines a run is probed once per eval)."""
    code = extract_code(answer)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return {"parses": False, "defines": False, "passes": False if execute and task.checkable else None}
    defines = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == task.name for n in tree.body)
    if not (execute and task.checkable):
        return {"parses": True, "defines": defines, "passes": None}
    if not defines:
        return {"parses": True, "defines": False, "passes": False}
    verdict = run_answer(code, task.name, task.tests, task.doctests, timeout)
    return {"parses": True, "defines": True, "passes": verdict.passed, "error": verdict.error}


def _share(values: list[bool]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def summarize(scores: list[dict]) -> dict:
    """Shares of answers that parse, define the function, and pass their tests (pass@1 of greedy
    answers, over the tasks that have tests, None when none was run)."""
    run = [s["passes"] for s in scores if s["passes"] is not None]
    return {
        "prompts": len(scores),
        "parses": _share([s["parses"] for s in scores]),
        "defines": _share([s["defines"] for s in scores]),
        "tested": len(run),
        "pass_at_1": _share(run),
    }
