"""Run untrusted Python (model-written code and its tests) in a throwaway, isolated process.

Isolation (Linux namespaces, see `_jail.py`):
- no network: a new network namespace has only a loopback interface, and it is down;
- no writes outside the working directory: a private mount namespace in which every mount is
  remounted read-only except a bind mount of the working directory. We chose a read-only mount view over
  relying on file ownership alone because world-writable places (/tmp, /dev/shm) accept writes from any
  user; as root we also drop to `nobody`, so permissions are a second wall;
- limited processes: RLIMIT_NPROC (enforced for `nobody`; root ignores it) and a new PID namespace
  whose every process dies with the program, so a fork bomb is both bounded and cleaned up;
- limited time and memory: a wall-clock timeout (the process is killed), RLIMIT_CPU, RLIMIT_AS, and
  RLIMIT_FSIZE on every file written, including captured output;
- a temporary working directory, removed afterwards.

Reads are not restricted: the program sees what `nobody` may read, but has no network to send it to.
The process cap counts every process of `nobody` on the machine, so sandboxes run one at a time.

Where namespaces are unavailable (not root and no unprivileged user namespaces) running is refused
unless the caller passes `isolate=False` (the CLI's `--unsafe-no-sandbox true`): the program then runs
with the resource limits and the temporary directory only, and can reach the network and your files.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.errors import ConfigError

JAIL = Path(__file__).with_name("_jail.py")
NOBODY = 65534
OUTPUT_LIMIT = 64 * 1024  # characters of stdout/stderr kept in a result


@dataclass(frozen=True)
class Limits:
    """What one program may use. Memory is address space (RLIMIT_AS), so it bounds what it can allocate."""

    timeout: float = 10.0  # seconds of wall-clock time
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16


@dataclass
class RunResult:
    status: Literal["passed", "failed", "timeout"]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _env(workdir: str, python_lib: str) -> dict[str, str]:
    """A minimal environment: nothing of ours (tokens, paths) leaks into untrusted code."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "LD_LIBRARY_PATH": python_lib}


def _interpreter() -> tuple[str, str]:
    """(installation root, interpreter path relative to it) of the Python running lmforge.

    The sandbox runs the base installation (stdlib only, no site-packages) bind-mounted at a path the
    `nobody` user can reach, since the original may sit under a private home directory.
    """
    home = os.path.realpath(sys.base_prefix)
    binary = os.path.realpath(sys.executable)
    if not binary.startswith(home + os.sep):
        binary = os.path.join(home, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return home, os.path.relpath(binary, home)


def run_python(code: str, limits: Limits = Limits(), *, isolate: bool = True) -> RunResult:
    """Run `code` as a script in a fresh sandbox; the result says whether it exited 0 in time.

    Raises ConfigError if isolation was asked for and cannot be set up (namespaces unavailable).
    """
    parent = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    try:
        os.chmod(parent, 0o755)  # traversable by `nobody`; its parent (/tmp) is too
        workdir = os.path.join(parent, "work")
        python_mount = os.path.join(parent, "python")
        os.mkdir(workdir, 0o700)
        os.mkdir(python_mount, 0o755)
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        as_root = isolate and os.geteuid() == 0
        if as_root:
            for path in (workdir, os.path.join(workdir, "main.py")):
                os.chown(path, NOBODY, NOBODY)
        home, relative = _interpreter()
        python_root = python_mount if isolate else home
        argv = [os.path.join(python_root, relative), "-I", "-S", "main.py"]
        rlimits = {
            "RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_FSIZE": limits.max_file_mb << 20,
            "RLIMIT_CPU": int(limits.timeout) + 1, "RLIMIT_CORE": 0, "RLIMIT_NOFILE": 256,
        }
        if as_root:  # counted per user: for `nobody` that is the sandbox; root would be exempt anyway
            rlimits["RLIMIT_NPROC"] = limits.max_processes
        read_fd, write_fd = os.pipe()
        config = {
            "workdir": workdir, "isolate": isolate, "python_home": home, "python_mount": python_mount,
            "argv": argv, "env": _env(workdir, os.path.join(python_root, "lib")), "limits": rlimits,
            "timeout": limits.timeout, "status_fd": write_fd,
            "uid": NOBODY if as_root else None, "gid": NOBODY if as_root else None,
        }
        out_path, err_path = os.path.join(parent, "stdout"), os.path.join(parent, "stderr")
        start = time.perf_counter()
        with os.fdopen(read_fd) as status, open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                process = subprocess.Popen([sys.executable, "-I", str(JAIL), json.dumps(config)],
                                           stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(write_fd,),
                                           start_new_session=True)
            finally:
                os.close(write_fd)
            try:
                process.wait(timeout=limits.timeout + 30)
            except subprocess.TimeoutExpired:  # the launcher itself hung: its death takes the namespace along
                process.kill()
                process.wait()
            lines = status.read().splitlines()
        seconds = time.perf_counter() - start
        stdout, stderr = (_read_head(p) for p in (out_path, err_path))
        if not lines:
            raise RuntimeError(f"sandbox launcher died (exit {process.returncode}): {stderr[-2000:]}")
        report = json.loads(lines[-1])
        if "error" in report:
            raise ConfigError(f"sandbox: {report['error']}. Namespaces need root or unprivileged user "
                              "namespaces; to run generated code without isolation anyway, pass isolate=False "
                              "(CLI: --unsafe-no-sandbox true)")
        status = "timeout" if report["timeout"] else "passed" if report["exit"] == 0 else "failed"
        return RunResult(status, report["exit"], stdout, stderr, seconds)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


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
    _probe()
