"""Run one model-written answer and its tests, confined. Executed as a script by a fresh
`python -I` (standard library only) that `sandbox.run_answer` starts in a new session, in an empty
temp directory, with an allow-listed environment. Reads {code, name, tests, doctests, limits,
read_paths, control_fd, result_fd} on stdin. Writes to control_fd (closed before the answer runs,
so the answer cannot write there) the layers it set up, the errors of those it could not, and the
outer PID of the answer's process; writes the verdict to result_fd. The answer's own
stdout/stderr go nowhere: nothing it prints can spoil the verdict.

Layers, each applied where the platform allows it and reported when it is:
- rlimits: address space, CPU seconds, file size, open files, no core files;
- namespaces (Linux): a new user, network and PID namespace. The network has only a loopback that
  is down; the answer runs as PID 1 of its namespace, so when it ends or is killed every process
  it forked is killed by the kernel; processes in the namespace are capped by RLIMIT_NPROC
  (not for root: the kernel exempts uid 0);
- landlock (Linux 5.13+): reads only below the interpreter's prefixes, system library folders and
  the temp dir; writes only in the temp dir; TCP bind/connect denied (ABI 4+); no signals to
  processes outside the sandbox (ABI 6+);
- seccomp (Linux, x86_64 and aarch64): no sockets of any family (UNIX sockets to local services
  included), no changes to file modes, owners, times or extended attributes (landlock does not
  cover those), no ptrace, keyrings, bpf, perf events, userfaultfd or io_uring;
- python: fork, exec, os.system, subprocess, os.kill and sockets raise. This layer alone is easy
  to get around (ctypes, `import _socket`); it stops the accidents, the layers above the rest.
"""

import ctypes
import doctest
import json
import os
import resource
import struct
import sys

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_SET_SECCOMP, SIGKILL = 38, 1, 22, 9
SYS_LANDLOCK = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}  # create_ruleset, add_rule, restrict_self
LL_READ = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read file, read dir
LL_FILE_READ = (1 << 0) | (1 << 2)  # what a rule on a single file (not a folder) may grant
LL_NULL = (1 << 1) | (1 << 2)  # /dev/null: write and read
# seccomp: (audit arch, denied syscalls) per machine. socket socketpair | chmod fchmod fchmodat
# fchmodat2 | chown fchown lchown fchownat | utime utimes futimesat utimensat | setxattr lsetxattr
# fsetxattr removexattr lremovexattr fremovexattr setxattrat removexattrat | ptrace
# process_vm_writev | add_key request_key keyctl | bpf perf_event_open userfaultfd io_uring_setup
SECCOMP_DENY = {
    "x86_64": (
        0xC000003E,
        (41, 53, 90, 91, 268, 452, 92, 93, 94, 260, 132, 235, 261, 280, 188, 189, 190, 197, 198, 199, 463, 466)
        + (101, 311, 248, 249, 250, 321, 298, 323, 425),
    ),
    "aarch64": (
        0xC00000B7,
        (198, 199, 52, 53, 452, 55, 54, 88, 5, 6, 7, 14, 15, 16, 463, 466)
        + (117, 271, 217, 218, 219, 280, 241, 282, 425),
    ),
}


def set_rlimits(limits: dict) -> list[str]:
    pairs = [
        (resource.RLIMIT_AS, limits["memory_bytes"]),
        (resource.RLIMIT_CPU, limits["cpu_seconds"]),
        (resource.RLIMIT_FSIZE, limits["file_bytes"]),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ]
    applied = 0
    for what, value in pairs:
        try:
            resource.setrlimit(what, (value, value))
            applied += 1
        except (ValueError, OSError):  # macOS refuses RLIMIT_AS, for one
            pass
    return ["rlimits"] if applied == len(pairs) else [f"rlimits ({applied} of {len(pairs)})"]


def enter_namespaces(libc) -> list[str]:
    """A user+network+PID namespace where unprivileged namespaces exist, else (root without user
    namespaces) network+PID, else nothing."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
        for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
        return ["user+net+pid namespaces"]
    if libc.unshare(CLONE_NEWNET | CLONE_NEWPID) == 0:
        return ["net+pid namespaces"]
    raise OSError(ctypes.get_errno(), "unshare refused")


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def restrict_files(libc, writable: str, read_paths: list[str]) -> list[str]:
    """Landlock: write only below `writable`, read only below `read_paths`; deny TCP and signals
    to the outside where the kernel's ABI knows them."""
    create, add_rule, restrict = SYS_LANDLOCK[os.uname().machine]
    abi = libc.syscall(create, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        raise OSError(ctypes.get_errno(), "landlock is not enabled")
    handled_fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
    attr = (ctypes.c_uint64 * 3)(handled_fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(create, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    rules = [(writable, handled_fs)] + [(p, LL_READ) for p in read_paths] + [("/dev/null", LL_NULL)]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            access &= LL_FILE_READ | LL_NULL
        added = libc.syscall(add_rule, ruleset, 1, ctypes.byref(PathBeneath(access, fd)), 0)
        os.close(fd)
        if added != 0 and path == writable:
            raise OSError(ctypes.get_errno(), "landlock could not allow the temp dir")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(restrict, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return [f"landlock abi {abi}"]


def deny_syscalls(libc) -> list[str]:
    """A seccomp filter: the syscalls of SECCOMP_DENY fail with EPERM, the rest run."""
    arch, denied = SECCOMP_DENY[os.uname().machine]
    ld_arch, ld_nr, jeq, ret = (0x20, 4), (0x20, 0), 0x15, 0x06
    allow, eperm = 0x7FFF0000, 0x00050000 | 1
    program = [(ld_arch[0], 0, 0, ld_arch[1]), (jeq, 1, 0, arch), (ret, 0, 0, eperm), (ld_nr[0], 0, 0, ld_nr[1])]
    program.append((0x35, len(denied) + 1, 0, 0x40000000))  # jge: x32 numbers on x86_64 are denied
    program += [(jeq, len(denied) - i, 0, nr) for i, nr in enumerate(denied)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]
    raw = b"".join(struct.pack("HBBI", *op) for op in program)
    filters = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(filters))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp refused the filter")
    return ["seccomp"]


def _refuse(*args, **kwargs):
    raise PermissionError("not allowed in the evaluation sandbox")


def python_guard() -> None:
    import shutil
    import socket
    import subprocess

    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "execv", "execve", "execl", "execvp"):
        setattr(os, name, _refuse)
    for name in ("posix_spawn", "posix_spawnp", "spawnv", "spawnve"):
        if hasattr(os, name):
            setattr(os, name, _refuse)
    subprocess.Popen = _refuse
    shutil.rmtree = _refuse
    socket.socket = socket.create_connection = socket.socketpair = _refuse


def verdict(task: dict) -> dict:
    """Run the answer, then its tests, in one namespace. An answer that ends with exit() or
    sys.exit(main()) is still tested; one that kills its own process gives no verdict (a failure)."""
    namespace = {"__name__": "answer"}
    try:
        exec(compile(task["code"], "answer", "exec"), namespace)
    except SystemExit:
        pass
    except BaseException as e:  # noqa: BLE001 - any error of the answer is its failure
        return {"passed": False, "error": f"answer: {type(e).__name__}: {e}"[:200]}
    if task["name"] not in namespace:
        return {"passed": False, "error": f"answer: defines no {task['name']}"}
    try:
        if task["doctests"]:
            test = doctest.DocTestParser().get_doctest(task["doctests"], namespace, task["name"], None, 0)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            result = runner.run(test, out=lambda s: None)
            ok = result.attempted > 0 and result.failed == 0
            return {"passed": ok, "error": "" if ok else f"{result.failed} of {result.attempted} doctests failed"}
        exec(compile(task["tests"], "tests", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001
        return {"passed": False, "error": f"tests: {type(e).__name__}: {e}"[:200]}
    return {"passed": True, "error": ""}


def set_up(task: dict, libc) -> tuple[list[str], list[str]]:
    """(layers set up, errors of the layers that could not be), in the order they stack."""
    layers, errors = set_rlimits(task["limits"]), []
    if not sys.platform.startswith("linux"):
        return layers, ["namespaces, landlock, seccomp: Linux only"]
    steps = (
        ("namespaces", lambda: enter_namespaces(libc)),
        ("landlock", lambda: restrict_files(libc, os.getcwd(), task["read_paths"])),
        ("seccomp", lambda: deny_syscalls(libc)),
    )
    for name, step in steps:
        try:
            layers += step()
        except (OSError, KeyError, ValueError) as e:  # KeyError: a machine without syscall numbers here
            errors.append(f"{name}: {e}")
    return layers, errors


def main() -> None:
    task = json.loads(sys.stdin.read())
    control = os.fdopen(task["control_fd"], "w")
    result = os.fdopen(task["result_fd"], "w")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    layers, errors = set_up(task, libc)
    layers.append("python guard")
    pid_namespace = any("pid" in layer for layer in layers)
    child = os.fork() if pid_namespace else 0  # the first child is PID 1 of the new namespace
    if child:
        result.close()
        control.write(json.dumps({"layers": layers, "errors": errors, "pid1": child}) + "\n")
        control.close()
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    if pid_namespace:
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # the runner killed: the namespace goes too
        if os.getuid() != 0:  # the kernel enforces it in a user namespace, except for uid 0
            processes = task["limits"]["processes"]
            resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    else:
        control.write(json.dumps({"layers": layers, "errors": errors, "pid1": None}) + "\n")
    control.close()  # the answer never gets to write there
    python_guard()
    result.write(json.dumps(verdict(task)) + "\n")
    result.close()
    os._exit(0)  # no atexit handlers the answer may have registered


if __name__ == "__main__":
    main()
