"""Device references → rules, by looking at the host: stat, sysfs, /proc, storage pools.

Everything host-dependent hangs off one :class:`Host`, whose roots are parameters so tests
can build fake trees: ``root`` prefixes every device path we stat (``/`` on a real host),
``sysfs_root`` replaces ``/sys``; /proc files and libvirt's storage-pool directories are
paths too. A Host caches what it read for its own lifetime, so make one per plan.

``resolve(ref, host)`` returns one :class:`Resolved` per resulting row: the reference itself
first, then derived rows (device-mapper targets, one per driver of a device class).
Statuses: ``ok`` (a rule), ``missing``, ``not-a-device`` (regular file, directory, socket …),
``skipped`` (deliberately no rule) and ``lookup-failed`` (the host could not answer).
"""

from __future__ import annotations

import fnmatch
import os
import stat
from typing import Dict, List, NamedTuple, Tuple

from lxml import etree

from . import domain as dm
from .cgroup import unescape_mountinfo
from .domain import DeviceRef
from .errors import RuleError
from .rules import Rule

# Process-wide intern table for rules (see Host.rule).
_RULES: Dict[Tuple[str, int | None, int | None, str], Rule] = {}
_RULES_MAX = 4096

OK = "ok"
MISSING = "missing"
NOT_A_DEVICE = "not-a-device"
SKIPPED = "skipped"
FORBIDDEN = "forbidden"
LOOKUP_FAILED = "lookup-failed"
STATUSES = (OK, MISSING, NOT_A_DEVICE, SKIPPED, FORBIDDEN, LOOKUP_FAILED)

_NOT_A_DEVICE_REASON = {
    mode: f"{kind}: no rule needed" for mode, kind in (
        (stat.S_IFREG, "a regular file"), (stat.S_IFDIR, "a directory"),
        (stat.S_IFSOCK, "a socket"), (stat.S_IFIFO, "a FIFO"))}
# Pool types whose volumes live at <target><path>/<volume name>.
_PATH_POOLS = {"dir", "fs", "netfs", "logical", "disk", "zfs"}


class Resolved(NamedTuple):
    status: str
    rule: Rule | None
    reason: str
    path: str | None = None        # the path looked at (derived paths for lookups)
    source_suffix: str = ""        # for derived rows: appended to the ref's source
    kind: str | None = None        # for derived rows: their own kind


class Host:
    """The host as seen by one plan, with overridable roots and per-instance caches."""

    def __init__(self, *, root: str = "/", sysfs_root: str = "/sys",
                 proc_devices: str = "/proc/devices",
                 mountinfo: str = "/proc/self/mountinfo", swaps: str = "/proc/swaps",
                 storage_dirs: Tuple[str, ...] = ("/run/libvirt/storage",
                                                  "/etc/libvirt/storage")) -> None:
        self.root = root.rstrip("/")
        self.sysfs_root = sysfs_root.rstrip("/") or "/"
        self.proc_devices = proc_devices
        self.mountinfo = mountinfo
        self.swaps = swaps
        self.storage_dirs = tuple(storage_dirs)
        self._in_use: Dict[Tuple[int, int], str] | None = None
        self._proc: List[Tuple[str, int, str]] | None = None
        self._stats: Dict[Tuple[str, str], Resolved] = {}
        self._dm_majors: Dict[int, bool] = {}

    @classmethod
    def from_config(cls, config: object, root: str = "/") -> Host:
        return cls(root=root, sysfs_root=config.sysfs_root,  # type: ignore[attr-defined]
                   proc_devices=config.proc_devices,  # type: ignore[attr-defined]
                   mountinfo=config.mountinfo,  # type: ignore[attr-defined]
                   swaps=config.swaps,  # type: ignore[attr-defined]
                   storage_dirs=config.storage_dirs)  # type: ignore[attr-defined]

    # -- small helpers ------------------------------------------------------------------

    def host_path(self, path: str) -> str:
        """Where ``path`` (as the guest's XML names it) is on this Host's file system."""
        return self.root + path if self.root else path

    def sys(self, *parts: str) -> str:
        return os.path.join(self.sysfs_root, *parts)

    def rule(self, dev_type: str, major: int | None, minor: int | None, access: str) -> Rule:
        """Rules are immutable values that plans repeat: build each once per process."""
        key = (dev_type, major, minor, access)
        rule = _RULES.get(key)
        if rule is None:
            if len(_RULES) >= _RULES_MAX:
                _RULES.clear()  # a long-running watcher meets many devices: stay bounded
            rule = _RULES[key] = Rule(dev_type, major, minor, access)
        return rule

    def read_sys(self, *parts: str) -> str | None:
        text = _read(self.sys(*parts))
        return text.strip() if text is not None else None

    def block_dev_numbers(self, name: str) -> Tuple[int, int] | None:
        """``sda1`` → (8, 1) from /sys/class/block/NAME/dev."""
        return _dev_numbers(self.read_sys("class", "block", name, "dev"))

    def proc_devices_table(self) -> List[Tuple[str, int, str]]:
        """``[(type, major, name)]`` from /proc/devices; RuleError when unreadable."""
        if self._proc is None:
            text = _read(self.proc_devices)
            if text is None:
                raise RuleError(f"{self.proc_devices}: cannot read")
            self._proc = parse_proc_devices(text)
        return self._proc

    # -- stat -----------------------------------------------------------------------------

    def stat_path(self, path: str, access: str) -> Resolved:
        """libvirt's virCgroupAllowDevicePath: stat (following symlinks), devices only.

        Cached per (path, access): guests name /dev/null, /dev/urandom or /dev/vfio/vfio
        many times, and one plan is one snapshot of the host.
        """
        key = (path, access)
        found = self._stats.get(key)
        if found is None:
            found = self._stats[key] = self._stat_path(path, access)
        return found

    def _stat_path(self, path: str, access: str) -> Resolved:
        if not path.startswith("/"):
            return Resolved(SKIPPED, None, f"relative path {path!r}: only libvirt can "
                            "resolve it; no rule", path)
        real = self.host_path(path)
        link = False
        try:
            # lstat first: one syscall for the usual non-symlink, and we learn whether to
            # say where a by-id / by-path / mapper link points.
            st = os.lstat(real)
            if stat.S_ISLNK(st.st_mode):
                link = True
                st = os.stat(real)
        except FileNotFoundError:
            return Resolved(MISSING, None, "no such file or device node", path)
        except NotADirectoryError:
            return Resolved(MISSING, None, "a parent of the path is not a directory", path)
        except PermissionError:
            # libvirt passes ignoreEacces for disk images (root-squashed NFS) and moves on.
            return Resolved(SKIPPED, None, "permission denied to stat it (root-squashed "
                            "NFS?): libvirt skips it as well", path)
        except OSError as exc:
            return Resolved(LOOKUP_FAILED, None, f"cannot stat: {exc.strerror}", path)
        except ValueError:
            return Resolved(LOOKUP_FAILED, None, "invalid path (NUL byte)", path)
        mode = st.st_mode
        if stat.S_ISBLK(mode):
            dev_type, what = "b", "block device"
        elif stat.S_ISCHR(mode):
            dev_type, what = "c", "character device"
        else:
            return Resolved(NOT_A_DEVICE, None, _NOT_A_DEVICE_REASON.get(
                stat.S_IFMT(mode), "not a device node: no rule needed"), path)
        rule = self.rule(dev_type, os.major(st.st_rdev), os.minor(st.st_rdev), access)
        reason = what
        if link:
            target = os.path.realpath(real)
            if self.root and target.startswith(self.root + "/"):
                target = target[len(self.root):]
            reason = f"{what} {target}"
        return Resolved(OK, rule, reason, path)

    # -- block device usage (guardrails) ---------------------------------------------------

    def in_use_block_devices(self) -> Dict[Tuple[int, int], str]:
        """Block devices the host itself uses → why: mounted, swap, or under one of those.

        Walks down from each mounted or swap device through its device-mapper/md slaves
        and from partitions to their disk, so a whole disk holding a mounted partition, a
        PV under a mounted LV and a member of a mounted RAID all count as in use.
        """
        if self._in_use is None:
            self._in_use = self._compute_in_use()
        return self._in_use

    def _compute_in_use(self) -> Dict[Tuple[int, int], str]:
        used: Dict[Tuple[int, int], str] = {}
        for numbers, why in self._mounted() + self._swapped():
            used.setdefault(numbers, why)
        todo = list(used)
        while todo:
            numbers = todo.pop()
            why = used[numbers]
            base = self.sys("dev", "block", f"{numbers[0]}:{numbers[1]}")
            try:
                # ../../devices/…/block/sda/sda2: the name, and the disk of a partition.
                target = os.readlink(base)
            except OSError:
                continue
            me = os.path.basename(target)
            below: List[Tuple[Tuple[int, int], str]] = []
            try:
                slaves = os.listdir(os.path.join(base, "slaves"))
            except OSError:
                slaves = []
            for name in slaves:
                found = self.block_dev_numbers(name)
                if found:
                    below.append((found, f"{name} is under {me}, {why}"))
            if os.path.exists(os.path.join(base, "partition")):
                parent = os.path.normpath(os.path.join(os.path.dirname(base),
                                                       os.path.dirname(target)))
                found = _dev_numbers(_read(os.path.join(parent, "dev")))
                if found:
                    below.append((found, f"{os.path.basename(parent)} holds partition "
                                         f"{me}, {why}"))
            for found, reason in below:
                if found not in used:
                    used[found] = reason
                    todo.append(found)
        return used

    def _mounted(self) -> List[Tuple[Tuple[int, int], str]]:
        result: List[Tuple[Tuple[int, int], str]] = []
        text = _read(self.mountinfo)
        if text is None:
            return result
        for line in text.splitlines():
            fields = line.split(" ", 5)
            if len(fields) < 6:
                continue
            numbers = _dev_numbers(fields[2])
            if numbers is None:
                continue
            if numbers[0] == 0:
                # btrfs and friends report an anonymous 0:N: use the mount source instead.
                _, sep, tail = line.partition(" - ")
                source = tail.split(" ", 2)[1] if sep and tail.count(" ") >= 1 else ""
                if not source.startswith("/dev/"):
                    continue
                found = self._block_rdev(unescape_mountinfo(source))
                if found is None:
                    continue
                numbers = found
            result.append((numbers, f"mounted on {unescape_mountinfo(fields[4])}"))
        return result

    def _swapped(self) -> List[Tuple[Tuple[int, int], str]]:
        result: List[Tuple[Tuple[int, int], str]] = []
        text = _read(self.swaps)
        if text is None:
            return result
        for line in text.splitlines()[1:]:
            fields = line.split()
            if fields:
                found = self._block_rdev(unescape_mountinfo(fields[0]))
                if found:
                    result.append((found, "in use as swap"))
        return result

    def _block_rdev(self, path: str) -> Tuple[int, int] | None:
        try:
            st = os.stat(self.host_path(path))
        except (OSError, ValueError):
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        return os.major(st.st_rdev), os.minor(st.st_rdev)

    # -- device-mapper targets -------------------------------------------------------------

    def dm_targets(self, major: int, minor: int) -> List[Tuple[str, Tuple[int, int]]]:
        """virDevMapperGetTargets: every device below a dm device, recursively."""
        # device-mapper owns one major: one look per major tells loop, sd, nvme … apart.
        is_dm = self._dm_majors.get(major)
        if is_dm is None:
            is_dm = self._dm_majors[major] = os.path.isdir(
                self.sys("dev", "block", f"{major}:{minor}", "dm"))
        if not is_dm:
            return []
        result: List[Tuple[str, Tuple[int, int]]] = []
        seen = {(major, minor)}
        todo = [(major, minor)]
        while todo:
            numbers = todo.pop(0)
            base = self.sys("dev", "block", f"{numbers[0]}:{numbers[1]}")
            if not os.path.isdir(os.path.join(base, "dm")):
                continue
            try:
                slaves = sorted(os.listdir(os.path.join(base, "slaves")))
            except OSError:
                continue
            for name in slaves:
                found = self.block_dev_numbers(name)
                if found and found not in seen:
                    seen.add(found)
                    result.append((name, found))
                    todo.append(found)
        return result


def _read(path: str) -> str | None:
    """A small file's text, or None. Binary read + decode: for /proc and sysfs files a text
    wrapper costs more than the read."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def parse_proc_devices(text: str) -> List[Tuple[str, int, str]]:
    """The two tables of /proc/devices: ``Character devices:`` and ``Block devices:``."""
    result: List[Tuple[str, int, str]] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("Character"):
            section = "c"
        elif line.startswith("Block"):
            section = "b"
        elif section:
            number, _, name = line.strip().partition(" ")
            if number.isdigit():
                result.append((section, int(number), name.strip()))
    return result


def _dev_numbers(text: str | None) -> Tuple[int, int] | None:
    if not text:
        return None
    major, sep, minor = text.strip().partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


# ---------------------------------------------------------------------------------------
# Resolution of one reference


def resolve(ref: DeviceRef, host: Host) -> List[Resolved]:
    """Rows for one reference: itself first, then rows derived from it."""
    if ref.skip is not None:
        return [Resolved(SKIPPED, None, ref.skip, ref.path)]
    if ref.rule is not None:
        return [Resolved(OK, ref.rule, "fixed rule", None)]
    if ref.lookup is not None:
        return _LOOKUPS[ref.lookup.kind](ref, host)
    if ref.path is None:
        return [Resolved(SKIPPED, None, "nothing to resolve", None)]
    first = host.stat_path(ref.path, ref.access)
    rows = [first]
    if ref.follow_dm and first.rule is not None and first.rule.type == "b":
        rows.extend(dm_rows(first.rule, ref.access, host))
    return rows


def dm_rows(rule: Rule, access: str, host: Host) -> List[Resolved]:
    """Rows for the device-mapper targets below block device ``rule`` (often none)."""
    rows = []
    for name, (major, minor) in host.dm_targets(rule.major or 0, rule.minor or 0):
        rows.append(Resolved(OK, host.rule("b", major, minor, access),
                             f"device-mapper target {name} of b {rule.numbers}",
                             f"/dev/{name}", f" (dm target {name})", "dm-target"))
    return rows


def _derived(ref: DeviceRef, host: Host, path: str, found: str) -> List[Resolved]:
    """A lookup found ``path``: stat it like any other path and say how we got there."""
    result = host.stat_path(path, ref.access)
    label = ref.lookup.label if ref.lookup else "lookup"
    detail = f"{path} does not exist" if result.status == MISSING else result.reason
    return [result._replace(reason=f"{label}: {found}; {detail}")]


def _failed(ref: DeviceRef, why: str) -> List[Resolved]:
    return [Resolved(LOOKUP_FAILED, None, f"{ref.lookup.label}: {why}" if ref.lookup
                     else why)]


def _iommu_group(ref: DeviceRef, host: Host, link: str, what: str) -> List[Resolved]:
    if not os.path.exists(os.path.dirname(link)):
        return _failed(ref, f"{what} not found in {host.sys()}")
    try:
        group = os.path.basename(os.readlink(link))
    except OSError:
        return _failed(ref, f"{what} has no IOMMU group (is the IOMMU enabled, e.g. "
                            "intel_iommu=on?)")
    if not group.isdigit():
        return _failed(ref, f"unexpected IOMMU group {group!r}")
    return _derived(ref, host, f"/dev/vfio/{group}", f"IOMMU group {group}")


def _lookup_pci(ref: DeviceRef, host: Host) -> List[Resolved]:
    address = ref.lookup.key[0]  # type: ignore[union-attr]
    return _iommu_group(ref, host, host.sys("bus", "pci", "devices", address, "iommu_group"),
                        f"PCI device {address}")


def _lookup_mdev(ref: DeviceRef, host: Host) -> List[Resolved]:
    uuid = ref.lookup.key[0]  # type: ignore[union-attr]
    if "/" in uuid or uuid in (".", ".."):
        return _failed(ref, f"bad mediated device uuid {uuid!r}")
    return _iommu_group(ref, host, host.sys("bus", "mdev", "devices", uuid, "iommu_group"),
                        f"mediated device {uuid}")


def _lookup_usb(ref: DeviceRef, host: Host) -> List[Resolved]:
    """virUSBDeviceFind: match idVendor/idProduct (and bus/device when given) in sysfs."""
    vendor, product, bus, device = ref.lookup.key  # type: ignore[union-attr]
    base = host.sys("bus", "usb", "devices")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        names = []
    matches: List[Tuple[int, int]] = []
    for name in names:
        if ":" in name:
            continue  # interfaces (1-1:1.0), not devices
        found_vendor = _hex(host.read_sys("bus", "usb", "devices", name, "idVendor"))
        found_product = _hex(host.read_sys("bus", "usb", "devices", name, "idProduct"))
        if found_vendor != vendor or found_product != product:
            continue
        busnum = _int(host.read_sys("bus", "usb", "devices", name, "busnum"))
        devnum = _int(host.read_sys("bus", "usb", "devices", name, "devnum"))
        if busnum is None or devnum is None:
            continue
        if bus is not None and (busnum, devnum) != (bus, device):
            continue
        matches.append((busnum, devnum))
    if not matches:
        return [Resolved(MISSING, None, f"{ref.lookup.label}: not plugged in "  # type: ignore[union-attr]
                         f"(no match in {base})")]
    if len(matches) > 1:
        listed = ", ".join(f"bus {b} device {d}" for b, d in matches)
        return _failed(ref, f"several devices match ({listed}); add <address bus= device=> "
                            "to choose one, as libvirt requires")
    busnum, devnum = matches[0]
    return _derived(ref, host, f"/dev/bus/usb/{busnum:03d}/{devnum:03d}",
                    f"bus {busnum} device {devnum}")


def _lookup_scsi(ref: DeviceRef, host: Host) -> List[Resolved]:
    """virSCSIDeviceGetSgName: /sys/bus/scsi/devices/H:B:T:U/scsi_generic/sgN."""
    hctl = "{}:{}:{}:{}".format(*ref.lookup.key)  # type: ignore[union-attr]
    device_dir = host.sys("bus", "scsi", "devices", hctl)
    if not os.path.isdir(device_dir):
        return [Resolved(MISSING, None, f"{ref.lookup.label}: no SCSI device {hctl} "  # type: ignore[union-attr]
                         f"in {host.sys()}")]
    try:
        names = sorted(os.listdir(os.path.join(device_dir, "scsi_generic")))
    except OSError:
        names = []
    if not names:
        return _failed(ref, f"SCSI device {hctl} has no scsi_generic node (is the sg module "
                            "loaded?)")
    return _derived(ref, host, f"/dev/{names[0]}", names[0])


def _lookup_volume(ref: DeviceRef, host: Host) -> List[Resolved]:
    """A pool volume's path, for pools whose volumes are <target><path>/<volume>."""
    pool, volume = ref.lookup.key  # type: ignore[union-attr]
    if "/" in pool or "/" in volume or volume in (".", ".."):
        return _failed(ref, "pool and volume names must not contain '/'")
    for directory in host.storage_dirs:
        text = _read(os.path.join(directory, f"{pool}.xml"))
        if text is None:
            continue
        pool_type, target = _pool_target(text)
        if pool_type is None:
            continue
        if pool_type not in _PATH_POOLS or not target:
            return [Resolved(LOOKUP_FAILED, None,
                             f"{ref.lookup.label}: a {pool_type} pool's volume paths are "  # type: ignore[union-attr]
                             "known only to libvirt; libvirt allows it itself")]
        path = os.path.join(target, volume)
        rows = _derived(ref, host, path, f"pool type {pool_type}, path {path}")
        if ref.follow_dm and rows[0].rule is not None and rows[0].rule.type == "b":
            rows.extend(dm_rows(rows[0].rule, ref.access, host))
        return rows
    return [Resolved(LOOKUP_FAILED, None,
                     f"{ref.lookup.label}: no definition of pool {pool!r} in "  # type: ignore[union-attr]
                     + " or ".join(host.storage_dirs))]


def _pool_target(text: str) -> Tuple[str | None, str | None]:
    from .xmlsafe import parse_xml  # local: only volume disks need it

    try:
        root = parse_xml(text, "storage pool XML")
    except Exception:  # noqa: BLE001 - an unreadable pool is "not found", not a crash
        return None, None
    pool: etree._Element | None = root if root.tag == "pool" else root.find("pool")
    if pool is None:
        return None, None
    target = pool.findtext("target/path")
    return pool.get("type"), (target.strip() if target else None)


def _lookup_render_node(ref: DeviceRef, host: Host) -> List[Resolved]:
    """virHostGetDRMRenderNode: the first /dev/dri/renderD* (we take the lowest)."""
    try:
        names = sorted(name for name in os.listdir(host.host_path("/dev/dri"))
                       if name.startswith("renderD"))
    except OSError:
        names = []
    if not names:
        return _failed(ref, "no /dev/dri/renderD* on this host (libvirt will refuse to "
                            "start the guest)")
    return _derived(ref, host, f"/dev/dri/{names[0]}", names[0])


def _lookup_class(ref: DeviceRef, host: Host) -> List[Resolved]:
    """systemd-style ``char-NAME`` / ``block-NAME`` (globs allowed) → ``TYPE MAJOR:*``."""
    pattern = ref.lookup.key[0]  # type: ignore[union-attr]
    kind, _, glob = pattern.partition("-")
    dev_type = {"char": "c", "block": "b"}.get(kind)
    try:
        table = host.proc_devices_table()
    except RuleError as exc:
        return _failed(ref, str(exc))
    found = sorted({(major, name) for typ, major, name in table
                    if typ == dev_type and fnmatch.fnmatchcase(name, glob)})
    if not found:
        return [Resolved(MISSING, None, f"no driver in {host.proc_devices} matches "
                         f"{pattern} (module not loaded?)")]
    rows = []
    for index, (major, name) in enumerate(found):
        rows.append(Resolved(OK, host.rule(dev_type or "c", major, None, ref.access),  # type: ignore[arg-type]
                             f"driver {name} (major {major}) in {host.proc_devices}", None,
                             f" (driver {name})" if index else ""))
    return rows


def _hex(text: str | None) -> int | None:
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


_LOOKUPS = {
    dm.LOOKUP_PCI_GROUP: _lookup_pci,
    dm.LOOKUP_MDEV_GROUP: _lookup_mdev,
    dm.LOOKUP_USB: _lookup_usb,
    dm.LOOKUP_SCSI_SG: _lookup_scsi,
    dm.LOOKUP_VOLUME: _lookup_volume,
    dm.LOOKUP_RENDER_NODE: _lookup_render_node,
    dm.LOOKUP_CLASS: _lookup_class,
}
