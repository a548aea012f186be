"""scripts/slurm/train.sbatch passes the time-limit SIGTERM (sent to the batch shell by
--signal=B:TERM@120) to the ranks, so they checkpoint two minutes before the end. srun, scontrol,
scancel and accelerate are stand-ins on PATH: what is tested is the script's own logic."""

import os
import signal
import stat
import subprocess
import time

from tests.conftest import REPO

FAKE_RANK = """#!/usr/bin/env python3
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[0]).parent
def stop(signum, frame):
    (out / "rank_got_sigterm").write_text("checkpointed")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(out / "rank_pid").write_text(str(os.getpid()))
(out / "rank_args").write_text(repr(sys.argv[1:]))
time.sleep(60)
sys.exit(3)  # only without a signal
"""
# Real srun answers SIGTERM by killing its tasks; real scancel --signal=TERM signals every task.
FAKE_SRUN = "#!/bin/bash\nshift\n\"$@\" &\nchild=$!\ntrap 'kill -9 $child' TERM\nwait $child\nwait $child\n"
FAKE_SCANCEL = '#!/bin/sh\nkill -TERM "$(cat "$(dirname "$0")/rank_pid")"\n'


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_the_batch_script_passes_sigterm_to_the_ranks_and_their_arguments_intact(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "scontrol", "#!/bin/sh\necho node1\n")
    executable(bin_dir / "srun", FAKE_SRUN)
    executable(bin_dir / "scancel", FAKE_SCANCEL)
    executable(bin_dir / "accelerate", FAKE_RANK)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "42",
        "GPUS_PER_NODE": "2",
    }
    args = ["recipe=gpt2_124m", "run.name=a b", "data.separator='\\n\\n'"]
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts/slurm/train.sbatch"), *args],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not (bin_dir / "rank_args").exists():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    rank_args = eval((bin_dir / "rank_args").read_text())
    assert rank_args[rank_args.index("--num_processes") + 1] == "2"
    assert rank_args[-4:] == ["pipeline", *args]  # each argument arrives as it was given, quotes and all
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
    _, stderr = proc.communicate(timeout=30)
    assert (bin_dir / "rank_got_sigterm").read_text() == "checkpointed", stderr
    assert proc.returncode == 0 and "passing it to every rank" in stderr
