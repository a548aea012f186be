"""The eval's own tasks (pipeline/eval/functional_tasks.jsonl): each reference solution passes its
hidden tests in the real sandbox, a stub fails them, and no task is in any training data: the
embedded corpus and fine-tuning pairs are the standard library's files and functions, so no task
may be named like a stdlib function (the fine-tuning prompt would be the same) or have its summary
or solution text in a stdlib file."""

import ast
import json

import pytest

from pipeline.data.sources import read_text, stdlib_files
from pipeline.eval.sandbox import run_answer
from pipeline.eval.tasks import FUNCTION_TASKS, function_tasks

ROWS = [json.loads(line) for line in FUNCTION_TASKS.read_text().splitlines() if line.strip()]


def test_there_are_enough_tasks_with_unique_names_and_real_tests():
    assert len(ROWS) >= 80
    assert len({r["name"] for r in ROWS}) == len(ROWS)
    for r in ROWS:
        tests = ast.parse(r["tests"]).body
        assert 3 <= len(tests) and all(isinstance(t, ast.Assert) for t in tests), r["name"]
        stub = {}
        exec(f"def {r['name']}(*args, **kwargs):\n    return None\n", stub)
        with pytest.raises(Exception):  # noqa: B017 - any failure: the tests must not pass a stub
            exec(r["tests"], stub)


def test_each_summary_names_the_arguments_in_their_order():
    """The prompt gives no signature: the summary must say which argument comes first."""
    import re

    for r in ROWS:
        function = next(n for n in ast.parse(r["solution"]).body if isinstance(n, ast.FunctionDef))
        found = [re.search(rf"\b{re.escape(a.arg)}\b", r["summary"]) for a in function.args.args]
        assert all(found), f"{r['name']}: an argument is not named in its summary"
        starts = [m.start() for m in found]
        assert starts == sorted(starts), f"{r['name']}: the summary names its arguments out of order"


@pytest.mark.slow
def test_reference_solutions_pass_their_tests_in_the_sandbox():
    failed = [r["name"] for r in ROWS if not run_answer(r["solution"], r["name"], r["tests"], "", 5).passed]
    assert failed == []


@pytest.mark.slow
def test_no_task_is_in_the_training_data():
    texts = [t for t in map(read_text, stdlib_files()) if t]
    names = set()
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        names.update(n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    for r in ROWS:
        function = ast.parse(r["solution"]).body[-1]
        lines = r["solution"].splitlines(keepends=True)[function.body[1].lineno - 1 : function.end_lineno]
        body = "".join(lines)  # the code after the docstring, indented as written
        assert r["name"] not in names, f"{r['name']} is a stdlib function name"
        assert not any(r["summary"] in t for t in texts), f"{r['name']}'s summary is in a stdlib file"
        if body.count("\n") > 1:  # one line such as `return a + b` may well be somewhere
            assert not any(body in t for t in texts), f"{r['name']}'s solution is in a stdlib file"


def test_function_tasks_ask_in_the_fine_tuning_format():
    tasks = function_tasks(5)
    assert len(tasks) == 5 and tasks[0].messages[0]["content"].startswith(
        f"Write a Python function named {tasks[0].name}: "
    )
    assert all(t.tests and not t.doctests for t in tasks)
