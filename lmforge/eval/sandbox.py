"""Run untrusted Python (model-written code and its tests) in a throwaway, isolated process.

Isolation is bubblewrap's (`bwrap`, the sandbox Flatpak uses), a maintained tool, rather than namespaces and
mounts set up by hand:
- no network: a new network namespace with only a loopback interface;
- no host files but those Python needs: a new, read-only root holding read-only binds of /usr (and the /bin,
  /lib... links into it), /etc/ld.so.cache and the Python installation; a fresh /proc; a minimal read-only
  /dev (its devices stay usable); a private, size-capped /tmp; and the working directory, the one writable
  host path. Nothing else of the host (home directories, the repository, other files in /tmp) is visible;
- new PID, IPC, UTS and cgroup namespaces, a new session (no terminal to inject input into), and the
  whole sandbox dies with bwrap, which dies with us (`--die-with-parent`);
- as root, bwrap runs without a user namespace (one would map the sandbox's users to root outside, which the
  kernel exempts from the process limit) and a launcher inside drops to `nobody`; otherwise bwrap maps us
  into a new user namespace and forbids nested ones;
- limited time and resources: a wall-clock timeout (the sandbox is killed), and, set by the launcher before
  the program starts, RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE on every file written (including
  captured output), RLIMIT_NOFILE and RLIMIT_NPROC, so a fork bomb is bounded, and what it left is killed
  with the PID namespace. As root the process cap counts every process of `nobody` on the machine, so
  sandboxes run one at a time; in a user namespace (Linux >= 5.14) it counts the sandbox's only;
- a temporary working directory, removed afterwards.

Without bwrap (or where it cannot create namespaces) running is refused unless the caller passes
`isolate=False` (the CLI's `--unsafe-no-sandbox true`): the program then runs with the resource limits
(but no process cap) and the temporary directory only, and can reach the network and your files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.errors import ConfigError

NOBODY = 65534
OUTPUT_LIMIT = 64 * 1024  # characters of stdout/stderr kept in a result
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
OPT_OUT = ("to run generated code without isolation anyway, pass isolate=False (CLI: --unsafe-no-sandbox true), "
           "which gives it your network and files")
MISSING_BWRAP = ("sandbox: bubblewrap (`bwrap`) is not installed or not on PATH; it isolates generated code. "
                 "Install it (Debian/Ubuntu: `apt-get install bubblewrap`, Fedora: `dnf install bubblewrap`), "
                 f"or, {OPT_OUT}")

# The first process inside the sandbox (the same interpreter, stdlib only; run with -I -S -c). It applies the
# limits to itself, drops root to `nobody` when asked, says the sandbox is up (so a setup failure is never
# mistaken for a failing program), closes that descriptor so the program cannot forge it, and becomes the program.
LAUNCHER = """\
import json, os, resource, sys
config = json.loads(sys.argv[1])
for name, value in config["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if config["uid"] is not None:
    os.setgroups([])
    os.setgid(config["uid"])
    os.setuid(config["uid"])
os.write(config["started_fd"], b"started")
os.close(config["started_fd"])
os.execv(config["argv"][0], config["argv"])
"""


@dataclass(frozen=True)
class Limits:
    """What one program may use. Memory is address space (RLIMIT_AS), so it bounds what it can allocate."""

    timeout: float = 10.0  # seconds of wall-clock time
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16  # per file written, and the size of the private /tmp


@dataclass
class RunResult:
    """`returncode` is the exit status as a shell reports it (128 + N after signal N), None on timeout."""

    status: Literal["passed", "failed", "timeout"]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _env(workdir: str, python_home: str) -> dict[str, str]:
    """A minimal environment: nothing of ours (tokens, paths) leaks into untrusted code."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "LD_LIBRARY_PATH": os.path.join(python_home, "lib")}


def _interpreter() -> tuple[str, str]:
    """(installation root, interpreter) of the Python running lmforge, as real paths.

    The sandbox runs the base installation (stdlib only, no site-packages or virtual environment), which
    is bound read-only at the same path inside.
    """
    home = os.path.realpath(sys.base_prefix)
    binary = os.path.realpath(sys.executable)
    if not binary.startswith(home + os.sep):
        binary = os.path.join(home, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return home, binary


def _bwrap() -> str:
    """The bwrap executable on PATH; a ConfigError that says how to get it otherwise."""
    path = shutil.which("bwrap")
    if path is None:
        raise ConfigError(MISSING_BWRAP)
    return path


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _parents(path: str, bound: list[str]) -> list[str]:
    """bwrap arguments creating `path`'s ancestors traversable (bwrap would make them 0700, closed to nobody),
    except those that exist already: /tmp and those in `bound` directories."""
    args = []
    for parent in map(str, reversed(Path(path).parents[:-1])):  # top down, without "/"
        if parent != "/tmp" and not any(_within(parent, d) for d in bound):
            args += ["--perms", "0755", "--dir", parent]
    return args


def bwrap_args(bwrap: str, *, workdir: str, python_home: str, env: dict[str, str], tmp_bytes: int,
               as_root: bool, status_fd: int) -> list[str]:
    """The bwrap command line (up to `--`) for one run; order matters, later mounts go on top of earlier ones."""
    args = [bwrap, "--die-with-parent", "--new-session", "--json-status-fd", str(status_fd)]
    if as_root:  # no user namespace (see the module docstring); the launcher needs these two to become nobody
        args += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-all", "--unshare-user", "--disable-userns"]
    args += ["--hostname", "sandbox", "--clearenv"]
    for name, value in env.items():
        args += ["--setenv", name, value]
    bound = []
    for path in SYSTEM_DIRS:  # merged-/usr systems have /bin, /lib... as links into /usr: recreate them
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
            bound.append(path)
    args += [*_parents("/etc/ld.so.cache", bound),  # how the loader finds shared libraries
             "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    if not any(_within(python_home, d) for d in bound):
        args += [*_parents(python_home, bound), "--ro-bind", python_home, python_home]
        bound.append(python_home)
    # Last, the tmpfs root and /dev go read-only (the device nodes in /dev, separate mounts, stay usable).
    return [*args, *_parents(workdir, bound), "--bind", workdir, workdir, "--chdir", workdir,
            "--remount-ro", "/dev", "--remount-ro", "/"]


def run_python(code: str, limits: Limits = Limits(), *, isolate: bool = True) -> RunResult:
    """Run `code` as a script in a fresh sandbox; the result says whether it exited 0 in time.

    Raises ConfigError if isolation was asked for and cannot be set up (bwrap missing, or unable to create
    namespaces here).
    """
    bwrap = _bwrap() if isolate else None
    parent = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    read_ends: list[int] = []
    try:
        os.chmod(parent, 0o755)  # traversable by `nobody`; its parent (/tmp) is too
        workdir = os.path.join(parent, "work")
        os.mkdir(workdir, 0o700)
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        as_root = isolate and os.geteuid() == 0
        if as_root:
            for path in (workdir, os.path.join(workdir, "main.py")):
                os.chown(path, NOBODY, NOBODY)
        home, python = _interpreter()
        env = _env(workdir, home)
        rlimits = {
            "RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_FSIZE": limits.max_file_mb << 20,
            "RLIMIT_CPU": int(limits.timeout) + 1, "RLIMIT_CORE": 0, "RLIMIT_NOFILE": 256,
        }
        if isolate:  # unisolated, it would count every process of ours, not the program's
            rlimits["RLIMIT_NPROC"] = limits.max_processes
        started_r, started_w = os.pipe()
        status_r, status_w = os.pipe()  # bwrap reports the host PID of the sandbox's PID 1 here
        read_ends.extend((started_r, status_r))
        config = {"limits": rlimits, "uid": NOBODY if as_root else None, "started_fd": started_w,
                  "argv": [python, "-I", "-S", "main.py"]}
        argv = [python, "-I", "-S", "-c", LAUNCHER, json.dumps(config)]
        fds, process_env = (started_w,), env
        if bwrap is not None:  # bwrap itself needs no environment; it sets the program's
            argv = [*bwrap_args(bwrap, workdir=workdir, python_home=home, env=env, as_root=as_root,
                                tmp_bytes=limits.max_file_mb << 20, status_fd=status_w), "--", *argv]
            fds, process_env = (started_w, status_w), {}
        out_path, err_path = os.path.join(parent, "stdout"), os.path.join(parent, "stderr")
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=process_env,
                                           cwd=workdir, pass_fds=fds, start_new_session=True)
            finally:
                os.close(started_w)
                os.close(status_w)
            timed_out = _wait(process, limits.timeout, status_r if isolate else None)
        seconds = time.perf_counter() - start
        started = _drain(started_r)
        stdout, stderr = (_read_head(p) for p in (out_path, err_path))
        if not started and not timed_out:
            what = "bwrap could not set up the sandbox" if isolate else "the launcher failed"
            message = f"sandbox: {what}: {stderr.strip()[-2000:] or f'exit status {process.returncode}'}"
            raise ConfigError(f"{message}. bwrap needs root or unprivileged user namespaces; {OPT_OUT}"
                              if isolate else message)
        returncode = None if timed_out else process.returncode if process.returncode >= 0 else 128 - process.returncode
        status = "timeout" if timed_out else "passed" if returncode == 0 else "failed"
        return RunResult(status, returncode, stdout, stderr, seconds)
    finally:
        for fd in read_ends:
            os.close(fd)
        shutil.rmtree(parent, ignore_errors=True)


def _wait(process: subprocess.Popen, timeout: float, status_fd: int | None) -> bool:
    """Wait for the run to end, killing it at `timeout`; True if it was killed. Returns once nothing is left.

    Isolated, the sandbox's PID 1 is killed, and the kernel kills everything else in its PID namespace before
    bwrap can reap it, so bwrap's exit means the sandbox is empty. Unisolated, the program's session (process
    group) is the best handle on what it started.
    """
    try:
        process.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        pid1 = _sandbox_pid(status_fd) if status_fd is not None else None
        if pid1 is not None and process.poll() is None:  # bwrap has not reaped it: the PID is still its
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid1, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
    if status_fd is None or process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return timed_out


def _sandbox_pid(status_fd: int) -> int | None:
    """The host PID of the sandbox's PID 1 from bwrap's JSON status lines, if it got that far."""
    text = _drain(status_fd).decode(errors="replace")
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            pid = json.loads(line).get("child-pid")
            if isinstance(pid, int):
                return pid
    return None


def _drain(fd: int) -> bytes:
    """What is in a pipe now, without waiting for writers that may still hold it."""
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _read_head(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(OUTPUT_LIMIT).decode("utf-8", errors="replace")


@functools.cache
def _probe() -> None:
    """One trivial isolated run; cached once it succeeds (a failure raises and is tried again next time)."""
    run_python("pass", Limits(timeout=10))


def check_isolation(isolate: bool) -> None:
    """Fail fast (before any generation) when isolation is asked for but impossible here; warn when off."""
    if not isolate:
        warnings.warn("running generated code WITHOUT a sandbox (no network or filesystem isolation)",
                      stacklevel=2)
        return
    _bwrap()  # checked on every call: the probe's success is cached
    _probe()
