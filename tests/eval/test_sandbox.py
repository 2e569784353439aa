"""The code sandbox (bubblewrap): hostile programs (infinite loop, fork bomb, writes outside, network, memory) are
contained and reported as failures, the working directory is removed, and missing isolation is refused, not ignored."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

import lmforge
from lmforge.errors import ConfigError
from lmforge.eval import sandbox
from lmforge.eval.sandbox import NOBODY, Limits, run_python


def _sandbox_works() -> bool:
    try:
        return run_python("pass", Limits(timeout=10)).passed
    except ConfigError:
        return False


TASKS = Path(__file__).resolve().parents[2] / "tasks"

needs_isolation = pytest.mark.skipif(not sys.platform.startswith("linux") or not _sandbox_works(),
                                     reason="bwrap missing, or it cannot create namespaces here (needs root or "
                                            "unprivileged user namespaces)")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the process limit and uid drop apply when run as root")


def nobody_processes() -> list[int]:
    """PIDs of processes owned by `nobody`, which is what the sandbox runs programs as."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == NOBODY:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                pass
    return pids


@needs_isolation
def test_a_correct_program_passes_and_its_working_directory_is_removed(tmp_path: Path) -> None:
    """A program that writes into its working directory and exits 0 passes; the directory is gone afterwards."""
    code = "import os\nopen('out.txt', 'w').write('ok')\nprint(os.getcwd())\nprint(open('out.txt').read())\n"
    result = run_python(code, Limits(timeout=10))
    assert result.status == "passed" and result.returncode == 0
    workdir, content = result.stdout.split()
    assert content == "ok"
    assert Path(workdir).name == "work" and not Path(workdir).parent.exists()


@needs_isolation
def test_a_failing_assertion_is_a_failure_with_its_traceback() -> None:
    result = run_python("assert 1 + 1 == 3, 'arithmetic'\n", Limits(timeout=10))
    assert result.status == "failed" and result.returncode == 1
    assert "AssertionError: arithmetic" in result.stderr


@needs_isolation
def test_a_program_imitating_a_bwrap_error_is_a_failure_not_a_setup_error() -> None:
    """Whether the sandbox came up is told by the launcher, not by what the program prints or its exit status."""
    code = "import sys\nsys.stderr.write('bwrap: Creating new namespace failed\\n')\nsys.exit(1)\n"
    result = run_python(code, Limits(timeout=10))
    assert result.status == "failed" and result.returncode == 1


@needs_isolation
def test_an_infinite_loop_is_killed_at_the_time_limit() -> None:
    result = run_python("while True:\n    pass\n", Limits(timeout=1.0))
    assert result.status == "timeout" and not result.passed and result.returncode is None
    assert result.seconds < 15


@pytest.mark.slow
@needs_isolation
@as_root
def test_a_fork_bomb_is_bounded_by_the_process_limit_and_leaves_nothing_behind() -> None:
    """Forking until refused stops below max_processes; a bomb that ignores refusals is killed with all its
    children when the time is up (PID namespace), and no process of the sandbox user survives."""
    counting = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                "            time.sleep(60)\n            os._exit(0)\n        n += 1\n"
                "except OSError:\n    print(n, flush=True)\n    raise\n")
    before = set(nobody_processes())
    result = run_python(counting, Limits(timeout=5, max_processes=16))
    assert result.status == "failed"
    assert 0 < int(result.stdout) < 16
    relentless = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(relentless, Limits(timeout=1.5, max_processes=16))
    assert result.status == "timeout"
    assert set(nobody_processes()) <= before


@needs_isolation
def test_writes_outside_the_working_directory_fail_and_leave_no_file(tmp_path: Path) -> None:
    """Host directories outside the binds do not exist in the sandbox, the bound ones and the root are read-only:
    writes fail and no file appears. /tmp is private: a write there succeeds but never reaches the host's."""
    python_lib = Path(sys.base_prefix).resolve() / "lib" / "escaped.txt"
    for target in (tmp_path / "escaped.txt", Path.cwd() / "escaped.txt", Path("/usr/escaped.txt"), python_lib,
                   Path("/escaped.txt"), Path("/dev/escaped.txt")):
        result = run_python(f"open({str(target)!r}, 'w').write('escaped')\n", Limits(timeout=10))
        assert result.status == "failed", target
        assert any(e in result.stderr for e in ("Read-only file system", "Permission denied", "No such file")), target
        assert not target.exists()
    tmp_target = Path(tempfile.gettempdir()) / f"lmforge-escape-{os.getpid()}"
    result = run_python(f"open({str(tmp_target)!r}, 'w').write('x')\nprint(open({str(tmp_target)!r}).read())\n",
                        Limits(timeout=10))
    assert result.passed and result.stdout.strip() == "x"
    assert not tmp_target.exists()


@needs_isolation
def test_bwrap_hides_the_host(tmp_path: Path) -> None:
    """What isolates is bubblewrap: PID 1 is bwrap; a host file outside the binds (here next to the sandbox's own
    temporary directories) and the repository are absent; /etc holds only the loader cache; the host name is
    the sandbox's; and the only network interface is loopback."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host data")
    code = ("import os, socket\n"
            "print(open('/proc/1/comm').read().strip())\n"
            f"print(os.path.exists({str(secret)!r}), os.path.exists({str(tmp_path)!r}), "
            f"os.path.exists({str(Path.cwd())!r}))\n"
            "print(os.listdir('/etc'), socket.gethostname(), socket.if_nameindex())\n"
            "print(os.getuid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            f"open({str(secret)!r})\n")
    result = run_python(code, Limits(timeout=10))
    assert result.status == "failed" and "FileNotFoundError" in result.stderr
    comm, visible, names, ids = result.stdout.splitlines()
    assert comm == "bwrap"
    assert visible == "False False False"
    assert names == "['ld.so.cache'] sandbox [(1, 'lo')]"
    assert ids == f"{NOBODY if os.geteuid() == 0 else os.getuid()} [1, 2]"  # PID 1 is bwrap's, 2 the program


@needs_isolation
def test_there_is_no_network() -> None:
    """Only a loopback interface exists, and connecting anywhere fails."""
    code = ("import socket\nprint(socket.if_nameindex())\n"
            "socket.create_connection(('93.184.216.34', 80), timeout=3)\n")
    result = run_python(code, Limits(timeout=10))
    assert result.status == "failed"
    assert result.stdout.strip() == "[(1, 'lo')]"
    assert "unreachable" in result.stderr.lower()


@needs_isolation
def test_allocating_past_the_memory_limit_fails() -> None:
    result = run_python("x = bytearray(1 << 30)\n", Limits(timeout=10, memory_mb=256))
    assert result.status == "failed" and "MemoryError" in result.stderr


@needs_isolation
def test_the_environment_carries_nothing_of_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_SECRET_FOR_TEST", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\n", Limits(timeout=10))
    assert result.passed
    # Only what the sandbox sets (and the working directory bubblewrap records); nothing of the test's own.
    assert result.stdout.strip() == str(["HOME", "LANG", "LD_LIBRARY_PATH", "PATH", "PWD", "PYTHONDONTWRITEBYTECODE",
                                         "TMPDIR"])


def test_missing_bwrap_is_refused_naming_the_install_and_the_opt_out(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bwrap on PATH, run_python and check_isolation raise, saying how to install it and how to opt out,
    instead of running the code unisolated; `eval` refuses before loading the model and writes no report."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    expected = r"bubblewrap \(`bwrap`\) is not installed.*apt-get install bubblewrap.*--unsafe-no-sandbox true"
    with pytest.raises(ConfigError, match=expected):
        run_python("print('should not run')\n", Limits(timeout=5))
    with pytest.raises(ConfigError, match=expected):
        sandbox.check_isolation(True)  # even once a probe succeeded and was cached
    with pytest.raises(ConfigError, match=expected):
        lmforge.evaluate(model=tmp_path / "never-loaded", tasks=[TASKS / "python_functions.yaml"],
                         out=tmp_path / "eval.json")
    assert not (tmp_path / "eval.json").exists()


def test_bwrap_unable_to_isolate_is_refused_with_its_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bwrap that cannot create the sandbox (no user namespaces, say) is a ConfigError carrying its message."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"bwrap: No permissions to create new namespace.*unsafe-no-sandbox"):
            sandbox.check_isolation(True)
    finally:
        sandbox._probe.cache_clear()


def test_without_isolation_limits_still_apply() -> None:
    """The explicit opt-out still has the time limit and a temporary directory."""
    code = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass\n"
    result = run_python(code, Limits(timeout=1.0), isolate=False)
    assert result.status == "timeout" and result.seconds < 15
    assert Path(result.stdout.strip()).name == "work" and not Path(result.stdout.strip()).exists()
