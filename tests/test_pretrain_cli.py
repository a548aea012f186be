"""The pretrain stage through the real CLI on a tiny model: artifact, resume after kill -9, errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    TINY,
    assert_clear_error,
    last_actions,
    manifest_facts,
    run_cli,
)

pytestmark = pytest.mark.slow


def pretrain_args(corpus, name="t", *extra):
    return [
        "stage=pretrain",
        f"run.name={name}",
        "data=text",
        f"data.paths=[{corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        *extra,
    ]


def test_pretrain_writes_a_loadable_model_and_skips_when_up_to_date(tmp_path, text_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_cli(*pretrain_args(text_corpus), cwd=tmp_path)
    stage = tmp_path / "runs/t/pretrain"
    manifest = json.loads((stage / "manifest.json").read_text())
    facts = manifest["facts"]
    assert facts["steps"] == 20 and facts["tokens_seen"] == 20 * 512
    assert facts["final_val_bpb"] > 0 and facts["gzip9_val_bpb"] > 0 and facts["xz9_val_bpb"] > 0
    assert "checkpoints/step_000020/model.safetensors" not in manifest["files"]
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 20 and train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert any("gzip_bpb" in r and "xz_bpb" in r for r in rows) and (stage / "curves.png").stat().st_size > 1000

    model = AutoModelForCausalLM.from_pretrained(stage / "model")
    tok = AutoTokenizer.from_pretrained(stage / "model")
    assert model.config.vocab_size == len(tok) == 320
    out = model.generate(**tok("the model", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 2

    run_cli(*pretrain_args(text_corpus), cwd=tmp_path)
    assert last_actions(tmp_path / "runs/t", 3) == {"tokenizer": "reused", "prepare": "reused", "pretrain": "reused"}

    # Another learning rate cannot resume the old checkpoints: they are set aside, not deleted.
    proc = run_cli(*pretrain_args(text_corpus), "train.lr=0.002", cwd=tmp_path)
    aside = sorted(p.name.split(".")[0] for p in (stage / "checkpoints/superseded").iterdir())
    assert aside == ["step_000010", "step_000020"]
    assert "kept step_000010, step_000020 (written under other settings" in proc.stderr and "rm -r" in proc.stderr


KILL_IN_CHECKPOINT = """
import os, signal, sys
import pipeline.train.checkpoints as ck
real = ck.seal
def seal_then_die(tmp, final, state, keep):
    if state["step"] == 20:
        os.kill(os.getpid(), signal.SIGKILL)  # the step-20 state is on disk in .tmp-, not yet sealed
    real(tmp, final, state, keep)
ck.seal = seal_then_die
from pipeline.cli import main
main(sys.argv[1:])
"""


def test_kill_9_mid_checkpoint_resumes_from_previous_and_matches(tmp_path, text_corpus):
    args = pretrain_args(text_corpus, "a", "train.max_steps=30")
    run_cli(*args, cwd=tmp_path)  # uninterrupted reference
    ref = load_file(tmp_path / "runs/a/pretrain/model/model.safetensors")

    args_b = pretrain_args(text_corpus, "b", "train.max_steps=30")
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_CHECKPOINT, *args_b], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = tmp_path / "runs/b/pretrain/checkpoints"
    assert (ckpts / ".tmp-step_000020").is_dir() and not (ckpts / "step_000020").exists()
    assert not (tmp_path / "runs/b/pretrain/manifest.json").exists()

    run_cli(*args_b, cwd=tmp_path)
    assert manifest_facts(tmp_path / "runs/b/pretrain")["resumed_from_step"] == 10
    got = load_file(tmp_path / "runs/b/pretrain/model/model.safetensors")
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_seq_len_beyond_model_positions_is_refused(tmp_path, text_corpus):
    proc = run_cli(
        *pretrain_args(text_corpus, "t", "train.seq_len=512", "train.batch_tokens=2048"), cwd=tmp_path, check=False
    )
    assert_clear_error(proc, "train.seq_len=512", "model.max_seq_len=256")


def test_shards_from_another_tokenizer_are_refused(tmp_path, text_corpus):
    from pipeline.artifacts import Artifact, check_lineage
    from pipeline.errors import PipelineError

    tok = Artifact("tokenizer", tmp_path, {"facts": {"vocab_size": 320}, "files": {}})
    data = Artifact(
        "prepare", tmp_path, {"inputs": {"tokenizer": {"manifest_hash": "other"}}, "facts": {"vocab_size": 320}}
    )
    with pytest.raises(PipelineError, match="tokenized with another tokenizer"):
        check_lineage(list(range(320)), tok, data)
    data.manifest["inputs"]["tokenizer"]["manifest_hash"] = tok.hash
    data.manifest["facts"]["vocab_size"] = 512
    with pytest.raises(PipelineError, match="vocabulary sizes disagree"):
        check_lineage(list(range(320)), tok, data)
