"""FSDP2 and DeepSpeed ZeRO-2/3 in a real 2-process CPU launch (via tests/cpu_sharding.py): the
checkpoints are sharded, pretraining and LoRA fine-tuning resume from them, and the consolidated HF
model, LoRA adapter and merged model match a 1-process run with the same global batch."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    REPO,
    TINY,
    free_port,
    make_documents,
    manifest_facts,
    run_cli,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ARGS = [
    *TINY,
    "model=tiny",
    "train=tiny",
    "train.max_steps=6",
    "train.ckpt_every=3",
    "train.micro_batch_size=2",
    "train.log_every=1",
    "finetune.train.max_steps=4",
    "finetune.train.ckpt_every=2",
    "finetune.train.seq_len=64",
    "finetune.train.batch_tokens=512",
    "finetune.train.micro_batch_size=2",
    "finetune.train.mixed_precision=no",
    "finetune.train.log_every=1",
    "finetune.lora.dropout=0",
    "generate.max_new_tokens=4",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: tokenizer, data, pretrain and LoRA finetune of a tiny model."""
    root = tmp_path_factory.mktemp("sharded")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_documents(120)):
        (corpus / f"doc_{i:03d}.txt").write_text(doc)
    args = ["data=text", f"data.paths=[{corpus}]", *ARGS]
    run_cli("stage=finetune", *args, "run.name=ref", cwd=root)
    return root, args


def launch(root, args, config, name: str, stage: str = "finetune", reuse=("tokenizer", "data"), check=True) -> str:
    run = root / "runs" / name
    for upstream in reuse:  # the reference's artifacts: only training differs
        if not (run / upstream).exists():
            shutil.copytree(root / "runs/ref" / upstream, run / upstream)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}
    config_file = config if os.path.isabs(str(config)) else REPO / f"conf/accelerate/{config}.yaml"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        str(REPO / "tests/cpu_sharding.py"),
        f"stage={stage}",
        *args,
        f"run.name={name}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a hang: take the ranks down too, then show what they said
        os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.communicate()[1]
        raise AssertionError(f"{config} launch hung:\n{stderr[-4000:]}") from None
    assert proc.returncode == 0 or not check, stderr[-4000:]
    return stderr


def losses(run, stage):
    rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_same_tensors(reference_file, other_file, atol=1e-5):
    ref, other = load_file(reference_file), load_file(other_file)
    assert set(ref) <= set(other), sorted(set(ref) ^ set(other))  # sharded saves may add a tied lm_head
    for k in ref:
        torch.testing.assert_close(other[k], ref[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize(
    "config,shard_marker",
    [
        ("fsdp", "pytorch_model_fsdp_0/.metadata"),
        ("deepspeed_zero2", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ],
)
def test_sharded_run_matches_one_process_and_resumes(reference, config, shard_marker):
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    root, args = reference
    ref, run = root / "runs/ref", root / "runs" / config
    launch(root, args, config, config)
    for stage in ("pretrain", "finetune"):
        facts = manifest_facts(run / stage)["launch"]
        assert facts["strategy"] == ("FSDP" if config == "fsdp" else "DEEPSPEED")
        assert (facts["processes"], facts["micro_batch"], facts["accumulation"]) == (2, 2, 2)
    assert (run / "pretrain/checkpoints/step_000003" / shard_marker).exists()
    torch.testing.assert_close(losses(run, "pretrain"), losses(ref, "pretrain"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses(run, "finetune"), losses(ref, "finetune"), rtol=1e-4, atol=1e-5)
    assert_same_tensors(ref / "pretrain/model/model.safetensors", run / "pretrain/model/model.safetensors")
    assert_same_tensors(
        ref / "finetune/adapter/adapter_model.safetensors", run / "finetune/adapter/adapter_model.safetensors"
    )
    assert_same_tensors(ref / "finetune/merged/model.safetensors", run / "finetune/merged/model.safetensors")

    # A crash after the step-2 checkpoint of the LoRA fine-tune: the rerun resumes from it, same
    # adapter (DeepSpeed writes its checkpoints without the frozen base; FSDP writes them whole).
    finished = load_file(run / "finetune/adapter/adapter_model.safetensors")
    for lost in ("checkpoints/step_000004", "adapter", "merged", "manifest.json"):
        path = run / "finetune" / lost
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    launch(root, args, config, config, reuse=())
    assert manifest_facts(run / "finetune")["resumed_from_step"] == 2
    resumed = load_file(run / "finetune/adapter/adapter_model.safetensors")
    for k, v in finished.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6, msg=k)

    # A crash after the step-3 checkpoint: the rerun resumes from the sharded state, same result.
    finished = load_file(run / "pretrain/model/model.safetensors")
    for lost in ("checkpoints/step_000006", "model", "manifest.json"):
        path = run / "pretrain" / lost
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    launch(root, args, config, config, stage="pretrain")
    assert manifest_facts(run / "pretrain")["resumed_from_step"] == 3
    resumed = load_file(run / "pretrain/model/model.safetensors")
    for k, v in finished.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6, msg=k)


def test_zero3_pretrain_matches_and_lora_finetune_consolidates(reference):
    pytest.importorskip("deepspeed")
    root, args = reference
    ref, run = root / "runs/ref", root / "runs/zero3"
    log = launch(root, args, "deepspeed_zero3", "zero3", stage="all")
    assert "0.0M params" not in log  # parameter counts see through ZeRO-3 partitioning
    torch.testing.assert_close(losses(run, "pretrain"), losses(ref, "pretrain"), rtol=1e-4, atol=1e-5)
    assert_same_tensors(ref / "pretrain/model/model.safetensors", run / "pretrain/model/model.safetensors")
    # LoRA over frozen tied embeddings: ZeRO-3's gradients differ a little; the run says so.
    assert (
        "ZeRO-3 with LoRA on a model with tied embeddings" in manifest_facts(run / "finetune")["launch"]["warnings"][0]
    )
    adapter = load_file(run / "finetune/adapter/adapter_model.safetensors")
    assert set(adapter) == set(load_file(ref / "finetune/adapter/adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in adapter.values())
    assert (run / "finetune/merged/model.safetensors").exists()
    assert (run / "generate/samples.jsonl").exists()  # generation after ZeRO-3 runs on one rank


def test_fsdp_activation_checkpointing_that_would_empty_the_adapter_is_refused_before_training(reference, tmp_path):
    root, args = reference
    config = tmp_path / "fsdp_ac.yaml"
    config.write_text(
        (REPO / "conf/accelerate/fsdp.yaml")
        .read_text()
        .replace("fsdp_activation_checkpointing: false", "fsdp_activation_checkpointing: true")
    )
    log = launch(root, args, config, "fsdp_ac", reuse=("tokenizer", "data", "pretrain"), check=False)
    assert "error: PEFT finds no LoRA weights in the prepared model" in log
    assert "train.activation_checkpointing=true" in log
    assert not (root / "runs/fsdp_ac/finetune/metrics.jsonl").exists()  # refused before training
