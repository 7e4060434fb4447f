"""Extra device nodes inside a process's private /dev (nsdev), on the real kernel.

A stand-in for QEMU: a process of our own in a private mount namespace with a fresh tmpfs
on /dev, as libvirt gives QEMU. Both ways of making the nodes are exercised: openat2 through
/proc/PID/root (kernels since 5.6, this one) and the forked child that enters the namespace
(older kernels).
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from typing import Iterator

import pytest

from libvirt_bpfcg import nsdev

pytestmark = pytest.mark.kernel

HOST_NODES = ["/dev/null", "/dev/net/tun", "/dev/loop0"]  # /dev/net: a directory to make


@pytest.fixture
def qemu_like() -> Iterator[int]:
    """pid of a process whose /dev is an empty tmpfs in a mount namespace of its own."""
    for path in HOST_NODES:
        assert os.path.exists(path), f"{path} missing on this host"
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
         "mount -t tmpfs -o mode=0755 bpfcg-nsdev-test /dev && exec sleep 300"],
        stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _has_private_dev(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "namespace not ready"
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()  # our own child, by pid; its namespace and tmpfs go with it
        proc.wait(timeout=10)


def _has_private_dev(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/mountinfo") as handle:
            return any(" - tmpfs bpfcg-nsdev-test " in line for line in handle)
    except OSError:
        return False


def in_ns(pid: int, path: str) -> os.stat_result:
    return os.stat(f"/proc/{pid}/root{path}", follow_symlinks=False)


@pytest.fixture(params=["openat2", "forked child"])
def way(request, monkeypatch) -> str:
    if request.param == "forked child":
        def no_openat2(*_args: object) -> None:
            raise nsdev.NoOpenat2()

        monkeypatch.setattr(nsdev, "_make_nodes_through_root", no_openat2)
    return request.param


def test_nodes_are_made_like_the_hosts(qemu_like, way):
    messages = nsdev.create_nodes_in_namespace(qemu_like, [{"path": p} for p in HOST_NODES])
    assert messages == []
    for path in HOST_NODES:
        host, made = os.stat(path), in_ns(qemu_like, path)
        assert (stat.S_IFMT(made.st_mode), made.st_rdev) == \
            (stat.S_IFMT(host.st_mode), host.st_rdev), path
        assert (stat.S_IMODE(made.st_mode), made.st_uid, made.st_gid) == \
            (stat.S_IMODE(host.st_mode), host.st_uid, host.st_gid), path
    assert stat.S_IMODE(in_ns(qemu_like, "/dev/net").st_mode) == 0o755
    # Again: everything is there, nothing to do, nothing to say.
    assert nsdev.create_nodes_in_namespace(qemu_like, [{"path": p} for p in HOST_NODES]) == []


def test_what_is_there_already_is_left_alone(qemu_like, way):
    placeholder = f"/proc/{qemu_like}/root/dev/null"
    with open(placeholder, "w") as handle:
        handle.write("libvirt's\n")
    assert nsdev.create_nodes_in_namespace(qemu_like, [{"path": "/dev/null"}]) == []
    assert stat.S_ISREG(in_ns(qemu_like, "/dev/null").st_mode)


def test_only_existing_host_device_nodes_under_dev_are_made(qemu_like, way):
    nodes = [{"path": "/etc/passwd"}, {"path": "/dev/no-such-node"}, {"path": "/dev/shm"},
             {"path": "/dev/../dev/null"}]
    assert nsdev.create_nodes_in_namespace(qemu_like, nodes) == []
    assert sorted(os.listdir(f"/proc/{qemu_like}/root/dev")) == ["null"]


def test_a_process_sharing_our_namespace_gets_nothing(tmp_path):
    assert nsdev.create_nodes_in_namespace(os.getpid(), [{"path": "/dev/null"}]) == []


def test_a_parent_that_is_a_file_is_one_warning_not_an_abort(qemu_like, way):
    with open(f"/proc/{qemu_like}/root/dev/net", "w") as handle:
        handle.write("not a directory\n")
    messages = nsdev.create_nodes_in_namespace(
        qemu_like, [{"path": "/dev/net/tun"}, {"path": "/dev/null"}])
    assert len(messages) == 1 and messages[0].startswith("cannot create /dev/net/tun")
    assert stat.S_ISCHR(in_ns(qemu_like, "/dev/null").st_mode)
