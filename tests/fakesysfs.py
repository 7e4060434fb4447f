"""Fake host trees for resolve/policy tests: a sysfs, a /dev with real device nodes, /proc files.

Only the corners the planner reads are modelled, laid out as the kernel lays them out:

* ``bus/pci/devices/DDDD:BB:SS.F/iommu_group -> ../../../kernel/iommu_groups/N``
* ``bus/mdev/devices/UUID/iommu_group``
* ``bus/usb/devices/1-2/{idVendor,idProduct,busnum,devnum}`` (+ an interface ``1-2:1.0``)
* ``bus/scsi/devices/H:B:T:U/scsi_generic/sgN``
* ``devices/virtual/block/NAME/{dev,dm/,slaves/,holders/}`` and partitions below their disk,
  with ``class/block/NAME`` and ``dev/block/MAJ:MIN`` symlinks.

Device nodes under ``root`` are created with mknod (the tests run as root), so the plan
stats real character and block nodes with the numbers the test chose.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

from libvirt_bpfcg.config import Config
from libvirt_bpfcg.resolve import Host


class FakeHost:
    """A scratch host: ``root`` (device nodes), ``sysfs`` and /proc-like files in ``base``."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.root = os.path.join(base, "root")
        self.sysfs = os.path.join(base, "sys")
        self.mountinfo = os.path.join(base, "mountinfo")
        self.swaps = os.path.join(base, "swaps")
        self.proc_devices = os.path.join(base, "devices")
        self.storage = os.path.join(base, "storage")
        for path in (self.root, self.sysfs, self.storage):
            os.makedirs(path, exist_ok=True)
        self._mounts: List[str] = []
        self._swaps: List[str] = []
        self._blocks: Dict[str, Tuple[int, int]] = {}
        self.set_proc_devices(char={1: "mem", 4: "tty", 10: "misc", 136: "pts", 195: "nvidia",
                                    508: "nvidia-uvm", 509: "nvidia-caps"},
                              block={7: "loop", 8: "sd", 253: "device-mapper"})
        self._write_mounts()

    # -- plumbing ---------------------------------------------------------------------------

    def host(self) -> Host:
        return Host(root=self.root, sysfs_root=self.sysfs, proc_devices=self.proc_devices,
                    mountinfo=self.mountinfo, swaps=self.swaps, storage_dirs=(self.storage,))

    def config(self, **overrides: object) -> Config:
        values = dict(sysfs_root=self.sysfs, proc_devices=self.proc_devices,
                      mountinfo=self.mountinfo, swaps=self.swaps,
                      storage_dirs=(self.storage,),
                      qemu_conf=os.path.join(self.base, "qemu.conf"),
                      libvirt_version="9.0.0")
        values.update(overrides)
        return Config(**values)  # type: ignore[arg-type]

    def _sys(self, *parts: str) -> str:
        return os.path.join(self.sysfs, *parts)

    @staticmethod
    def _write(path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)

    @staticmethod
    def _symlink(target: str, link: str) -> None:
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)

    # -- device nodes -----------------------------------------------------------------------

    def node(self, path: str, kind: str, major: int, minor: int) -> str:
        """mknod ``root/path``: kind 'c' or 'b'. Returns the in-guest path."""
        real = self.root + path
        os.makedirs(os.path.dirname(real), exist_ok=True)
        mode = 0o600 | (0o020000 if kind == "c" else 0o060000)
        if os.path.lexists(real):
            os.unlink(real)
        os.mknod(real, mode, os.makedev(major, minor))
        return path

    def file(self, path: str, text: str = "") -> str:
        self._write(self.root + path, text)
        return path

    def link(self, path: str, target: str) -> str:
        """A symlink at ``root/path`` pointing (relatively) to the in-root ``target``."""
        real = self.root + path
        relative = os.path.relpath(self.root + target, os.path.dirname(real))
        self._symlink(relative, real)
        return path

    # -- sysfs ------------------------------------------------------------------------------

    def pci(self, address: str, group: int | None) -> None:
        device = self._sys("devices", "pci0000:00", address)
        os.makedirs(device, exist_ok=True)
        self._symlink(os.path.relpath(device, self._sys("bus", "pci", "devices")),
                      self._sys("bus", "pci", "devices", address))
        if group is not None:
            os.makedirs(self._sys("kernel", "iommu_groups", str(group), "devices"),
                        exist_ok=True)
            self._symlink(os.path.relpath(self._sys("kernel", "iommu_groups", str(group)),
                                          device), os.path.join(device, "iommu_group"))

    def mdev(self, uuid: str, group: int) -> None:
        device = self._sys("devices", "pci0000:00", "0000:00:02.0", uuid)
        os.makedirs(device, exist_ok=True)
        self._symlink(os.path.relpath(device, self._sys("bus", "mdev", "devices")),
                      self._sys("bus", "mdev", "devices", uuid))
        os.makedirs(self._sys("kernel", "iommu_groups", str(group)), exist_ok=True)
        self._symlink(os.path.relpath(self._sys("kernel", "iommu_groups", str(group)), device),
                      os.path.join(device, "iommu_group"))

    def usb(self, name: str, vendor: int, product: int, busnum: int, devnum: int) -> None:
        device = self._sys("devices", "pci0000:00", "0000:00:14.0", "usb1", name)
        for key, value in (("idVendor", f"{vendor:04x}"), ("idProduct", f"{product:04x}"),
                           ("busnum", str(busnum)), ("devnum", str(devnum))):
            self._write(os.path.join(device, key), value + "\n")
        interface = os.path.join(device, f"{name}:1.0")
        os.makedirs(interface, exist_ok=True)
        for entry, target in ((name, device), (f"{name}:1.0", interface)):
            self._symlink(os.path.relpath(target, self._sys("bus", "usb", "devices")),
                          self._sys("bus", "usb", "devices", entry))

    def scsi(self, hctl: str, sg: str | None) -> None:
        device = self._sys("devices", "pci0000:00", "host0", hctl)
        os.makedirs(device, exist_ok=True)
        if sg is not None:
            os.makedirs(os.path.join(device, "scsi_generic", sg), exist_ok=True)
        self._symlink(os.path.relpath(device, self._sys("bus", "scsi", "devices")),
                      self._sys("bus", "scsi", "devices", hctl))

    def block(self, name: str, major: int, minor: int, parent: str | None = None,
              dm: bool = False, slaves: Tuple[str, ...] = ()) -> None:
        """A block device; ``parent`` makes it a partition of that disk."""
        if parent is not None:
            device = os.path.join(self._block_dir(parent), name)
            self._write(os.path.join(device, "partition"), f"{minor}\n")
        else:
            device = self._sys("devices", "virtual", "block", name)
        self._write(os.path.join(device, "dev"), f"{major}:{minor}\n")
        os.makedirs(os.path.join(device, "slaves"), exist_ok=True)
        os.makedirs(os.path.join(device, "holders"), exist_ok=True)
        if dm:
            self._write(os.path.join(device, "dm", "name"), name + "\n")
        self._symlink(os.path.relpath(device, self._sys("class", "block")),
                      self._sys("class", "block", name))
        self._symlink(os.path.relpath(device, self._sys("dev", "block")),
                      self._sys("dev", "block", f"{major}:{minor}"))
        self._blocks[name] = (major, minor)
        for slave in slaves:
            slave_dir = self._block_dir(slave)
            self._symlink(os.path.relpath(slave_dir, os.path.join(device, "slaves")),
                          os.path.join(device, "slaves", slave))
            self._symlink(os.path.relpath(device, os.path.join(slave_dir, "holders")),
                          os.path.join(slave_dir, "holders", name))

    def _block_dir(self, name: str) -> str:
        return os.path.realpath(self._sys("class", "block", name))

    # -- /proc ------------------------------------------------------------------------------

    def mount(self, device: str, where: str, fstype: str = "ext4",
              numbers: Tuple[int, int] | None = None, source: str | None = None) -> None:
        """A mountinfo line for block device ``device`` (its numbers, or ``numbers``)."""
        major, minor = numbers if numbers is not None else self._blocks[device]
        index = len(self._mounts) + 100
        src = source if source is not None else f"/dev/{device}"
        self._mounts.append(f"{index} 1 {major}:{minor} / {where} rw,relatime shared:1 - "
                            f"{fstype} {src} rw")
        self._write_mounts()

    def swap(self, path: str) -> None:
        self._swaps.append(f"{path}                               partition\t1048572\t0\t-2")
        self._write_mounts()

    def _write_mounts(self) -> None:
        base = ["22 1 0:21 / /proc rw,relatime shared:12 - proc proc rw",
                "23 1 0:22 / /sys rw,relatime shared:2 - sysfs sysfs rw"]
        self._write(self.mountinfo, "\n".join(base + self._mounts) + "\n")
        self._write(self.swaps, "\n".join(
            ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"] + self._swaps) + "\n")

    def set_proc_devices(self, char: Dict[int, str], block: Dict[int, str]) -> None:
        lines = ["Character devices:"] + [f"{major:3d} {name}" for major, name in
                                          sorted(char.items())]
        lines += ["", "Block devices:"] + [f"{major:3d} {name}" for major, name in
                                           sorted(block.items())]
        self._write(self.proc_devices, "\n".join(lines) + "\n")

    def pool(self, name: str, pool_type: str, target: str) -> None:
        self._write(os.path.join(self.storage, f"{name}.xml"),
                    f"<pool type='{pool_type}'><name>{name}</name>"
                    f"<target><path>{target}</path></target></pool>\n")
