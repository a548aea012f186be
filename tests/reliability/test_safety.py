"""Safety defaults: no remote code, no uploads, nothing written outside the run root; plus the
kill -9 soak in small."""

import os
import subprocess
import sys

import pytest

from pipeline.cli import keep_wandb_local
from tests.conftest import REPO, TINY, run_cli


def test_wandb_is_offline_unless_chosen_or_logged_in(tmp_path, monkeypatch):
    # keep_wandb_local sets several variables: give it a throwaway environment so none leak
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MPL"))})
    monkeypatch.setenv("HOME", str(tmp_path))
    keep_wandb_local(tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path / "run")
    monkeypatch.setenv("WANDB_MODE", "online")
    keep_wandb_local(tmp_path / "run")
    assert os.environ["WANDB_MODE"] == "online"  # the user's choice is respected
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password key\n")
    keep_wandb_local(tmp_path / "run")
    assert "WANDB_MODE" not in os.environ  # logged in: wandb decides


def test_remote_code_is_off_by_default(tmp_path):
    cfg = run_cli("--cfg", cwd=tmp_path).stdout
    assert cfg.count("trust_remote_code: false") == 4  # finetune, preference, generate and eval


@pytest.mark.slow
def test_nothing_is_written_outside_the_run_root(tmp_path, text_corpus):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    run_cli(
        "run.name=t",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        "finetune.train.max_steps=2",
        "finetune.train.seq_len=128",
        "finetune.train.batch_tokens=512",
        "finetune.train.micro_batch_size=4",
        "finetune.data.max_examples=60",
        "finetune.data.max_val_examples=8",
        "generate.max_new_tokens=4",
        "eval.max_prompts=2",
        "eval.max_new_tokens=4",
        "logger=wandb",
        cwd=work,
        env={"HOME": str(home)},
    )
    assert list(home.iterdir()) == []
    assert [p.name for p in work.iterdir()] == ["runs"]
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["t"]


@pytest.mark.slow
@pytest.mark.distributed
def test_soak_kill_9_two_processes_then_resume_gives_the_same_weights(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/soak_kill9.py"),
            "--kills",
            "3",
            "--steps",
            "60",
            "--max-delay",
            "6",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert '"same_final_weights": true' in proc.stdout
