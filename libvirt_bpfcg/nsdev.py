"""Device nodes for our extras inside QEMU's private /dev.

libvirt gives QEMU its own mount namespace with a /dev that holds only the devices libvirt
knows about (qemu.conf ``namespaces = ["mount"]``, the default). Allowing an extra device in
the filter is useless if its node does not exist there, so we create it the way libvirt does
on hotplug: same type, numbers, mode and owner as the host's node.

A forked child enters the namespace (setns) and makes the nodes; the parent never changes
namespace. Nothing is created when QEMU shares our mount namespace (``namespaces = []``).
"""

from __future__ import annotations

import ctypes
import os
import stat
from typing import Dict, List, Sequence

CLONE_NEWNS = 0x00020000


def _same_namespace(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return True  # cannot tell: do nothing rather than guess


def _host_nodes(nodes: Sequence[Dict[str, str]]) -> List[tuple]:
    """(path, mode, rdev, uid, gid) of each host node, taken before entering the namespace."""
    found = []
    for node in nodes:
        path = node.get("path", "")
        if not path.startswith("/dev/"):
            continue  # only /dev is private in QEMU's namespace
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            found.append((os.path.normpath(path), st.st_mode, st.st_rdev, st.st_uid, st.st_gid))
    return found


def create_nodes_in_namespace(pid: int, nodes: Sequence[Dict[str, str]]) -> List[str]:
    """Create the host's device nodes ``nodes`` in ``pid``'s mount namespace.

    Returns warnings (one line each) for nodes that could not be created; never raises for a
    single node, so one bad extra cannot abort the guest's start.
    """
    if _same_namespace(pid):
        return []
    wanted = _host_nodes(nodes)
    if not wanted:
        return []
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        code = 0
        try:
            os.close(read_fd)
            messages = _make_nodes_in(pid, wanted)
            os.write(write_fd, "\n".join(messages).encode())
        except BaseException as exc:  # noqa: BLE001
            try:
                os.write(write_fd, f"cannot enter QEMU's mount namespace: {exc}".encode())
            finally:
                code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read().decode(errors="replace")
    os.waitpid(child, 0)
    return [line for line in output.splitlines() if line]


def _make_nodes_in(pid: int, wanted: Sequence[tuple]) -> List[str]:
    libc = ctypes.CDLL(None, use_errno=True)
    ns_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    if libc.setns(ns_fd, CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.close(ns_fd)
    messages = []
    for path, mode, rdev, uid, gid in wanted:
        try:
            if os.path.lexists(path):
                continue
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            os.mknod(path, mode, rdev)
            os.chown(path, uid, gid)
            os.chmod(path, stat.S_IMODE(mode))
        except OSError as exc:
            messages.append(f"cannot create {path} in QEMU's /dev: {exc.strerror}")
    return messages
