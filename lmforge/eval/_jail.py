"""The sandbox's launcher, run as `python -I _jail.py CONFIG_JSON` by lmforge.eval.sandbox.

Standard library only and run as a fresh single-threaded interpreter, because it forks and changes
namespaces: doing that from the evaluating process (which holds torch's thread pools) is unsafe.

With isolation it (1) unshares new network, mount, PID, IPC and UTS namespaces (plus a user namespace
when not root), (2) bind-mounts the working directory read-write and remounts every other mount
read-only, (3) bind-mounts the Python installation at a path the unprivileged user can reach, then
(4) forks the program as PID 1 of the new PID namespace, with resource limits and, when root, as the
`nobody` user. When PID 1 exits or is killed, the kernel kills every process left in the namespace,
so a fork bomb or a stray background process cannot outlive the run.

It reports one JSON line on the status descriptor: {"exit": code, "signal": n, "timeout": bool} or
{"error": "..."} when the sandbox itself could not be set up.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG = 1
# Per-mount flags a bind remount must repeat: in a user namespace, dropping a locked one is EPERM.
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags, None),
           f"mount {target}")


def mounts() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) from /proc/self/mountinfo, parents before children."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # spaces are written as \040
            flags = 0
            for option in fields[5].split(","):
                flags |= MOUNT_OPTIONS.get(option, 0)
            result.append((point, flags))
    return result


def isolate(workdir: str, python_home: str, python_mount: str) -> None:
    """New namespaces; the filesystem read-only except `workdir`; Python visible at `python_mount`."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if flags & CLONE_NEWUSER:  # become root of the new user namespace, mapped to ourselves outside
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    mount(python_home, python_mount, None, MS_BIND | MS_REC)
    mount(workdir, workdir, None, MS_BIND | MS_REC)
    for point, keep in mounts():
        if point == workdir or point.startswith(workdir.rstrip("/") + "/"):
            continue
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError as e:  # a mount hidden under another one cannot be reached, so needs nothing
            if os.path.ismount(point):
                raise OSError(e.errno, f"cannot make {point} read-only ({e.strerror})") from None


def set_limits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def main() -> int:
    config = json.loads(sys.argv[1])
    status = os.fdopen(config["status_fd"], "w")
    os.set_inheritable(config["status_fd"], False)

    def report(**fields: object) -> int:
        status.write(json.dumps(fields) + "\n")
        status.flush()
        return 0

    workdir = config["workdir"]
    try:
        if config["isolate"]:
            isolate(workdir, config["python_home"], config["python_mount"])
    except OSError as e:
        return report(error=f"cannot isolate the program: {e}")
    pid = os.fork()
    if pid == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher gone means the namespace goes too
            os.setsid()
            set_limits(config["limits"])
            if config["isolate"] and os.geteuid() == 0 and config.get("uid") is not None:
                os.setgroups([])
                os.setgid(config["gid"])
                os.setuid(config["uid"])
            os.chdir(workdir)
            os.execve(config["argv"][0], config["argv"], config["env"])
        except BaseException as e:  # anything here must become an exit code, never a second launcher
            sys.stderr.write(f"sandbox: cannot start the program: {e}\n")
        finally:
            os._exit(127)
    deadline = time.monotonic() + config["timeout"]
    pidfd = os.pidfd_open(pid)
    timed_out = False
    while True:
        ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            break
    # Isolated, the program is PID 1 of its namespace and the kernel kills the rest with it; without
    # isolation its session (process group) is the best handle on what it started.
    _kill_group(pid)
    _, wait_status = os.waitpid(pid, 0)
    _kill_group(pid)
    return report(exit=os.waitstatus_to_exitcode(wait_status), timeout=timed_out)


if __name__ == "__main__":
    sys.exit(main())
