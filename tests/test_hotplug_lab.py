"""attach-device / detach-device on a real libvirtd 9.0 + QEMU guest.

Own mode (libvirtd without bpf(2), our hook installs the filter at start): libvirt updates no
filter on hotplug, so without our pre-grant QEMU could not open the new disk. libvirt mode:
libvirt grants the disk itself; we only keep the overlay.
"""

from __future__ import annotations

import os

import pytest
from lab_cli import STATE_DIR, cli, extras_xml
from test_hook_lab import map_entries

from libvirt_bpfcg import detect as det

pytestmark = pytest.mark.lab

EPERM = 1


def scsi_disk_xml(lab, name: str, source: str, target: str = "sda", unit: int = 0) -> str:
    """A device file in the lab dir (the same path inside the namespace)."""
    path = os.path.join(lab.lab_dir, "xml", f"dev-{name}.xml")
    with open(path, "w") as handle:
        handle.write("<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
                     f"<source dev='{source}'/><target dev='{target}' bus='scsi'/>"
                     f"<address type='drive' controller='0' bus='0' target='0' unit='{unit}'/>"
                     "</disk>\n")
    return path


def hotplug(lab, verb: str, guest, path: str, *flags: str, expect: int = 0):
    return cli(lab, verb, "-c", lab.uri, guest.name, path, *flags, "--state-dir", STATE_DIR,
               expect=expect)


def opens(guest, paths):
    return guest.open_in_cgroup([(p, os.O_RDONLY) for p in paths])


def targets(lab, name: str):
    return [line.split()[0] for line in lab.virsh("domblklist", name).stdout.splitlines()
            if line.strip()]


def test_own_mode_attach_then_detach_scsi_disk(hooked_nobpf, lab_guest):
    lab = hooked_nobpf
    guest = lab_guest(lab=lab, name="hpown")
    hot = lab.new_loop("hpown-hot")
    major, minor = os.major(os.stat(hot).st_rdev), os.minor(os.stat(hot).st_rdev)
    before = map_entries(guest.cgroup)
    assert det.detect(guest.cgroup).mode == det.MODE_OWN
    assert opens(guest, [hot]) == [EPERM]
    path = scsi_disk_xml(lab, "hpown", hot)
    # the negative control: libvirt alone cannot hotplug here, QEMU is denied the disk
    plain = lab.virsh("attach-device", guest.name, path, "--live", check=False)
    assert plain.returncode != 0 and "Operation not permitted" in plain.stderr, plain.stderr

    out = hotplug(lab, "attach-device", guest, path, "--live").stdout
    assert out.splitlines()[0] == "Device attached successfully"
    assert f"filter: granted b {major}:{minor} rw (own mode)" in out
    assert "sda" in targets(lab, guest.name), "QEMU opened the disk: the grant came first"
    assert opens(guest, [hot]) == [0]

    out = hotplug(lab, "detach-device", guest, path, "--live").stdout
    assert out.splitlines()[0] == "Device detached successfully"
    assert f"filter: revoked b {major}:{minor} rw (own mode)" in out
    assert "sda" not in targets(lab, guest.name)
    assert opens(guest, [hot]) == [EPERM]
    assert map_entries(guest.cgroup) == before, "back to exactly the start map"


def test_own_mode_attach_libvirt_rejects_leaves_the_map_as_it_was(hooked_nobpf, lab_guest):
    lab = hooked_nobpf
    guest = lab_guest(lab=lab, name="hprej")
    loop = lab.new_loop("hprej-new")
    before = map_entries(guest.cgroup)
    # a real rejection: the target name is taken by the guest's boot disk
    path = os.path.join(lab.lab_dir, "xml", "dev-hprej.xml")
    with open(path, "w") as handle:
        handle.write("<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
                     f"<source dev='{loop}'/><target dev='vda' bus='scsi'/></disk>\n")
    proc = hotplug(lab, "attach-device", guest, path, "--live", expect=1)
    assert proc.stdout == ""
    message = proc.stderr.strip()
    assert message.startswith(f"libvirt-bpfcg: Failed to attach device from {path}: "), message
    assert "vda" in message and len(message.splitlines()) == 1, message
    assert map_entries(guest.cgroup) == before
    assert opens(guest, [loop]) == [EPERM]


def test_forbidden_device_is_refused_before_libvirt_sees_it(hooked_nobpf, lab_guest):
    lab = hooked_nobpf
    guest = lab_guest(lab=lab, name="hpforbid")
    before = map_entries(guest.cgroup)
    path = os.path.join(lab.lab_dir, "xml", "dev-hpforbid.xml")
    with open(path, "w") as handle:
        handle.write("<serial type='dev'><source path='/dev/port'/></serial>\n")
    proc = hotplug(lab, "attach-device", guest, path, "--live", expect=2)
    assert "refusing to attach" in proc.stderr and "/dev/port" in proc.stderr
    assert map_entries(guest.cgroup) == before
    assert len(lab.virsh("dumpxml", guest.name).stdout.split("<serial ")) == 2, \
        "libvirt was never asked"


def test_config_only_attach_and_usage_errors(hooked_nobpf, lab_guest):
    lab = hooked_nobpf
    guest = lab_guest(lab=lab, name="hpcfg")
    loop = lab.new_loop("hpcfg-d")
    before = map_entries(guest.cgroup)
    path = scsi_disk_xml(lab, "hpcfg", loop)
    out = hotplug(lab, "attach-device", guest, path, "--config").stdout
    assert out.splitlines() == ["Device attached successfully",
                                "filter: persistent definition only: the filter is unchanged"]
    assert map_entries(guest.cgroup) == before
    assert loop in lab.virsh("dumpxml", guest.name, "--inactive").stdout
    assert loop not in lab.virsh("dumpxml", guest.name).stdout
    proc = hotplug(lab, "detach-device", guest, path, "--current", "--live", expect=2)
    assert "--current and --live are mutually exclusive" in proc.stderr
    proc = hotplug(lab, "attach-device", guest, "/nonexistent.xml", expect=2)
    assert "/nonexistent.xml: no such file" in proc.stderr
    proc = cli(lab, "attach-device", "-c", lab.uri, "no-such-guest", path, expect=1)
    assert "failed to get domain 'no-such-guest'" in proc.stderr


def test_libvirt_mode_attach_detach_keep_the_overlay(hooked_lab, lab_guest):
    lab = hooked_lab
    extra = lab.new_loop("hplv-extra")
    guest = lab_guest(lab=lab, name="hplv", metadata_xml=extras_xml(extra))
    hot = lab.new_loop("hplv-hot")
    assert det.detect(guest.cgroup).overlay_installed
    path = scsi_disk_xml(lab, "hplv", hot)
    out = hotplug(lab, "attach-device", guest, path).stdout  # no flag: live, like virsh
    assert out.splitlines() == ["Device attached successfully"], "libvirt granted it itself"
    assert opens(guest, [hot, extra]) == [0, 0]
    hotplug(lab, "detach-device", guest, path)
    assert opens(guest, [hot, extra]) == [EPERM, 0]
    assert det.detect(guest.cgroup).overlay_installed
