"""Finding cgroup2 and the guest's own cgroup.

cgroup2 may be mounted anywhere: ``/sys/fs/cgroup`` on pure-v2 (systemd) hosts,
``/sys/fs/cgroup/unified`` on hybrid ones, somewhere else inside a container. We therefore
read mountinfo (which also gives each mount's root inside the hierarchy, relevant in cgroup
namespaces and bind mounts) and map ``/proc/PID/cgroup``'s ``0::`` path onto it.

The guest cgroup of a libvirt domain is found from QEMU's pid, never reconstructed from the
domain name: names are escaped differently by systemd and libvirt, and stale directories of
the same name linger after daemon restarts (lab pitfalls P12, P13).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

from .errors import OperationError, UsageError

DEFAULT_QEMU_RUN_DIR = "/run/libvirt/qemu"
# Threaded children libvirt creates under the guest cgroup; the filter lives above them.
_GUEST_CHILDREN = ("emulator", "vcpu", "iothread")
_DAEMON_NAMES = {"libvirtd", "virtqemud"}


@dataclass(frozen=True)
class Mount:
    mountpoint: str  # where it is mounted in our mount namespace
    root: str  # which directory of the hierarchy appears there ("/" normally)


def unescape_mountinfo(field: str) -> str:
    """mountinfo (and /proc/swaps) write space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> List[Mount]:
    """Every cgroup2 mount, in mountinfo order."""
    mounts: List[Mount] = []
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise OperationError(f"{mountinfo}: cannot read: {exc.strerror}") from None
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype = right.split(" ", 1)[0]
        if fstype != "cgroup2":
            continue
        fields = left.split(" ")
        if len(fields) >= 5:
            mounts.append(Mount(mountpoint=unescape_mountinfo(fields[4]),
                                root=unescape_mountinfo(fields[3])))
    return mounts


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str:
    """The mountpoint of the (first) cgroup2 mount whose root is the hierarchy's root."""
    mounts = cgroup2_mounts(mountinfo)
    for mount in mounts:
        if mount.root == "/":
            return mount.mountpoint
    if mounts:
        return mounts[0].mountpoint
    raise OperationError(
        "no cgroup2 file system is mounted: mount one (mount -t cgroup2 none /sys/fs/cgroup) "
        "or boot with systemd.unified_cgroup_hierarchy=1"
    )


def hierarchy_path(pid: int | str = "self", proc: str = "/proc") -> str:
    """The process's cgroup2 path inside the hierarchy (the ``0::`` line)."""
    path = f"{proc}/{pid}/cgroup"
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise OperationError(f"process {pid} does not exist") from None
    except OSError as exc:
        raise OperationError(f"{path}: cannot read: {exc.strerror}") from None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    raise OperationError(f"process {pid} is in no cgroup2 hierarchy ({path} has no 0:: line)")


def to_directory(hier_path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """Map a hierarchy path (``/machine/x``) to a directory through a cgroup2 mount."""
    hier_path = hier_path.split(" (deleted)")[0]
    best: Mount | None = None
    for mount in cgroup2_mounts(mountinfo):
        root = mount.root.rstrip("/")
        visible = hier_path == root or hier_path.startswith(root + "/") or root == ""
        if visible and (best is None or len(mount.root) > len(best.root)):
            best = mount
    if best is None:
        raise OperationError(f"cgroup {hier_path} is not visible through any cgroup2 mount")
    rel = hier_path[len(best.root.rstrip("/")):].lstrip("/")
    return os.path.join(best.mountpoint, rel) if rel else best.mountpoint


def process_cgroup(pid: int | str = "self", proc: str = "/proc",
                   mountinfo: str = "/proc/self/mountinfo") -> str:
    """The cgroup2 directory a process is in."""
    return to_directory(hierarchy_path(pid, proc), mountinfo)


def is_mount_root(directory: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    real = os.path.realpath(directory)
    return any(os.path.realpath(m.mountpoint) == real for m in cgroup2_mounts(mountinfo))


def strip_guest_children(directory: str) -> str:
    """``…/libvirt/emulator`` → ``…/libvirt``: the filter is attached above the threads."""
    base = os.path.basename(directory.rstrip("/"))
    if base == "emulator" or any(base.startswith(p) and base[len(p):].isdigit()
                                 for p in _GUEST_CHILDREN[1:]):
        return os.path.dirname(directory.rstrip("/"))
    return directory


def read_pid_file(path: str) -> int:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        raise OperationError(f"{path} does not exist: is the domain running?") from None
    except OSError as exc:
        raise OperationError(f"{path}: cannot read: {exc.strerror}") from None
    if not text.isdigit() or int(text) <= 1:
        raise OperationError(f"{path}: does not hold a process id")
    return int(text)


def domain_pid(name: str, run_dir: str = DEFAULT_QEMU_RUN_DIR) -> int:
    """QEMU's pid from libvirt's pid file; the name is checked so it cannot escape run_dir."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise UsageError(f"bad domain name {name!r}")
    pid = read_pid_file(os.path.join(run_dir, f"{name}.pid"))
    if not os.path.exists(f"/proc/{pid}"):
        raise OperationError(f"domain {name}: QEMU (pid {pid}) is not running")
    return pid


def _process_names(directory: str) -> List[str]:
    names = []
    try:
        with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as handle:
            pids = handle.read().split()
    except OSError:
        return names
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
                names.append(handle.read().strip())
        except OSError:
            continue
    return names


def check_guest_cgroup(directory: str, what: str,
                       mountinfo: str = "/proc/self/mountinfo") -> str:
    """Refuse a cgroup that is not a guest's own: the cgroup2 root, or one holding libvirtd."""
    if is_mount_root(directory, mountinfo):
        raise OperationError(
            f"{what}: QEMU runs in the cgroup2 root ({directory}), not in a cgroup of its own; "
            "a filter there would apply to the whole host — refusing. Check qemu.conf's "
            "cgroup_controllers"
        )
    daemons = sorted(set(_process_names(directory)) & _DAEMON_NAMES)
    if daemons:
        raise OperationError(
            f"{what}: cgroup {directory} also holds {', '.join(daemons)}; a filter there "
            "would confine the daemon too — refusing"
        )
    return directory


def guest_cgroup_of_pid(pid: int, what: str, proc: str = "/proc",
                        mountinfo: str = "/proc/self/mountinfo") -> str:
    directory = strip_guest_children(process_cgroup(pid, proc, mountinfo))
    return check_guest_cgroup(directory, what, mountinfo)


def domain_cgroup(name: str, run_dir: str = DEFAULT_QEMU_RUN_DIR,
                  mountinfo: str = "/proc/self/mountinfo") -> str:
    """The guest cgroup of a running libvirt domain, from its QEMU pid."""
    pid = domain_pid(name, run_dir)
    return guest_cgroup_of_pid(pid, f"domain {name}", mountinfo=mountinfo)
