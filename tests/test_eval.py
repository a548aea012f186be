"""The eval stage: held-out code prompts, answers scored for parsing, defining the function and
(opted in) passing their tests in the sandbox, for the fine-tuned model and its base."""

import json

import pytest

from pipeline.config.data import CorpusSpec
from pipeline.eval.scoring import extract_code, score, summarize
from pipeline.eval.tasks import CodeTask, held_out_tasks

ADD = CodeTask(
    "add",
    [{"role": "user", "content": "Write a Python function named add: Add two numbers."}],
    doctests=">>> add(2, 3)\n5\n>>> add(-1, 1)\n0",
)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("def add(a, b):\n    return a + b", {"parses": True, "defines": True, "passes": True}),
        (
            "```python\ndef add(a, b):\n    return a + b\n```\nThis adds.",
            {"parses": True, "defines": True, "passes": True},
        ),
        ("def add(a, b):\n    return a - b", {"parses": True, "defines": True, "passes": False}),
        ("def plus(a, b):\n    return a + b", {"parses": True, "defines": False, "passes": False}),
        ("def add(a, b:\n    return", {"parses": False, "defines": False, "passes": False}),
        (
            "def add(a, b):\n    while True:\n        pass",
            {"parses": True, "defines": True, "passes": False},
        ),  # timeout
        (
            "import socket\ndef add(a, b):\n    socket.create_connection(('example.com', 80))\n    return a + b",
            {"parses": True, "defines": True, "passes": False},
        ),  # no network
    ],
)
def test_answers_are_scored_for_parsing_defining_and_doctests(answer, expected):
    scored = score(answer, ADD, timeout=3, execute=True)
    assert {k: scored[k] for k in expected} == expected


def test_summary_shares_and_tasks_without_doctests():
    no_tests = CodeTask("f", ADD.messages)
    scores = [
        score("def add(a, b):\n    return a + b", ADD, 3, execute=True),
        score("def f(): pass", no_tests, 3, execute=True),
        score("nonsense (", no_tests, 3, execute=True),
    ]
    assert scores[1]["passes"] is None
    assert summarize(scores) == {"prompts": 3, "parses": 0.6667, "defines": 0.6667, "tested": 1, "pass_at_1": 1.0}
    assert extract_code("text\n```\nx = 1\n```") == "x = 1\n"


@pytest.mark.slow
def test_doctests_count_only_when_an_example_runs():
    from pipeline.eval.tasks import runnable_doctests

    assert runnable_doctests(ADD.doctests) == ADD.doctests
    assert runnable_doctests("Random bytes.\n\n>>> token_bytes(16)  #doctest:+SKIP\nb'...'") == ""
    assert runnable_doctests("No examples here.") == ""


def test_held_out_tasks_ask_for_documented_functions_of_validation_files():
    tasks = held_out_tasks(CorpusSpec(), 0.05, 400, 64)
    assert len(tasks) == 64 and all(f" named {t.name}: " in t.messages[0]["content"] for t in tasks)
    assert len({t.name for t in tasks}) == 64  # each name once


@pytest.mark.slow
def test_eval_stage_scores_a_model_dir_and_writes_answers(tmp_path):
    from tests.chat_families import FAMILIES, make_base
    from tests.conftest import run_cli

    base = make_base(FAMILIES["qwen2_5"], tmp_path / "model")
    args = ("stage=eval", "run.name=e", f"eval.model={base}", "eval.max_prompts=6", "eval.max_new_tokens=12")
    run_cli(*args, "eval.batch_size=3", cwd=tmp_path)
    facts = json.loads((tmp_path / "runs/e/eval/manifest.json").read_text())["facts"]
    assert facts["tasks"] == {"stdlib": 6, "functions": 6} and facts["execute"] is False
    stdlib = facts["model"]["stdlib"]
    assert stdlib["prompts"] == 6 and 0 <= stdlib["parses"] <= 1 and stdlib["pass_at_1"] is None
    assert facts["model"]["dtype"] == "float32"  # fixed on a CPU: the same score twice
    answers = tmp_path / "runs/e/eval/answers_model_functions.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 6 and {"function", "prompt", "answer", "parses", "defines", "passes"} <= set(rows[0])
    first = answers.read_text()
    run_cli(*args, "eval.batch_size=2", cwd=tmp_path)  # a rerun (batch size is in its config): same answers
    assert answers.read_text() == first


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
    [task] = held_out_tasks(CorpusSpec(), 0.05, 400, 5)
    assert ">>> add(2, 3)" in task.doctests and score(answer, task, 5.0, execute=True)["passes"] is True


WRITES_A_FILE = "open({path!r}, 'w').write('ran')\ndef {name}(a, b):\n    return a + b\n"


def test_without_the_opt_in_no_answer_is_run(tmp_path, monkeypatch):
    from pipeline.eval import scoring

    calls = []
    monkeypatch.setattr(scoring, "run_answer", lambda *a, **k: calls.append(a))
    marker = tmp_path / "created"
    scored = score(WRITES_A_FILE.format(path=str(marker), name="add"), ADD, 3, execute=False)
    assert scored == {"parses": True, "defines": True, "passes": None} and calls == [] and not marker.exists()


def test_eval_stage_runs_answers_only_when_opted_in(tmp_path, monkeypatch):
    """The stage itself, its model's answers replaced by one that would create a file when run."""
    from pipeline.config.compose import compose_config
    from pipeline.eval import scoring
    from pipeline.model.inference import ModelChoice
    from pipeline.stages import answer_quality
    from pipeline.stages.context import StageContext

    marker, runs = tmp_path / "created", []
    monkeypatch.setattr(answer_quality, "resolve_model", lambda target: ModelChoice(target, None, "model", True))
    monkeypatch.setattr(answer_quality, "load_model", lambda *a: (type("M", (), {"dtype": "float32"})(), None))
    monkeypatch.setattr(
        answer_quality,
        "_answers",
        lambda model, tok, tasks, e, desc: [WRITES_A_FILE.format(path=str(marker), name=t.name) for t in tasks],
    )
    real_run = scoring.run_answer
    monkeypatch.setattr(scoring, "run_answer", lambda *a: runs.append(a) or real_run(*a))
    for execute in ("false", "true"):
        _, specs = compose_config(["stage=eval", "eval.model=m", "eval.max_prompts=2", f"eval.execute={execute}"])
        out = tmp_path / execute
        out.mkdir()
        facts = answer_quality.run(StageContext(specs, {}, out, "f"))
        assert facts["execute"] is (execute == "true")
        if execute == "false":
            assert runs == [] and not marker.exists() and facts["sandbox"].startswith("not run")
            assert facts["model"]["stdlib"]["pass_at_1"] is None
        else:
            assert {"rlimits", "python guard"} <= set(facts["sandbox"]["layers"])  # what confined them, probed
    assert len(runs) == 2 + sum(bool(t.doctests) for t in held_out_tasks(specs.data, 0.05, 400, 2))


@pytest.mark.slow
def test_no_eval_task_is_in_a_training_split_with_other_fractions_and_a_separator():
    """Non-default pretraining and fine-tuning fractions, and documents cut at a separator: every
    stdlib eval task's file is held out by the real splits, pretraining's documents (as
    labelled_documents makes them) and fine-tuning's conversations (as load_conversations does)."""
    import hashlib

    from pipeline.config.data import ChatDataSpec
    from pipeline.data.conversations import load_conversations, stdlib_conversations_by_file
    from pipeline.data.sources import labelled_documents

    corpus, chat = CorpusSpec(val_fraction=0.3, separator="\n\n\n"), ChatDataSpec(val_fraction=0.4)
    tasks = held_out_tasks(corpus, chat.val_fraction, chat.max_code_chars, 1000)
    assert len(tasks) >= 5  # few: a file is held out only when every one of its parts is
    digest = lambda text: hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()  # noqa: E731
    trained_on = {digest(doc) for val, doc, _ in labelled_documents(corpus) if not val}
    asked = {t.messages[0]["content"] for t in tasks}
    files = {text for text, (user, _) in stdlib_conversations_by_file(chat.max_code_chars) if user["content"] in asked}
    for text in files:
        assert not any(digest(part) in trained_on for part in text.split(corpus.separator))
    train, _, _ = load_conversations(chat)
    assert not asked & {conv[0]["content"] for conv in train}


def test_report_shows_the_eval_shares(tmp_path):
    from pipeline.report import build_table

    run = tmp_path / "r"
    (run / "eval").mkdir(parents=True)
    shares = {"prompts": 64, "parses": 0.9, "defines": 0.5, "tested": 60, "pass_at_1": 0.125}
    facts = {"finetuned": {"stdlib": shares, "functions": {**shares, "pass_at_1": None}}}
    (run / "eval/manifest.json").write_text(json.dumps({"status": "complete", "facts": facts}))
    columns, [row] = build_table([run])
    assert row["eval_finetuned_stdlib"] == "90%/50%/12%" and row["eval_finetuned_functions"] == "90%/50%/-"
