"""The default run holds on every CPU: Muon at the machine's speed (its own Newton-Schulz dtype),
measurements bounded by the clock, an explicit max_steps over a default budget, and an honest end
line when the model is short of what was meant. The AVX2 test simulates an AVX2-only CPU on any
x86 CPU (ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2: bf16 matmuls ~20-60x slower)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config.compose import compose_config
from pipeline.train.autotune import TimeBudget
from pipeline.train.muon import Muon
from tests.conftest import REPO, TINY, manifest_facts, run_cli

SHAPES = [(256, 704), (704, 256), (256, 256), (64, 256)]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _muon_params(optimizer_cls, steps: int = 3, **kwargs) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = optimizer_cls(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kwargs)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params]


def test_muon_in_bf16_is_torch_muon_and_in_fp32_within_bf16_rounding():
    reference = _muon_params(torch.optim.Muon)
    assert all(torch.equal(a, b) for a, b in zip(reference, _muon_params(Muon, ns_dtype=torch.bfloat16)))
    start = _muon_params(Muon, steps=0)
    for ref, fp32, p0 in zip(reference, _muon_params(Muon, ns_dtype=torch.float32), start):
        ref_update, update = (ref - p0).flatten(), (fp32 - p0).flatten()
        # the updates differ only by bf16's rounding in the iterations (8 bits of mantissa)
        assert torch.nn.functional.cosine_similarity(ref_update, update, dim=0) > 0.999
        assert (ref_update - update).abs().max() <= 0.03 * ref_update.abs().max()


def test_a_time_budget_moves_the_wsd_cooldown_when_the_pace_changes():
    budget = TimeBudget(100.0, started=0.0, warmup_steps=20, eval_every=0)
    budget.steps(1, 1.0, cap=10_000)
    assert budget.steps(11, 2.0, cap=10_000) == 11 + int(98 // 0.1)  # 0.1 s per step -> ~990 steps
    assert budget.repace(40, 4.9, cap=10_000, floor=60) is None  # on pace (2.9 s for 29 steps)
    slower = budget.repace(100, 19.8, cap=10_000, floor=130)  # 0.2 s per step since deciding
    assert slower == 100 + int((100 - 19.8) // (17.8 / 89)) and budget.facts["steps"] == slower
    late = budget.repace(200, 95.0, cap=10_000, floor=260)  # nearly out of time: the cooldown starts now
    assert late == 260


@pytest.mark.parametrize(
    "overrides, budget, steps",
    [
        ([], "90s", 1000),  # the recipe sets both: the budget, capped by max_steps
        (["finetune.train.max_steps=150"], None, 150),  # the command line over the recipe's budget
        (["finetune.train.max_steps=150", "finetune.train.time_budget=30s"], "30s", 150),  # both: both hold
    ],
)
def test_an_explicit_max_steps_wins_over_a_budget_set_further_away(overrides, budget, steps):
    _, specs = compose_config(overrides)
    assert (specs.finetune.train.time_budget, specs.finetune.train.max_steps) == (budget, steps)
    assert bool(specs.notes) == (budget is None)
    _, specs = compose_config(["train.max_steps=40"])  # train=cpu's 4min is a group default
    assert specs.train.time_budget is None and "config group default" in specs.notes[0]


@pytest.mark.slow
def test_a_run_the_budget_leaves_short_ends_with_the_plain_words_line(tmp_path, text_corpus):
    args = ["stage=pretrain", "run.name=short", "data=text", f"data.paths=[{text_corpus}]", *TINY, "model=tiny"]
    proc = run_cli(*args, "train=tiny", "train.time_budget=3s", "train.max_steps=1000", cwd=tmp_path)
    facts = manifest_facts(tmp_path / "runs/short/pretrain")
    assert facts["steps"] < 1000 and any("time budget fit only" in w for w in facts["warnings"])
    assert "train.time_budget=" in facts["warnings"][-1]  # names the fix
    last = proc.stderr.strip().splitlines()[-1]
    assert "done, but pretrain:" in last and "undertrained" in last


AVX2_PROBE = r"""
import json, time, statistics, torch
from pipeline.config.model import ModelSpec
from pipeline.model.build import build_model, hf_config
from pipeline.train.autotune import measure_precision
from pipeline.train.optim import make_optimizer, hidden_matrices
from pipeline.train.muon import iteration_shapes
from pipeline.train.autotune import MARGIN
from pipeline.config.train import TrainSpec
from pipeline.device import bf16_speedup
from pipeline.train.loss import token_losses

torch.manual_seed(0)
model = build_model(hf_config(ModelSpec(arch="qwen3", d_model=256, n_layer=4, n_head=4, d_ff=704), 8192, 0, 1, 2), 0)
ids = torch.randint(0, 8192, (16, 257))
batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
t0 = time.perf_counter()
result = measure_precision(model, batch, torch.device("cpu"), None, 240.0)  # the quickstart's 4 minutes
wall = time.perf_counter() - t0

def step_seconds(optimizer):
    times = []
    for _ in range(3):
        t = time.perf_counter()
        token_losses(model, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)

speedup = bf16_speedup(iteration_shapes(hidden_matrices(model)), torch.device("cpu"))
ns = torch.bfloat16 if speedup > 1 / (1 - MARGIN) else torch.float32  # choices.choose_muon_dtype's rule
adamw = step_seconds(make_optimizer(model, TrainSpec(optimizer="adamw"), fused=False))
muon = step_seconds(make_optimizer(model, TrainSpec(optimizer="muon"), fused=False, muon_dtype=ns))
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "precision": result, "wall": wall,
                  "ns_dtype": str(ns), "speedup": speedup, "adamw_step": adamw, "muon_step": muon}))
"""


@pytest.mark.slow
def test_on_an_avx2_cpu_the_choices_are_fp32_bounded_and_muon_runs_at_fp32_speed():
    env = {**os.environ, **AVX2}
    proc = subprocess.run(
        [sys.executable, "-c", AVX2_PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["capability"] == "AVX2" and out["speedup"] < 0.5  # the simulation really makes bf16 slow
    assert out["precision"]["choice"] == "no" and out["precision"]["not_run_at_full_size"] == ["bf16"]
    assert out["precision"]["cost_seconds"] <= 12 and out["wall"] <= 12  # 5% of the quickstart's 4 minutes
    assert out["ns_dtype"] == "torch.float32" and out["muon_step"] <= 1.5 * out["adamw_step"]
