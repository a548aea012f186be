"""A real 2-process CPU launch (gloo): one artifact, one log, same losses as 1 process with the
same global batch, the micro-batch found automatically on each side."""

import json
import shutil

import numpy as np
import pytest

from tests.conftest import TINY, launch_two_processes, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def losses(run):
    rows = [json.loads(x) for x in (run / "pretrain/metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_process_launch_matches_one_process(tmp_path, text_corpus):
    args = [
        "stage=pretrain",
        "data=text",
        f"data.paths=[{text_corpus}]",
        *TINY,
        "model=tiny",
        "train=tiny",
        "train.micro_batch_size=auto",
    ]
    run_cli(*args, "run.name=one", cwd=tmp_path)
    one, two = tmp_path / "runs/one", tmp_path / "runs/two"
    for stage in ("tokenizer", "data"):  # same upstream artifacts, so only training differs
        shutil.copytree(one / stage, two / stage)

    proc = launch_two_processes(*args, "run.name=two", cwd=tmp_path)
    assert proc.stderr.count("pretrain: val bpb") == 1  # only the main process reports
    assert proc.stderr.count("ready on cpu") == 2 and "pre-flight: per-device memory" in proc.stderr
    launch = json.loads((two / "pretrain/manifest.json").read_text())["facts"]["launch"]
    assert (launch["processes"], launch["micro_batch"], launch["accumulation"]) == (2, 4, 1)
    assert (two / "pretrain/model/model.safetensors").exists()
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4, atol=1e-5)
