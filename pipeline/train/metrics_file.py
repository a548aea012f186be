"""metrics.jsonl (one JSON object per logged step or evaluation) and its curves.png."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsFile:
    """Append-only metrics.jsonl, written by the main process only (`enabled`)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def keep_until(self, step: int | None) -> None:
        """Drop the rows after `step` (a resumed run rewrites them), or all rows (None: a fresh run)."""
        if not self.enabled:
            return
        kept = []
        if step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if row.get("step", 0) <= step:
                    kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


def plot_curves(rows: list[dict], out: Path, references: dict[str, float]) -> None:
    """Training loss and validation bits per byte against steps, with compressor lines for scale
    (references: label -> bits per byte, e.g. {"gzip -9": 1.87})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        a.plot(*zip(*train))
    a.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    if val:
        b.plot(*zip(*val), marker="o", label="model")
    for (label, bpb), style in zip(references.items(), ("--", ":", "-.")):
        b.axhline(bpb, color="gray", linestyle=style, label=label)
    b.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_preference_curves(rows: list[dict], out: Path) -> None:
    """A preference run's loss, rewards (beta x log-ratio to the reference) and reward accuracy
    against steps: lines for training steps, markers for validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        return [(r["step"], r[key]) for r in rows if key in r]

    panels = (
        ("loss", ("loss",), "loss per pair"),
        ("rewards", ("chosen_reward", "rejected_reward", "reward_margin"), "reward (beta x log-ratio)"),
        ("reward accuracy", ("reward_accuracy",), "share of pairs with chosen > rejected"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (title, keys, ylabel) in zip(axes, panels):
        for key in keys:
            for prefix, style in (("", "-"), ("val_", "o--")):
                points = series(prefix + key)
                if points:
                    ax.plot(*zip(*points), style, label=f"{'val ' if prefix else ''}{key.replace('_', ' ')}")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
