"""Our configuration file, ``/etc/libvirt/libvirt-bpfcg.conf`` (INI, read with configparser).

Every key is optional; a missing default file means "all defaults". An explicitly named file
that is missing, an unknown section or key, or a bad value is an InputError naming the file
and the key — a typo in a guardrail exception must not pass silently. docs/config.md and
packaging/libvirt-bpfcg.conf document every key.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Tuple

from .errors import InputError, RuleError
from .rules import TYPE_BITS, Rule, access_bits

DEFAULT_CONFIG_PATH = "/etc/libvirt/libvirt-bpfcg.conf"
DEFAULT_QEMU_CONF = "/etc/libvirt/qemu.conf"
DEFAULT_STATE_DIR = "/run/libvirt-bpfcg"
DEFAULT_QEMU_RUN_DIR = "/run/libvirt/qemu"
DEFAULT_BPFFS = "/sys/fs/bpf"
DEFAULT_STORAGE_DIRS = ("/run/libvirt/storage", "/etc/libvirt/storage")
ACCESS_CHOICES = ("r", "rw", "rwm")


@dataclass(frozen=True)
class Config:
    """Settings for planning and for the hook. Paths are overridable for tests."""

    # [acl]
    default_acl: Tuple[str, ...] = ()          # empty: libvirt's own (qemu.conf or built-in)
    qemu_conf: str = DEFAULT_QEMU_CONF
    libvirt_version: str | None = None         # "10.1.0"; None: read from libvirt.so.0.X.Y
    # [guardrails]
    allow_forbidden: Tuple[str, ...] = ()      # paths or rules the admin allows anyway
    # [hook]
    strict: bool = False                       # reconnect failures kill the guest (see docs)
    state_dir: str = DEFAULT_STATE_DIR
    record_denials: bool = True                # our program counts what it denies
    create_extra_nodes: bool = True            # mknod extras in QEMU's private /dev
    # [host]
    qemu_run_dir: str = DEFAULT_QEMU_RUN_DIR   # libvirt's NAME.pid files
    bpffs: str = DEFAULT_BPFFS                 # where overlay/denial maps are pinned
    # [host]
    sysfs_root: str = "/sys"
    proc_devices: str = "/proc/devices"
    mountinfo: str = "/proc/self/mountinfo"
    swaps: str = "/proc/swaps"
    storage_dirs: Tuple[str, ...] = DEFAULT_STORAGE_DIRS
    # Where the settings came from (None: built-in defaults only).
    source: str | None = field(default=None, compare=False)

    def with_overrides(self, **changes: object) -> Config:
        return replace(self, **changes)  # type: ignore[arg-type]


# section → key → kind (list, path, bool, version, paths)
_SCHEMA: Dict[str, Dict[str, str]] = {
    "acl": {"default_acl": "acl", "qemu_conf": "path", "libvirt_version": "version"},
    "guardrails": {"allow_forbidden": "exceptions"},
    "hook": {"strict": "bool", "state_dir": "path", "record_denials": "bool",
             "create_extra_nodes": "bool"},
    "host": {"sysfs_root": "path", "proc_devices": "path", "mountinfo": "path",
             "swaps": "path", "storage_dirs": "paths", "qemu_run_dir": "path",
             "bpffs": "path"},
}


def split_list(text: str) -> List[str]:
    """A list value: one item per line or comma-separated (rules contain spaces)."""
    items: List[str] = []
    for line in text.splitlines():
        for item in line.split(","):
            item = " ".join(item.split())
            if item:
                items.append(item)
    return items


def check_acl_entry(item: str, where: str) -> str:
    """``PATH [ACCESS]`` or ``TYPE MAJOR:MINOR [ACCESS]``; returns the item normalised."""
    parts = item.split()
    if parts and parts[0] in TYPE_BITS:
        try:
            rule = Rule.parse(item)
        except RuleError as exc:
            raise InputError(f"{where}: {exc}") from None
        if rule.access not in ACCESS_CHOICES:
            raise InputError(f"{where}: access in {item!r} must be r, rw or rwm")
        return str(rule)
    if not parts or not parts[0].startswith("/") or len(parts) > 2:
        raise InputError(f"{where}: bad entry {item!r}: use '/dev/PATH [ACCESS]' or "
                         "'c MAJOR:MINOR ACCESS'")
    if len(parts) == 2 and parts[1] not in ACCESS_CHOICES:
        raise InputError(f"{where}: access in {item!r} must be r, rw or rwm")
    return " ".join(parts)


def check_exception(item: str, where: str) -> str:
    """An ``allow_forbidden`` item: an absolute path, or a rule (access optional)."""
    parts = item.split()
    if parts and parts[0] in TYPE_BITS:
        try:
            rule = Rule.parse(item if len(parts) == 3 else item + " rwm")
        except RuleError as exc:
            raise InputError(f"{where}: {exc}") from None
        return str(rule)
    if len(parts) != 1 or not parts[0].startswith("/"):
        raise InputError(f"{where}: bad entry {item!r}: use an absolute path such as "
                         "/dev/sdb or a rule such as 'b 8:16 rw'")
    return parts[0]


def parse_version(text: str, where: str) -> str:
    parts = text.strip().split(".")
    if not 1 <= len(parts) <= 3 or not all(part.isdigit() for part in parts):
        raise InputError(f"{where}: bad libvirt version {text!r}: use e.g. 10.1.0")
    return ".".join(parts + ["0"] * (3 - len(parts)))


def _bool(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0", ""):
        return False
    raise InputError(f"{where}: bad boolean {text!r}: use yes or no")


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse the file's text; raises InputError naming ``source`` and the key."""
    parser = configparser.ConfigParser(interpolation=None, empty_lines_in_values=False,
                                       inline_comment_prefixes=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are lower-case
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise InputError(f"{source}: {' '.join(str(exc).split())}") from None
    values: Dict[str, object] = {}
    for section in parser.sections():
        keys = _SCHEMA.get(section)
        if keys is None:
            raise InputError(f"{source}: unknown section [{section}]; expected "
                             + ", ".join(f"[{name}]" for name in _SCHEMA))
        for key, raw in parser.items(section, raw=True):
            where = f"{source}: [{section}] {key}"
            kind = keys.get(key)
            if kind is None:
                raise InputError(f"{source}: unknown key {key!r} in [{section}]; expected "
                                 + ", ".join(keys))
            values[key] = _convert(kind, raw, where)
    return Config(source=source, **values)  # type: ignore[arg-type]


def _convert(kind: str, raw: str, where: str) -> object:
    if kind == "acl":
        return tuple(check_acl_entry(item, where) for item in split_list(raw))
    if kind == "exceptions":
        return tuple(check_exception(item, where) for item in split_list(raw))
    if kind == "bool":
        return _bool(raw, where)
    if kind == "version":
        return parse_version(raw, where) if raw.strip() else None
    if kind == "paths":
        items = tuple(split_list(raw))
        _absolute(items, where)
        return items
    value = raw.strip()
    _absolute((value,), where)
    return value


def _absolute(paths: Iterable[str], where: str) -> None:
    for path in paths:
        if not path.startswith("/"):
            raise InputError(f"{where}: {path!r} is not an absolute path")


def load_config(path: str | None = None) -> Config:
    """Read ``path``, or the default file when ``path`` is None (absent default: defaults)."""
    explicit = path is not None
    target = path if explicit else DEFAULT_CONFIG_PATH
    try:
        with open(target, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        if explicit:
            raise InputError(f"{target}: no such configuration file") from None
        return Config()
    except UnicodeDecodeError:
        raise InputError(f"{target}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{target}: cannot read: {exc.strerror}") from None
    return parse_config(text, target)


def access_of(entry: str) -> str:
    """Access of an ACL entry (``rw`` when not written)."""
    parts = entry.split()
    if parts[0] in TYPE_BITS:
        return Rule.parse(entry).access
    access = parts[1] if len(parts) == 2 else "rw"
    access_bits(access)
    return access
