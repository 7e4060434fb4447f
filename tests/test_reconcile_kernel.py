"""reconcile() and the engine's sync/undo against the real kernel: scratch cgroups, real maps,
real opens; the host the plan looks at is a fake tree (tests/fakesysfs.py) whose device
numbers match nodes made in node_dir."""

from __future__ import annotations

import errno
import os
import subprocess
from typing import List

import pytest
from engine_helpers import install_libvirt_like
from fakesysfs import FakeHost
from kernel_fixtures import make_node, open_in_cgroup

from libvirt_bpfcg import detect as det
from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.devfilter import DeviceFilter, read_entries
from libvirt_bpfcg.reconcile import HotplugEpoch, collect_stale_epochs, reconcile
from libvirt_bpfcg.rules import Rule, RuleSet
from libvirt_bpfcg.state import StateDirs

pytestmark = pytest.mark.kernel

R = Rule.parse
EXTRAS_NS = "https://libvirt-bpfcg.org/xmlns/extras/1"
ACL = ("c 1:3 rw",)  # a one-entry default ACL keeps the expected maps readable


@pytest.fixture
def dirs(tmp_path) -> StateDirs:
    bpffs = tmp_path / "bpffs"
    bpf.ensure_bpffs(str(bpffs))
    yield StateDirs(state_dir=str(tmp_path / "state"), bpffs=str(bpffs))
    subprocess.run(["umount", "-n", str(bpffs)], check=True)


@pytest.fixture
def fake(tmp_path) -> FakeHost:
    host = FakeHost(str(tmp_path / "host"))
    for minor in range(1, 6):
        host.node(f"/dev/loop{minor}", "b", 7, minor)
    return host


def domain_xml(disks: List[str] = (), hostdev_slots: List[int] = (), extras: str = "") -> str:
    devices = "".join(
        f"<disk type='block' device='disk'><source dev='{d}'/>"
        f"<target dev='vd{chr(97 + i)}' bus='virtio'/></disk>" for i, d in enumerate(disks))
    devices += "".join(
        "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
        f"<address domain='0x0000' bus='0x06' slot='0x{slot:02x}' function='0x0'/>"
        "</source></hostdev>" for slot in hostdev_slots)
    metadata = (f"<metadata><bpfcg:extras xmlns:bpfcg='{EXTRAS_NS}'>{extras}</bpfcg:extras>"
                "</metadata>") if extras else ""
    return ("<domain type='kvm' id='7'><name>g</name>"
            "<uuid>11111111-2222-3333-4444-555555555555</uuid>"
            f"{metadata}<devices>{devices}</devices></domain>")


def entries(f: DeviceFilter, which: str = "base") -> List[str]:
    d = f.detect()
    view = getattr(d, which)
    if view is None and which == "overlay":
        fd = f.dirs.get_pinned(f.cgroup, "overlay")
    else:
        fd = bpf.map_get_fd_by_id(view.id)
    try:
        return sorted(str(Rule.from_entry(k, v)) for k, v in read_entries(fd).items())
    finally:
        bpf.close(fd)


def opens(cgroup: str, paths: List[str]) -> List[bool]:
    return [e != errno.EPERM for e in open_in_cgroup(cgroup, [(p, os.O_RDONLY) for p in paths])]


def run(f: DeviceFilter, fake: FakeHost, xml: str, **kwargs):
    return reconcile(f, xml, fake.config(default_acl=ACL), host=fake.host(), **kwargs)


# --- own mode -----------------------------------------------------------------------------


def test_unfiltered_guest_gets_exactly_its_plan(scratch_cgroup, node_dir, dirs, fake):
    f = DeviceFilter(scratch_cgroup, dirs)
    result = run(f, fake, domain_xml(["/dev/loop1"]))
    assert result.mode == det.MODE_OWN and result.installed and not result.held_back
    assert entries(f) == sorted(["b 7:1 rw", "c 1:3 rw", "c 136:* rw"])
    disk, other = make_node(node_dir, "b", 7, 1), make_node(node_dir, "b", 7, 2)
    assert opens(scratch_cgroup, [disk, other]) == [True, False]
    again = run(f, fake, domain_xml(["/dev/loop1"]))
    assert not again.changed and "nothing to do" in again.summary()


def test_map_becomes_plan_plus_runtime_grants(scratch_cgroup, dirs, fake):
    f = DeviceFilter(scratch_cgroup, dirs)
    run(f, fake, domain_xml(["/dev/loop1", "/dev/loop2"]))
    f.grant([R("c 240:1 rw")], remember=True)  # allow: kept
    f.grant([R("c 240:2 rw"), R("c 1:3 m")])  # not derived from anything: dropped / narrowed
    result = run(f, fake, domain_xml(["/dev/loop1"]))  # loop2 was unplugged
    assert entries(f) == sorted(["b 7:1 rw", "c 1:3 rw", "c 136:* rw", "c 240:1 rw"])
    assert {str(r) for r in result.revoked} == {"b 7:2 rw", "c 240:2 rw", "c 1:3 rwm"}
    assert [str(r) for r in result.granted] == ["c 1:3 rw"]  # narrowed in one update


def test_vfio_container_node_stays_while_any_vfio_device_remains(
        scratch_cgroup, dirs, fake):
    fake.pci("0000:06:01.0", 11)
    fake.pci("0000:06:02.0", 12)
    fake.node("/dev/vfio/11", "c", 243, 11)
    fake.node("/dev/vfio/12", "c", 243, 12)
    fake.node("/dev/vfio/vfio", "c", 10, 196)
    f = DeviceFilter(scratch_cgroup, dirs)
    both = domain_xml(hostdev_slots=[1, 2])
    run(f, fake, both)
    assert {"c 10:196 rw", "c 243:11 rw", "c 243:12 rw"} <= set(entries(f))
    config = fake.config(default_acl=ACL)
    from libvirt_bpfcg.plan import plan_domain

    # detach of slot 1: only the keys the guest used before are candidates
    keys = plan_domain(both, config, fake.host()).rules.entries.keys()
    run(f, fake, domain_xml(hostdev_slots=[2]), keys=keys)
    assert "c 243:11 rw" not in entries(f)
    assert {"c 10:196 rw", "c 243:12 rw"} <= set(entries(f)), "/dev/vfio/vfio stays"
    run(f, fake, domain_xml(), keys=keys)
    assert not {"c 10:196 rw", "c 243:12 rw"} & set(entries(f)), "the last one takes it"


def test_keys_limit_what_a_detach_may_revoke(scratch_cgroup, dirs, fake):
    f = DeviceFilter(scratch_cgroup, dirs)
    run(f, fake, domain_xml(["/dev/loop1", "/dev/loop2"]))
    f.grant([R("c 240:3 rw")])  # outside the keys: a detach leaves it alone
    run(f, fake, domain_xml(["/dev/loop1"]), keys=[R("b 7:2 rw").key])
    assert entries(f) == sorted(["b 7:1 rw", "c 1:3 rw", "c 136:* rw", "c 240:3 rw"])


def test_plan_problems_hold_back_revocations_but_still_grant(scratch_cgroup, dirs, fake):
    f = DeviceFilter(scratch_cgroup, dirs)
    run(f, fake, domain_xml(["/dev/loop1"]))
    f.grant([R("b 7:4 rw")])
    result = run(f, fake, domain_xml(["/dev/loop1", "/dev/loop3", "/dev/gone"]))
    assert result.held_back and any("/dev/gone" in p for p in result.problems)
    assert entries(f) == sorted(["b 7:1 rw", "b 7:3 rw", "b 7:4 rw", "c 1:3 rw",
                                "c 136:* rw"])


def test_hotplug_in_flight_holds_back_revocations(scratch_cgroup, dirs, fake):
    f = DeviceFilter(scratch_cgroup, dirs)
    run(f, fake, domain_xml(["/dev/loop1"]))
    epoch = HotplugEpoch(f)
    with f.locked():
        epoch.begin()
        f.grant([R("b 7:5 rw")])  # pre-granted, libvirt's XML does not have it yet
    result = run(f, fake, domain_xml(["/dev/loop1"]))
    assert result.held_back and "b 7:5 rw" in entries(f)
    with f.locked():
        epoch.end()

    # an XML read before the hotplug ended is stale: the epoch moved, still only adds
    def stale_xml() -> str:
        with f.locked():
            epoch.begin()
            epoch.end()
        return domain_xml(["/dev/loop1"])

    assert run(f, fake, stale_xml).held_back and "b 7:5 rw" in entries(f)
    result = run(f, fake, domain_xml(["/dev/loop1"]))
    assert not result.held_back and "b 7:5 rw" not in entries(f)


def test_hotplug_killed_midway_does_not_hold_back_forever(scratch_cgroup, dirs, fake):
    f = DeviceFilter(scratch_cgroup, dirs)
    run(f, fake, domain_xml(["/dev/loop1"]))
    epoch = HotplugEpoch(f)
    os.makedirs(os.path.dirname(epoch.path))
    with open(epoch.path, "w") as handle:  # odd count, pid that cannot exist
        handle.write("3 999999999\n")
    assert not epoch.in_progress()
    f.grant([R("b 7:5 rw")])
    assert not run(f, fake, domain_xml(["/dev/loop1"])).held_back
    assert "b 7:5 rw" not in entries(f)
    # counters of cgroups that are gone are collected, live ones kept
    with open(os.path.join(os.path.dirname(epoch.path), "999999999"), "w") as handle:
        handle.write("2 1\n")
    assert collect_stale_epochs(dirs.state_dir, os.path.dirname(scratch_cgroup)) == 1
    assert os.path.exists(epoch.path)


# --- undo ------------------------------------------------------------------------------------


def test_undo_puts_back_exactly_what_the_grant_changed(scratch_cgroup, dirs, fake):
    f = DeviceFilter(scratch_cgroup, dirs)
    run(f, fake, domain_xml(["/dev/loop1"]))
    f.grant([R("c 240:9 r")], remember=True)
    before = entries(f)
    change = f.grant([R("b 7:2 rw"), R("b 7:1 rw"), R("c 240:9 rw"), R("c 240:8 rw")])
    assert {str(r) for r in change.unchanged} == {"b 7:1 rw"}
    f.grant([R("c 240:8 rwm")])  # someone else changed it since: left alone
    taken = f.undo(change)
    assert {str(r) for r in taken} == {"b 7:2 rw", "c 240:9 rw"}
    assert entries(f) == sorted(before + ["c 240:8 rwm"])


def test_undo_keeps_a_runtime_grant_made_meanwhile(scratch_cgroup, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    f.grant([R("c 1:3 rw")])
    change = f.grant([R("c 240:1 rw"), R("c 240:2 rw")])
    f.grant([R("c 240:1 rw")], remember=True)  # an allow of the same rule meanwhile
    assert [str(r) for r in f.undo(change)] == ["c 240:2 rw"]
    assert entries(f) == ["c 1:3 rw", "c 240:1 rw"]


def test_undo_never_takes_away_a_filter_the_grant_created(scratch_cgroup, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    change = f.grant([R("c 1:3 rw")])
    assert change.installed and f.undo(change) == []
    assert entries(f) == ["c 1:3 rw"]


# --- libvirt mode ----------------------------------------------------------------------------


def test_libvirt_mode_overlay_is_extras_plus_runtime_and_survives_growth(
        scratch_cgroup, node_dir, dirs, fake):
    map_fd = install_libvirt_like(scratch_cgroup, [R("c 1:3 rw"), R("b 7:1 rw")])
    try:
        f = DeviceFilter(scratch_cgroup, dirs)
        extras = "<bpfcg:rule>c 240:20 rw</bpfcg:rule><bpfcg:rule>c 240:21 rw</bpfcg:rule>"
        result = run(f, fake, domain_xml(["/dev/loop1"], extras=extras))
        assert result.mode == det.MODE_LIBVIRT and result.installed
        assert entries(f, "overlay") == ["c 240:20 rw", "c 240:21 rw"]
        f.grant([R("c 240:22 rw")], remember=True)
        # libvirt's map growth swaps its own program in: the overlay is dropped
        new_fd = devprog.create_libvirt_map(128)
        for key, value in bpf.map_items(map_fd, 8, 4):
            bpf.map_update(new_fd, key, value)
        prog_fd = devprog.load_libvirt_program(new_fd)
        cg = bpf.open_cgroup(scratch_cgroup)
        bpf.prog_attach(cg, prog_fd, bpf.BPF_CGROUP_DEVICE, 0)
        bpf.close(cg)
        bpf.close(prog_fd)
        bpf.close(map_fd)
        map_fd = new_fd
        assert not f.detect().overlay_installed
        # reconcile re-installs on libvirt's new map; an extra removed from metadata goes
        result = run(f, fake, domain_xml(["/dev/loop1"],
                                         extras="<bpfcg:rule>c 240:20 rw</bpfcg:rule>"))
        d = f.detect()
        assert result.installed and d.overlay_installed
        assert d.base.id == bpf.map_info(map_fd).id and d.base.max_entries == 128
        assert entries(f, "overlay") == ["c 240:20 rw", "c 240:22 rw"]
        assert [str(r) for r in result.revoked] == ["c 240:21 rw"]
        nodes = [make_node(node_dir, "c", 240, m) for m in (20, 21, 22)]
        assert opens(scratch_cgroup, nodes) == [True, False, True]
        assert read_entries(map_fd) == RuleSet.of([R("c 1:3 rw"), R("b 7:1 rw")]).as_map(), \
            "libvirt's map is never written"
    finally:
        bpf.close(map_fd)


def test_foreign_filter_is_reported_and_left_alone(scratch_cgroup, dirs, fake):
    prog_fd = devprog.load_linear_program([R("c 1:3 rw")])
    cg = bpf.open_cgroup(scratch_cgroup)
    try:
        bpf.prog_attach(cg, prog_fd, bpf.BPF_CGROUP_DEVICE, bpf.BPF_F_ALLOW_MULTI)
    finally:
        bpf.close(cg)
        bpf.close(prog_fd)
    f = DeviceFilter(scratch_cgroup, dirs)
    result = run(f, fake, domain_xml(["/dev/loop1"]))
    assert result.mode == det.MODE_FOREIGN and "ALLOW_MULTI" in result.note
    assert not result.changed and "nothing changed" in result.summary()
