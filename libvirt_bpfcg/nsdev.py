"""Device nodes for our extras inside QEMU's private /dev.

libvirt gives QEMU its own mount namespace with a /dev that holds only the devices libvirt
knows about (qemu.conf ``namespaces = ["mount"]``, the default). Allowing an extra device in
the filter is useless if its node does not exist there, so we create it the way libvirt does
on hotplug: same type, numbers, mode and owner as the host's node.

The nodes are made through QEMU's own root, ``/proc/PID/root``: openat2(2) with
RESOLVE_IN_ROOT resolves the parent directory the way QEMU would see it, in QEMU's mount
namespace, and mknodat/fchownat work relative to that directory. No fork and no setns:
this runs in the hook server too, where forking a process that holds lxml and the engine
cost more than the rest of the ``started`` event. Kernels before 5.6 have no openat2: a
forked child then enters the namespace (setns) and makes the nodes there; the parent never
changes namespace. Nothing is created when QEMU shares our mount namespace
(``namespaces = []``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Dict, List, Sequence

CLONE_NEWNS = 0x00020000
SYS_OPENAT2 = 437  # the same number on every architecture (syscalls added since 5.1)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class NoOpenat2(Exception):
    """The kernel has no openat2(2)."""


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
    try:
        return _make_nodes_through_root(pid, wanted)
    except NoOpenat2:
        return _make_nodes_in_forked_child(pid, wanted)


def _openat2(dir_fd: int, path: str, flags: int) -> int:
    """openat2(dir_fd, path) resolved with dir_fd as the root (absolute symlinks and '..'
    stay inside it), never through /proc magic links."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise NoOpenat2()
        raise OSError(err, os.strerror(err), path)
    return fd


def _open_parent(root_fd: int, parent: str) -> int:
    """An O_PATH descriptor of ``parent`` below QEMU's root, made (0755) as needed."""
    relative = parent.strip("/")
    flags = os.O_PATH | os.O_DIRECTORY
    try:
        return _openat2(root_fd, relative, flags)
    except FileNotFoundError:
        pass
    done = ""
    for part in relative.split("/"):
        at = _openat2(root_fd, done or ".", flags)
        try:
            os.mkdir(part, 0o755, dir_fd=at)
        except FileExistsError:
            pass
        finally:
            os.close(at)
        done = f"{done}/{part}" if done else part
    return _openat2(root_fd, relative, flags)


def _make_nodes_through_root(pid: int, wanted: Sequence[tuple]) -> List[str]:
    try:
        root_fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return [f"cannot reach QEMU's /dev (pid {pid}): {exc.strerror}"]
    messages = []
    try:
        for path, mode, rdev, uid, gid in wanted:
            try:
                _make_node(root_fd, path, mode, rdev, uid, gid)
            except OSError as exc:
                messages.append(f"cannot create {path} in QEMU's /dev: {exc.strerror}")
    finally:
        os.close(root_fd)
    return messages


def _make_node(root_fd: int, path: str, mode: int, rdev: int, uid: int, gid: int) -> None:
    parent, name = os.path.split(path)
    dir_fd = _open_parent(root_fd, parent)
    try:
        try:
            os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            return  # something is there already (libvirt's own node, or ours)
        except FileNotFoundError:
            pass
        # The host node's permission bits exactly, with no chmod after. umask is per process:
        # safe here, the hook and the hook server run one event at a time in one thread.
        old_umask = os.umask(0)
        try:
            os.mknod(name, mode, rdev, dir_fd=dir_fd)
        finally:
            os.umask(old_umask)
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    finally:
        os.close(dir_fd)


def _make_nodes_in_forked_child(pid: int, wanted: Sequence[tuple]) -> List[str]:
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
    ns_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    if _libc.setns(ns_fd, CLONE_NEWNS) != 0:
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
