"""The lab's libvirt configuration files and guest XML, as text."""

from __future__ import annotations

import re
from typing import Sequence
from xml.sax.saxutils import escape, quoteattr

# Categories logged at debug level (a filter matches a substring of the category name):
# util.cgroup ("Controller 'devices' present=yes|no", mkdir of guest cgroups),
# qemu.qemu_cgroup (qemuCgroupAllowDevicePath), util.hook (each hook run),
# qemu.qemu_process (start/stop/reconnect), qemu.qemu_hotplug (attach/detach).
# Everything else stays at the default level (warnings and errors).
LOG_FILTERS = "1:cgroup 1:hook 1:qemu.qemu_process 1:qemu.qemu_hotplug"

LIBVIRTD_CONF = f"""\
# libvirt-bpfcg test lab: root-only unix sockets, no polkit, no TCP
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
log_filters = "{LOG_FILTERS}"
"""

# QEMU as root, unconfined, no ownership games; stdio to files since no virtlogd runs (P9)
QEMU_CONF_BASE = """\
# libvirt-bpfcg test lab
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
"""

# Kept in hooks/qemu at all times: libvirt ignores hooks/qemu.d/* added later unless some
# qemu hook existed when the daemon started (lab README section 4, "Hook pickup"). It drains
# stdin and prints nothing (stdout of some operations would be taken as new XML).
NOOP_HOOK = "#!/bin/sh\nexec cat >/dev/null\n"

LIBVIRT_QEMU_UID = 64055

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def qemu_conf(extra: str = "", namespaces: str | None = None) -> str:
    text = QEMU_CONF_BASE
    if namespaces is not None:
        text += f"namespaces = {namespaces}\n"
    if extra:
        text += extra.rstrip("\n") + "\n"
    return text


def with_libvirt_qemu_user(passwd: str, group: str) -> tuple[str, str]:
    """Copies of /etc/passwd and /etc/group that have a libvirt-qemu entry (P1)."""
    if not any(line.startswith("libvirt-qemu:") for line in passwd.splitlines()):
        passwd = passwd.rstrip("\n") + (
            f"\nlibvirt-qemu:x:{LIBVIRT_QEMU_UID}:{LIBVIRT_QEMU_UID}:"
            "libvirt-bpfcg lab (namespace only):/var/lib/libvirt:/usr/sbin/nologin\n"
        )
    if not any(line.startswith("libvirt-qemu:") for line in group.splitlines()):
        group = group.rstrip("\n") + f"\nlibvirt-qemu:x:{LIBVIRT_QEMU_UID}:\n"
    return passwd, group


def check_guest_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"guest name {name!r}: use letters, digits, '_.+-' (max 64)")
    return name


def disk_target(index: int) -> str:
    """vda, vdb, ... for virtio disks."""
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[index]


def block_disk_xml(source: str, target: str, bus: str = "virtio") -> str:
    return (
        "    <disk type='block' device='disk'>\n"
        "      <driver name='qemu' type='raw'/>\n"
        f"      <source dev={quoteattr(source)}/>\n"
        f"      <target dev={quoteattr(target)} bus={quoteattr(bus)}/>\n"
        "    </disk>\n"
    )


def guest_xml(
    name: str,
    virt_type: str,
    disks: Sequence[str],
    extra_devices_xml: str = "",
    metadata_xml: str = "",
) -> str:
    """A 64 MiB, 1-vCPU firmware-only guest: no <cpu> element (libvirt then passes -cpu
    qemu64; host-model/passthrough abort under this PVM KVM, P6), no NIC, no graphics, a
    serial pty, no balloon. Each disk is a virtio block disk on a block device (vda first).
    A virtio-scsi controller is there for hotplug: SCSI disks hot-unplug without guest
    cooperation, virtio-blk on PCI does not (P8)."""
    check_guest_name(name)
    if len(disks) > 26:
        raise ValueError("at most 26 disks")
    disks_xml = "".join(block_disk_xml(d, disk_target(i)) for i, d in enumerate(disks))
    metadata = f"  <metadata>\n{metadata_xml}\n  </metadata>\n" if metadata_xml else ""
    extra = extra_devices_xml.rstrip("\n") + "\n" if extra_devices_xml else ""
    return (
        f"<domain type={quoteattr(virt_type)}>\n"
        f"  <name>{escape(name)}</name>\n"
        f"{metadata}"
        "  <memory unit='MiB'>64</memory>\n"
        "  <vcpu>1</vcpu>\n"
        "  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\n"
        "  <clock offset='utc'/>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        f"{disks_xml}"
        "    <controller type='scsi' index='0' model='virtio-scsi'/>\n"
        "    <controller type='usb' model='none'/>\n"
        "    <serial type='pty'/>\n"
        "    <memballoon model='none'/>\n"
        f"{extra}"
        "  </devices>\n"
        "</domain>\n"
    )
