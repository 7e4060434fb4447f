"""Real device nodes on this machine: /dev/null, loop devices, a symlink chain, and the
guardrails against a really mounted partition. Needs root (losetup, addpart, mkfs, mount).

We attach our own loop device to a scratch file and detach only that one afterwards.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Iterator, Tuple

import pytest

from libvirt_bpfcg.config import Config
from libvirt_bpfcg.plan import plan_domain
from libvirt_bpfcg.resolve import FORBIDDEN, OK, Host

MIB = 1024 * 1024


def stat_command(path: str) -> Tuple[str, int, int]:
    """Type and numbers as the stat(1) command reports them (major/minor in hex)."""
    out = subprocess.run(["stat", "-L", "-c", "%F|%t|%T", path], check=True,
                         capture_output=True, text=True).stdout.strip()
    kind, major, minor = out.split("|")
    return ("b" if kind.startswith("block") else "c"), int(major, 16), int(minor, 16)


def rule_of(path: str, access: str = "rw") -> str:
    found = Host().stat_path(path, access)
    assert found.status == OK, found
    return str(found.rule)


@pytest.mark.parametrize("path", ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/ptmx",
                                  "/dev/kvm", "/dev/loop0"])
def test_real_nodes_match_stat(path: str) -> None:
    kind, major, minor = stat_command(path)
    assert rule_of(path) == f"{kind} {major}:{minor} rw"


def test_symlink_chain(tmp_path) -> None:
    os.symlink("/dev/loop0", tmp_path / "b")
    os.symlink(tmp_path / "b", tmp_path / "a")
    kind, major, minor = stat_command(str(tmp_path / "a"))
    assert rule_of(str(tmp_path / "a"), "r") == f"{kind} {major}:{minor} r" == "b 7:0 r"
    assert Host().stat_path(str(tmp_path / "a"), "r").reason == "block device /dev/loop0"


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def loop_disk(tmp_path) -> Iterator[str]:
    """A 40 MiB scratch disk with two partitions on our own loop device.

    This kernel has no partition-table parsers, so the partitions are added with BLKPG
    (addpart), which is what partx does; sysfs shows them like any other partitions.
    """
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(40 * MIB)
    device = _run("losetup", "--find", "--show", "--partscan", str(image))
    mounted = []
    try:
        _run("addpart", device, "1", "2048", str(16 * 2048))
        _run("addpart", device, "2", str(18 * 2048), str(16 * 2048))
        for _ in range(100):  # devtmpfs creates the partition nodes asynchronously
            if os.path.exists(device + "p2"):
                break
            time.sleep(0.02)
        yield device
    finally:
        mounts = _run("cat", "/proc/self/mountinfo")
        for line in mounts.splitlines():
            if str(tmp_path) in line.split()[4]:
                mounted.append(line.split()[4])
        for where in mounted:
            subprocess.run(["umount", where], check=False)
        subprocess.run(["losetup", "--detach", device], check=False)


def domain_with_disks(*paths: str) -> bytes:
    disks = "".join(f"<disk type='block'><source dev='{path}'/><target dev='vd{i}'/></disk>"
                    for i, path in enumerate(paths))
    return f"<domain><name>real</name><devices>{disks}</devices></domain>".encode()


def test_loop_partitions_and_mounted_guardrail(loop_disk: str, tmp_path) -> None:
    device = loop_disk
    config = Config(qemu_conf="/nonexistent/qemu.conf", libvirt_version="9.0.0")
    for path in (device, device + "p1", device + "p2"):
        kind, major, minor = stat_command(path)
        assert rule_of(path) == f"{kind} {major}:{minor} rw"

    plan = plan_domain(domain_with_disks(device, device + "p1", device + "p2"), config)
    statuses = [(d.path, d.status) for d in plan.devices if d.kind == "disk"]
    assert statuses == [(device, OK), (device + "p1", OK), (device + "p2", OK)]

    _run("mkfs.ext4", "-q", "-F", device + "p1")
    where = tmp_path / "mnt"
    where.mkdir()
    _run("mount", device + "p1", str(where))
    plan = plan_domain(domain_with_disks(device, device + "p1", device + "p2"), config)
    rows = {d.path: d for d in plan.devices if d.kind == "disk"}
    assert rows[device + "p1"].status == FORBIDDEN
    assert f"mounted on {where}" in rows[device + "p1"].reason
    assert rows[device].status == FORBIDDEN            # the disk holding that partition
    assert "holds partition" in rows[device].reason
    assert rows[device + "p2"].status == OK            # its idle sibling
    assert {d.path for d in plan.problems} == {device, device + "p1"}

    allowed = config.with_overrides(allow_forbidden=(device,))
    plan = plan_domain(domain_with_disks(device), allowed)
    row = next(d for d in plan.devices if d.kind == "disk")
    assert row.status == OK and "allowed by allow_forbidden" in row.reason
