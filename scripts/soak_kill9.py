"""Soak test: kill -9 a 2-process CPU pretraining run at random moments, resume each time, and check
that the final weights equal those of an uninterrupted run.

    python scripts/soak_kill9.py --kills 20            # prints one JSON line per kill, then a verdict

Each launch is `accelerate launch --multi_gpu --num_processes 2 -m pipeline ... resume=auto` on a tiny
model (gloo on CPU); the whole process group gets SIGKILL after a random delay, mid-step,
mid-checkpoint or mid-startup alike, the launcher and every rank together. Exit status 0 only when the weights match.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: Path, processes: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "pipeline",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every rank at once, like a node dying. torchrun starts ranks in
    sessions of their own, so killing the launcher's process group would orphan them."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def newest_checkpoint(run: Path) -> int | None:
    steps = [int(p.name.split("_")[1]) for p in (run / "pretrain/checkpoints").glob("step_*")]
    return max(steps) if steps else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-delay", type=float, default=6.0, help="seconds before each kill, drawn from [1, max]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args()
    rng = random.Random(a.seed)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    from tests.conftest import make_documents

    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(make_documents(120)):
        (corpus / f"{i}.txt").write_text(doc)
    common = [
        "stage=pretrain",
        "data=text",
        f"data.paths=[{corpus}]",
        "tokenizer.vocab_size=320",
        "model=tiny",
        "train=tiny",
        f"train.max_steps={a.steps}",
        "train.ckpt_every=4",
        "train.eval_every=0",
        "train.log_every=10",
    ]

    ref = launch([*common, "run.name=ref"], work, a.processes)
    if ref.wait() != 0:
        sys.exit(f"reference run failed:\n{ref.stderr.read()[-3000:]}")
    for stage in ("tokenizer", "data"):
        shutil.copytree(work / "runs/ref" / stage, work / "runs/soak" / stage, dirs_exist_ok=True)

    run = work / "runs/soak"
    for k in range(1, a.kills + 1):
        proc = launch([*common, "run.name=soak", "resume=auto"], work, a.processes)
        delay = rng.uniform(1.0, a.max_delay)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            kill_tree(proc.pid)
        proc.wait()
        print(
            json.dumps(
                {
                    "kill": k,
                    "after_s": round(delay, 2),
                    "killed": not finished,
                    "newest_checkpoint": newest_checkpoint(run),
                    "complete": (run / "pretrain/manifest.json").exists(),
                }
            ),
            flush=True,
        )
        if finished:
            break
    final = launch([*common, "run.name=soak", "resume=auto"], work, a.processes)
    if final.wait() != 0:
        sys.exit(f"final resume failed:\n{final.stderr.read()[-3000:]}")
    got = load_file(run / "pretrain/model/model.safetensors")
    want = load_file(work / "runs/ref/pretrain/model/model.safetensors")
    diff = max((got[k] - v).abs().max().item() for k, v in want.items())
    ok = got.keys() == want.keys() and diff <= 1e-6
    print(
        json.dumps(
            {
                "kills": k,
                "steps": a.steps,
                "processes": a.processes,
                "max_abs_weight_diff": diff,
                "same_final_weights": ok,
                "workdir": str(work),
            }
        )
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
