"""The eval stage: held-out code prompts, answers scored for parsing, defining the function and
passing doctests in a sandboxed subprocess, for the fine-tuned model and its base."""

import json

import pytest

from pipeline.eval.scoring import extract_code, score, summarize
from pipeline.eval.tasks import CodeTask, held_out_tasks

ADD = CodeTask(
    "add",
    [{"role": "user", "content": "Write a Python function named add: Add two numbers."}],
    ">>> add(2, 3)\n5\n>>> add(-1, 1)\n0",
)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("def add(a, b):\n    return a + b", {"parses": True, "defines": True, "doctests": True}),
        (
            "```python\ndef add(a, b):\n    return a + b\n```\nThis adds.",
            {"parses": True, "defines": True, "doctests": True},
        ),
        ("def add(a, b):\n    return a - b", {"parses": True, "defines": True, "doctests": False}),
        ("def plus(a, b):\n    return a + b", {"parses": True, "defines": False, "doctests": False}),
        ("def add(a, b:\n    return", {"parses": False, "defines": False, "doctests": False}),
        (
            "def add(a, b):\n    while True:\n        pass",
            {"parses": True, "defines": True, "doctests": False},
        ),  # timeout
        (
            "import socket\ndef add(a, b):\n    socket.create_connection(('example.com', 80))\n    return a + b",
            {"parses": True, "defines": True, "doctests": False},
        ),  # no network
    ],
)
def test_answers_are_scored_for_parsing_defining_and_doctests(answer, expected):
    assert score(answer, ADD, timeout=3) == expected


def test_summary_shares_and_tasks_without_doctests():
    no_tests = CodeTask("f", ADD.messages, "")
    scores = [
        score("def add(a, b):\n    return a + b", ADD, 3),
        score("def f(): pass", no_tests, 3),
        score("nonsense (", no_tests, 3),
    ]
    assert scores[1]["doctests"] is None
    assert summarize(scores) == {
        "prompts": 3,
        "parses": 0.6667,
        "defines": 0.6667,
        "with_doctests": 1,
        "passes_doctests": 1.0,
    }
    assert extract_code("text\n```\nx = 1\n```") == "x = 1\n"


@pytest.mark.slow
def test_doctests_count_only_when_an_example_runs():
    from pipeline.eval.tasks import runnable_doctests

    assert runnable_doctests(ADD.doctests) == ADD.doctests
    assert runnable_doctests("Random bytes.\n\n>>> token_bytes(16)  #doctest:+SKIP\nb'...'") == ""
    assert runnable_doctests("No examples here.") == ""


def test_held_out_tasks_ask_for_documented_functions_of_validation_files():
    tasks = held_out_tasks(0.05, 400, 64)
    assert len(tasks) == 64 and all(f" named {t.name}: " in t.messages[0]["content"] for t in tasks)
    assert len({t.name for t in tasks}) == 64  # each name once


@pytest.mark.slow
def test_eval_stage_scores_a_model_dir_and_writes_answers(tmp_path):
    from tests.chat_families import FAMILIES, make_base
    from tests.conftest import run_cli

    base = make_base(FAMILIES["qwen2_5"], tmp_path / "model")
    run_cli(
        "stage=eval",
        "run.name=e",
        f"eval.model={base}",
        "eval.max_prompts=6",
        "eval.max_new_tokens=12",
        "eval.batch_size=3",
        cwd=tmp_path,
    )
    facts = json.loads((tmp_path / "runs/e/eval/manifest.json").read_text())["facts"]
    assert facts["tasks"] == 6 and facts["model"]["prompts"] == 6 and 0 <= facts["model"]["parses"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "runs/e/eval/answers_model.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"function", "prompt", "answer", "parses", "defines", "doctests"} <= set(rows[0])


def test_held_out_tasks_take_the_doctests_from_the_file_not_the_cut_answer(monkeypatch):
    from pipeline.eval import tasks as eval_tasks

    source = 'def add(a, b):\n    """Add two numbers.\n\n    >>> add(2, 3)\n    5\n    """\n    return a + b\n'
    answer = 'def add(a, b):\n    """Add two numbers."""\n    return a + b'
    conv = [
        {"role": "user", "content": "Write a Python function named add: Add two numbers."},
        {"role": "assistant", "content": answer},
    ]
    monkeypatch.setattr(eval_tasks, "stdlib_conversations_by_file", lambda chars: iter([(source, conv)]))
    monkeypatch.setattr(eval_tasks, "is_val", lambda text, fraction: True)
    [task] = held_out_tasks(0.05, 400, 5)
    assert ">>> add(2, 3)" in task.doctests and score(answer, task, 5.0)["doctests"] is True
