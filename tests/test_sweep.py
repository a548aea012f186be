"""Sweeps (`pipeline -m`) and `pipeline report`: every combination a run, shared upstream built
once, complete runs skipped, a bad combination refused while the others complete."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.config.compose import CONF_DIR
from pipeline.config.sweep_grammar import expand
from pipeline.sweep import run_name
from tests.conftest import TINY, free_port, history, manifest_facts, run_cli


def test_sweep_grammar_expands_lists_ranges_and_globs_over_groups():
    combos, swept = expand(["model=glob(t*)", "train.max_steps=range(10,30,10)", "seed=1"], CONF_DIR)
    assert swept == ["model", "train.max_steps"]
    assert combos == [["model=tiny", "train.max_steps=10", "seed=1"], ["model=tiny", "train.max_steps=20", "seed=1"]]
    assert run_name(["train.lr=0.001", "model=tiny"]) == "train.lr=0.001,model=tiny"
    altered = {run_name(["data.paths=[a/b]"]), run_name(["data.paths=[a_b]"])}  # no two runs in one dir
    assert len(altered) == 2 and all(n.startswith("data.paths=_a_b_") for n in altered)


@pytest.mark.parametrize("override", ["run.name=a,b", "stage=prepare,pretrain"])
def test_the_sweep_itself_cannot_be_swept(tmp_path, override):
    proc = run_cli("-m", override, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "cannot be swept" in proc.stderr


@pytest.mark.slow
def test_a_2x2_sweep_builds_upstream_once_skips_when_complete_and_reports(tmp_path, text_corpus):
    args = [
        "-m",
        "stage=pretrain",
        "run.name=sw",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        "train.max_steps=4",
        "train.lr=1e-3,3e-3",
        "model.n_layer=1,2",
    ]
    run_cli(*args, cwd=tmp_path)
    sweep = tmp_path / "runs/sw"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [r.name for r in runs] == [f"train.lr={lr},model.n_layer={n}" for lr in ("0.001", "0.003") for n in (1, 2)]
    assert all(manifest_facts(r / "pretrain")["steps"] == 4 for r in runs)
    built = [e for r in runs for e in history(r) if e["stage"] == "tokenizer" and e["action"].startswith("built")]
    assert len(built) == 1  # trained once, kept write-once in runs/.shared and linked into every run
    assert len({(r / "tokenizer").resolve() for r in runs}) == 1 and all((r / "tokenizer").is_symlink() for r in runs)
    assert len({manifest_facts(r / "pretrain")["final_val_loss"] for r in runs}) == 4  # four different runs

    before = {r.name: len(history(r)) for r in runs}
    run_cli(*args, cwd=tmp_path)
    assert {r.name: len(history(r)) for r in runs} == before  # complete runs are skipped: nothing ran

    run_cli("report", str(sweep), cwd=tmp_path)
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["train.lr"], r["model.n_layer"]) for r in rows} == {
        ("0.001", "1"),
        ("0.001", "2"),
        ("0.003", "1"),
        ("0.003", "2"),
    }
    assert all(float(r["val_bpb"]) > 0 and float(r["gzip9_bpb"]) > 0 for r in rows)
    assert sorted(r["tokenizer_s"] == "linked" for r in rows) == [False, True, True, True]
    assert (sweep / "report.png").stat().st_size > 1000 and (sweep / "report.md").read_text().count("\n") == 6

    # One run changes its tokenizer: it gets its own; what the other runs read is untouched.
    shared = (runs[0] / "tokenizer").resolve()
    files = file_bytes(shared)
    rebuild_tokenizer(runs[0], text_corpus, "tokenizer.vocab_size=300")
    assert not (runs[0] / "tokenizer").is_symlink() or (runs[0] / "tokenizer").resolve() != shared
    assert file_bytes(shared) == files
    assert all((r / "tokenizer").resolve() == shared for r in runs[1:])


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def rebuild_tokenizer(run, text_corpus, override: str) -> None:
    """Rebuild one sweep run's tokenizer on its own, as a user would after the sweep."""
    run_cli(
        "stage=tokenizer",
        f"run.root={run.parent}",
        f"run.name='{run.name}'",
        "run.shared_upstream=true",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        override,
        cwd=run.parent.parent.parent,
    )


@pytest.mark.slow
def test_a_bad_combination_is_refused_in_one_line_and_the_others_complete(tmp_path, text_corpus):
    proc = run_cli(
        "-m",
        "stage=pretrain",
        "run.name=bad",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        "train.max_steps=2",
        "train.lr=3e-3,-1",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    refused = [line for line in proc.stderr.splitlines() if line.startswith("sweep [") and "refused" in line]
    assert len(refused) == 1 and "train.lr=-1" in refused[0]
    assert manifest_facts(tmp_path / "runs/bad/train.lr=0.003/pretrain")["steps"] == 2
    assert not (tmp_path / "runs/bad/train.lr=-1").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_each_combination_can_run_as_an_accelerate_launch(tmp_path, text_corpus):
    launch = (
        f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 "
        f"--mixed_precision no --dynamo_backend no --main_process_port {free_port()}"
    )
    run_cli(
        "-m",
        "stage=pretrain",
        "run.name=acc",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        "train.max_steps=2",
        f"sweep.launch={launch}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert manifest_facts(tmp_path / "runs/acc/default/pretrain")["launch"]["processes"] == 2


@pytest.mark.slow
def test_sigterm_to_the_sweep_checkpoints_the_running_combination_and_stops_the_sweep(tmp_path, text_corpus):
    args = [
        "-m",
        "stage=pretrain",
        "run.name=term",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        "train.max_steps=2000",
        "train.ckpt_every=0",
        "train.eval_every=0",
        "train.lr=1e-3,3e-3",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    metrics = tmp_path / "runs/term/train.lr=0.001/pretrain/metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-2000:]
    assert list((metrics.parent / "checkpoints").glob("step_*"))  # the run checkpointed before stopping
    assert not (tmp_path / "runs/term/train.lr=0.003").exists()  # and the sweep went no further


@pytest.mark.slow
def test_a_sweep_rerun_with_more_steps_resumes_each_run_and_force_adds_a_shared_entry(tmp_path, text_corpus):
    args = [
        "-m",
        "stage=pretrain",
        "run.name=ext",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        "train.decay=wsd",
        "train.warmup_steps=2",
        "train.ckpt_every=10",
        "train.eval_every=10",
        "train.lr=1e-3,3e-3",
    ]
    run_cli(*args, "train.max_steps=20", cwd=tmp_path)
    sweep = tmp_path / "runs/ext"
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 2 and all((r / "pretrain").is_symlink() for r in runs)
    assert not list((sweep / ".shared").glob("*/checkpoints"))  # only finished artifacts are shared
    assert all((r / ".checkpoints/pretrain/step_000016").is_dir() for r in runs)  # the cooldown's, kept by the run

    run_cli(*args, "train.max_steps=30", cwd=tmp_path)
    for r in runs:
        facts = manifest_facts(r / "pretrain")
        assert (facts["resumed_from_step"], facts["steps"]) == (16, 30), r.name

    # A forced rebuild of one run's tokenizer makes a new shared entry: the others' stays as it was.
    shared = (runs[1] / "tokenizer").resolve()
    files = file_bytes(shared)
    rebuild_tokenizer(runs[0], text_corpus, "force=true")
    assert (runs[0] / "tokenizer").resolve() != shared and (runs[0] / "tokenizer").resolve().parent == shared.parent
    assert file_bytes(shared) == files
    assert (runs[1] / "tokenizer").resolve() == shared


def test_a_second_sweep_on_the_same_sweep_dir_is_refused_in_one_line(tmp_path):
    import json
    import socket

    lock = tmp_path / "runs/busy/.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    proc = run_cli("-m", "stage=tokenizer", "run.name=busy", "tokenizer.vocab_size=300,400", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "is in use by pipeline process" in proc.stderr
    assert not (tmp_path / "runs/busy/tokenizer.vocab_size=300").exists()
