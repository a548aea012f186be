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
    layers: tuple[str, ...]  # what confined the run
    unavailable: tuple[str, ...] = ()  # layers this platform refused, and why


def read_paths() -> list[str]:
    """What the child may read under landlock: the interpreter and the system's libraries."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    prefixes.add(str(Path(os.path.realpath(sys.executable)).parent.parent))
    system = ["/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom"]
    return sorted(prefixes) + [p for p in system if os.path.exists(p)]


def _child_env(home: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOWED if k in os.environ}
    marker = f"{os.getpid()}-{uuid.uuid4().hex}"  # whose run it is: tests find their own leftovers by it
    return {**env, "HOME": home, "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1", MARKER: marker}


def _read_lines(fd: int) -> list[dict]:
    """The JSON objects written to a pipe, read without blocking (a forked survivor may still
    hold its write end open); lines that are not JSON objects are dropped."""
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
    lines = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


def _kill(proc: subprocess.Popen, pid1) -> None:
    """The answer's namespace first (its PID 1 is still the runner's unreaped child, so the pid is
    not reused), then the runner's process group."""
    targets = [(os.kill, pid1)] if isinstance(pid1, int) and pid1 > 1 else []
    for kill, pid in targets + [(os.killpg, proc.pid)]:
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _verdict(control: dict, results: list[dict], timed_out: bool, timeout: float, code: int | None) -> Verdict:
    layers = tuple(str(x) for x in control.get("layers", ()))
    errors = tuple(str(x) for x in control.get("errors", ()))
    result = next((r for r in results if "passed" in r), None)
    if result is None:
        reason = f"timed out after {timeout:g} s" if timed_out else f"ended with code {code}, no verdict"
        return Verdict(False, reason, layers, errors)
    return Verdict(result["passed"] is True, str(result.get("error", ""))[:200], layers, errors)


def run_answer(code: str, name: str, tests: str, doctests: str, timeout: float) -> Verdict:
    """Run `code`, then its tests (assert lines, or doctests), confined; the verdict and the
    layers that confined it."""
    home = tempfile.mkdtemp(prefix="pipeline-eval-")
    control_r, control_w = os.pipe()
    result_r, result_w = os.pipe()
    limits = {**LIMITS, "cpu_seconds": math.ceil(timeout) + 1}
    task = {"code": code, "name": name, "tests": tests, "doctests": doctests, "limits": limits}
    task |= {"read_paths": read_paths(), "control_fd": control_w, "result_fd": result_w}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(RUNNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=home,
            env=_child_env(home),
            pass_fds=(control_w, result_w),
            start_new_session=True,
        )
        os.close(control_w)
        os.close(result_w)
        control_w = result_w = None
        try:
            proc.communicate(json.dumps(task).encode(), timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        control = next(iter(_read_lines(control_r)), {})
        if timed_out or not any("pid" in str(layer) for layer in control.get("layers", ())):
            _kill(proc, control.get("pid1"))  # with a PID namespace, a clean exit took every process with it
        results = _read_lines(result_r)
    finally:
        for fd in (control_r, result_r, control_w, result_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(home, ignore_errors=True)
    return _verdict(control, results, timed_out, timeout, proc.returncode)


def probe(timeout: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(layers, unavailable layers) of the sandbox here, from a trivial correct answer that must
    pass and a wrong one that must fail; an error otherwise (every score would be wrong)."""
    right = run_answer("def f(x):\n    return x + 1\n", "f", "assert f(1) == 2\n", "", timeout)
    wrong = run_answer("def f(x):\n    return x\n", "f", "assert f(1) == 2\n", "", timeout)
    if not right.passed or wrong.passed:
        problem = right.error if not right.passed else "a wrong answer passed"
        raise PipelineError(
            f"the eval's sandbox does not score a trivial answer correctly ({problem}; layers "
            f"{', '.join(right.layers) or 'none'}; unavailable: {'; '.join(right.unavailable) or 'none'}); "
            "run with eval.execute=false to score answers without running them."
        )
    return right.layers, right.unavailable
