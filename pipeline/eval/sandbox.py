"""Running a model-written answer against its tests, only when the user opted in, and confined.

`run_answer` starts `sandbox_runner.py` in a fresh `python -I`: a new session, an empty temp
working directory that is also HOME and TMPDIR (removed afterwards), an environment reduced to an
allow-list, the task on stdin and the verdict on a dedicated pipe. The runner adds what the
platform allows (rlimits, Linux namespaces, landlock, a Python-level guard; see its docstring) and
reports which layers it set up. On timeout the whole process group is killed, and with a PID
namespace every process the answer forked dies with it.

What this does not protect against: kernel exploits; an answer that forges its own verdict (it
runs in the process that writes it); CPU and memory use up to the limits while it runs; on a
platform without namespaces or landlock (macOS, old kernels, some containers), file reads and
writes outside the temp dir and the network beyond Python's socket module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

RUNNER = Path(__file__).with_name("sandbox_runner.py")
ENV_ALLOWED = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
MARKER = "PIPELINE_SANDBOX_RUN"  # in the child's environment: tests find its processes by it
LIMITS = {
    "memory_bytes": 1 << 30,  # address space: the stdlib tasks need tens of MB
    "file_bytes": 16 << 20,
    "open_files": 64,
    "processes": 32,  # in its own user namespace, where the kernel enforces it (not for root)
}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    error: str
    layers: tuple[str, ...]


def read_paths() -> list[str]:
    """What the child may read under landlock: the interpreter and the system's libraries."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes.add(str(Path(os.path.realpath(sys.executable)).parent.parent))
    system = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom"]
    return sorted(prefixes) + [p for p in system if os.path.exists(p)]


def _child_env(home: str, marker: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOWED if k in os.environ}
    return {**env, "HOME": home, "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1", MARKER: marker}


def _read_messages(fd: int) -> list[dict]:
    """The JSON lines written to the result pipe, read without blocking (a forked survivor may
    still hold its write end open)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    messages = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        try:
            messages.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return messages


def _kill(proc: subprocess.Popen, messages: list[dict]) -> None:
    pid1 = next((m["pid1"] for m in messages if m.get("pid1")), None)
    for kill, pid in ((os.killpg, proc.pid), (os.kill, pid1)):
        if pid:
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()


def run_answer(code: str, name: str, tests: str, doctests: str, timeout: float) -> Verdict:
    """Run `code`, then its tests (assert lines, or doctests), confined; the verdict and the
    layers that confined it."""
    home = tempfile.mkdtemp(prefix="pipeline-eval-")
    read_fd, write_fd = os.pipe()
    limits = {**LIMITS, "cpu_seconds": math.ceil(timeout) + 1}
    task = {"code": code, "name": name, "tests": tests, "doctests": doctests, "limits": limits}
    task |= {"read_paths": read_paths(), "result_fd": write_fd}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(RUNNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=home,
            env=_child_env(home, uuid.uuid4().hex),
            pass_fds=(write_fd,),
            start_new_session=True,
        )
        os.close(write_fd)
        try:
            proc.communicate(json.dumps(task).encode(), timeout=timeout)
            messages = _read_messages(read_fd)
            timed_out = False
        except subprocess.TimeoutExpired:
            messages = _read_messages(read_fd)
            _kill(proc, messages)
            timed_out = True
        _kill(proc, messages)  # the group: forked survivors of an answer that returned
    finally:
        os.close(read_fd)
        shutil.rmtree(home, ignore_errors=True)
    layers = next((tuple(m["layers"]) for m in messages if "layers" in m), ())
    result = next((m for m in messages if "passed" in m), None)
    if result is None:
        reason = f"timed out after {timeout:g} s" if timed_out else f"ended with code {proc.returncode}, no verdict"
        return Verdict(False, reason, layers)
    return Verdict(bool(result["passed"]), str(result["error"]), layers)


def probe(timeout: float) -> tuple[str, ...]:
    """The layers the sandbox sets up here, from a trivial correct answer; an error if even that
    does not pass (every answer would then be scored a failure)."""
    verdict = run_answer("def f(x):\n    return x + 1\n", "f", "assert f(1) == 2\n", "", timeout)
    if not verdict.passed:
        raise PipelineError(
            f"the eval's sandbox could not run a trivial correct answer ({verdict.error}); "
            "run with eval.execute=false to score answers without running them."
        )
    return verdict.layers
