"""Shared fixtures: tiny corpora written into tmp dirs, and a way to run the real CLI."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a model learns tokens from text and writes code that returns values while data flows "
    "through layers of attention def class import return if else for in range print self"
).split()


def make_documents(n: int, seed: int = 0, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(words // 8)]
        docs.append(f"# doc {i}\n" + "\n".join(lines) + "\n")
    return docs


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """A folder of 120 small .txt documents (~100 KB)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, doc in enumerate(make_documents(120)):
        (root / f"doc_{i:03d}.txt").write_text(doc)
    return root


@pytest.fixture
def jsonl_corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(make_documents(120))))
    return path


TINY = ["tokenizer.vocab_size=320", "prepare.shard_bytes=40000"]


@pytest.fixture(autouse=True)
def own_machine_record(tmp_path_factory, monkeypatch):
    """Each test measures for itself: answers kept per machine (pipeline.machine_record) go to a
    fresh cache, for the test and the CLI processes it starts, never to the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(autouse=True)
def gloo_on_loopback(monkeypatch):
    """Every process group of a test is on this machine: gloo binds the loopback interface instead of
    resolving the host's name, which a machine with a misconfigured resolver can stall on."""
    loopback = next((name for _, name in socket.if_nameindex() if name in ("lo", "lo0")), None)
    if loopback:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback)


def run_cli(*args: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m pipeline ARGS`, checked. On a machine
    without GPUs --multi_gpu uses torchrun, which gives a gloo CPU process group (`--cpu` would
    use accelerate's MPI launcher)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "pipeline",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def history(run: Path) -> list[dict]:
    """The runner's decisions, oldest first: {"stage", "action": "reused" | "built (REASON)", ...}."""
    path = run / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_actions(run: Path, count: int) -> dict[str, str]:
    """{stage: action} of the last `count` decisions (one command's worth)."""
    return {e["stage"]: e["action"] for e in history(run)[-count:]}


def manifest_facts(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text())["facts"]


def assert_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code != 0, no traceback, and the one error line mentions every needle."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
