"""scripts/slurm/train.sbatch forwards the time-limit SIGTERM (sent to the batch shell by
--signal=B:TERM@120) to the ranks, so they checkpoint two minutes before the end. srun, scontrol
and accelerate are stand-ins on PATH: what is tested is the script's own forwarding logic."""

import os
import signal
import stat
import subprocess
import time

from tests.conftest import REPO

FAKE_ACCELERATE = """#!/usr/bin/env python3
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[0]).parent
def stop(signum, frame):
    (out / "rank_got_sigterm").write_text("checkpointed")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(out / "rank_started").write_text(" ".join(sys.argv[1:]))
time.sleep(60)
sys.exit(3)  # only without a signal
"""


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_the_batch_script_forwards_sigterm_to_the_ranks(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "scontrol", "#!/bin/sh\necho node1\n")
    executable(bin_dir / "srun", '#!/bin/bash\nshift\nexec "$@"\n')  # real srun forwards signals to its tasks
    executable(bin_dir / "accelerate", FAKE_ACCELERATE)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1",
           "SLURM_NNODES": "1", "SLURM_NODEID": "0", "GPUS_PER_NODE": "2"}
    proc = subprocess.Popen(["bash", str(REPO / "scripts/slurm/train.sbatch"), "recipe=gpt2_124m", "run.name=x"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (bin_dir / "rank_started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    assert "--num_processes 2" in (bin_dir / "rank_started").read_text()
    assert "-m pipeline recipe=gpt2_124m run.name=x" in (bin_dir / "rank_started").read_text()
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does
    _, stderr = proc.communicate(timeout=30)
    assert (bin_dir / "rank_got_sigterm").read_text() == "checkpointed", stderr
    assert proc.returncode == 0 and "forwarding it to every rank" in stderr
