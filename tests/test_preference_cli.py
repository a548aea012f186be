"""The preference stage through the CLI on a tiny local model and JSONL pairs: its artifact,
metrics and curves, a 2-process launch with the 1-process losses that resumes exactly from its
adapter-only checkpoints, generation from it, and a bad pair line refused in one line."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import assert_clear_error, launch_two_processes, manifest_facts, run_cli
from tests.test_finetune_generate import make_base

pytestmark = pytest.mark.slow

METRICS = ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    base = make_base(root / "base")
    rows = [
        {"prompt": f"say the number {i}", "chosen": f"the number is {i}", "rejected": f"no idea {i * 7}"}
        for i in range(60)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, base


def args(root, base, name, *extra):
    return [
        "stage=preference",
        f"run.name={name}",
        f"preference.base={base}",
        "preference.data.source=jsonl",
        f"preference.data.paths=[{root / 'pairs.jsonl'}]",
        "preference.train.max_steps=6",
        "preference.train.seq_len=48",
        "preference.train.batch_tokens=192",
        "preference.train.micro_batch_size=2",
        "preference.train.log_every=1",
        "preference.train.lr=1e-2",
        "preference.train.mixed_precision=no",
        *extra,
    ]


def train_rows(stage_dir):
    return [r for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_preference_stage_trains_publishes_and_generates(setup):
    root, base = setup
    proc = run_cli(*args(root, base, "one"), cwd=root)
    stage = root / "runs/one/preference"
    facts = manifest_facts(stage)
    assert facts["train_pairs"] + facts["val_pairs"] == 60 and facts["steps"] == 6
    assert facts["final"]["val_reward_margin"] > facts["initial"]["val_reward_margin"] == 0
    assert all(all(k in r for k in METRICS) for r in train_rows(stage))
    assert (stage / "curves.png").stat().st_size > 1000 and (stage / "merged/config.json").exists()
    assert "reward accuracy" in proc.stderr
    run_cli(
        "stage=generate", "run.name=gen", f"generate.model={root / 'runs/one'}", "generate.max_new_tokens=4", cwd=root
    )
    assert json.loads((root / "runs/gen/generate/manifest.json").read_text())["facts"]["model"] == str(stage / "merged")


@pytest.mark.distributed
def test_two_processes_give_the_one_process_losses_and_resume_from_adapter_checkpoints(setup):
    root, base = setup
    if not (root / "runs/one/preference/metrics.jsonl").exists():
        run_cli(*args(root, base, "one"), cwd=root)
    two_args = args(root, base, "two", "preference.train.ckpt_every=3")
    proc = launch_two_processes(*two_args, cwd=root)
    assert proc.stderr.count("preference: val loss") == 1
    stage = root / "runs/two/preference"
    one, two = train_rows(root / "runs/one/preference"), train_rows(stage)
    for key in ("loss", *METRICS):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-4, atol=1e-5)

    # The checkpoints hold the adapter, not the frozen base; a crash after step 3 resumes from it exactly.
    with safe_open(str(stage / "checkpoints/step_000003/model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())
    finished = load_file(stage / "adapter/adapter_model.safetensors")
    for lost in ("checkpoints/step_000006", "adapter", "merged", "manifest.json"):
        path = stage / lost
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    launch_two_processes(*two_args, cwd=root)
    assert manifest_facts(stage)["resumed_from_step"] == 3
    resumed = load_file(stage / "adapter/adapter_model.safetensors")
    for k, v in finished.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6, msg=k)


def test_a_bad_pair_line_is_refused_in_one_line(setup):
    root, base = setup
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    proc = run_cli(*args(root, base, "bad"), f"preference.data.paths=[{bad}]", cwd=root, check=False)
    assert_clear_error(proc, f"{bad}:2", "'rejected'", "preference.data.skip_bad=true")
