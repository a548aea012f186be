"""A real 2-process CPU launch (gloo): one artifact, one log, same losses as 1 process with the
same global batch, the micro-batch found automatically on each side."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import TINY, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run):
    rows = [json.loads(x) for x in (run / "pretrain/metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_process_launch_matches_one_process(tmp_path, text_corpus):
    args = ["stage=pretrain", "data=text", f"data.paths=[{text_corpus}]", *TINY, "model=tiny", "train=tiny",
            "train.micro_batch_size=auto"]
    run_cli(*args, "run.name=one", cwd=tmp_path)
    one, two = tmp_path / "runs/one", tmp_path / "runs/two"
    for stage in ("tokenizer", "data"):  # same upstream artifacts, so only training differs
        shutil.copytree(one / stage, two / stage)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    # `--cpu` would use accelerate's MPI launcher; --multi_gpu uses torchrun, which on a machine
    # without GPUs gives a gloo CPU process group.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "pipeline", *args, "run.name=two"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("pretrain: val bpb") == 1  # only the main process reports
    assert proc.stderr.count("ready on cpu") == 2 and "pre-flight: per-device memory" in proc.stderr
    launch = json.loads((two / "pretrain/manifest.json").read_text())["facts"]["launch"]
    assert (launch["processes"], launch["micro_batch"], launch["accumulation"]) == (2, 4, 1)
    assert (two / "pretrain/model/model.safetensors").exists()
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4, atol=1e-5)
