"""`pipeline --multirun key=a,b other=x,y`: every combination of Hydra's sweep grammar, a run each.

    pipeline -m stage=pretrain train.lr=1e-3,3e-3,1e-2 run.name=lr        # runs/lr/train.lr=0.001, ...
    pipeline -m model=glob(t*) train.max_steps=range(100,400,100)         # globs over groups, ranges
    pipeline -m train.lr=1e-3,3e-3 sweep.launch='accelerate launch --multi_gpu --num_processes 2'

A sweep.launch holding a comma or '=' needs Hydra's quotes too:
    sweep.launch="'accelerate launch --gpu_ids 0,1'"

Each combination is a run dir under the sweep dir (run.root/run.name, or run.root/<recipe>-sweep
without a run.name), named from its swept overrides. Every combination is composed and checked
first: a bad one is refused in one line and the others still run. They run one after another,
each as its own process (or accelerate launch), with run.shared_upstream=true, so an artifact with
the same config and inputs (the tokenizer and token shards of a learning-rate sweep, the
pretrained model of a fine-tuning sweep) is built once, kept in run.root/.shared/ and linked into
every run that uses it. A combination whose stages are all up to date is skipped; SIGTERM and
Ctrl-C reach the running combination, which checkpoints, and the sweep stops after it. Rerun with
more steps, a sweep resumes each run from its checkpoints. One sweep at a time runs in a sweep dir.
Compare the runs with `pipeline report runs/NAME`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.compose import CONF_DIR, compose_config
from pipeline.config.sweep_grammar import expand
from pipeline.errors import PipelineError
from pipeline.lock import RunLock


@dataclass
class Combination:
    overrides: list[str]  # this run's full override list (the common ones and its swept values)
    swept: list[str]  # just the swept key=value pairs: they name the run
    name: str
    problem: str | None = None  # why it was refused, if it was
    composed: tuple | None = None  # (config, specs) as composed when it was checked


def run_name(swept: list[str]) -> str:
    """A directory name from the swept overrides: `train.lr=0.001,model=tiny`; a name that had to
    be changed (characters a path cannot hold, length) gets a hash of the original, so no two
    combinations share a dir."""
    name = ",".join(swept) or "default"
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if safe != name or len(safe) > 120:
        safe = f"{safe[:110]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


def _quoted(value: str) -> str:
    """A Hydra override value that stays one string whatever it holds (commas, =, quotes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan(argv: list[str]) -> tuple[Path, str | None, list[Combination]]:
    """(sweep dir, launch prefix, combinations), each composed and checked; refused ones carry
    their problem. Without run.name the sweep dir is runs/<recipe's run name>-sweep."""

    combos, swept_keys = expand(argv, CONF_DIR)
    common = [a for a in argv if a.split("=", 1)[0] not in swept_keys]
    base, _ = compose_config(common, validate=False)
    named = any(a.lstrip("+").startswith("run.name=") for a in argv)
    sweep_dir = Path(base.run.root) / (base.run.name if named else f"{base.run.name}-sweep")
    shared = [] if any(a.startswith("run.shared_upstream=") for a in argv) else ["run.shared_upstream=true"]
    out = []
    for overrides in combos:
        swept = [o for o in overrides if o.split("=", 1)[0] in swept_keys]
        name = run_name(swept)
        full = [*overrides, f"run.root={_quoted(str(sweep_dir))}", f"run.name={_quoted(name)}", *shared]
        combo = Combination(full, swept, name)
        try:
            combo.composed = compose_config(full)
        except PipelineError as e:
            combo.problem = str(e)
        out.append(combo)
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise PipelineError(f"two combinations would share a run dir ({sorted(names)}); give distinct values.")
    return sweep_dir, base.sweep.launch, out


def _up_to_date(combo: Combination, honour_force: bool = True) -> bool:
    """Every stage this run would run is complete and current (with force=..., nothing is, unless
    honour_force=False: then only completeness counts, as after the run)."""
    from pipeline.runner import Runner

    cfg, specs = combo.composed
    force = specs.force if honour_force else False
    return Runner(specs, Path(cfg.run.root) / cfg.run.name, force, cfg.run.shared_upstream).up_to_date(cfg.stage)


def _launch(combo: Combination, launch: str | None) -> tuple[int, str | None, bool]:
    """Run one combination, echoing its log; returns (exit code, its `error:` line if any, whether
    a SIGTERM arrived meanwhile)."""
    prefix = shlex.split(launch) if launch else [sys.executable]
    try:
        proc = subprocess.Popen(
            [*prefix, "-m", "pipeline", *combo.overrides], stderr=subprocess.PIPE, text=True, errors="replace"
        )
    except OSError as e:
        return 127, f"error: could not start {prefix[0]} ({e.strerror or e}); check sweep.launch.", False
    error, terminated = None, []

    def forward(signum, frame):  # a scheduler's time limit: the run checkpoints, the sweep stops after it
        terminated.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            if line.startswith("error: "):
                error = line.strip()
    except KeyboardInterrupt:  # the run got the same Ctrl-C: let it checkpoint and stop, then stop the sweep
        sys.stderr.write(proc.stderr.read())
        proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return proc.wait(), error, bool(terminated)


def _skippable(combo: Combination, tag: str, honour_force: bool = True) -> bool | None:
    """True when the run is complete, False when it needs running, None when its dir is damaged."""
    try:
        return _up_to_date(combo, honour_force)
    except PipelineError as e:
        print(f"{tag}: failed: {e}", file=sys.stderr)
        return None


def run_sweep(argv: list[str]) -> int:
    """Plan, then run every valid combination in turn; returns the exit code (1 if any failed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PipelineError("run the sweep itself with plain `pipeline -m`; each run is launched with sweep.launch.")
    sweep_dir, launch, combos = plan(argv)
    with RunLock(sweep_dir):  # one sweep at a time: two would race on the shared store
        return _run_all(argv, sweep_dir, launch, combos)


def _run_all(argv: list[str], sweep_dir: Path, launch: str | None, combos: list[Combination]) -> int:
    counts = {"complete": 0, "skipped": 0, "refused": 0, "failed": 0}
    print(f"sweep: {len(combos)} runs under {sweep_dir}", file=sys.stderr)
    for i, combo in enumerate(combos, 1):
        tag = f"sweep [{i}/{len(combos)}] {combo.name}"
        if combo.problem:
            counts["refused"] += 1
            print(f"{tag}: refused: {combo.problem}", file=sys.stderr)
            continue
        skip = _skippable(combo, tag)
        if skip is None:
            counts["failed"] += 1
            continue
        if skip:
            counts["skipped"] += 1
            print(f"{tag}: up to date, skipped", file=sys.stderr)
            continue
        print(f"{tag}: running", file=sys.stderr, flush=True)
        t0 = time.time()
        code, error, terminated = _launch(combo, launch)
        if terminated or (code == 0 and _skippable(combo, tag, honour_force=False) is False):
            resume = shlex.join(["pipeline", "-m", *[a for a in argv if not a.startswith(("force=", "resume="))]])
            print(f"{tag}: stopped by a signal; resume the sweep with: {resume}", file=sys.stderr)
            return 1
        if code == 0:
            counts["complete"] += 1
            print(f"{tag}: done in {time.time() - t0:.0f}s", file=sys.stderr)
        else:
            counts["failed"] += 1
            print(f"{tag}: failed (exit {code}){': ' + error if error else ''}", file=sys.stderr)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    print(f"sweep: {summary} -> {sweep_dir}; compare them with `pipeline report {sweep_dir}`", file=sys.stderr)
    return 1 if counts["refused"] or counts["failed"] else 0
