"""Smoke tests of the real-libvirt lab: what libvirt 9.0 itself does to a guest's cgroup (the
behaviour our tool must coexist with or replace), the own-mode lab, hook order, and that the
harness leaves the machine as it found it. BPF state is read with bpftool."""

from __future__ import annotations

import errno
import itertools
import os
import signal
from typing import Dict, Iterator, List, Set

import pytest
from lab_fixtures import bring_up_lab
from labharness import Lab, device_programs, guest_filter, host_leftovers
from labharness.host import mounts_of_type, pid_cmdline
from labharness.lab import DEFAULT_BASE, other_live_labs

pytestmark = pytest.mark.lab

# libvirt's default cgroup_device_acl as map entries: null, zero, full, random, urandom,
# ptmx, kvm, pts (lab README section 2); a guest adds one "b MAJ:MIN rw" per block disk
DEFAULT_ACL = {
    "c 1:3 rw", "c 1:5 rw", "c 1:7 rw", "c 1:8 rw", "c 1:9 rw",
    "c 5:2 rw", "c 10:232 rw", "c 136:* rw",
}


def block_entry(device: str) -> str:
    rdev = os.stat(device).st_rdev
    return f"b {os.major(rdev)}:{os.minor(rdev)} rw"


def filter_entries(cgroup_dir: str) -> Set[str]:
    found = guest_filter(cgroup_dir)
    assert found is not None, f"no device program on {cgroup_dir}"
    return set(found[1])


_spare_numbers = itertools.count(1)


@pytest.fixture
def spare_loop(lab: Lab) -> Iterator[str]:
    """A loop device of the lab that no guest uses."""
    device = lab.new_loop(f"spare{next(_spare_numbers)}")
    yield device
    lab.free_loop(device)


# --- (a) native mode ----------------------------------------------------------------------


def test_native_guest_has_one_exclusive_program_with_libvirt_acl(lab, lab_guest):
    guest = lab_guest()
    progs = device_programs(guest.cgroup)
    assert len(progs) == 1
    assert progs[0].attach_flags == ""  # flags 0: exclusive, neither multi nor override
    entries = filter_entries(guest.cgroup)
    assert entries == DEFAULT_ACL | {block_entry(guest.disks[0])}
    assert len(entries) == 9


def test_native_filter_enforced_in_guest_cgroup(lab, lab_guest, spare_loop):
    guest = lab_guest()
    results = guest.open_in_cgroup([(guest.disks[0], os.O_RDWR), (spare_loop, os.O_RDONLY)])
    assert results == [0, errno.EPERM]


def test_native_scsi_hotplug_opens_and_closes_the_device(lab, lab_guest, spare_loop):
    guest = lab_guest()
    prog_before = guest_filter(guest.cgroup)[0].id  # type: ignore[index]
    lab.virsh("attach-disk", guest.name, spare_loop, "sda", "--targetbus", "scsi",
              "--sourcetype", "block", "--live")
    assert guest.open_in_cgroup([(spare_loop, os.O_RDONLY)]) == [0]
    assert block_entry(spare_loop) in filter_entries(guest.cgroup)
    lab.virsh("detach-disk", guest.name, "sda", "--live")
    assert guest.open_in_cgroup([(spare_loop, os.O_RDONLY)]) == [errno.EPERM]
    assert len(filter_entries(guest.cgroup)) == 9
    assert guest_filter(guest.cgroup)[0].id == prog_before  # type: ignore[index]


def test_native_libvirtd_restart_keeps_guest_and_program(lab, lab_guest):
    guest = lab_guest()
    pid, cgroup = guest.qemu_pid, guest.cgroup
    prog = guest_filter(cgroup)[0].id  # type: ignore[index]
    lab.restart_libvirtd()
    assert guest.qemu_pid == pid
    assert guest.cgroup == cgroup
    assert guest_filter(cgroup)[0].id == prog  # type: ignore[index]
    assert guest.name in lab.virsh("list", "--name").stdout.split()


def test_native_destroy_removes_guest_cgroup(lab, lab_guest):
    guest = lab_guest()
    cgroup = guest.cgroup
    lab.destroy(guest.name)
    assert not os.path.exists(cgroup)


def test_namespace_view_is_what_libvirt_and_hooks_see(lab, lab_guest):
    """Inside the lab (where libvirtd, QEMU and hooks run) cgroup2 is at /sys/fs/cgroup and
    the guest cgroup is /machine/qemu-N-NAME.libvirt-qemu; the host sees the same directory
    under the lab's cgroup (lab.cgroup_root_host)."""
    guest = lab_guest()
    inside = lab.ns_run(["/bin/cat", f"/proc/{guest.qemu_pid}/cgroup"]).stdout
    path = next(line[3:] for line in inside.splitlines() if line.startswith("0::"))
    assert path.startswith("/machine/qemu-") and path.endswith(f"-{guest.name}.libvirt-qemu")
    assert guest.cgroup == lab.cgroup_root_host + path
    lab.ns_run(["/usr/bin/test", "-d", "/sys/fs/cgroup" + path])
    lab.ns_run(["/usr/bin/test", "-f", f"/run/libvirt/qemu/{guest.name}.pid"])
    mounts = lab.ns_run(["/usr/bin/findmnt", "-n", "-o", "FSTYPE", "/sys/fs/cgroup"]).stdout
    assert mounts.split() == ["cgroup2"]


# --- (b) own mode (libvirtd without bpf) --------------------------------------------------


def test_nobpf_guest_has_own_cgroup_and_no_filter(lab_nobpf, lab_guest):
    guest = lab_guest(lab=lab_nobpf)
    other = lab_nobpf.new_loop("nobpf-other")
    try:
        assert device_programs(guest.cgroup) == []
        assert os.path.basename(guest.cgroup).endswith(".libvirt-qemu")
        assert "Controller 'devices' present=no" in lab_nobpf.libvirtd_log()
        assert guest.open_in_cgroup([(other, os.O_RDONLY)]) == [0]  # nothing filters
    finally:
        lab_nobpf.destroy(guest.name)
        lab_nobpf.free_loop(other)


# --- (c) hooks ----------------------------------------------------------------------------


def hook_lines(path: str, guest: str) -> List[str]:
    with open(path) as handle:
        return [line.strip() for line in handle if line.split()[:1] == [guest]]


def test_hooks_run_in_order_and_on_reconnect(lab, lab_guest):
    log = os.path.join(lab.lab_dir, "smoke-hook.log")
    # absolute shebang and paths: libvirt runs hooks with only LC_ALL and PATH (P7)
    script = f'#!/bin/bash\ncat >/dev/null\necho "$*" >> {log}\nexit 0\n'
    lab.install_hook(script, name="10-smoke")
    try:
        guest = lab_guest()
        lab.restart_libvirtd()  # its barrier waits for the reconnect hook (P11)
        lab.destroy(guest.name)
    finally:
        lab.remove_hook("10-smoke")
    ops = [line.split()[1:] for line in hook_lines(log, guest.name)]
    assert ops == [
        ["prepare", "begin", "-"],
        ["start", "begin", "-"],
        ["started", "begin", "-"],
        ["reconnect", "begin", "-"],
        ["stopped", "end", "-"],
        ["release", "end", "-"],
    ]


# --- (d) down() leaves nothing ------------------------------------------------------------


def host_state() -> Dict[str, object]:
    """What a lab must not change on the host."""
    cgroup2 = mounts_of_type("cgroup2")[0]
    return {
        # other labs up (this session's fixtures, other test runs): they may own the
        # mount-point directories, so those are compared only when this set is unchanged
        "labs": sorted(other_live_labs(DEFAULT_BASE, exclude="")),
        "cgroup2": (cgroup2["mountpoint"], cgroup2["options"], cgroup2["super_options"]),
        "run_mount": os.path.exists("/run/mount"),
        "libvirt_dirs": {d: os.path.exists(d) for d in
                         ("/var/lib/libvirt", "/run/libvirt", "/var/log/libvirt",
                          "/var/cache/libvirt", "/etc/libvirt")},
    }


def lab_with_running_guest() -> Lab:
    lab = bring_up_lab()
    disk = lab.new_loop("d0")
    lab.new_loop("unused")
    lab.define(lab.guest_xml("leftover-check", [disk]))
    lab.start("leftover-check")
    return lab


def assert_nothing_left(lab_dir: str, cgroup_dir: str, pids: List[int],
                        before: Dict[str, object]) -> None:
    assert host_leftovers(lab_dir, cgroup_dir) == []
    assert [p for p in pids if pid_cmdline(p)] == []
    after = host_state()
    assert after["cgroup2"] == before["cgroup2"]
    assert "nsdelegate" not in str(after["cgroup2"])
    assert after["run_mount"] == before["run_mount"]
    if after["labs"] == before["labs"]:
        assert after["libvirt_dirs"] == before["libvirt_dirs"]


def test_down_leaves_nothing():
    before = host_state()
    lab = lab_with_running_guest()
    lab_dir, cgroup_dir = lab.lab_dir, lab.cgroup_root_host
    pids = [lab.holder_pid, lab.libvirtd_pid, lab.qemu_pid("leftover-check")]
    lab.down()
    assert_nothing_left(lab_dir, cgroup_dir, pids, before)  # type: ignore[arg-type]


def test_down_after_libvirtd_crash_leaves_nothing():
    before = host_state()
    lab = lab_with_running_guest()
    lab_dir, cgroup_dir = lab.lab_dir, lab.cgroup_root_host
    pids = [lab.holder_pid, lab.libvirtd_pid, lab.qemu_pid("leftover-check")]
    os.kill(lab.libvirtd_pid, signal.SIGKILL)  # type: ignore[arg-type]
    lab.down()  # QEMU outlived libvirtd: killed by its recorded pid
    assert_nothing_left(lab_dir, cgroup_dir, pids, before)  # type: ignore[arg-type]


def test_failed_up_cleans_up_and_says_why():
    before = host_state()
    lab = Lab()
    with pytest.raises(Exception, match="lab did not come up") as info:
        lab.up(qemu_conf_extra="this is not qemu.conf syntax")
    assert "libvirtd" in str(info.value)
    assert lab.lab_dir is None
    after = host_state()
    assert (after["cgroup2"], after["run_mount"]) == (before["cgroup2"], before["run_mount"])
    if after["labs"] == before["labs"]:
        assert after["libvirt_dirs"] == before["libvirt_dirs"]
