"""Resolution on fake host trees: IOMMU groups, SCSI generic, USB ids, dm targets, pools."""

from __future__ import annotations

import os

import pytest
from fakesysfs import FakeHost

from libvirt_bpfcg import domain as dm
from libvirt_bpfcg.domain import DeviceRef, Lookup
from libvirt_bpfcg.resolve import (
    LOOKUP_FAILED,
    MISSING,
    NOT_A_DEVICE,
    OK,
    SKIPPED,
    Host,
    resolve,
)


@pytest.fixture
def fake(tmp_path) -> FakeHost:
    return FakeHost(str(tmp_path))


def lookup(kind: str, key: tuple, access: str = "rw", **kwargs: object) -> DeviceRef:
    return DeviceRef("here", "test", access, lookup=Lookup(kind, key, f"the {kind}"),
                     **kwargs)  # type: ignore[arg-type]


def path_ref(path: str, access: str = "rw", follow_dm: bool = True) -> DeviceRef:
    return DeviceRef("here", "disk", access, path=path, follow_dm=follow_dm)


def only(rows: list):
    assert len(rows) == 1, rows
    return rows[0]


# -- stat ---------------------------------------------------------------------------------

def test_stat_char_block_file_dir_missing(fake: FakeHost) -> None:
    host = fake.host()
    fake.node("/dev/null", "c", 1, 3)
    fake.node("/dev/sdb", "b", 8, 16)
    fake.file("/images/a.qcow2")
    os.makedirs(fake.root + "/srv/dir")
    assert host.stat_path("/dev/null", "rw")[:2] == (OK, host.rule("c", 1, 3, "rw"))
    assert str(host.stat_path("/dev/sdb", "r").rule) == "b 8:16 r"
    found = host.stat_path("/images/a.qcow2", "rw")
    assert found.status == NOT_A_DEVICE and "regular file" in found.reason
    assert "directory" in host.stat_path("/srv/dir", "rw").reason
    assert host.stat_path("/nope", "rw").status == MISSING
    assert host.stat_path("/images/a.qcow2/x", "rw").status == MISSING
    relative = host.stat_path("CODE.fd", "r")
    assert relative.status == SKIPPED and "relative" in relative.reason
    assert host.stat_path("/dev/\0null", "rw").status == LOOKUP_FAILED


def test_symlink_chain_names_the_target(fake: FakeHost) -> None:
    fake.node("/dev/dm-3", "b", 253, 3)
    fake.link("/dev/mapper/vg-lv", "/dev/dm-3")
    fake.link("/dev/disk/by-id/dm-name-vg-lv", "/dev/mapper/vg-lv")
    found = fake.host().stat_path("/dev/disk/by-id/dm-name-vg-lv", "rw")
    assert str(found.rule) == "b 253:3 rw"
    assert found.reason == "block device /dev/dm-3"


def test_symlink_loop_is_a_lookup_failure(fake: FakeHost) -> None:
    os.makedirs(fake.root + "/dev")
    os.symlink("b", fake.root + "/dev/a")
    os.symlink("a", fake.root + "/dev/b")
    found = fake.host().stat_path("/dev/a", "rw")
    assert found.status == LOOKUP_FAILED and "symbolic links" in found.reason


def test_rules_are_shared_objects(fake: FakeHost) -> None:
    host = fake.host()
    assert host.rule("c", 1, 3, "rw") is host.rule("c", 1, 3, "rw")


# -- IOMMU groups ---------------------------------------------------------------------------

def test_pci_iommu_group(fake: FakeHost) -> None:
    fake.pci("0000:06:12.1", 12)
    fake.node("/dev/vfio/12", "c", 243, 12)
    row = only(resolve(lookup(dm.LOOKUP_PCI_GROUP, ("0000:06:12.1",)), fake.host()))
    assert (row.status, str(row.rule), row.path) == (OK, "c 243:12 rw", "/dev/vfio/12")
    assert "IOMMU group 12" in row.reason


def test_pci_group_node_missing(fake: FakeHost) -> None:
    fake.pci("0000:06:12.1", 12)
    row = only(resolve(lookup(dm.LOOKUP_PCI_GROUP, ("0000:06:12.1",)), fake.host()))
    assert (row.status, row.path) == (MISSING, "/dev/vfio/12")
    assert "does not exist" in row.reason


def test_pci_without_group_or_device(fake: FakeHost) -> None:
    fake.pci("0000:00:04.0", None)
    host = fake.host()
    row = only(resolve(lookup(dm.LOOKUP_PCI_GROUP, ("0000:00:04.0",)), host))
    assert row.status == LOOKUP_FAILED and "no IOMMU group" in row.reason
    row = only(resolve(lookup(dm.LOOKUP_PCI_GROUP, ("0000:09:00.0",)), host))
    assert row.status == LOOKUP_FAILED and "not found" in row.reason


def test_mdev_group(fake: FakeHost) -> None:
    uuid = "53764d0e-85a0-42b4-af5c-2046b460b1dc"
    fake.mdev(uuid, 7)
    fake.node("/dev/vfio/7", "c", 243, 7)
    row = only(resolve(lookup(dm.LOOKUP_MDEV_GROUP, (uuid,)), fake.host()))
    assert str(row.rule) == "c 243:7 rw"
    bad = only(resolve(lookup(dm.LOOKUP_MDEV_GROUP, ("../../x",)), fake.host()))
    assert bad.status == LOOKUP_FAILED


# -- SCSI generic ---------------------------------------------------------------------------

def test_scsi_generic(fake: FakeHost) -> None:
    fake.scsi("2:0:1:3", "sg7")
    fake.node("/dev/sg7", "c", 21, 7)
    row = only(resolve(lookup(dm.LOOKUP_SCSI_SG, (2, 0, 1, 3), "r"), fake.host()))
    assert (str(row.rule), row.path) == ("c 21:7 r", "/dev/sg7")


def test_scsi_without_sg_or_device(fake: FakeHost) -> None:
    fake.scsi("0:0:0:0", None)
    row = only(resolve(lookup(dm.LOOKUP_SCSI_SG, (0, 0, 0, 0)), fake.host()))
    assert row.status == LOOKUP_FAILED and "sg module" in row.reason
    row = only(resolve(lookup(dm.LOOKUP_SCSI_SG, (5, 0, 0, 0)), fake.host()))
    assert row.status == MISSING


# -- USB ------------------------------------------------------------------------------------

def test_usb_by_vendor_product(fake: FakeHost) -> None:
    fake.usb("1-2", 0x046D, 0xC52B, 1, 5)
    fake.usb("2-1", 0x0781, 0x5151, 2, 3)
    fake.node("/dev/bus/usb/001/005", "c", 189, 4)
    row = only(resolve(lookup(dm.LOOKUP_USB, (0x046D, 0xC52B, None, None)), fake.host()))
    assert (row.status, str(row.rule), row.path) == (OK, "c 189:4 rw", "/dev/bus/usb/001/005")


def test_usb_ambiguous_needs_an_address(fake: FakeHost) -> None:
    fake.usb("1-2", 0x1234, 0x0001, 1, 5)
    fake.usb("1-3", 0x1234, 0x0001, 1, 6)
    fake.node("/dev/bus/usb/001/006", "c", 189, 5)
    host = fake.host()
    row = only(resolve(lookup(dm.LOOKUP_USB, (0x1234, 1, None, None)), host))
    assert row.status == LOOKUP_FAILED and "several devices" in row.reason
    row = only(resolve(lookup(dm.LOOKUP_USB, (0x1234, 1, 1, 6)), host))
    assert str(row.rule) == "c 189:5 rw"


def test_usb_not_plugged_in(fake: FakeHost) -> None:
    row = only(resolve(lookup(dm.LOOKUP_USB, (1, 2, None, None)), fake.host()))
    assert row.status == MISSING and "not plugged in" in row.reason


# -- device-mapper targets -----------------------------------------------------------------

def test_dm_targets_are_allowed_recursively(fake: FakeHost) -> None:
    """LVM on multipath: dm-5 (LV) → dm-2 (mpath) → sdb, sdc; libvirt allows them all."""
    fake.block("sdb", 8, 16)
    fake.block("sdc", 8, 32)
    fake.block("dm-2", 253, 2, dm=True, slaves=("sdb", "sdc"))
    fake.block("dm-5", 253, 5, dm=True, slaves=("dm-2",))
    fake.node("/dev/dm-5", "b", 253, 5)
    fake.link("/dev/mapper/vg-lv", "/dev/dm-5")
    rows = resolve(path_ref("/dev/mapper/vg-lv", "r"), fake.host())
    assert [(r.status, str(r.rule), r.path, r.source_suffix, r.kind) for r in rows] == [
        (OK, "b 253:5 r", "/dev/mapper/vg-lv", "", None),
        (OK, "b 253:2 r", "/dev/dm-2", " (dm target dm-2)", "dm-target"),
        (OK, "b 8:16 r", "/dev/sdb", " (dm target sdb)", "dm-target"),
        (OK, "b 8:32 r", "/dev/sdc", " (dm target sdc)", "dm-target")]


def test_non_dm_block_and_chars_have_no_targets(fake: FakeHost) -> None:
    fake.block("md0", 9, 0, slaves=())
    fake.node("/dev/md0", "b", 9, 0)
    fake.node("/dev/null", "c", 1, 3)
    host = fake.host()
    assert len(resolve(path_ref("/dev/md0"), host)) == 1
    assert len(resolve(path_ref("/dev/null"), host)) == 1


# -- storage pools, render nodes, classes, fixed rules, skips ------------------------------

def test_volume_in_dir_and_logical_pools(fake: FakeHost) -> None:
    fake.pool("default", "dir", "/var/lib/libvirt/images")
    fake.file("/var/lib/libvirt/images/vm.qcow2")
    fake.pool("vg0", "logical", "/dev/vg0")
    fake.node("/dev/vg0/lv1", "b", 253, 9)
    host = fake.host()
    row = only(resolve(lookup(dm.LOOKUP_VOLUME, ("default", "vm.qcow2")), host))
    assert (row.status, row.path) == (NOT_A_DEVICE, "/var/lib/libvirt/images/vm.qcow2")
    row = only(resolve(lookup(dm.LOOKUP_VOLUME, ("vg0", "lv1"), "r"), host))
    assert (str(row.rule), row.path) == ("b 253:9 r", "/dev/vg0/lv1")


def test_volume_lookup_failures(fake: FakeHost) -> None:
    fake.pool("iscsi0", "iscsi", "/dev/disk/by-path")
    host = fake.host()
    row = only(resolve(lookup(dm.LOOKUP_VOLUME, ("iscsi0", "unit:0:0:1")), host))
    assert row.status == LOOKUP_FAILED and "iscsi pool" in row.reason
    row = only(resolve(lookup(dm.LOOKUP_VOLUME, ("nopool", "v")), host))
    assert row.status == LOOKUP_FAILED and "no definition" in row.reason
    row = only(resolve(lookup(dm.LOOKUP_VOLUME, ("default", "../etc")), host))
    assert row.status == LOOKUP_FAILED


def test_render_node_auto_selection(fake: FakeHost) -> None:
    host = fake.host()
    row = only(resolve(lookup(dm.LOOKUP_RENDER_NODE, ()), host))
    assert row.status == LOOKUP_FAILED
    fake.node("/dev/dri/card0", "c", 226, 0)
    fake.node("/dev/dri/renderD129", "c", 226, 129)
    fake.node("/dev/dri/renderD128", "c", 226, 128)
    row = only(resolve(lookup(dm.LOOKUP_RENDER_NODE, ()), fake.host()))
    assert (str(row.rule), row.path) == ("c 226:128 rw", "/dev/dri/renderD128")


def test_device_class(fake: FakeHost) -> None:
    rows = resolve(lookup(dm.LOOKUP_CLASS, ("char-nvidia*",)), fake.host())
    assert [(str(r.rule), r.source_suffix) for r in rows] == [
        ("c 195:* rw", ""), ("c 508:* rw", " (driver nvidia-uvm)"),
        ("c 509:* rw", " (driver nvidia-caps)")]
    rows = resolve(lookup(dm.LOOKUP_CLASS, ("block-loop",), "r"), fake.host())
    assert [str(r.rule) for r in rows] == ["b 7:* r"]
    row = only(resolve(lookup(dm.LOOKUP_CLASS, ("char-kvmfr",)), fake.host()))
    assert row.status == MISSING and "module not loaded" in row.reason


def test_fixed_rules_and_skips_touch_nothing() -> None:
    host = Host(root="/nonexistent", sysfs_root="/nonexistent")
    rule = host.rule("c", 136, None, "rw")
    assert only(resolve(DeviceRef("s", "pty", "rw", rule=rule), host)).rule is rule
    row = only(resolve(DeviceRef("s", "disk", "rw", path="/x", skip="why"), host))
    assert (row.status, row.reason, row.path) == (SKIPPED, "why", "/x")
