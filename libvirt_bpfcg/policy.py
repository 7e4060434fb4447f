"""What libvirt would allow on this host besides the XML, and what we refuse to allow.

* The default ACL: our config's ``default_acl`` when set; else qemu.conf's
  ``cgroup_device_acl`` when the admin set it (it *replaces* libvirt's list); else libvirt's
  built-in list, plus ``/dev/userfaultfd`` from libvirt 10.1 on. The libvirt version comes
  from our config, else from the name of the installed ``libvirt.so.0.X.Y`` (one readlink:
  running ``virtqemud --version`` or asking dpkg would be far too slow for a hook).
* The sound gate: qemu.conf's ``vnc_allow_host_audio`` / ``nographics_allow_host_audio``.
* Guardrails: refuse devices that hand the guest the host — ``/dev/mem``, ``/dev/kmem``,
  ``/dev/port`` and block devices the host has mounted, uses as swap, or that hold one of
  those (partitions, dm/LVM/md stacks) — unless ``allow_forbidden`` names them.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, NamedTuple, Sequence, Tuple

from . import domain as dm
from .config import Config
from .domain import ORIGIN_ACL, DeviceRef
from .errors import InputError
from .resolve import Host
from .rules import TYPE_BITS, Rule, access_bits

BUILTIN_ACL = ("/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom",
               "/dev/ptmx", "/dev/kvm")
USERFAULTFD = "/dev/userfaultfd"
USERFAULTFD_SINCE = (10, 1, 0)

# Character devices that give the guest the host's memory or I/O ports.
FORBIDDEN_CHAR = {(1, 1): "/dev/mem (physical memory)",
                  (1, 2): "/dev/kmem (kernel memory)",
                  (1, 4): "/dev/port (I/O ports)"}

Version = Tuple[int, int, int]


# ---------------------------------------------------------------------------------------
# qemu.conf


class QemuConf(NamedTuple):
    path: str
    found: bool
    cgroup_device_acl: Tuple[str, ...] | None = None   # None: not set by the admin
    vnc_allow_host_audio: bool = False
    nographics_allow_host_audio: bool = False


_TOKEN = re.compile(r'\s+|#[^\n]*|"""(?:.|\n)*?"""|"[^"\n]*"|\'[^\'\n]*\'|-?\d+|[\[\],]|.')
_WANTED = ("cgroup_device_acl", "vnc_allow_host_audio", "nographics_allow_host_audio")


def parse_qemu_conf(text: str, path: str = "qemu.conf") -> QemuConf:
    """The three keys we need, in libvirt's virconf syntax (``key = value``, lists, ``#``).

    A shipped qemu.conf is ~1000 lines of comments around a few settings: we jump to the
    assignments we need (str.find, then a check that the name starts a line and is
    followed by ``=``) instead of tokenizing all of it, which keeps the hook fast. The last
    assignment wins, as in libvirt.
    """
    found: List[Tuple[int, str, int]] = []
    for key in _WANTED:
        at = text.find(key)
        while at >= 0:
            line_start = text.rfind("\n", 0, at) + 1
            after = at + len(key)
            rest = text[after:after + 64].lstrip(" \t")
            if not text[line_start:at].strip(" \t") and rest.startswith("="):
                found.append((at, key, text.index("=", after) + 1))
            at = text.find(key, after)
    values: Dict[str, object] = {}
    for _, key, value_at in sorted(found):
        value, _ = _conf_value(_tokens_from(text, value_at), 0, path, key)
        values[key] = value
    acl = values.get("cgroup_device_acl")
    if acl is not None and not isinstance(acl, list):
        raise InputError(f"{path}: cgroup_device_acl must be a list of strings")
    return QemuConf(path, True,
                    tuple(acl) if isinstance(acl, list) else None,
                    _truthy(values.get("vnc_allow_host_audio")),
                    _truthy(values.get("nographics_allow_host_audio")))


def _tokens_from(text: str, start: int) -> List[str]:
    """Tokens of one value starting at ``start``: a scalar, or a list up to its ``]``."""
    tokens: List[str] = []
    depth = 0
    for match in _TOKEN.finditer(text, start):
        tok = match.group()
        if tok.isspace() or tok[0] == "#":
            if "\n" in tok and not depth and tokens:
                break
            continue
        tokens.append(tok)
        if tok == "[":
            depth += 1
        elif tok == "]":
            depth -= 1
        if not depth:
            break
    return tokens


def _conf_value(tokens: List[str], i: int, path: str, name: str) -> Tuple[object, int]:
    if i >= len(tokens):
        raise InputError(f"{path}: {name} has no value")
    tok = tokens[i]
    if tok == "[":
        items: List[str] = []
        i += 1
        while i < len(tokens) and tokens[i] != "]":
            if tokens[i] != ",":
                item, i = _conf_value(tokens, i, path, name)
                items.append(str(item))
                continue
            i += 1
        if i >= len(tokens):
            raise InputError(f"{path}: {name}: unterminated list")
        return items, i + 1
    if tok.startswith('"""'):
        return tok[3:-3], i + 1
    if tok[0] in "\"'":
        return tok[1:-1], i + 1
    if re.fullmatch(r"-?\d+", tok):
        return int(tok), i + 1
    raise InputError(f"{path}: {name}: unexpected {tok!r}")


def _truthy(value: object) -> bool:
    return isinstance(value, int) and value != 0


def read_qemu_conf(path: str) -> QemuConf:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return QemuConf(path, False)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_qemu_conf(raw.decode("utf-8", errors="replace"), path)


# ---------------------------------------------------------------------------------------
# libvirt version

_MULTIARCH = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu",
              "ppc64le": "powerpc64le-linux-gnu", "s390x": "s390x-linux-gnu",
              "riscv64": "riscv64-linux-gnu", "i686": "i386-linux-gnu",
              "armv7l": "arm-linux-gnueabihf", "loongarch64": "loongarch64-linux-gnu"}


_CANDIDATES: List[str] = []


def library_candidates() -> List[str]:
    """Where distributions put libvirt.so.0 (Debian multiarch, Fedora lib64, plain lib).

    Computed once per process: the machine's architecture does not change.
    """
    if not _CANDIDATES:
        triplet = _MULTIARCH.get(os.uname().machine)
        for prefix in ("/usr", "/usr/local"):
            if triplet:
                _CANDIDATES.append(f"{prefix}/lib/{triplet}/libvirt.so.0")
            _CANDIDATES.extend((f"{prefix}/lib64/libvirt.so.0", f"{prefix}/lib/libvirt.so.0"))
    return _CANDIDATES


def version_from_soname(name: str) -> Version | None:
    """``libvirt.so.0.10001.0`` → (10, 1, 0): libvirt's library version is
    ``0.(major*1000 + minor).micro``."""
    match = re.fullmatch(r"libvirt\.so\.0\.(\d+)\.(\d+)", os.path.basename(name))
    if not match:
        return None
    combined, micro = int(match.group(1)), int(match.group(2))
    return combined // 1000, combined % 1000, micro


def detect_libvirt_version(config: Config,
                           candidates: Sequence[str] | None = None) -> Tuple[Version | None, str]:
    """(version or None, where it came from)."""
    if config.libvirt_version:
        major, minor, micro = (int(part) for part in config.libvirt_version.split("."))
        return (major, minor, micro), "config libvirt_version"
    for link in candidates if candidates is not None else library_candidates():
        try:
            target = os.readlink(link)
        except OSError:
            continue
        version = version_from_soname(target)
        if version:
            return version, os.path.join(os.path.dirname(link), os.path.basename(target))
    return None, "no libvirt.so.0.X.Y found (set libvirt_version in the config)"


def version_text(version: Version | None) -> str | None:
    return ".".join(map(str, version)) if version else None


# ---------------------------------------------------------------------------------------
# The default ACL


class AclChoice(NamedTuple):
    refs: List[DeviceRef]
    origin: str            # "config default_acl", "qemu.conf cgroup_device_acl", "libvirt built-in"
    libvirt_version: Version | None
    version_source: str


def default_acl(config: Config, qemu_conf: QemuConf,
                version_probe: Sequence[str] | None = None) -> AclChoice:
    """The ACL rows libvirt would add on this host (or our config's replacement)."""
    refs: List[DeviceRef] = []
    if config.default_acl:
        for index, entry in enumerate(config.default_acl, 1):
            refs.append(_acl_entry(entry, f"config:default_acl[{index}]",
                                   "default ACL from our config"))
        return AclChoice(refs, "config default_acl", None, "not needed")
    if qemu_conf.cgroup_device_acl is not None:
        for index, path in enumerate(qemu_conf.cgroup_device_acl, 1):
            refs.append(_acl_entry(path, f"qemu.conf:cgroup_device_acl[{index}]",
                                   f"cgroup_device_acl in {qemu_conf.path}"))
        return AclChoice(refs, "qemu.conf cgroup_device_acl", None, "not needed")
    for index, path in enumerate(BUILTIN_ACL, 1):
        refs.append(_acl_entry(path, f"libvirt:default-acl[{index}]",
                               "libvirt's built-in default ACL"))
    version, source = detect_libvirt_version(config, version_probe)
    where = f"libvirt:default-acl[{len(BUILTIN_ACL) + 1}]"
    if version is not None and version >= USERFAULTFD_SINCE:
        refs.append(_acl_entry(USERFAULTFD, where,
                               f"libvirt {version_text(version)} ≥ 10.1 adds it ({source})"))
    else:
        why = (f"libvirt {version_text(version)} < 10.1 ({source})" if version
               else f"libvirt version unknown: {source}")
        refs.append(DeviceRef(where, "acl", "rw", path=USERFAULTFD, required=False,
                              origin=ORIGIN_ACL, skip=f"{why}: not in its default ACL"))
    return AclChoice(refs, "libvirt built-in", version, source)


def _acl_entry(entry: str, source: str, note: str) -> DeviceRef:
    parts = entry.split()
    if parts and parts[0] in TYPE_BITS:
        rule = Rule.parse(entry)
        return DeviceRef(source, "acl", rule.access, rule=rule, required=False,
                         origin=ORIGIN_ACL, note=note)
    access = parts[1] if len(parts) == 2 else "rw"
    # libvirt skips ACL paths that do not exist (qemuCgroupAllowDevicesPaths).
    return DeviceRef(source, "acl", access, path=parts[0] if parts else entry,
                     required=False, origin=ORIGIN_ACL, note=note)


def gate_open(gate: str | None, qemu_conf: QemuConf) -> bool:
    """Is a qemu.conf-gated reference (sound) allowed by this host's qemu.conf?"""
    if gate is None:
        return True
    if gate == dm.GATE_SOUND_VNC:
        return qemu_conf.vnc_allow_host_audio
    if gate == dm.GATE_SOUND_NOGRAPHICS:
        return qemu_conf.nographics_allow_host_audio
    return False


# ---------------------------------------------------------------------------------------
# Guardrails


class Verdict(NamedTuple):
    reason: str                   # why the rule is dangerous
    allowed_by: str | None = None  # the allow_forbidden entry that lets it through


class Guardrails:
    """Refuse rules that hand the guest the host, unless the admin allowed them."""

    def __init__(self, host: Host, allow: Sequence[str] = ()) -> None:
        self.host = host
        self.allow = tuple(allow)
        self._allow_rules: List[Tuple[str, Rule | None]] | None = None
        self._dangers: Dict[int, Tuple[Rule, str | None]] = {}

    def check(self, rule: Rule, path: str | None = None) -> Verdict | None:
        """None when harmless; else why it is forbidden (and who allowed it, if anyone)."""
        if rule.type == "c" and rule.major is not None and rule.major != 1:
            return None  # the forbidden character devices are all major 1 (mem)
        # Keyed by identity: resolve.Host hands out one Rule object per rule, and the
        # dataclass hash is not cheap. The entry keeps the rule alive, so ids stay unique.
        cached = self._dangers.get(id(rule))
        if cached is None:
            cached = self._dangers[id(rule)] = (rule, self._danger(rule))
        reason = cached[1]
        if reason is None:
            return None
        return Verdict(reason, self._allowed_by(rule, path))

    def _danger(self, rule: Rule) -> str | None:
        if rule.type in ("c", "a"):
            for (major, minor), what in FORBIDDEN_CHAR.items():
                if _covers(rule, major, minor):
                    return f"{rule.type} {rule.numbers} gives the guest {what}"
        if rule.type in ("b", "a"):
            in_use = self.host.in_use_block_devices()
            if rule.major is not None and rule.minor is not None:
                why = in_use.get((rule.major, rule.minor))
                if why:
                    return f"block device {rule.major}:{rule.minor} is the host's: {why}"
            else:
                for (major, minor), why in sorted(in_use.items()):
                    if _covers(rule, major, minor):
                        return (f"{rule.type} {rule.numbers} covers the host's block device "
                                f"{major}:{minor}: {why}")
        return None

    def _allowed_by(self, rule: Rule, path: str | None) -> str | None:
        for entry, allowed in self._exceptions():
            if entry.startswith("/") and path is not None and path == entry:
                return entry
            if allowed is not None and allowed.type in (rule.type, "a") \
                    and allowed.major in (None, rule.major) \
                    and allowed.minor in (None, rule.minor) \
                    and access_bits(rule.access) & ~access_bits(allowed.access) == 0:
                return entry
        return None

    def _exceptions(self) -> List[Tuple[str, Rule | None]]:
        """Each exception with the rule it stands for (a path: its node now, any access)."""
        if self._allow_rules is None:
            self._allow_rules = []
            for entry in self.allow:
                if entry.startswith("/"):
                    # A path that is no device right now still matches by name.
                    self._allow_rules.append((entry, self.host.stat_path(entry, "rwm").rule))
                else:
                    self._allow_rules.append((entry, Rule.parse(entry)))
        return self._allow_rules


def _covers(rule: Rule, major: int, minor: int) -> bool:
    return rule.major in (None, major) and rule.minor in (None, minor)
