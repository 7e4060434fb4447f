"""Host-side helpers of the lab: running commands, checking recorded pids, cgroup2 paths,
loop devices, packages and the KVM probe.

Everything that signals or removes something checks first that it is ours: a pid must still
run the expected program (pids are reused), a loop device must still be backed by our file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from typing import Dict, Iterator, List, Sequence

# The packages the lab needs (lab README "Versions"). Never libvirt-daemon-system: it pulls
# in polkit, dnsmasq and an autostarted NAT network, and expects an init system.
LAB_PACKAGES = (
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "bpftool",
    "gcc",  # builds the nobpf shim
    "libc6-dev",  # headers for the shim
    "util-linux",  # unshare, nsenter, losetup, mount -n
)

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says why and where to look."""


def run(
    cmd: Sequence[str],
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,  # noqa: A002 - same name as subprocess.run
    env: Dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """subprocess.run with text output captured; check=True raises LabError with stderr."""
    try:
        proc = subprocess.run(
            list(cmd), input=input, capture_output=True, text=True, timeout=timeout, env=env,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout}s: {' '.join(cmd)}") from exc
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {cmd[0]}") from exc
    if check and proc.returncode != 0:
        raise LabError(
            f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


# --- processes ----------------------------------------------------------------------------


def pid_cmdline(pid: int | None) -> str:
    """The command line of pid joined by spaces, "" if it is gone (or a zombie)."""
    if not pid:
        return ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pid_matches(pid: int | None, needle: str) -> bool:
    """True while pid runs and its command line contains needle (guards against pid reuse)."""
    return bool(pid) and needle in pid_cmdline(pid)


def _stat_fields(pid: int) -> List[str] | None:
    """/proc/PID/stat from field 3 (state) on; None if the pid does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after its closing paren
    return stat[stat.rindex(")") + 2:].split()


def pid_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: with the pid it identifies one process for good."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_gone(pid: int, start_time: int | None) -> bool:
    """True once the process that had start_time has finished exiting (zombie or reaped).
    An empty cmdline is not enough: it empties when the memory is released, before the
    files (pid-file locks, sockets) are closed."""
    fields = _stat_fields(pid)
    return fields is None or int(fields[19]) != start_time or fields[0] in ("Z", "X")


def kill_wait(pid: int | None, needle: str, timeout: float = 15) -> bool:
    """SIGTERM a pid of ours, SIGKILL it after timeout; True once it has exited."""
    if not pid or not pid_matches(pid, needle):
        return True
    start_time = pid_start_time(pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process_gone(pid, start_time):
                return True
            time.sleep(0.01)
    return process_gone(pid, start_time)


def read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --- cgroup2 ------------------------------------------------------------------------------


def _mountinfo(pid: str = "self") -> List[List[str]]:
    """mountinfo lines as [mount fields..., "-", fstype, source, options]."""
    with open(f"/proc/{pid}/mountinfo") as handle:
        return [line.split() for line in handle]


def mounts_of_type(fstype: str, pid: str = "self") -> List[Dict[str, str]]:
    out = []
    for fields in _mountinfo(pid):
        sep = fields.index("-")
        if fields[sep + 1] == fstype:
            out.append({"root": fields[3], "mountpoint": fields[4], "options": fields[5],
                        "super_options": fields[sep + 3]})
    return out


def host_cgroup2_mount() -> str:
    """Where this mount namespace sees the cgroup2 hierarchy's root (hybrid host:
    /sys/fs/cgroup/unified). The lab's private /sys/fs/cgroup is the same hierarchy."""
    for mount in mounts_of_type("cgroup2"):
        if mount["root"] == "/":
            return mount["mountpoint"]
    raise LabError("the host has no cgroup2 mount of the hierarchy root (/proc/self/mountinfo)")


def cgroup2_super_options() -> str:
    """The cgroup2 superblock options; they are global, so the lab must never change them (P3)."""
    return mounts_of_type("cgroup2")[0]["super_options"]


def process_cgroup_path(pid: int) -> str:
    """The 0:: line of /proc/PID/cgroup: the process's cgroup2 path, relative to our
    cgroup namespace's root (the host's, for the test process)."""
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            for line in handle:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError as exc:
        raise LabError(f"process {pid} is gone: {exc}") from exc
    raise LabError(f"process {pid} is in no cgroup2 cgroup")


def remove_cgroup_tree(directory: str) -> List[str]:
    """rmdir a cgroup subtree bottom-up; returns the directories that could not be removed."""
    failed = []
    if not os.path.isdir(directory):
        return failed
    for dirpath, dirnames, _ in os.walk(directory, topdown=False):
        for path in [os.path.join(dirpath, d) for d in dirnames] + (
            [directory] if dirpath == directory else []
        ):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append(f"{path}: {exc.strerror}")
    return failed


def cgroup_tree_pids(directory: str) -> List[int]:
    pids: List[int] = []
    for dirpath, _, files in os.walk(directory):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids += [int(x) for x in f.read().split()]
    return pids


# --- loop devices -------------------------------------------------------------------------


def loop_backing_file(device: str) -> str:
    """The backing file of a loop device, "" when it is not attached."""
    proc = run(["losetup", "-n", "-O", "BACK-FILE", device], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def loops_backed_under(directory: str) -> List[str]:
    """Loop devices (from `losetup -a`-equivalent sysfs) whose backing file is under directory."""
    found = []
    prefix = directory.rstrip("/") + "/"
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as handle:
                backing = handle.read().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append(f"/dev/{name}")
    return found


# --- locking ------------------------------------------------------------------------------


@contextlib.contextmanager
def global_lock(directory: str) -> Iterator[None]:
    """An exclusive flock on a directory every lab on this machine shares (the labs' parent
    directory). It serialises the parts where labs touch shared host state: the mount-point
    directories and the sweep of labs whose owner died. flock on a directory leaves no file."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the lock


# --- packages -----------------------------------------------------------------------------


def missing_packages(packages: Sequence[str] = LAB_PACKAGES) -> List[str]:
    missing = []
    for package in packages:
        proc = run(["dpkg-query", "-W", "-f=${Status}", package], check=False)
        if "ok installed" not in proc.stdout:
            missing.append(package)
    return missing


def ensure_packages(packages: Sequence[str] = LAB_PACKAGES) -> List[str]:
    """apt-get install what is missing (one update, --no-install-recommends); returns what
    was installed. Raises LabError when it cannot."""
    missing = missing_packages(packages)
    if not missing:
        return []
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], timeout=300, env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        timeout=900, env=env)
    still = missing_packages(missing)
    if still:
        raise LabError(f"apt-get install did not install: {' '.join(still)}")
    return missing


# --- virtualisation type ------------------------------------------------------------------

_virt_type: str | None = None


def detect_virt_type() -> str:
    """"kvm" if /dev/kvm can run QEMU with the CPU model libvirt uses when the domain has no
    <cpu> element (qemu64; -cpu host/max abort on this PVM host, P6), else "qemu" (TCG).
    Probed once per process with a QMP quit: about 0.1 s."""
    global _virt_type
    if _virt_type is None:
        _virt_type = "kvm" if os.path.exists("/dev/kvm") and _kvm_probe_ok() else "qemu"
    return _virt_type


def _kvm_probe_ok() -> bool:
    qmp = '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    cmd = [QEMU_BINARY, "-machine", "pc,accel=kvm", "-cpu", "qemu64", "-m", "16", "-nodefaults",
           "-display", "none", "-S", "-qmp", "stdio"]
    try:
        return run(cmd, check=False, timeout=20, input=qmp).returncode == 0
    except LabError:
        return False


def tcg_probe_ok() -> bool:
    qmp = '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    cmd = [QEMU_BINARY, "-machine", "pc,accel=tcg", "-m", "16", "-nodefaults",
           "-display", "none", "-S", "-qmp", "stdio"]
    try:
        return run(cmd, check=False, timeout=30, input=qmp).returncode == 0
    except LabError:
        return False
