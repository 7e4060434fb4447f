"""Kernel truth for tests: scratch cgroups under one parent this test run owns, and a child
process moved into them that opens device nodes and reports the errno of each open.

Nothing here is mocked. On a machine without root, bpf(2) or cgroup2 these fixtures fail the
test (never skip), so CI cannot go green without having run them.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import tempfile
from typing import Callable, Iterator, List, Sequence, Tuple

import pytest

from libvirt_bpfcg import cgroup as cg

_counter = itertools.count()


def _require_kernel() -> str:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (they create cgroups and load BPF programs)")
    try:
        root = cg.cgroup2_root()
    except Exception as exc:  # noqa: BLE001 - any reason is a failure here
        pytest.fail(f"kernel tests need a cgroup2 mount: {exc}")
    return root


@pytest.fixture(scope="session")
def cgroup_parent() -> Iterator[str]:
    """One parent cgroup for the whole run, removed (with everything under it) at the end."""
    root = _require_kernel()
    parent = os.path.join(root, f"bpfcg-test-{os.getpid()}")
    os.mkdir(parent)
    try:
        yield parent
    finally:
        remove_cgroup_tree(parent)


def remove_cgroup_tree(directory: str) -> None:
    """rmdir bottom-up; processes still inside are moved to the parent first (ours only)."""
    if not os.path.isdir(directory):
        return
    for dirpath, dirnames, _ in os.walk(directory, topdown=False):
        for name in dirnames:
            _rmdir_cgroup(os.path.join(dirpath, name))
    _rmdir_cgroup(directory)


def _rmdir_cgroup(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)


@pytest.fixture
def scratch_cgroup(cgroup_parent: str) -> Iterator[str]:
    """A fresh, empty cgroup for one test."""
    path = os.path.join(cgroup_parent, f"t{next(_counter)}")
    os.mkdir(path)
    try:
        yield path
    finally:
        remove_cgroup_tree(path)


@pytest.fixture(scope="session")
def node_dir() -> Iterator[str]:
    """A private directory for device nodes made with mknod (on a file system without nodev)."""
    for base in ("/dev/shm", "/tmp", "/run"):
        try:
            path = tempfile.mkdtemp(prefix="bpfcg-nodes-", dir=base)
        except OSError:
            continue
        probe = os.path.join(path, "probe")
        try:
            os.mknod(probe, 0o600 | 0o020000, os.makedev(1, 3))
            os.close(os.open(probe, os.O_RDONLY))
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            continue
        os.unlink(probe)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return
    pytest.fail("no file system here lets us create and open device nodes (all nodev?)")


def make_node(node_dir: str, dev_type: str, major: int, minor: int) -> str:
    """A device node ``dev_type major:minor`` in node_dir (created once, reused)."""
    path = os.path.join(node_dir, f"{dev_type}{major}_{minor}")
    if not os.path.exists(path):
        mode = (0o060000 if dev_type == "b" else 0o020000) | 0o600
        os.mknod(path, mode, os.makedev(major, minor))
    return path


def errnos_in_cgroup(directory: str, calls: Sequence[Callable[[], object]]) -> List[int]:
    """Fork a child, move it into ``directory``, run each call; return each call's errno
    (0 = it succeeded). The child runs nothing but those syscalls and exits at once."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only syscalls, then _exit
        code = 0
        try:
            os.close(read_fd)
            with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
                procs.write("0")
            results = []
            for call in calls:
                try:
                    call()
                    results.append(0)
                except OSError as exc:
                    results.append(exc.errno or -1)
            os.write(write_fd, (",".join(map(str, results)) + "\n").encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read().decode().strip()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data and calls:
        raise RuntimeError(f"probe child failed to join {directory} (status {status})")
    return [int(x) for x in data.split(",")] if data else []


def open_in_cgroup(directory: str, opens: Sequence[Tuple[str, int]]) -> List[int]:
    """Open each (path, flags) from a child inside ``directory``; each errno (0 = opened)."""
    def opener(path: str, flags: int) -> Callable[[], None]:
        return lambda: os.close(os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY))

    return errnos_in_cgroup(directory, [opener(path, flags) for path, flags in opens])


def can_open(directory: str, path: str, flags: int = os.O_RDONLY) -> bool:
    """True when the open was not refused by the device filter (EPERM)."""
    return open_in_cgroup(directory, [(path, flags)])[0] != errno.EPERM


__all__ = [
    "cgroup_parent", "scratch_cgroup", "node_dir", "make_node", "errnos_in_cgroup",
    "open_in_cgroup", "can_open", "remove_cgroup_tree",
]
