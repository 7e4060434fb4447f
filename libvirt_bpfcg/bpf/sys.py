"""Thin ctypes wrappers around bpf(2): one function per command we use.

Rules every wrapper follows (DESIGN.md §2):

* The attribute buffer is always ``ATTR_SIZE`` zeroed bytes, larger than ``union bpf_attr`` on
  any kernel we know: a kernel copies at most its own ``sizeof(union bpf_attr)``, checks that
  anything beyond is zero, and some kernels (6.17+) write ``query.revision`` back even when
  the caller passed a shorter buffer, so a short buffer would be corrupted memory.
* fd 0 is never handed to the kernel (bpf(2) reads 0 as "no fd" in several fields) and never
  kept: a hook started with stdin closed gets fd 0 from the kernel for its first map, which we
  move to >= 3 at once.
* Every failure is a :class:`BpfError` naming the command and saying in words what the errno
  means for that command ("map full", "revision mismatch", ...).

Map keys and values are plain ``bytes``; ``key_bytes``/``value_bytes`` and their inverses encode
libvirt's format (native-endian u64 key, u32 value, see rules.py).

Offsets below are those of include/uapi/linux/bpf.h (stable ABI: fields are only ever appended).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import fcntl
import os
import resource
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

from ..cgroup import unescape_mountinfo
from ..errors import OperationError

# --------------------------------------------------------------------------------------------
# Constants (include/uapi/linux/bpf.h)

# Commands.
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_ENABLE_STATS = 32

COMMAND_NAMES: Dict[int, str] = {
    BPF_MAP_CREATE: "BPF_MAP_CREATE",
    BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM",
    BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
    BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
    BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY",
    BPF_PROG_LOAD: "BPF_PROG_LOAD",
    BPF_OBJ_PIN: "BPF_OBJ_PIN",
    BPF_OBJ_GET: "BPF_OBJ_GET",
    BPF_PROG_ATTACH: "BPF_PROG_ATTACH",
    BPF_PROG_DETACH: "BPF_PROG_DETACH",
    BPF_PROG_GET_FD_BY_ID: "BPF_PROG_GET_FD_BY_ID",
    BPF_MAP_GET_FD_BY_ID: "BPF_MAP_GET_FD_BY_ID",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD",
    BPF_PROG_QUERY: "BPF_PROG_QUERY",
    BPF_ENABLE_STATS: "BPF_ENABLE_STATS",
}

# Map and program types, attach types.
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6

# Attach flags.
BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2

# Map update flags.
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# Query flags.
BPF_F_QUERY_EFFECTIVE = 1 << 0

# BPF_ENABLE_STATS types.
BPF_STATS_RUN_TIME = 0

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# Larger than union bpf_attr on every kernel up to 6.18 (168 bytes there); the kernel
# accepts a bigger buffer as long as the tail is zero (bpf_check_uarg_tail_zero, <= PAGE_SIZE).
ATTR_SIZE = 512
# bpf_prog_info / bpf_map_info: same rule, larger than the structs, zero tail.
_INFO_SIZE = 512

_VERIFIER_LOG_SIZE = 1 << 20
_VERIFIER_LOG_TAIL_LINES = 25

_NR_BPF = {
    "x86_64": 321,
    "amd64": 321,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "loongarch64": 280,
    "s390x": 351,
    "ppc64le": 361,
    "ppc64": 361,
    "i386": 357,
    "i686": 357,
    "armv7l": 386,
}

# --------------------------------------------------------------------------------------------
# Errors


class BpfError(OperationError):
    """A bpf(2) command failed. ``op`` is the command name, ``errno`` the kernel's errno."""

    def __init__(self, op: str, err: int, detail: str = "", log: str = "") -> None:
        self.op = op
        self.errno = err
        self.detail = detail
        self.log = log  # the verifier log's tail for a failed BPF_PROG_LOAD, else ""
        super().__init__(self._message())

    def _message(self) -> str:
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        text = f"{self.op} failed: {explain_errno(self.op, self.errno)} ({name})"
        if self.detail:
            text += f" [{self.detail}]"
        if self.log:
            text += "\nverifier log (last lines):\n" + self.log
        return text


_MEMLOCK_HINT = (
    "operation not permitted: needs root with CAP_BPF and CAP_SYS_ADMIN (a hook inherits "
    "libvirtd's capabilities and seccomp filter); on kernels before 5.11 BPF memory also "
    "counts against RLIMIT_MEMLOCK, which may need raising"
)

# (op, errno) -> words; (None, errno) is the fallback for any op.
_ERRNO_WORDS: Dict[Tuple[str | None, int], str] = {
    ("BPF_MAP_UPDATE_ELEM", errno_mod.E2BIG): "map full (no room for another key)",
    ("BPF_MAP_UPDATE_ELEM", errno_mod.EEXIST): "key already present (BPF_NOEXIST)",
    ("BPF_MAP_UPDATE_ELEM", errno_mod.ENOENT): "no such key (BPF_EXIST)",
    ("BPF_MAP_UPDATE_ELEM", errno_mod.ENOMEM): "out of memory for a map element",
    ("BPF_MAP_LOOKUP_ELEM", errno_mod.ENOENT): "no such key",
    ("BPF_MAP_DELETE_ELEM", errno_mod.ENOENT): "no such key",
    ("BPF_MAP_CREATE", errno_mod.EPERM): _MEMLOCK_HINT,
    ("BPF_MAP_CREATE", errno_mod.EINVAL): "invalid map parameters (type, sizes or flags)",
    ("BPF_PROG_LOAD", errno_mod.EPERM): _MEMLOCK_HINT,
    ("BPF_PROG_LOAD", errno_mod.EACCES): "the verifier rejected the program",
    ("BPF_PROG_LOAD", errno_mod.EINVAL): "the verifier rejected the program (invalid)",
    ("BPF_PROG_LOAD", errno_mod.E2BIG): "program too large",
    ("BPF_PROG_ATTACH", errno_mod.ESTALE): "cgroup program list changed (revision mismatch)",
    ("BPF_PROG_ATTACH", errno_mod.EPERM): (
        "attach refused: this cgroup or an ancestor already has a program attached in an "
        "incompatible mode (exclusive flags 0 vs ALLOW_MULTI/ALLOW_OVERRIDE), or no privilege"
    ),
    ("BPF_PROG_ATTACH", errno_mod.E2BIG): "too many programs attached to the cgroup (max 64)",
    ("BPF_PROG_ATTACH", errno_mod.ENOENT): "the program to replace is not attached",
    ("BPF_PROG_ATTACH", errno_mod.EINVAL): (
        "invalid attach request (attach type or flags; or expected_revision on a kernel "
        "without cgroup revision support)"
    ),
    ("BPF_PROG_DETACH", errno_mod.ENOENT): "program not attached to this cgroup",
    ("BPF_PROG_QUERY", errno_mod.ENOSPC): "more programs attached than room for their ids",
    ("BPF_PROG_GET_FD_BY_ID", errno_mod.ENOENT): "no such object (program freed?)",
    ("BPF_MAP_GET_FD_BY_ID", errno_mod.ENOENT): "no such object (map freed?)",
    ("BPF_OBJ_PIN", errno_mod.EEXIST): "the pin path already exists",
    ("BPF_OBJ_PIN", errno_mod.EPERM): "cannot pin there (the path is not on a bpf file system?)",
    ("BPF_OBJ_PIN", errno_mod.ENOENT): "the pin's directory does not exist",
    ("BPF_OBJ_GET", errno_mod.ENOENT): "no such pin",
    ("BPF_OBJ_GET", errno_mod.EACCES): "not a pinned bpf object (or no permission)",
    ("BPF_OBJ_GET", errno_mod.EPERM): "not a pinned bpf object (or no permission)",
    (None, errno_mod.EBADF): "bad file descriptor",
    (None, errno_mod.ENOSYS): (
        "bpf(2) not available (kernel without CONFIG_BPF_SYSCALL, or blocked by seccomp)"
    ),
    (None, errno_mod.EPERM): (
        "operation not permitted (needs root with CAP_BPF/CAP_SYS_ADMIN; seccomp or "
        "lockdown can also refuse bpf(2))"
    ),
    (None, errno_mod.EFAULT): "bad address passed to the kernel (a bug in this program)",
    (None, errno_mod.E2BIG): "attribute or info buffer too large for this kernel",
}


def explain_errno(op: str, err: int) -> str:
    """What ``err`` means for command ``op``, in words."""
    words = _ERRNO_WORDS.get((op, err)) or _ERRNO_WORDS.get((None, err))
    return words or os.strerror(err)


# --------------------------------------------------------------------------------------------
# The raw syscall

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]


def _syscall_number() -> int:
    machine = os.uname().machine.lower()  # not platform: its import costs the hook
    try:
        return _NR_BPF[machine]
    except KeyError:
        raise BpfError("bpf", errno_mod.ENOSYS, f"unknown architecture {machine!r}") from None


def _new_attr() -> ctypes.Array:
    return ctypes.create_string_buffer(ATTR_SIZE)


def _addr(buf: ctypes.Array | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def _bpf(cmd: int, attr: ctypes.Array, detail: str = "") -> int:
    """bpf(cmd, attr, sizeof attr); BpfError on failure. The caller keeps every buffer whose
    address is in ``attr`` referenced until this returns."""
    ret = _libc.syscall(
        ctypes.c_long(_syscall_number()), ctypes.c_long(cmd), attr, ctypes.c_ulong(len(attr))
    )
    if ret < 0:
        raise BpfError(COMMAND_NAMES.get(cmd, f"bpf cmd {cmd}"), ctypes.get_errno(), detail)
    return int(ret)


def _bpf_fd(cmd: int, attr: ctypes.Array, detail: str = "") -> int:
    """A bpf(2) command that returns a new fd: never let that fd be 0."""
    return move_off_zero(_bpf(cmd, attr, detail))


def move_off_zero(fd: int) -> int:
    """Return ``fd`` unchanged unless it is 0; then dup it to >= 3 (cloexec) and close 0.

    fd 0 is free only when stdin was closed (a hook, a daemon); the kernel treats 0 as "no fd"
    in several bpf_attr fields, so an object living at fd 0 could silently go unused.
    """
    if fd != 0:
        return fd
    new_fd = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(0)
    return new_fd


def _check_fd(op: str, fd: int, what: str) -> int:
    if fd <= 0:
        raise BpfError(op, errno_mod.EBADF, f"refusing to pass {what} {fd} to the kernel")
    return fd


def open_cgroup(path: str) -> int:
    """Open a cgroup directory for attach/query: O_RDONLY|O_DIRECTORY|O_CLOEXEC, never fd 0."""
    return move_off_zero(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))


def close(fd: int) -> None:
    """os.close that ignores an fd already closed (EBADF)."""
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno_mod.EBADF:
            raise


# --------------------------------------------------------------------------------------------
# libvirt's map format


def key_bytes(key: int) -> bytes:
    """u64 key ``major << 32 | minor`` in host byte order (libvirt's map key)."""
    return struct.pack("=Q", key)


def value_bytes(value: int) -> bytes:
    """u32 value ``access << 16 | type`` in host byte order (libvirt's map value)."""
    return struct.pack("=I", value)


def parse_key(data: bytes) -> int:
    return int(struct.unpack("=Q", data)[0])


def parse_value(data: bytes) -> int:
    return int(struct.unpack("=I", data)[0])


# --------------------------------------------------------------------------------------------
# Maps


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "",
    flags: int = 0,
) -> int:
    """BPF_MAP_CREATE -> map fd. ``name`` is at most 15 characters ([A-Za-z0-9_.])."""
    attr = _new_attr()
    # map_type @0, key_size @4, value_size @8, max_entries @12, map_flags @16, map_name @28
    struct.pack_into("=IIIII", attr, 0, map_type, key_size, value_size, max_entries, flags)
    _put_name(attr, 28, name, "BPF_MAP_CREATE")
    detail = f"type {map_type}, {key_size}->{value_size} x {max_entries}"
    if name:
        detail += f", name {name!r}"
    return _bpf_fd(BPF_MAP_CREATE, attr, detail)


def _put_name(buf: ctypes.Array, offset: int, name: str, op: str) -> None:
    raw = name.encode()
    if len(raw) >= BPF_OBJ_NAME_LEN:
        raise BpfError(op, errno_mod.EINVAL, f"object name {name!r} longer than 15 bytes")
    ctypes.memmove(ctypes.addressof(buf) + offset, raw, len(raw))


def _elem_attr(fd: int, key: ctypes.Array | None, value: ctypes.Array | None,
               flags: int = 0) -> ctypes.Array:
    attr = _new_attr()
    # map_fd @0, key @8, value/next_key @16, flags @24
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, _addr(key), _addr(value), flags)
    return attr


def _bytes_buf(data: bytes) -> ctypes.Array:
    return ctypes.create_string_buffer(data, len(data))


def _bpf_key_found(cmd: int, attr: ctypes.Array) -> bool:
    """_bpf for the map commands where ENOENT (no such key, or no next key) is an answer,
    not an error: False."""
    try:
        _bpf(cmd, attr)
    except BpfError as exc:
        if exc.errno == errno_mod.ENOENT:
            return False
        raise
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """BPF_MAP_LOOKUP_ELEM -> value, or None when the key is absent."""
    _check_fd("BPF_MAP_LOOKUP_ELEM", fd, "map fd")
    key_buf = _bytes_buf(key)
    value_buf = ctypes.create_string_buffer(value_size)
    if not _bpf_key_found(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, key_buf, value_buf)):
        return None
    return value_buf.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """BPF_MAP_UPDATE_ELEM. A full hash map gives BpfError(errno E2BIG, "map full")."""
    _check_fd("BPF_MAP_UPDATE_ELEM", fd, "map fd")
    key_buf, value_buf = _bytes_buf(key), _bytes_buf(value)
    _bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, key_buf, value_buf, flags), f"map fd {fd}")


def map_delete(fd: int, key: bytes) -> bool:
    """BPF_MAP_DELETE_ELEM -> True if deleted, False if the key was absent."""
    _check_fd("BPF_MAP_DELETE_ELEM", fd, "map fd")
    key_buf = _bytes_buf(key)
    return _bpf_key_found(BPF_MAP_DELETE_ELEM, _elem_attr(fd, key_buf, None))


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """BPF_MAP_GET_NEXT_KEY -> the key after ``key``, or None at the end.

    ``key=None`` asks for the first key with a NULL key pointer, so a real key 0 (device 0:0)
    is not skipped (libvirt starts from key 0 and would skip it). A key that is no longer in a
    hash map makes the kernel start again from the first key.
    """
    _check_fd("BPF_MAP_GET_NEXT_KEY", fd, "map fd")
    key_buf = None if key is None else _bytes_buf(key)
    next_buf = ctypes.create_string_buffer(key_size)
    if not _bpf_key_found(BPF_MAP_GET_NEXT_KEY, _elem_attr(fd, key_buf, next_buf)):
        return None
    return next_buf.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key once. A key deleted under us restarts the kernel's walk; ``seen`` keeps the
    restart from yielding duplicates."""
    seen = set()
    key = map_next_key(fd, None, key_size)
    while key is not None:
        if key not in seen:
            seen.add(key)
            yield key
        key = map_next_key(fd, key, key_size)


def map_items(fd: int, key_size: int, value_size: int) -> Iterator[Tuple[bytes, bytes]]:
    """(key, value) pairs; keys deleted during the walk are skipped."""
    for key in map_keys(fd, key_size):
        value = map_lookup(fd, key, value_size)
        if value is not None:
            yield key, value


# --------------------------------------------------------------------------------------------
# Programs


def prog_load(
    prog_type: int, insns: bytes, license: str = "GPL", name: str = "",
    expected_attach_type: int = 0,
) -> int:
    """BPF_PROG_LOAD -> program fd.

    The first attempt runs without a verifier log (cheaper, and a log buffer that is too small
    would itself fail the load); a failure is retried with log_level 1 and a 1 MiB buffer so
    that the BpfError carries the verifier's last lines.
    """
    if len(insns) % 8:
        raise BpfError("BPF_PROG_LOAD", errno_mod.EINVAL, "instructions not a multiple of 8 bytes")
    try:
        return _prog_load_once(prog_type, insns, license, name, expected_attach_type, 0)
    except BpfError as first:
        if first.errno in (errno_mod.EPERM, errno_mod.ENOSYS, errno_mod.EBADF):
            raise  # the verifier never ran: a log would be empty
        try:
            return _prog_load_once(prog_type, insns, license, name, expected_attach_type,
                                   _VERIFIER_LOG_SIZE)
        except BpfError as second:
            # Report the first attempt's errno: the retry can only add ENOSPC (log too short).
            raise BpfError(first.op, first.errno, first.detail, second.log) from None


def _prog_load_once(prog_type: int, insns: bytes, license: str, name: str,
                    expected_attach_type: int, log_size: int) -> int:
    insn_buf = _bytes_buf(insns)
    license_buf = ctypes.create_string_buffer(license.encode())
    log_buf = ctypes.create_string_buffer(log_size) if log_size else None
    attr = _new_attr()
    # prog_type @0, insn_cnt @4, insns @8, license @16, log_level @24, log_size @28,
    # log_buf @32, kern_version @40, prog_flags @44, prog_name @48, prog_ifindex @64,
    # expected_attach_type @68
    struct.pack_into("=IIQQIIQ", attr, 0, prog_type, len(insns) // 8, _addr(insn_buf),
                     _addr(license_buf), 1 if log_size else 0, log_size, _addr(log_buf))
    _put_name(attr, 48, name, "BPF_PROG_LOAD")
    struct.pack_into("=I", attr, 68, expected_attach_type)
    detail = f"{len(insns) // 8} insns" + (f", name {name!r}" if name else "")
    try:
        return _bpf_fd(BPF_PROG_LOAD, attr, detail)
    except BpfError as exc:
        if log_buf is None:
            raise
        raise BpfError(exc.op, exc.errno, exc.detail, _log_tail(log_buf.value)) from None


def _log_tail(raw: bytes) -> str:
    lines = raw.decode(errors="replace").rstrip("\n").splitlines()
    return "\n".join(lines[-_VERIFIER_LOG_TAIL_LINES:])


def prog_attach(
    target_fd: int, prog_fd: int, attach_type: int, flags: int = 0, replace_prog_fd: int = 0,
    expected_revision: int = 0,
) -> None:
    """BPF_PROG_ATTACH. flags 0 is exclusive and atomically replaces a flags-0 program.

    ``replace_prog_fd`` needs BPF_F_REPLACE in ``flags`` (ALLOW_MULTI only).
    ``expected_revision`` makes the attach fail with ESTALE when the cgroup's program list
    changed since the query that returned that revision; 0 means "no check" (libvirt's way).
    It needs the kernel's cgroup mprog support (tested on 6.18): older kernels report revision
    0 from prog_query and refuse a non-zero expected_revision with EINVAL, so pass only what
    the query returned.
    """
    op = "BPF_PROG_ATTACH"
    _check_fd(op, target_fd, "target fd")
    _check_fd(op, prog_fd, "program fd")
    if replace_prog_fd:
        _check_fd(op, replace_prog_fd, "replace program fd")
    attr = _new_attr()
    # target_fd @0, attach_bpf_fd @4, attach_type @8, attach_flags @12, replace_bpf_fd @16,
    # relative_fd/relative_id @20, expected_revision @24 (u64)
    struct.pack_into("=IIIIIIQ", attr, 0, target_fd, prog_fd, attach_type, flags,
                     replace_prog_fd, 0, expected_revision)
    detail = f"attach_flags {flags:#x}"
    if expected_revision:
        detail += f", expected_revision {expected_revision}"
    _bpf(BPF_PROG_ATTACH, attr, detail)


def attach_to_cgroup(cgroup_dir: str, prog_fd: int, flags: int = 0) -> None:
    """Attach a device program to a cgroup directory and close ``prog_fd``: the attachment
    keeps the program alive. (The engine attaches with a revision check itself; this is for
    programs that stand in for libvirt's or another manager's.)"""
    cg_fd = open_cgroup(cgroup_dir)
    try:
        prog_attach(cg_fd, prog_fd, BPF_CGROUP_DEVICE, flags)
    finally:
        close(cg_fd)
        close(prog_fd)


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    """BPF_PROG_DETACH of that program from the cgroup."""
    op = "BPF_PROG_DETACH"
    _check_fd(op, target_fd, "target fd")
    _check_fd(op, prog_fd, "program fd")
    attr = _new_attr()
    struct.pack_into("=III", attr, 0, target_fd, prog_fd, attach_type)
    _bpf(BPF_PROG_DETACH, attr)


@dataclass
class QueryResult:
    prog_ids: List[int]
    attach_flags: int
    revision: int  # 0 when the kernel does not report one


def prog_query(target_fd: int, attach_type: int, query_flags: int = 0,
               max_ids: int = 64) -> QueryResult:
    """BPF_PROG_QUERY: attached program ids, the attach flags and the program-list revision.

    If more than ``max_ids`` programs are attached, the query is repeated with room for all of
    them (the kernel reports the real count with ENOSPC).
    """
    _check_fd("BPF_PROG_QUERY", target_fd, "target fd")
    room = max(int(max_ids), 1)
    while True:
        ids = (ctypes.c_uint32 * room)()
        attr = _new_attr()
        # target_fd @0, attach_type @4, query_flags @8, attach_flags @12, prog_ids @16,
        # prog_cnt @24, prog_attach_flags @32, link_ids @40, link_attach_flags @48,
        # revision @56 (u64)
        struct.pack_into("=IIIIQI", attr, 0, target_fd, attach_type, query_flags, 0,
                         ctypes.addressof(ids), room)
        try:
            _bpf(BPF_PROG_QUERY, attr)
        except BpfError as exc:
            count = struct.unpack_from("=I", attr, 24)[0]
            if exc.errno == errno_mod.ENOSPC and count > room:
                room = count
                continue
            raise
        attach_flags, = struct.unpack_from("=I", attr, 12)
        count, = struct.unpack_from("=I", attr, 24)
        revision, = struct.unpack_from("=Q", attr, 56)
        return QueryResult([ids[i] for i in range(min(count, room))], attach_flags, revision)


def _get_fd_by_id(cmd: int, obj_id: int) -> int:
    attr = _new_attr()
    struct.pack_into("=I", attr, 0, obj_id)
    return _bpf_fd(cmd, attr, f"id {obj_id}")


def prog_get_fd_by_id(prog_id: int) -> int:
    return _get_fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)


def map_get_fd_by_id(map_id: int) -> int:
    return _get_fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id)


# --------------------------------------------------------------------------------------------
# Object info


def _obj_info(fd: int, info: ctypes.Array) -> None:
    _check_fd("BPF_OBJ_GET_INFO_BY_FD", fd, "object fd")
    attr = _new_attr()
    # bpf_fd @0, info_len @4, info @8
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"fd {fd}")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


@dataclass
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str  # hex; the hashing changed in 6.18, so recognise programs by name instead
    map_ids: List[int]
    xlated_len: int
    jited_len: int
    run_time_ns: int = 0  # filled only while BPF_ENABLE_STATS is in force
    run_cnt: int = 0
    verified_insns: int = 0


def prog_info(fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a program, in two calls like libvirt's virBPFGetProgInfo:
    the first learns nr_map_ids, the second fetches that many map ids."""
    info = ctypes.create_string_buffer(_INFO_SIZE)
    _obj_info(fd, info)
    nr_map_ids, = struct.unpack_from("=I", info, 52)
    map_ids = (ctypes.c_uint32 * max(nr_map_ids, 1))()
    info = ctypes.create_string_buffer(_INFO_SIZE)
    # nr_map_ids @52, map_ids @56
    struct.pack_into("=IQ", info, 52, nr_map_ids, ctypes.addressof(map_ids))
    _obj_info(fd, info)
    prog_type, prog_id = struct.unpack_from("=II", info, 0)
    jited_len, xlated_len = struct.unpack_from("=II", info, 16)
    returned, = struct.unpack_from("=I", info, 52)
    run_time_ns, run_cnt = struct.unpack_from("=QQ", info, 192)
    verified_insns, = struct.unpack_from("=I", info, 216)
    return ProgInfo(
        id=prog_id,
        type=prog_type,
        name=_cstr(info.raw[64:64 + BPF_OBJ_NAME_LEN]),
        tag=info.raw[8:8 + BPF_TAG_SIZE].hex(),
        # A map added between the two calls is not listed: nr_map_ids was fixed by call one.
        map_ids=[map_ids[i] for i in range(min(returned, nr_map_ids))],
        xlated_len=xlated_len,
        jited_len=jited_len,
        run_time_ns=run_time_ns,
        run_cnt=run_cnt,
        verified_insns=verified_insns,
    )


@dataclass
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(_INFO_SIZE)
    _obj_info(fd, info)
    # type @0, id @4, key_size @8, value_size @12, max_entries @16, map_flags @20, name @24
    map_type, map_id, key_size, value_size, max_entries, map_flags = struct.unpack_from(
        "=IIIIII", info, 0)
    return MapInfo(map_id, map_type, key_size, value_size, max_entries, map_flags,
                   _cstr(info.raw[24:24 + BPF_OBJ_NAME_LEN]))


# --------------------------------------------------------------------------------------------
# bpffs


def obj_pin(fd: int, path: str) -> None:
    """BPF_OBJ_PIN: keep the object alive at ``path`` (must be on a bpf file system)."""
    _check_fd("BPF_OBJ_PIN", fd, "object fd")
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    attr = _new_attr()
    # pathname @0, bpf_fd @8, file_flags @12
    struct.pack_into("=QII", attr, 0, ctypes.addressof(path_buf), fd, 0)
    _bpf(BPF_OBJ_PIN, attr, path)


def obj_get(path: str) -> int:
    """BPF_OBJ_GET -> fd of the object pinned at ``path`` (read-write)."""
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    attr = _new_attr()
    struct.pack_into("=QII", attr, 0, ctypes.addressof(path_buf), 0, 0)
    return _bpf_fd(BPF_OBJ_GET, attr, path)


def is_bpffs_mounted(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """True if a bpf file system is mounted exactly at ``path`` (the topmost mount counts)."""
    target = os.path.realpath(path)
    fstype_on_top = None
    with open(mountinfo, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            left, sep, right = line.partition(" - ")
            fields = left.split()
            if not sep or len(fields) < 5:
                continue
            if unescape_mountinfo(fields[4]) == target:
                fstype_on_top = right.split(" ", 1)[0]  # later lines are mounted on top
    return fstype_on_top == "bpf"


def ensure_bpffs(path: str = "/sys/fs/bpf") -> str:
    """Mount a bpf file system at ``path`` (mode 0700) unless one is there; return ``path``."""
    if is_bpffs_mounted(path):
        return path
    os.makedirs(path, mode=0o700, exist_ok=True)
    ret = _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, b"mode=0700")
    if ret != 0:
        err = ctypes.get_errno()
        raise OperationError(f"cannot mount a bpf file system at {path}: {os.strerror(err)}")
    return path


# --------------------------------------------------------------------------------------------
# Process setup


def raise_memlock() -> None:
    """Raise RLIMIT_MEMLOCK to infinity where allowed: before Linux 5.11 BPF maps and programs
    are charged against it and the default 64 KiB fails map creation with EPERM."""
    # Not privileged: map creation will say so if it matters.
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def enable_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): run_time_ns/run_cnt are collected while the
    returned fd stays open (benchmarks only; it costs time on every program run)."""
    attr = _new_attr()
    struct.pack_into("=I", attr, 0, BPF_STATS_RUN_TIME)
    return _bpf_fd(BPF_ENABLE_STATS, attr)
