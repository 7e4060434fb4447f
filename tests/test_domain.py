"""Domain XML → references (pure): provenance, access, lookups, skips, malformed elements."""

from __future__ import annotations

from typing import List

import pytest

from libvirt_bpfcg import domain as dm
from libvirt_bpfcg.domain import DeviceRef, c_uint, domain_info, domain_refs, snippet_refs
from libvirt_bpfcg.errors import InputError
from libvirt_bpfcg.xmlsafe import parse_xml


def refs_of(devices: str, extra: str = "") -> List[DeviceRef]:
    root = parse_xml(f"<domain type='kvm'><name>t</name>{extra}<devices>{devices}</devices>"
                     "</domain>")
    return [ref for ref in domain_refs(root) if ref.kind != "pty"]


def one(devices: str, extra: str = "") -> DeviceRef:
    refs = refs_of(devices, extra)
    assert len(refs) == 1, refs
    return refs[0]


def test_domain_info() -> None:
    root = parse_xml("<domain id='7'><name> vm1 </name><uuid>abc</uuid></domain>")
    assert domain_info(root) == ("vm1", "abc", 7)
    assert domain_info(parse_xml("<domain/>")) == (None, None, None)
    with pytest.raises(InputError, match="domain id"):
        domain_info(parse_xml("<domain id='x'/>"))


def test_pty_is_always_there() -> None:
    refs = domain_refs(parse_xml("<domain/>"))
    assert [(r.source, str(r.rule)) for r in refs] == [("libvirt:pty", "c 136:* rw")]


@pytest.mark.parametrize("xml, source, path, access", [
    ("<disk type='block'><source dev='/dev/sdb'/></disk>",
     "devices/disk[1]/source/@dev", "/dev/sdb", "rw"),
    ("<disk type='block'><source dev='/dev/sdb'/><readonly/></disk>",
     "devices/disk[1]/source/@dev", "/dev/sdb", "r"),
    ("<disk type='block' device='cdrom'><source dev='/dev/sr0'/></disk>",
     "devices/disk[1]/source/@dev", "/dev/sr0", "r"),
    ("<disk type='file' device='floppy'><source file='/f.img'/></disk>",
     "devices/disk[1]/source/@file", "/f.img", "rw"),
    ("<disk><source file='/default-type-is-file.img'/></disk>",
     "devices/disk[1]/source/@file", "/default-type-is-file.img", "rw"),
    ("<disk type='dir'><source dir='/srv/fat'/></disk>",
     "devices/disk[1]/source/@dir", "/srv/fat", "rw"),
])
def test_disk_top_layer(xml: str, source: str, path: str, access: str) -> None:
    ref = one(xml)
    assert (ref.source, ref.path, ref.access, ref.kind) == (source, path, access, "disk")
    assert ref.required and ref.follow_dm and ref.skip is None


def test_disk_index_counts_disks_only() -> None:
    refs = refs_of("<interface type='network'/><disk type='file'><source file='/a'/></disk>"
                   "<controller type='usb'/><disk type='file'><source file='/b'/></disk>")
    assert [r.source for r in refs] == ["devices/disk[1]/source/@file",
                                        "devices/disk[2]/source/@file"]


def test_backing_chain_is_read_only_and_ends_at_empty_backing_store() -> None:
    refs = refs_of("""<disk type='file'><source file='/top'/>
      <backingStore type='block'><source dev='/dev/base'/>
        <backingStore type='file'><source file='/base2'/><backingStore/></backingStore>
      </backingStore></disk>""")
    assert [(r.source, r.path, r.access, r.kind) for r in refs] == [
        ("devices/disk[1]/source/@file", "/top", "rw", "disk"),
        ("devices/disk[1]/backingStore/source/@dev", "/dev/base", "r", "backing"),
        ("devices/disk[1]/backingStore/backingStore/source/@file", "/base2", "r", "backing")]


def test_startup_policy_optional_makes_the_chain_optional() -> None:
    refs = refs_of("""<disk type='file' device='cdrom'><source file='/x.iso'
      startupPolicy='optional'/><backingStore type='file'><source file='/y'/></backingStore>
      </disk>""")
    assert [r.required for r in refs] == [False, False]


@pytest.mark.parametrize("xml, reason", [
    ("<disk type='file' device='cdrom'/>", "empty removable drive"),
    ("<disk type='volume' device='cdrom'><target dev='hdc'/></disk>", "empty removable drive"),
    ("<disk type='network'><source protocol='rbd' name='p/i'/></disk>", "protocol rbd"),
    ("<disk type='vhostuser'><source type='unix' path='/s'/></disk>", "vhost-user"),
    ("<disk type='vhostvdpa'><source dev='/dev/vhost-vdpa-0'/></disk>", "passes the descr"),
    ("<disk type='file'><source file='/x' fdgroup='g'/></disk>", "fdgroup"),
    ("<disk type='weird'/>", "not local storage"),
    ("<disk type='volume'><source pool='p' volume='v' mode='direct'/></disk>", "direct"),
])
def test_disks_that_get_no_rule(xml: str, reason: str) -> None:
    ref = one(xml)
    assert ref.skip is not None and reason in ref.skip
    assert not ref.required


def test_volume_disk_is_a_host_lookup() -> None:
    ref = one("<disk type='volume'><source pool='default' volume='vm.qcow2'/></disk>")
    assert ref.lookup == (dm.LOOKUP_VOLUME, ("default", "vm.qcow2"),
                          "storage volume default/vm.qcow2")
    assert ref.source == "devices/disk[1]/source/@volume"


def test_nvme_disk_is_rw_even_when_readonly() -> None:
    refs = refs_of("""<disk type='nvme'><source type='pci' namespace='1'>
      <address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>
      <readonly/></disk>""")
    assert [(r.kind, r.access, r.path, r.lookup and r.lookup.key) for r in refs] == [
        ("nvme", "rw", None, ("0000:01:00.0",)),
        ("vfio-container", "rw", "/dev/vfio/vfio", None)]


def test_managed_reservations_add_mapper_control() -> None:
    refs = refs_of("""<disk type='block' device='lun'><source dev='/dev/sdc'>
      <reservations managed='yes'/></source></disk>
      <disk type='block' device='lun'><source dev='/dev/sdd'>
      <reservations managed='no'><source type='unix' path='/s' mode='client'/>
      </reservations></source></disk>""")
    assert [(r.source, r.path, r.required) for r in refs] == [
        ("devices/disk[1]/source/@dev", "/dev/sdc", True),
        ("devices/disk[1]/source/reservations/@managed", "/dev/mapper/control", False),
        ("devices/disk[2]/source/@dev", "/dev/sdd", True)]


def test_mirror_and_data_store() -> None:
    refs = refs_of("""<disk type='file'><source file='/a.qcow2'/>
      <dataStore type='block'><format type='raw'/><source dev='/dev/data'/></dataStore>
      <mirror type='file' file='/old-spelling.img' job='copy'/></disk>""")
    assert [(r.source, r.path, r.access, r.kind) for r in refs] == [
        ("devices/disk[1]/source/@file", "/a.qcow2", "rw", "disk"),
        ("devices/disk[1]/dataStore/source/@dev", "/dev/data", "rw", "data-file"),
        ("devices/disk[1]/mirror/@file", "/old-spelling.img", "rw", "mirror")]


def test_firmware() -> None:
    refs = refs_of("", extra="""<os><loader readonly='yes' type='pflash'>/fw/CODE.fd</loader>
      <nvram type='block'><source dev='/dev/nvram0'/></nvram></os>""")
    assert [(r.source, r.path, r.access, r.required) for r in refs] == [
        ("os/loader", "/fw/CODE.fd", "r", False),
        ("os/nvram/source/@dev", "/dev/nvram0", "rw", False)]
    plain = refs_of("", extra="<os><loader>/fw/rw.fd</loader><nvram>/v.fd</nvram></os>")
    assert [(r.source, r.access) for r in plain] == [("os/loader", "rw"), ("os/nvram", "rw")]


def test_pci_hostdev_and_interface() -> None:
    refs = refs_of("""<hostdev mode='subsystem' type='pci' managed='yes'><source>
      <address domain='0' bus='21' slot='0' function='1'/></source></hostdev>
      <interface type='hostdev'><source><address type='pci' domain='0x0000' bus='0x03'
      slot='0x07' function='0x1'/></source></interface>""")
    assert [(r.source, r.kind, r.lookup and r.lookup.key, r.path) for r in refs] == [
        ("devices/hostdev[1]/source/address", "hostdev-pci", ("0000:15:00.1",), None),
        ("devices/hostdev[1]", "vfio-container", None, "/dev/vfio/vfio"),
        ("devices/interface[1]/source/address", "interface-hostdev", ("0000:03:07.1",),
         None),
        ("devices/interface[1]", "vfio-container", None, "/dev/vfio/vfio")]


@pytest.mark.parametrize("driver, reason", [
    ("<driver name='kvm'/>", "legacy"), ("<driver iommufd='yes'/>", "iommufd")])
def test_pci_hostdev_without_vfio_node(driver: str, reason: str) -> None:
    ref = one(f"""<hostdev type='pci'>{driver}<source><address bus='1' slot='0'/></source>
      </hostdev>""")
    assert ref.skip is not None and reason in ref.skip


def test_usb_hostdevs() -> None:
    refs = refs_of("""<hostdev type='usb'><source><address bus='1' device='010'/></source>
      </hostdev>
      <hostdev type='usb'><source startupPolicy='optional'><vendor id='0x046d'/>
      <product id='0xc52b'/></source></hostdev>
      <hostdev type='usb'><source><vendor id='0x1'/><product id='0x2'/>
      <address bus='2' device='3'/></source></hostdev>""")
    assert refs[0].path == "/dev/bus/usb/001/008"  # device='010' is octal, as in strtoul
    assert refs[0].required
    assert refs[1].lookup == (dm.LOOKUP_USB, (0x046D, 0xC52B, None, None),
                              "USB device 046d:c52b")
    assert not refs[1].required
    assert refs[2].lookup.key == (1, 2, 2, 3)  # type: ignore[union-attr]


def test_scsi_hostdevs() -> None:
    refs = refs_of("""<hostdev type='scsi'><source><adapter name='scsi_host2'/>
      <address bus='0' target='1' unit='3'/></source><readonly/></hostdev>
      <hostdev type='scsi'><source protocol='iscsi' name='iqn.x'/></hostdev>
      <hostdev type='scsi_host'><source protocol='vhost' wwpn='naa.5'/></hostdev>
      <hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block></source>
      </hostdev>""")
    assert refs[0].lookup.key == (2, 0, 1, 3) and refs[0].access == "r"  # type: ignore
    assert ["iSCSI" in (r.skip or "") for r in refs[1:2]] == [True]
    assert "vhost-scsi" in (refs[2].skip or "")
    assert "LXC" in (refs[3].skip or "")


def test_mdev_hostdev() -> None:
    refs = refs_of("""<hostdev mode='subsystem' type='mdev' model='vfio-ccw'><source>
      <address uuid='b1ae8bf6-38b0-4c81-9d44-78ce3f520496'/></source></hostdev>""")
    assert refs[0].lookup == (dm.LOOKUP_MDEV_GROUP, ("b1ae8bf6-38b0-4c81-9d44-78ce3f520496",),
                              "IOMMU group of mediated device "
                              "b1ae8bf6-38b0-4c81-9d44-78ce3f520496")
    assert refs[1].path == "/dev/vfio/vfio"


def test_chardevs_tpm_input_rng() -> None:
    refs = refs_of("""<serial type='pty'/><serial type='dev'><source path='/dev/ttyS0'/>
      </serial><parallel type='dev'><source path='/dev/parport0'/></parallel>
      <channel type='dev'><source path='/dev/ttyUSB0'/></channel>
      <console type='dev'><source path='/dev/ttyS0'/></console>
      <tpm><backend type='passthrough'/></tpm>
      <input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>
      <input type='evdev'><source dev='/dev/input/by-id/kbd'/></input>
      <input type='tablet'/>
      <rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>
      <rng model='virtio'><backend model='random'/></rng>
      <rng model='virtio'><backend model='builtin'/></rng>""")
    assert [(r.source, r.path) for r in refs if not r.skip] == [
        ("devices/serial[2]/source/@path", "/dev/ttyS0"),
        ("devices/parallel[1]/source/@path", "/dev/parport0"),
        ("devices/channel[1]/source/@path", "/dev/ttyUSB0"),
        ("devices/console[1]/source/@path", "/dev/ttyS0"),
        ("devices/tpm[1]/backend", "/dev/tpm0"),
        ("devices/input[1]/source/@evdev", "/dev/input/event1"),
        ("devices/input[2]/source/@dev", "/dev/input/by-id/kbd"),
        ("devices/rng[1]/backend", "/dev/hwrng"),
        ("devices/rng[2]/backend", "/dev/random")]
    assert all(r.access == "rw" for r in refs)
    assert [r.source for r in refs if r.skip] == ["devices/rng[3]/backend"]


def test_memory_graphics_video_sev() -> None:
    refs = refs_of("""<memory model='nvdimm'><source><path>/dev/dax0.0</path></source></memory>
      <memory model='virtio-pmem'><source><path>/dev/pmem0</path></source></memory>
      <memory model='dimm'/>
      <memory model='sgx-epc'/>
      <graphics type='spice'><gl enable='yes' rendernode='/dev/dri/renderD129'/></graphics>
      <graphics type='egl-headless'/>
      <graphics type='spice'><gl enable='no'/></graphics>
      <video><model type='virtio' blob='on'><acceleration accel3d='yes'
        rendernode='/dev/dri/renderD128'/></model></video>""",
                   extra="<launchSecurity type='sev'><policy>0x3</policy></launchSecurity>")
    got = [(r.source, r.path, r.lookup and r.lookup.kind, r.required) for r in refs]
    assert got == [
        ("devices/memory[1]/source/path", "/dev/dax0.0", None, True),
        ("devices/memory[2]/source/path", "/dev/pmem0", None, True),
        ("devices/memory[4]", "/dev/sgx_vepc", None, False),
        ("devices/memory[4]", "/dev/sgx_provision", None, False),
        ("devices/graphics[1]/gl/@rendernode", "/dev/dri/renderD129", None, True),
        ("devices/graphics[2]/gl", None, dm.LOOKUP_RENDER_NODE, False),
        ("devices/video[1]/model/acceleration/@rendernode", "/dev/dri/renderD128", None, True),
        ("devices/video[1]/model/@blob", "/dev/udmabuf", None, True),
        ("launchSecurity/@type", "/dev/sev", None, True)]


@pytest.mark.parametrize("graphics, gate, skipped", [
    ("", dm.GATE_SOUND_NOGRAPHICS, False),
    ("<graphics type='vnc'/><graphics type='sdl'/>", dm.GATE_SOUND_VNC, False),
    ("<graphics type='sdl'/><graphics type='vnc'/>", None, False),
    ("<graphics type='spice'/>", None, True),
])
def test_sound_conditions(graphics: str, gate: str | None, skipped: bool) -> None:
    refs = [r for r in refs_of(f"<sound model='ich9'/>{graphics}") if r.kind == "sound"]
    assert len(refs) == 1
    assert refs[0].gate == gate and (refs[0].skip is not None) == skipped
    assert str(refs[0].rule) == "c 116:* rw"


def test_no_sound_no_sound_ref() -> None:
    assert not [r for r in refs_of("<graphics type='sdl'/>") if r.kind == "sound"]


@pytest.mark.parametrize("xml, message", [
    ("<hostdev type='pci'><source/></hostdev>", "missing PCI <address>"),
    ("<hostdev type='pci'><source><address bus='0x100' slot='0'/></source></hostdev>",
     "PCI bus"),
    ("<hostdev type='pci'><source><address bus='zz' slot='0'/></source></hostdev>",
     "bad PCI bus 'zz'"),
    ("<hostdev type='usb'><source><vendor id='0x1'/></source></hostdev>", "<product>"),
    ("<hostdev type='usb'><source/></hostdev>", "<vendor>/<product> or <address>"),
    ("<hostdev type='scsi'><source><adapter name='fc0'/></source></hostdev>", "scsi_hostN"),
    ("<hostdev type='mdev'><source/></hostdev>", "uuid"),
    ("<serial type='dev'/>", "type='dev' without"),
    ("<input type='evdev'/>", "without <source dev"),
    ("<memory model='nvdimm'/>", "without <source><path>"),
])
def test_malformed_devices_are_input_errors(xml: str, message: str) -> None:
    with pytest.raises(InputError, match="devices/") as info:
        refs_of(xml)
    assert message in str(info.value)


@pytest.mark.parametrize("text, value", [("0", 0), ("10", 10), ("0x1F", 31), ("017", 15),
                                         (" 7 ", 7)])
def test_c_uint(text: str, value: int) -> None:
    assert c_uint(text, "n", "here") == value


@pytest.mark.parametrize("text", [None, "", "-1", "+1", "1_0", "0x", "08", "1e3", "٣"])
def test_c_uint_rejects(text: str | None) -> None:
    with pytest.raises(InputError, match="here"):
        c_uint(text, "n", "here")


def test_snippets() -> None:
    refs = snippet_refs(parse_xml("<disk type='block'><source dev='/dev/sdz'/></disk>"))
    assert [(r.source, r.path) for r in refs] == [("disk/source/@dev", "/dev/sdz")]
    assert snippet_refs(parse_xml("<watchdog model='itco'/>")) == []
    with pytest.raises(InputError, match="not a libvirt device"):
        snippet_refs(parse_xml("<cpu/>"))


def test_comments_and_foreign_elements_are_ignored() -> None:
    refs = refs_of("<!-- a comment --><?pi x?><disk type='file'><!-- c -->"
                   "<source file='/a'/></disk><x:y xmlns:x='urn:x'/>")
    assert [r.source for r in refs] == ["devices/disk[1]/source/@file"]
