"""Domain XML → device references, the way libvirt's QEMU driver reads it (pure: no host access).

Each :class:`DeviceRef` is one thing libvirt's ``qemuSetupDevicesCgroup`` would allow (or, for
``skip`` refs, deliberately would not): a path as written in the XML, a fixed rule (PTY
``c 136:*``), or a host lookup to be done by :mod:`resolve` (the IOMMU group of a PCI
address, the ``/dev/sgN`` of a SCSI address, the USB device with a vendor/product id).
``source`` is an XPath-like provenance such as ``devices/disk[2]/source/@dev``.

The table this module implements is ../shared/reference/libvirt-facts.md §3
(qemu_cgroup.c, libvirt ~9.x/10.0). Order follows qemuSetupDevicesCgroup: firmware, disks,
PTY, sound, chardevs, TPMs, hostdevs, memory, graphics, video, inputs, RNGs, SEV.
Extras from our ``<metadata>`` namespace live in :mod:`domain_extras`.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, NamedTuple, Tuple

from lxml import etree

from .errors import InputError
from .rules import Rule

# Where a reference comes from (PlannedDevice.origin).
ORIGIN_ACL = "default-acl"
ORIGIN_DOMAIN = "domain"
ORIGIN_EXTRA = "extra"

# Host lookups resolve.py knows how to do.
LOOKUP_PCI_GROUP = "pci-iommu-group"      # key: ("0000:01:00.0",)
LOOKUP_MDEV_GROUP = "mdev-iommu-group"    # key: (uuid,)
LOOKUP_USB = "usb"                        # key: (vendor, product, bus, device) ints or None
LOOKUP_SCSI_SG = "scsi-generic"           # key: (host, bus, target, unit)
LOOKUP_VOLUME = "storage-volume"          # key: (pool, volume)
LOOKUP_RENDER_NODE = "drm-render-node"    # key: () — libvirt's automatic choice
LOOKUP_CLASS = "device-class"             # key: ("char-nvidia*",)

# Conditions the plan evaluates with qemu.conf (policy.host_audio_allowed).
GATE_SOUND_NOGRAPHICS = "nographics_allow_host_audio"
GATE_SOUND_VNC = "vnc_allow_host_audio"

VFIO_CONTAINER = "/dev/vfio/vfio"
MAPPER_CONTROL = "/dev/mapper/control"
UDMABUF = "/dev/udmabuf"
SEV_DEVICE = "/dev/sev"
SGX_DEVICES = ("/dev/sgx_vepc", "/dev/sgx_provision")
TPM_DEFAULT_DEVICE = "/dev/tpm0"     # virDomainTPMDefParseXML's default
RNG_DEFAULT_SOURCE = "/dev/random"   # what libvirt fills in for <backend model='random'/>
PTY_RULE = Rule("c", 136, None, "rw")
SOUND_RULE = Rule("c", 116, None, "rw")

# Device elements a hotplug snippet may have as its root (libvirt's virDomainDeviceType).
DEVICE_TAGS = frozenset({
    "disk", "controller", "lease", "filesystem", "interface", "input", "sound", "video",
    "hostdev", "graphics", "watchdog", "hub", "redirdev", "smartcard", "serial", "parallel",
    "console", "channel", "memballoon", "nvram", "rng", "shmem", "tpm", "panic", "memory",
    "iommu", "vsock", "audio", "crypto", "pstore", "redirfilter",
})


class Lookup(NamedTuple):
    """A host lookup: what to find (``kind``), the key, and how to name it to a human."""

    kind: str
    key: Tuple
    label: str


class DeviceRef(NamedTuple):
    """One reference to a host device (or a deliberate non-reference, when ``skip`` is set)."""

    source: str                      # provenance, e.g. devices/disk[2]/source/@dev
    kind: str                        # disk, backing, hostdev-pci, chardev, acl, extra-rule …
    access: str                      # r, rw or rwm
    path: str | None = None          # as written in the XML (or libvirt's fixed path)
    lookup: Lookup | None = None     # resolved on the host by resolve.py
    rule: Rule | None = None         # a fixed rule: PTY, sound, metadata rule extras
    required: bool = True            # missing → a problem (False: a finding only)
    skip: str | None = None          # set: no rule by design; the reason why
    note: str = ""                   # why libvirt grants it, shown in the plan's reason
    origin: str = ORIGIN_DOMAIN
    follow_dm: bool = False          # also allow device-mapper targets (disks, firmware)
    gate: str | None = None          # qemu.conf condition (sound)
    late: bool = False               # managed VFIO: the node may appear after prepare


class DomainInfo(NamedTuple):
    name: str | None
    uuid: str | None
    id: int | None

    def to_json(self) -> Dict[str, object]:
        return {"name": self.name, "uuid": self.uuid, "id": self.id}


# ---------------------------------------------------------------------------------------
# Small XML helpers


def attr_of(el: etree._Element | None, name: str) -> str | None:
    """Attribute ``name`` of ``el``, or None when the element itself is missing."""
    return el.get(name) if el is not None else None


def first_child(el: etree._Element | None, tag: str) -> etree._Element | None:
    """First child element named ``tag`` (or None): lxml's find() is 4x slower here."""
    if el is not None:
        for child in el:
            if child.tag == tag:
                return child
    return None


def _text(el: etree._Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    text = el.text.strip()
    return text or None


_C_UINT = re.compile(r"0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*)")


def c_uint(text: str | None, what: str, where: str, maximum: int = 0xFFFFFFFF) -> int:
    """strtoul(text, NULL, 0) as libvirt's virXMLPropUInt does: 0x hex, 0 octal, decimal."""
    match = _C_UINT.fullmatch(text.strip()) if text is not None else None
    if match is None:
        raise InputError(f"{where}: bad {what} {text!r}")
    hexa, octal, decimal = match.groups()
    value = int(hexa, 16) if hexa else int(octal, 8) if octal else int(decimal, 10)
    if value > maximum:
        raise InputError(f"{where}: {what} {text!r} is out of range")
    return value


def pci_address(addr: etree._Element | None, where: str) -> str:
    """``<address domain= bus= slot= function=>`` → ``0000:01:00.0`` (sysfs spelling)."""
    if addr is None:
        raise InputError(f"{where}: missing PCI <address>")
    domain = c_uint(addr.get("domain", "0"), "PCI domain", where)
    bus = c_uint(addr.get("bus"), "PCI bus", where, 0xFF)
    slot = c_uint(addr.get("slot"), "PCI slot", where, 0x1F)
    function = c_uint(addr.get("function", "0"), "PCI function", where, 0x7)
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"


class _Refs:
    """Collects references for one document, with provenance helpers."""

    def __init__(self) -> None:
        self.items: List[DeviceRef] = []
        self.add = self.items.append

    def skip(self, source: str, kind: str, access: str, reason: str,
             path: str | None = None) -> None:
        self.add(DeviceRef(source, kind, access, path=path, required=False, skip=reason))


# ---------------------------------------------------------------------------------------
# Storage: disks, backing chains, mirrors, firmware

_PATH_ATTR = {"file": "file", "block": "dev", "dir": "dir"}
_TYPE_NOTE = {stype: f"disk source type='{stype}'" for stype in _PATH_ATTR}
_LAYER_TAGS = ("source", "backingStore", "dataStore", "readonly", "mirror")


def _layer_children(layer: etree._Element) -> Dict[str, etree._Element]:
    """The children a storage layer may have, in one pass (first of each tag)."""
    found: Dict[str, etree._Element] = {}
    for child in layer:
        tag = child.tag
        if tag in _LAYER_TAGS and tag not in found:
            found[tag] = child
    return found


def _storage_layer(refs: _Refs, layer: etree._Element, kids: Dict[str, etree._Element],
                   loc: str, stype: str, access: str, kind: str, required: bool,
                   removable: bool) -> None:
    """One virStorageSource: what qemuSetupImageCgroupInternal does with it."""
    source = kids.get("source")
    src_loc = f"{loc}/source"
    if stype in _PATH_ATTR:
        attr = _PATH_ATTR[stype]
        path = attr_of(source, attr)
        if path is None and layer.tag == "mirror":
            path = layer.get("file")  # the old <mirror file=...> spelling
            src_loc = loc
        if not path:
            reason = ("empty removable drive (no medium): nothing to allow" if removable
                      else "no source path: nothing to allow")
            refs.skip(loc, kind, access, reason)
            return
        if source is not None and source.get("fdgroup"):
            refs.skip(f"{src_loc}/@{attr}", kind, access,
                      "passed by file descriptor (fdgroup): QEMU never opens the path",
                      path=path)
            return
        refs.add(DeviceRef(f"{src_loc}/@{attr}", kind, access, path, None, None, required,
                           None, _TYPE_NOTE[stype], ORIGIN_DOMAIN, True))
        if source is not None and len(source):
            _reservations(refs, source, src_loc)
        data_store = kids.get("dataStore")
        if data_store is not None:
            _storage_layer(refs, data_store, _layer_children(data_store), f"{loc}/dataStore",
                           data_store.get("type") or "file", access, "data-file", required,
                           False)
    elif stype == "volume":
        pool = attr_of(source, "pool")
        volume = attr_of(source, "volume")
        if not pool or not volume:
            reason = ("empty removable drive (no medium): nothing to allow" if removable
                      else "no pool/volume: nothing to allow")
            refs.skip(loc, kind, access, reason)
            return
        if source.get("mode") == "direct":
            refs.skip(f"{src_loc}/@volume", kind, access,
                      f"volume {pool}/{volume} with mode='direct': QEMU connects over the "
                      "network")
            return
        refs.add(DeviceRef(f"{src_loc}/@volume", kind, access,
                           lookup=Lookup(LOOKUP_VOLUME, (pool, volume),
                                         f"storage volume {pool}/{volume}"),
                           required=required, follow_dm=True))
        _reservations(refs, source, src_loc)
    elif stype == "nvme":
        address = pci_address(first_child(source, "address"), src_loc)
        # managed defaults to yes for NVMe sources (virStorageSourceNVMeDef).
        managed = source is not None and source.get("managed") != "no"
        note = "type='nvme': rw even when readonly (QEMU's ioctls count as writes)"
        _vfio_group(refs, f"{src_loc}/address", loc, "nvme", address,
                    f"IOMMU group of NVMe PCI {address}", note, required, managed)
    elif stype == "network":
        protocol = attr_of(source, "protocol")
        refs.skip(loc, kind, access,
                  f"network disk (protocol {protocol or '?'}): QEMU connects over the network")
    elif stype == "vhostuser":
        refs.skip(loc, kind, access, "vhost-user disk: a socket, not a device node")
    elif stype == "vhostvdpa":
        path = attr_of(source, "dev")
        refs.skip(loc, kind, access,
                  "vhost-vdpa disk: libvirt opens the device and passes the descriptor",
                  path=path)
    else:
        refs.skip(loc, kind, access, f"disk type {stype!r}: not local storage")


def _reservations(refs: _Refs, source: etree._Element | None, src_loc: str) -> None:
    pr = first_child(source, "reservations")
    if pr is not None and pr.get("managed") == "yes":
        refs.add(DeviceRef(f"{src_loc}/reservations/@managed", "pr-helper", "rw",
                           path=MAPPER_CONTROL, required=False,
                           note="managed persistent reservations (qemu-pr-helper); "
                                "libvirt skips it when absent"))


def _backing_chain(refs: _Refs, kids: Dict[str, etree._Element], loc: str,
                   required: bool) -> None:
    """Every <backingStore> layer below a layer: read-only (qemuSetupImageChainCgroup)."""
    store = kids.get("backingStore")
    # <backingStore/> without type ends the chain (libvirt's "no backing" marker).
    while store is not None and store.get("type"):
        loc += "/backingStore"
        kids = _layer_children(store)
        _storage_layer(refs, store, kids, loc, store.get("type") or "file", "r", "backing",
                       required, False)
        store = kids.get("backingStore")


def _disk(refs: _Refs, el: etree._Element, loc: str) -> None:
    stype = el.get("type") or "file"
    device = el.get("device") or "disk"
    kids = _layer_children(el)
    # libvirt forces CD-ROMs read-only (virDomainDiskDefParseXML).
    readonly = device == "cdrom" or "readonly" in kids
    source = kids.get("source")
    optional = source is not None and source.get("startupPolicy") == "optional"
    removable = device in ("cdrom", "floppy")
    _storage_layer(refs, el, kids, loc, stype, "r" if readonly else "rw", "disk",
                   not optional, removable)
    if "backingStore" in kids:
        _backing_chain(refs, kids, loc, not optional)
    mirror = kids.get("mirror")
    if mirror is not None:
        # An active block-copy job (live XML): its destination is written.
        mloc = f"{loc}/mirror"
        mkids = _layer_children(mirror)
        _storage_layer(refs, mirror, mkids, mloc, mirror.get("type") or "file", "rw",
                       "mirror", True, False)
        _backing_chain(refs, mkids, mloc, True)


def _os_firmware(refs: _Refs, os_el: etree._Element) -> None:
    """qemuSetupFirmwareCgroup: loader and nvram, only when they are device nodes.

    Firmware files are regular files almost always; the nvram file is created from its
    template after the prepare hook, so neither is ever a problem when missing.
    """
    loader = first_child(os_el, "loader")
    path = _text(loader)
    if path:
        access = "r" if loader.get("readonly") == "yes" else "rw"
        refs.add(DeviceRef("os/loader", "loader", access, path=path, required=False,
                           follow_dm=True, note="firmware loader"))
    nvram = first_child(os_el, "nvram")
    if nvram is None:
        return
    ntype = nvram.get("type")
    source = first_child(nvram, "source")
    if ntype in ("file", "block") and source is not None:
        attr = _PATH_ATTR[ntype]
        path = source.get(attr)
        loc = f"os/nvram/source/@{attr}"
    elif ntype == "network":
        refs.skip("os/nvram", "nvram", "rw", "network NVRAM: QEMU connects over the network")
        return
    else:
        path = _text(nvram)
        loc = "os/nvram"
    if path:
        refs.add(DeviceRef(loc, "nvram", "rw", path=path, required=False, follow_dm=True,
                           note="UEFI variable store (created from its template at start)"))


# ---------------------------------------------------------------------------------------
# Host devices


def _vfio_group(refs: _Refs, source: str, container_source: str, kind: str, address: str,
                label: str, note: str, required: bool, managed: bool) -> None:
    """/dev/vfio/<IOMMU group> and /dev/vfio/vfio for a PCI device used through VFIO.

    For a managed device the nodes may not exist yet when the hook plans at prepare time
    (libvirt switches the driver later): a missing node is then a finding, not a problem
    (``late``); a PCI device or IOMMU group missing from sysfs still is one.
    """
    refs.add(DeviceRef(source, kind, "rw", lookup=Lookup(LOOKUP_PCI_GROUP, (address,), label),
                       required=required, note=note, late=managed))
    refs.add(DeviceRef(container_source, "vfio-container", "rw", path=VFIO_CONTAINER,
                       required=required, late=managed,
                       note="VFIO container, needed by every VFIO device"))


def _vfio_pci(refs: _Refs, el: etree._Element, loc: str, kind: str) -> None:
    driver = first_child(el, "driver")
    name = attr_of(driver, "name")
    source = first_child(el, "source")
    address = pci_address(first_child(source, "address"), f"{loc}/source")
    if name in ("kvm", "xen"):
        refs.skip(f"{loc}/driver/@name", kind, "rw",
                  f"legacy <driver name='{name}'> assignment: no VFIO device to allow")
        return
    if driver is not None and driver.get("iommufd") == "yes":
        refs.skip(f"{loc}/driver/@iommufd", kind, "rw",
                  f"iommufd='yes' for PCI {address}: libvirt opens /dev/iommu and the VFIO "
                  "device itself and passes the descriptors")
        return
    _vfio_group(refs, f"{loc}/source/address", loc, kind, address,
                f"IOMMU group of PCI {address}", "", True, el.get("managed") == "yes")


def _hostdev(refs: _Refs, el: etree._Element, loc: str) -> None:
    mode = el.get("mode") or "subsystem"
    htype = el.get("type") or ""
    if mode != "subsystem":
        refs.skip(loc, "hostdev", "rw",
                  f"<hostdev mode='{mode}'> is an LXC feature; QEMU does not use it")
        return
    source = first_child(el, "source")
    if htype == "pci":
        _vfio_pci(refs, el, loc, "hostdev-pci")
    elif htype == "usb":
        _hostdev_usb(refs, source, loc)
    elif htype == "scsi":
        if source is not None and source.get("protocol") == "iscsi":
            refs.skip(loc, "hostdev-scsi", "rw",
                      "iSCSI hostdev: QEMU connects over the network")
            return
        access = "r" if first_child(el, "readonly") is not None else "rw"
        adapter = first_child(source, "adapter")
        name = attr_of(adapter, "name")
        if not name or not name.startswith("scsi_host"):
            raise InputError(f"{loc}/source/adapter: expected name='scsi_hostN', got {name!r}")
        host = c_uint(name[len("scsi_host"):], "SCSI host number", f"{loc}/source/adapter")
        addr = first_child(source, "address")
        if addr is None:
            raise InputError(f"{loc}/source: missing SCSI <address>")
        where = f"{loc}/source/address"
        key = (host, c_uint(addr.get("bus"), "SCSI bus", where),
               c_uint(addr.get("target"), "SCSI target", where),
               c_uint(addr.get("unit"), "SCSI unit", where))
        refs.add(DeviceRef(where, "hostdev-scsi", access,
                           lookup=Lookup(LOOKUP_SCSI_SG, key,
                                         "SCSI generic device of {}:{}:{}:{}".format(*key)),
                           note="SCSI hostdev" + (", <readonly/>" if access == "r" else "")))
    elif htype == "scsi_host":
        refs.skip(loc, "hostdev-scsi", "rw",
                  "vhost-scsi: libvirt opens /dev/vhost-scsi itself and passes the descriptor")
    elif htype == "mdev":
        addr = first_child(source, "address")
        uuid = attr_of(addr, "uuid")
        if not uuid:
            raise InputError(f"{loc}/source: missing mediated device <address uuid=...>")
        refs.add(DeviceRef(f"{loc}/source/address/@uuid", "hostdev-mdev", "rw",
                           lookup=Lookup(LOOKUP_MDEV_GROUP, (uuid,),
                                         f"IOMMU group of mediated device {uuid}")))
        refs.add(DeviceRef(loc, "vfio-container", "rw", path=VFIO_CONTAINER,
                           note="VFIO container, needed by every VFIO device"))
    else:
        refs.skip(loc, "hostdev", "rw", f"hostdev type {htype!r}: nothing libvirt allows")


def _hostdev_usb(refs: _Refs, source: etree._Element | None, loc: str) -> None:
    if source is None:
        raise InputError(f"{loc}: missing <source>")
    optional = source.get("startupPolicy") == "optional"
    vendor_el, product_el = first_child(source, "vendor"), first_child(source, "product")
    addr = first_child(source, "address")
    where = f"{loc}/source"
    vendor = product = bus = device = None
    if vendor_el is not None:
        vendor = c_uint(vendor_el.get("id"), "USB vendor id", f"{where}/vendor", 0xFFFF)
        if product_el is None:
            raise InputError(f"{where}: <vendor> without <product>")
        product = c_uint(product_el.get("id"), "USB product id", f"{where}/product", 0xFFFF)
    if addr is not None:
        bus = c_uint(addr.get("bus"), "USB bus", f"{where}/address")
        device = c_uint(addr.get("device"), "USB device", f"{where}/address")
    if vendor is None and bus is None:
        raise InputError(f"{where}: USB hostdev needs <vendor>/<product> or <address>")
    note = "USB hostdev" + (" (startupPolicy='optional')" if optional else "")
    if vendor is None:
        refs.add(DeviceRef(f"{where}/address", "hostdev-usb", "rw",
                           path=f"/dev/bus/usb/{bus:03d}/{device:03d}",
                           required=not optional, note=note))
        return
    label = f"USB device {vendor:04x}:{product:04x}"
    if bus is not None:
        label += f" at bus {bus} device {device}"
    refs.add(DeviceRef(f"{where}/vendor", "hostdev-usb", "rw",
                       lookup=Lookup(LOOKUP_USB, (vendor, product, bus, device), label),
                       required=not optional, note=note))


def _interface(refs: _Refs, el: etree._Element, loc: str) -> None:
    itype = el.get("type")
    if itype == "hostdev":
        _vfio_pci(refs, el, loc, "interface-hostdev")
    elif itype == "vdpa":
        source = first_child(el, "source")
        refs.skip(loc, "interface", "rw",
                  "vDPA interface: libvirt opens the device and passes the descriptor",
                  path=attr_of(source, "dev"))


# ---------------------------------------------------------------------------------------
# Character devices, TPM, input, RNG, memory, graphics, video


def _chardev(refs: _Refs, el: etree._Element, loc: str) -> None:
    if el.get("type") != "dev":
        return
    source = first_child(el, "source")
    path = attr_of(source, "path")
    if not path:
        raise InputError(f"{loc}: type='dev' without <source path=...>")
    refs.add(DeviceRef(f"{loc}/source/@path", "chardev", "rw", path=path,
                       note=f"<{el.tag} type='dev'>"))


def _tpm(refs: _Refs, el: etree._Element, loc: str) -> None:
    backend = first_child(el, "backend")
    btype = attr_of(backend, "type")
    if btype == "passthrough":
        device = first_child(backend, "device")
        path = attr_of(device, "path")
        if path:
            src = f"{loc}/backend/device/@path"
        else:
            path, src = TPM_DEFAULT_DEVICE, f"{loc}/backend"
        refs.add(DeviceRef(src, "tpm", "rw", path=path, note="TPM passthrough"))
    elif btype in ("emulator", "external"):
        refs.skip(f"{loc}/backend", "tpm", "rw",
                  f"TPM {btype}: swtpm behind a socket, no device node")


def _input(refs: _Refs, el: etree._Element, loc: str) -> None:
    itype = el.get("type")
    attr = {"evdev": "dev", "passthrough": "evdev"}.get(itype or "")
    if attr is None:
        return
    source = first_child(el, "source")
    path = attr_of(source, attr)
    if not path:
        raise InputError(f"{loc}: type='{itype}' without <source {attr}=...>")
    refs.add(DeviceRef(f"{loc}/source/@{attr}", "input", "rw", path=path,
                       note=f"<input type='{itype}'>"))


def _rng(refs: _Refs, el: etree._Element, loc: str) -> None:
    backend = first_child(el, "backend")
    model = attr_of(backend, "model")
    if model == "random":
        path = _text(backend)
        src = f"{loc}/backend"
        note = "RNG backend model='random'"
        if not path:
            path, note = RNG_DEFAULT_SOURCE, note + " (libvirt's default source)"
        refs.add(DeviceRef(src, "rng", "rw", path=path, note=note))
    elif model:
        refs.skip(f"{loc}/backend", "rng", "rw",
                  f"RNG backend model='{model}': no device node for QEMU")


def _memory(refs: _Refs, el: etree._Element, loc: str) -> None:
    model = el.get("model")
    if model in ("nvdimm", "virtio-pmem"):
        path = _text(first_child(first_child(el, "source"), "path"))
        if not path:
            raise InputError(f"{loc}: model='{model}' without <source><path>")
        refs.add(DeviceRef(f"{loc}/source/path", "memory", "rw", path=path,
                           note=f"<memory model='{model}'> backing (a rule only for a device "
                                "node such as /dev/pmem0 or /dev/dax0.0)"))
    elif model == "sgx-epc":
        for path in SGX_DEVICES:
            refs.add(DeviceRef(loc, "sgx", "rw", path=path, required=False,
                               note="SGX EPC (libvirt skips it when absent)"))


def _render_node_wanted(el: etree._Element) -> bool:
    """virDomainGraphicsNeedsAutoRenderNode: does libvirt pick a render node itself?"""
    gtype = el.get("type")
    gl = first_child(el, "gl")
    if gtype == "egl-headless":
        return True
    if gtype in ("spice", "dbus"):
        return gl is not None and gl.get("enable") == "yes"
    return False


def _graphics(refs: _Refs, el: etree._Element, loc: str) -> None:
    gl = first_child(el, "gl")
    rendernode = attr_of(gl, "rendernode")
    if rendernode and el.get("type") in ("spice", "egl-headless", "dbus"):
        refs.add(DeviceRef(f"{loc}/gl/@rendernode", "rendernode", "rw", path=rendernode,
                           note="graphics render node"))
    elif _render_node_wanted(el):
        refs.add(DeviceRef(f"{loc}/gl", "rendernode", "rw",
                           lookup=Lookup(LOOKUP_RENDER_NODE, (),
                                         "the DRM render node libvirt picks at start"),
                           required=False,
                           note="no rendernode given: libvirt picks the first one at start"))


def _video(refs: _Refs, el: etree._Element, loc: str) -> None:
    model = first_child(el, "model")
    if model is None:
        return
    accel = first_child(model, "acceleration")
    rendernode = attr_of(accel, "rendernode")
    if rendernode:
        refs.add(DeviceRef(f"{loc}/model/acceleration/@rendernode", "rendernode", "rw",
                           path=rendernode, note="video acceleration render node"))
    if model.get("blob") == "on":
        refs.add(DeviceRef(f"{loc}/model/@blob", "udmabuf", "rw", path=UDMABUF,
                           note="blob resources need udmabuf"))


def _sound(refs: _Refs, loc: str, first_graphics: str | None, has_graphics: bool) -> None:
    """qemuSetupDevicesCgroup: c 116:* only under libvirt's host-audio conditions."""
    note = "host audio (ALSA) for <sound>"
    if not has_graphics:
        refs.add(DeviceRef(loc, "sound", "rw", rule=SOUND_RULE, gate=GATE_SOUND_NOGRAPHICS,
                           note=note + " with no graphics"))
    elif first_graphics == "vnc":
        refs.add(DeviceRef(loc, "sound", "rw", rule=SOUND_RULE, gate=GATE_SOUND_VNC,
                           note=note + " with VNC as first graphics"))
    elif first_graphics == "sdl":
        refs.add(DeviceRef(loc, "sound", "rw", rule=SOUND_RULE,
                           note=note + " with SDL as first graphics"))
    else:
        refs.add(DeviceRef(loc, "sound", "rw", rule=SOUND_RULE, required=False,
                           skip=f"first <graphics> is {first_graphics!r}: libvirt allows "
                                "c 116:* only with no graphics, VNC or SDL"))


def _launch_security(refs: _Refs, el: etree._Element) -> None:
    stype = el.get("type")
    if stype == "sev":
        refs.add(DeviceRef("launchSecurity/@type", "sev", "rw", path=SEV_DEVICE,
                           note="AMD SEV"))
    elif stype == "sev-snp":
        # libvirt 9.x only grants /dev/sev for type='sev'; QEMU's sev-snp-guest opens it
        # too, so newer libvirt must allow it. Not required: libvirt reports it itself.
        refs.add(DeviceRef("launchSecurity/@type", "sev", "rw", path=SEV_DEVICE,
                           required=False, note="AMD SEV-SNP (QEMU opens /dev/sev)"))


_Handler = Callable[[_Refs, etree._Element, str], None]

_DEVICE_HANDLERS: Dict[str, _Handler] = {
    "disk": _disk,
    "hostdev": _hostdev,
    "interface": _interface,
    "serial": _chardev,
    "parallel": _chardev,
    "console": _chardev,
    "channel": _chardev,
    "tpm": _tpm,
    "input": _input,
    "rng": _rng,
    "memory": _memory,
    "graphics": _graphics,
    "video": _video,
}


# ---------------------------------------------------------------------------------------
# Entry points


def domain_info(root: etree._Element) -> DomainInfo:
    name = _text(first_child(root, "name"))
    uuid = _text(first_child(root, "uuid"))
    raw_id = root.get("id")
    dom_id: int | None = None
    if raw_id is not None:
        try:
            dom_id = int(raw_id)
        except ValueError:
            raise InputError(f"domain/@id: bad domain id {raw_id!r}") from None
    return DomainInfo(name, uuid, dom_id)


_ORDER_FIRST = ("disk",)
_ORDER_REST = ("serial", "parallel", "channel", "console", "tpm", "hostdev", "interface",
               "memory", "graphics", "video", "input", "rng")
# Devices whose type decides alone that libvirt allows nothing for them (a pty serial, a
# bridged NIC, a tablet) are dropped while sorting, before any Python work on them.
_TYPES_THAT_MATTER = {
    "serial": frozenset({"dev"}), "parallel": frozenset({"dev"}),
    "channel": frozenset({"dev"}), "console": frozenset({"dev"}),
    "interface": frozenset({"hostdev", "vdpa"}),
    "input": frozenset({"evdev", "passthrough"}),
}


_SORTED_TAGS = tuple(_DEVICE_HANDLERS) + ("sound",)


def domain_refs(root: etree._Element) -> List[DeviceRef]:
    """All references of a ``<domain>`` element (metadata extras excluded)."""
    refs = _Refs()
    os_el = first_child(root, "os")
    if os_el is not None:
        _os_firmware(refs, os_el)
    # Sort the devices libvirt may turn into cgroup entries by tag, in document order
    # (a position in its list is the element's index among same-tag siblings). lxml
    # filters the tags in C: NICs' neighbours such as controllers cost nothing.
    buckets: Dict[str, List[etree._Element]] = {tag: [] for tag in _SORTED_TAGS}
    devices = first_child(root, "devices")
    if devices is not None:
        for child in devices.iterchildren(*_SORTED_TAGS):
            buckets[child.tag].append(child)
    # qemuSetupDevicesCgroup's order: disks, PTY, sound, chardevs, TPMs, hostdevs, …
    _run(refs, buckets, _ORDER_FIRST)
    refs.add(DeviceRef("libvirt:pty", "pty", "rw", rule=PTY_RULE,
                       note="libvirt allows every guest its pseudo-terminals"))
    if buckets["sound"]:
        graphics = buckets["graphics"]
        _sound(refs, "devices/sound[1]", graphics[0].get("type") if graphics else None,
               bool(graphics))
    _run(refs, buckets, _ORDER_REST)
    security = first_child(root, "launchSecurity")
    if security is not None:
        _launch_security(refs, security)
    return refs.items


def _run(refs: _Refs, buckets: Dict[str, List[etree._Element]],
         tags: Tuple[str, ...]) -> None:
    for tag in tags:
        elements = buckets[tag]
        if not elements:
            continue
        handler = _DEVICE_HANDLERS[tag]
        wanted = _TYPES_THAT_MATTER.get(tag)
        for n, child in enumerate(elements, 1):
            if wanted is None or child.get("type") in wanted:
                handler(refs, child, f"devices/{tag}[{n}]")


def snippet_refs(el: etree._Element) -> List[DeviceRef]:
    """References of one device element (a hotplug snippet such as ``<disk>``).

    Provenance is relative to the snippet: ``disk/source/@dev``. PTY, sound and the
    default ACL are properties of the whole domain and are not part of a snippet's plan.
    """
    tag = el.tag if isinstance(el.tag, str) else ""
    if tag not in DEVICE_TAGS:
        raise InputError(f"<{tag or '?'}> is not a libvirt device element")
    refs = _Refs()
    handler = _DEVICE_HANDLERS.get(tag)
    if handler is not None:
        handler(refs, el, tag)
    return refs.items
