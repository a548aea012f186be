"""The eval's sandbox against hostile answers: each row is a real answer run through the real
sandbox. Every answer defines a correct `f`, so a row that is contained and exits cleanly passes
its test, and one whose attack raised (or killed its own process) fails it. After each row: the
file, socket, secret or process it went after is untouched, the sandbox's temp dir is gone, and
no process of it is left."""

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.eval.sandbox import MARKER, run_answer

F = "def f(x):\n    return x + 1\n"
TESTS = "assert f(1) == 2\n"
LINUX = sys.platform.startswith("linux")


def _layers() -> tuple[str, ...]:
    return run_answer(F, "f", TESTS, "", 5).layers


LAYERS = _layers()
HAS_FILES = any(layer.startswith("landlock") for layer in LAYERS)
HAS_PIDS = any("pid" in layer for layer in LAYERS)
HAS_NET = any("net" in layer for layer in LAYERS)
HAS_SECCOMP = "seccomp" in LAYERS
needs_seccomp = pytest.mark.skipif(not HAS_SECCOMP, reason=f"no seccomp filter here (layers: {LAYERS})")
needs_files = pytest.mark.skipif(not HAS_FILES, reason=f"no landlock on this platform (layers: {LAYERS})")
needs_pids = pytest.mark.skipif(not HAS_PIDS, reason=f"no PID namespace on this platform (layers: {LAYERS})")


def sandbox_processes() -> list[int]:
    """PIDs of live processes of this test process's sandbox runs (by their environment marker)."""
    mine, found = f"{MARKER}={os.getpid()}-".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mine in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def world(tmp_path, monkeypatch):
    """What an answer may go after: a folder outside its own, a HOME with a file, a secret in the
    environment, a listening socket; and a private temp root, to see the sandbox's dir removed."""
    outside, home, temp_root = tmp_path / "outside", tmp_path / "home", tmp_path / "tmp"
    for d in (outside, home, temp_root):
        d.mkdir()
    (home / "keep.txt").write_text("precious")
    os.chmod(home / "keep.txt", 0o600)
    os.utime(home / "keep.txt", (1_000_000_000, 1_000_000_000))
    unix_server = socket.socket(socket.AF_UNIX)
    unix_server.bind(str(tmp_path / "service.sock"))  # a local service: docker, the session bus ...
    unix_server.listen(1)
    unix_server.settimeout(0.2)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PIPELINE_TEST_SECRET", "s3cret-value")
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    yield {
        "outside": outside,
        "home": home,
        "temp_root": temp_root,
        "server": server,
        "port": server.getsockname()[1],
        "unix_server": unix_server,
        "unix_path": str(tmp_path / "service.sock"),
    }
    server.close()
    unix_server.close()


def no_connection(server) -> bool:
    try:
        server.accept()[0].close()
        return False
    except TimeoutError:
        return True


ROWS = {
    # name: (attack before defining f, answer passes?, check of the world afterwards, marks)
    "write_outside": (
        "open({outside!r} + '/x', 'w').write('x')",
        False,
        lambda w: not any(w["outside"].iterdir()),
        [needs_files],
    ),
    "delete_in_real_home": (
        "import os\nos.remove({home!r} + '/keep.txt')",
        False,
        lambda w: (w["home"] / "keep.txt").exists(),
        [needs_files],
    ),
    "home_is_the_sandbox": (
        "import os\nassert os.path.expanduser('~') != {home!r}",
        True,
        lambda w: (w["home"] / "keep.txt").exists(),
        [],
    ),
    "secret_from_environment": ("import os\nassert 'PIPELINE_TEST_SECRET' not in os.environ", True, None, []),
    "secret_from_parent_proc": ("print(open('/proc/{parent}/environ').read())", False, None, [needs_files]),
    "socket_to_host": (
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x')",
        False,
        lambda w: no_connection(w["server"]),
        [],
    ),
    "raw_socket_module": (
        "import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))",
        False,
        lambda w: no_connection(w["server"]),
        [pytest.mark.skipif(not HAS_NET, reason="no network layer")],
    ),
    "unix_socket_to_local_service": (
        "import _socket\ns = _socket.socket(_socket.AF_UNIX)\ns.connect({unix_path!r})\ns.send(b'x')",
        False,
        lambda w: no_connection(w["unix_server"]),
        [needs_seccomp],
    ),
    "chmod_utime_xattr_outside": (
        "import ctypes, os\nlibc = ctypes.CDLL(None)\npath = ({home!r} + '/keep.txt').encode()\n"
        "libc.chmod(path, 0o777)\nlibc.utimes(path, None)\nlibc.setxattr(path, b'user.x', b'1', 1, 0)",
        True,
        lambda w: (
            (w["home"] / "keep.txt").stat().st_mode & 0o777 == 0o600
            and (w["home"] / "keep.txt").stat().st_mtime == 1_000_000_000
        ),
        [needs_seccomp],
    ),
    "forged_control_and_verdict_lines": (
        "import os\nfor fd in range(3, 20):\n    try:\n"
        '        os.write(fd, b\'{{"pid1": -1, "layers": 5}}\\n{{"passed": "yes"}}\\n\')\n'
        "    except OSError:\n        pass\nos._exit(0)",
        False,
        None,
        [],
    ),
    "subprocess_shell": (
        "import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {outside}/sh'])",
        False,
        lambda w: not any(w["outside"].iterdir()),
        [],
    ),
    "ctypes_system": (
        "import ctypes\nctypes.CDLL(None).system(b'echo x > {outside}/c; rm -f {home}/keep.txt')",
        True,
        lambda w: not any(w["outside"].iterdir()) and (w["home"] / "keep.txt").exists(),
        [needs_files],
    ),
    "ctypes_kill_parent": ("import ctypes\nctypes.CDLL(None).kill({parent}, 9)", True, None, []),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", False, None, []),
    "allocate_8gb": ("b = bytearray(8 << 30)", False, None, []),
    "write_1gb_file": (
        "with open('big', 'wb') as fh:\n    for _ in range(1024):\n        fh.write(bytes(1 << 20))",
        False,
        None,
        [],
    ),
    "loop_with_sleeping_grandchild": (
        "import ctypes, time\nif ctypes.CDLL(None).fork() == 0:\n    time.sleep(600)\nwhile True:\n    pass",
        False,
        None,
        [needs_pids],
    ),
    "setsid_grandchild_outlives_answer": (
        "import ctypes, time\nlibc = ctypes.CDLL(None)\nif libc.fork() == 0:\n    libc.setsid()\n    time.sleep(600)",
        True,
        None,
        [needs_pids],
    ),
    "exit_0": ("", True, None, []),
    "os_exit": ("", False, None, []),
    "trailing_print_without_newline": ("", True, None, []),
}
AFTER = {
    "exit_0": "exit(0)",
    "os_exit": "import os\nos._exit(0)",
    "trailing_print_without_newline": "print(f(1), end='')",
}


@pytest.mark.skipif(not LINUX, reason="the process table is read from /proc")
@pytest.mark.parametrize("row", [pytest.param(k, marks=v[3]) for k, v in ROWS.items()])
def test_hostile_answer_is_contained(row, world):
    attack, passes, untouched, _ = ROWS[row]
    fill = {k: str(world[k]) for k in ("outside", "home", "unix_path")} | {"port": world["port"], "parent": os.getpid()}
    code = attack.format(**fill) + "\n" + F + AFTER.get(row, "")
    started = time.monotonic()
    verdict = run_answer(code, "f", TESTS, "", timeout=3)
    assert time.monotonic() - started < 15
    assert verdict.passed is passes, verdict.error
    assert verdict.layers == LAYERS  # from the runner, not from what an answer wrote
    if untouched:
        assert untouched(world)
    assert (world["home"] / "keep.txt").read_text() == "precious"
    assert not any(world["temp_root"].iterdir()), "the sandbox's temp dir was left behind"
    time.sleep(0.1)  # the kernel reaps a killed namespace's processes asynchronously
    assert sandbox_processes() == []
