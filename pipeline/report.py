"""`pipeline report DIR...`: one table comparing finished runs, from their own artifacts, offline.

    pipeline report runs/lr                      # a sweep dir: every run in it
    pipeline report runs/a runs/b --out cmp/     # run dirs

Prints the table and writes report.csv, report.md and report.png (validation bits per byte against
training time and against tokens, a line per run) to --out (default: the one DIR given, else .).
Columns: the overrides that differ between the runs, pretraining val bits/byte with its gzip -9
and xz -9e references, tokens/s, wall seconds per stage ("linked": reused from another run of the sweep),
fine-tuning val loss before -> after, preference tuning's held-out reward accuracy, and the eval's
shares per model and task set
(parse/define/pass@1).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from pipeline.errors import PipelineError

STAGE_DIRS = ("tokenizer", "data", "pretrain", "finetune", "pairs", "preference", "generate", "eval")


def is_run(path: Path) -> bool:
    return path.is_dir() and (
        (path / "history.jsonl").exists() or any((path / s / "manifest.json").exists() for s in STAGE_DIRS)
    )


def find_runs(dirs: list[str]) -> list[Path]:
    """The runs directly inside each DIR (a sweep dir), or DIR itself when it holds none."""
    runs = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise PipelineError(f"{d} is not a directory; give run dirs (runs/NAME) or a sweep dir.")
        found = sorted(p for p in d.iterdir() if not p.name.startswith(".") and is_run(p)) or ([d] if is_run(d) else [])
        if not found:
            raise PipelineError(f"{d} holds no runs (no history.jsonl or stage manifest.json); run a stage first.")
        runs += found
    return runs


def _facts(run: Path, stage: str) -> dict:
    path = run / stage / "manifest.json"
    return json.loads(path.read_text()).get("facts", {}) if path.exists() else {}


def _overrides(run: Path) -> dict[str, str]:
    """The command-line overrides of the run's latest invocation (.hydra/overrides.yaml)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    import yaml

    items = yaml.safe_load(path.read_text()) or []
    skip = ("run.", "sweep.")
    return {k: v for k, _, v in (str(i).partition("=") for i in items) if not k.startswith(skip)}


def _fmt(value, spec: str):
    return format(value, spec) if isinstance(value, (int, float)) else value


def _linked_stages(run: Path) -> set[str]:
    """Stages this run took from the shared store and never built itself (history.jsonl)."""
    path = run / "history.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    built = {e["stage"] for e in events if e["action"].startswith("built")}
    return {e["stage"] for e in events if e["action"].startswith("reused from")} - built


def run_row(run: Path) -> dict:
    pre, ft = _facts(run, "pretrain"), _facts(run, "finetune")
    row = {
        "val_bpb": _fmt(pre.get("final_val_bpb"), ".4f"),
        "gzip9_bpb": _fmt(pre.get("gzip9_val_bpb"), ".4f"),
        "xz9_bpb": _fmt(pre.get("xz9_val_bpb"), ".4f"),
        "pretrain_tokens_per_s": _fmt(pre.get("tokens_per_s"), ".0f"),
        "finetune_val_loss": (
            f"{ft.get('initial_val_loss') or float('nan'):.4f} -> {ft['final_val_loss']:.4f}"
            if ft.get("final_val_loss") is not None
            else None
        ),
    }
    pref = _facts(run, "preference").get("final", {})
    if "val_reward_accuracy" in pref:
        row["preference_reward_accuracy"] = _fmt(pref["val_reward_accuracy"], ".3f")
    row |= eval_columns(_facts(run, "eval"))
    linked = _linked_stages(run)
    names = ("tokenizer", "prepare", "pretrain", "finetune", "pairs", "preference", "generate", "eval")
    for stage, name in zip(STAGE_DIRS, names):
        seconds = _facts(run, stage).get("wall_seconds")
        if seconds is not None:  # a stage another run of the sweep built cost this run nothing
            row[f"{stage}_s"] = "linked" if name in linked else _fmt(seconds, ".1f")
    return row


def eval_columns(facts: dict) -> dict:
    """The eval's shares per model and task set: "parse/define/pass@1" in percent (pass@1 "-"
    where answers were not run)."""
    columns = {}
    for label in ("finetuned", "base", "model"):
        for suite in ("stdlib", "functions"):
            s = facts.get(label, {}).get(suite)
            if s and s.get("prompts"):
                passed = "-" if s.get("pass_at_1") is None else f"{s['pass_at_1']:.0%}"
                columns[f"eval_{label}_{suite}"] = f"{s['parses']:.0%}/{s['defines']:.0%}/{passed}"
    return columns


def build_table(runs: list[Path]) -> tuple[list[str], list[dict]]:
    """(columns, rows): the run, the override keys whose values differ, then the measurements."""
    overrides = [_overrides(r) for r in runs]
    keys = sorted({k for o in overrides for k in o})
    differing = [k for k in keys if len({o.get(k, "(default)") for o in overrides}) > 1]
    common = Path(*Path(runs[0]).parts[:-1]) if len({r.parent for r in runs}) == 1 else None
    rows = []
    for run, o in zip(runs, overrides):
        name = run.name if common else str(run)
        rows.append({"run": name, **{k: o.get(k, "(default)") for k in differing}, **run_row(run)})
    columns = ["run", *differing]
    for row in rows:
        columns += [k for k in row if k not in columns and any(r.get(k) is not None for r in rows)]
    return columns, rows


def format_table(columns: list[str], rows: list[dict], markdown: bool = False) -> str:
    cells = [[str(r.get(c, "")) if r.get(c) is not None else "" for c in columns] for r in rows]
    if markdown:
        cells = [[v.replace("|", "\\|") for v in row] for row in cells]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) + "\n"


def bpb_curve(run: Path) -> list[tuple[float, int, float]]:
    """(training seconds, tokens seen, val bpb) at each evaluation of the run's pretraining."""
    path = run / "pretrain" / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "tokens_seen" in r]
    points = []
    for r in rows:
        if "val_bpb" in r:  # placed at the last logged training step at or before the evaluation
            last = next((t for t in reversed(train) if t["step"] <= r["step"]), {})
            points.append((last.get("train_seconds", 0.0), last.get("tokens_seen", 0), r["val_bpb"]))
    return points


def plot(runs: list[Path], names: list[str], out: Path) -> bool:
    curves = [(n, bpb_curve(r)) for r, n in zip(runs, names)]
    if not any(c for _, c in curves):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves:
        if points:
            seconds, tokens, bpb = zip(*points)
            a.plot(seconds, bpb, marker="o", label=name)
            b.plot(tokens, bpb, marker="o", label=name)
    a.set(xlabel="training time (s, evaluation excluded)", ylabel="val bits per byte", title="per second")
    b.set(xlabel="tokens seen", ylabel="val bits per byte", title="per token")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pipeline report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="run dirs (runs/NAME) or sweep dirs holding runs")
    p.add_argument("--out", help="where report.csv/.md/.png go (default: the one DIR, else .)")
    args = p.parse_args(argv)
    runs = find_runs(args.dirs)
    out = Path(args.out or (args.dirs[0] if len(args.dirs) == 1 else "."))
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = build_table(runs)
    print(format_table(columns, rows), end="")
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "report.md").write_text(format_table(columns, rows, markdown=True))
    plotted = plot(runs, [r["run"] for r in rows], out / "report.png")
    written = "report.csv, report.md" + (", report.png" if plotted else "")
    print(f"{len(rows)} runs -> {out}/ ({written})", file=sys.stderr)
    return 0
