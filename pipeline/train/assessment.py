"""An honest end line for a training stage: whether the model it made is short of what the recipe
meant, in plain words, with the measured cause and the settings that fix it.

Two signs are checked: pretraining that ends above what gzip -9 reaches on the same validation
text (the model learned less than a general-purpose compressor), and a time budget that fit fewer
steps than warmup plus UNDERTRAINED_STEPS (a machine too slow for the budget).
"""

from __future__ import annotations

from pipeline.config.train import TrainSpec

UNDERTRAINED_STEPS = 200  # steps past warmup that a budgeted run should fit to be more than a start


def training_warnings(summary: dict, spec: TrainSpec, key: str, gzip_bpb: float | None = None) -> list[str]:
    """Plain-words warnings about a finished training run (run_training's summary) whose config
    lives under `key` (train, finetune.train); [] when neither sign is present."""
    steps, final_bpb = summary["steps"], summary.get("final", {}).get("val_bpb")
    warnings = []
    if gzip_bpb is not None and final_bpb is not None and final_bpb >= gzip_bpb:
        warnings.append(
            f"the model ends at {final_bpb:.3f} bits/byte on held-out text, above gzip -9's {gzip_bpb:.3f}: "
            f"it predicts the text worse than a compressor does after {steps} steps ({_cause(summary)})"
        )
    if spec.time_budget and steps < min(spec.max_steps, spec.warmup_steps + UNDERTRAINED_STEPS):  # not capped
        warnings.append(
            f"the {spec.time_budget} time budget fit only {steps} steps on this machine, fewer than warmup + "
            f"{UNDERTRAINED_STEPS} ({_cause(summary)}): the model is undertrained"
        )
    if warnings:
        warnings[-1] += f"; to train more: {_fixes(spec, key, steps)}"
    return warnings


def _cause(summary: dict) -> str:
    """Seconds per step and the start-of-run choices that set them."""
    launch = summary["launch"]
    trained = max(1, summary["steps"] - summary.get("start_step", 0))
    per_step = summary.get("train_seconds", 0.0) / trained if summary.get("start_step", 0) == 0 else None
    pace = f"{per_step:.2f}s per step, " if per_step else ""
    precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(launch["mixed_precision"])
    choice = launch.get("precision_choice") or {}
    how = "measured" if choice.get("measured") else choice.get("reason") or "as set"  # e.g. run too short to measure
    muon = f", Muon's iterations in {launch['muon_dtype']}" if launch.get("muon_dtype") else ""
    compiled = "compiled" if launch.get("compiled") else "not compiled"
    return f"{pace}{precision} ({how}){muon}, {compiled}, {launch['processes']} process(es) on {launch['device']}"


def _fixes(spec: TrainSpec, key: str, steps: int) -> str:
    budget = f"{key}.time_budget={_longer(spec.budget_seconds)}, or " if spec.time_budget else ""
    more = max(2 * steps, spec.warmup_steps + UNDERTRAINED_STEPS)
    muon = f", or {key}.optimizer=adamw (a cheaper update)" if spec.optimizer == "muon" else ""
    return f"{budget}{key}.time_budget=null {key}.max_steps={more}{muon}"


def _longer(seconds: float | None) -> str:
    """Twice the budget, written as the config writes durations."""
    minutes = 2 * (seconds or 0) / 60
    return f"{minutes:.0f}min" if minutes >= 1 else f"{2 * (seconds or 0):.0f}s"
