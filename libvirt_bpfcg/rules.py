"""Device rules and libvirt's map encoding.

A rule is what an admin writes in ``devices.allow`` or systemd's ``DeviceAllow=``:
``c 1:3 rw``, ``b 8:* r``, ``a *:* rwm``. In the BPF map libvirt uses (and we mirror byte for
byte) a rule is one hash entry:

* key   u64 = ``major << 32 | minor``, 0xffffffff in a half meaning "any";
* value u32 = ``access << 16 | type`` with type block 1, char 2 (3 = both) and access
  mknod 1, read 2, write 4.

The key carries no type, so ``b 1:3`` and ``c 1:3`` share one entry: :class:`RuleSet` is where
that collision is resolved, and it resolves it by never widening (see ``RuleSet.add``).
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Tuple

from .errors import RuleError

# Kernel constants (include/uapi/linux/bpf.h: BPF_DEVCG_*).
TYPE_BLOCK = 1
TYPE_CHAR = 2
TYPE_BITS = {"b": TYPE_BLOCK, "c": TYPE_CHAR, "a": TYPE_BLOCK | TYPE_CHAR}
TYPE_LETTER = {v: k for k, v in TYPE_BITS.items()}
ACC_MKNOD = 1
ACC_READ = 2
ACC_WRITE = 4
ACCESS_BITS = {"r": ACC_READ, "w": ACC_WRITE, "m": ACC_MKNOD}
ANY = 0xFFFFFFFF  # the "any major" / "any minor" half of a key

DEFAULT_ACCESS = "rw"


def access_bits(access: str) -> int:
    """``'rw'`` → ``ACC_READ | ACC_WRITE``; raises RuleError on anything but r/w/m."""
    if not access:
        raise RuleError("empty access: use a combination of r, w and m")
    bits = 0
    for ch in access:
        if ch not in ACCESS_BITS:
            raise RuleError(f"bad access {access!r}: use a combination of r, w and m")
        bits |= ACCESS_BITS[ch]
    return bits


def access_string(bits: int) -> str:
    """Canonical access text in the order r, w, m (``''`` for no bits)."""
    return "".join(ch for ch in "rwm" if bits & ACCESS_BITS[ch])


def encode_key(major: int | None, minor: int | None) -> int:
    """libvirt's virCgroupV2DevicesGetKey; None means "*"."""
    hi = ANY if major is None else major
    lo = ANY if minor is None else minor
    return (hi << 32) | lo


def decode_key(key: int) -> Tuple[int | None, int | None]:
    hi, lo = key >> 32, key & 0xFFFFFFFF
    return (None if hi == ANY else hi, None if lo == ANY else lo)


def _number(text: str, what: str, rule_text: str) -> int | None:
    if text == "*":
        return None
    if not text.isdigit():
        raise RuleError(f"bad {what} {text!r} in rule {rule_text!r}: use a number or *")
    value = int(text)
    if value >= ANY:
        raise RuleError(f"{what} {value} in rule {rule_text!r} is out of range")
    return value


@dataclass(frozen=True, order=True)
class Rule:
    """One device rule: type ``a``/``b``/``c``, major/minor (None = *), access ``rwm`` subset."""

    type: str
    major: int | None
    minor: int | None
    access: str = DEFAULT_ACCESS

    def __post_init__(self) -> None:
        if self.type not in TYPE_BITS:
            raise RuleError(f"bad device type {self.type!r}: use b, c or a")
        # Normalise the access order so equal rules compare equal.
        object.__setattr__(self, "access", access_string(access_bits(self.access)))

    @property
    def key(self) -> int:
        return encode_key(self.major, self.minor)

    @property
    def value(self) -> int:
        return (access_bits(self.access) << 16) | TYPE_BITS[self.type]

    @property
    def numbers(self) -> str:
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{major}:{minor}"

    def __str__(self) -> str:
        return f"{self.type} {self.numbers} {self.access}"

    def with_access(self, access: str) -> Rule:
        return Rule(self.type, self.major, self.minor, access)

    def covers(self, dev_type: str, major: int, minor: int, access: str) -> bool:
        """Would this rule alone allow ``access`` on the device ``dev_type major:minor``?"""
        if self.type != "a" and self.type != dev_type:
            return False
        if self.major is not None and self.major != major:
            return False
        if self.minor is not None and self.minor != minor:
            return False
        return access_bits(access) & ~access_bits(self.access) == 0

    @classmethod
    def from_entry(cls, key: int, value: int) -> Rule | None:
        """Decode one map entry; None for a value with no type or access bits.

        libvirt's partial deny can leave such a "dead" value behind (it clears the type bit
        along with the access bits); it matches nothing, so it grants nothing.
        """
        type_bits = value & 0xFFFF
        acc = (value >> 16) & 0x7
        if type_bits not in TYPE_LETTER or not acc:
            return None
        major, minor = decode_key(key)
        return cls(TYPE_LETTER[type_bits], major, minor, access_string(acc))

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse the numeric form ``'c 1:3 rw'`` (access defaults to rw)."""
        parts = text.split()
        if len(parts) not in (2, 3) or ":" not in parts[1]:
            raise RuleError(
                f"bad rule {text!r}: expected 'TYPE MAJOR:MINOR [ACCESS]', e.g. 'c 1:3 rw'"
            )
        dev_type = parts[0]
        if dev_type not in TYPE_BITS:
            raise RuleError(f"bad device type {dev_type!r} in rule {text!r}: use b, c or a")
        major_text, minor_text = parts[1].split(":", 1)
        major = _number(major_text, "major", text)
        minor = _number(minor_text, "minor", text)
        access = parts[2] if len(parts) == 3 else DEFAULT_ACCESS
        try:
            return cls(dev_type, major, minor, access)
        except RuleError as exc:
            raise RuleError(f"{exc} (in rule {text!r})") from None


def rule_for_path(path: str, access: str = DEFAULT_ACCESS) -> Rule:
    """The rule for a device node, following symlinks (by-id, by-path, /dev/mapper names)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RuleError(f"{path}: no such device node") from None
    except OSError as exc:
        raise RuleError(f"{path}: cannot stat: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        dev_type = "b"
    elif stat.S_ISCHR(st.st_mode):
        dev_type = "c"
    else:
        raise RuleError(f"{path}: not a device node")
    return Rule(dev_type, os.major(st.st_rdev), os.minor(st.st_rdev), access)


def read_proc_devices(path: str = "/proc/devices") -> List[Tuple[str, int, str]]:
    """``[(type, major, name)]`` from /proc/devices (type ``c`` or ``b``)."""
    result: List[Tuple[str, int, str]] = []
    section = ""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise RuleError(f"{path}: cannot read: {exc.strerror}") from None
    for line in lines:
        if line.startswith("Character devices"):
            section = "c"
        elif line.startswith("Block devices"):
            section = "b"
        elif section and line.strip():
            number, _, name = line.strip().partition(" ")
            if number.isdigit():
                result.append((section, int(number), name.strip()))
    return result


def rules_for_class(
    pattern: str, access: str = DEFAULT_ACCESS, proc_devices: str = "/proc/devices"
) -> List[Rule]:
    """systemd's ``char-NAME`` / ``block-NAME`` classes (globs allowed) → ``c MAJOR:* access``.

    A class that matches no driver registered right now yields no rule; the caller decides
    whether that is an error (the CLI says so, a metadata extra reports it as missing).
    """
    kind, _, name_glob = pattern.partition("-")
    dev_type = {"char": "c", "block": "b"}.get(kind)
    if dev_type is None or not name_glob:
        raise RuleError(f"bad device class {pattern!r}: use char-NAME or block-NAME")
    access_bits(access)  # validate before any lookup
    majors = sorted(
        {major for typ, major, name in read_proc_devices(proc_devices)
         if typ == dev_type and fnmatch.fnmatchcase(name, name_glob)}
    )
    return [Rule(dev_type, major, None, access) for major in majors]


def is_class_name(text: str) -> bool:
    return text.startswith(("char-", "block-"))


def parse_rule_arg(
    text: str, proc_devices: str = "/proc/devices"
) -> List[Rule]:
    """One CLI argument in any form admins write → rules.

    ``'c 1:3 rw'``, ``'b 8:* r'``, ``'a *:* rwm'``, ``'/dev/null rw'``, ``'/dev/null'``,
    ``'char-pts rw'``, ``'block-loop r'``. Raises RuleError naming the argument.
    """
    parts = text.split()
    if not parts:
        raise RuleError("empty rule: expected e.g. 'c 1:3 rw', '/dev/null rw' or 'char-pts rw'")
    head = parts[0]
    if head in TYPE_BITS:
        return [Rule.parse(text)]
    if len(parts) > 2:
        raise RuleError(f"bad rule {text!r}: expected 'PATH [ACCESS]' or 'CLASS [ACCESS]'")
    access = parts[1] if len(parts) == 2 else DEFAULT_ACCESS
    try:
        access_bits(access)
    except RuleError as exc:
        raise RuleError(f"{exc} (in rule {text!r})") from None
    if head.startswith("/"):
        return [rule_for_path(head, access)]
    if is_class_name(head):
        rules = rules_for_class(head, access, proc_devices)
        if not rules:
            raise RuleError(f"device class {head!r} matches no driver in {proc_devices}")
        return rules
    raise RuleError(
        f"bad rule {text!r}: expected 'c 1:3 rw', '/dev/PATH [ACCESS]' or 'char-NAME [ACCESS]'"
    )


@dataclass
class RuleSet:
    """The content of one libvirt-format map: key → rule, with merge semantics.

    * Same key, same type: access is the union (granting ``r`` then ``w`` gives ``rw``).
    * Same key, block vs char (``b 1:3`` and ``c 1:3``): the map can hold only one value, so
      the entry becomes type ``a`` with the *intersection* of the accesses — never more than
      either rule asked for — and the collision is recorded in ``conflicts`` for the caller to
      report.
    """

    entries: Dict[int, Rule] = field(default_factory=dict)
    conflicts: List[Tuple[Rule, Rule]] = field(default_factory=list)

    @classmethod
    def of(cls, rules: Iterable[Rule]) -> RuleSet:
        result = cls()
        for rule in rules:
            result.add(rule)
        return result

    def add(self, rule: Rule) -> Rule:
        old = self.entries.get(rule.key)
        if old is None:
            merged = rule
        elif old.type == rule.type or (
            "a" in (old.type, rule.type) and old.access == rule.access
        ):
            dev_type = old.type if old.type == rule.type else "a"
            merged = Rule(dev_type, rule.major, rule.minor,
                          access_string(access_bits(old.access) | access_bits(rule.access)))
        else:
            both = access_bits(old.access) & access_bits(rule.access)
            if old.type == "a" and both == access_bits(rule.access):
                # The "a" entry already allows everything the narrower rule asks for.
                merged = old
            elif both:
                merged = Rule("a", rule.major, rule.minor, access_string(both))
                self.conflicts.append((old, rule))
            else:
                merged = old
                self.conflicts.append((old, rule))
        self.entries[rule.key] = merged
        return merged

    def remove(self, rule: Rule) -> Rule | None:
        """Take ``rule.access`` away from its key; drop the key when nothing is left.

        Returns the remaining rule (None if the key is gone). Removing access from a key whose
        type does not match the rule (``b`` vs ``c``) leaves the entry untouched.
        """
        old = self.entries.get(rule.key)
        if old is None:
            return None
        if rule.type != "a" and old.type not in (rule.type, "a"):
            return old
        left = access_bits(old.access) & ~access_bits(rule.access)
        if not left:
            del self.entries[rule.key]
            return None
        kept = Rule(old.type, old.major, old.minor, access_string(left))
        self.entries[rule.key] = kept
        return kept

    def rules(self) -> List[Rule]:
        return sorted(self.entries.values(), key=_sort_key)

    def as_map(self) -> Dict[int, int]:
        return {key: rule.value for key, rule in self.entries.items()}

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, rule: object) -> bool:
        return isinstance(rule, Rule) and self.entries.get(rule.key) == rule


def _sort_key(rule: Rule) -> Tuple[str, int, int, str]:
    major = -1 if rule.major is None else rule.major
    minor = -1 if rule.minor is None else rule.minor
    return (rule.type, major, minor, rule.access)


def sort_rules(rules: Iterable[Rule]) -> List[Rule]:
    return sorted(rules, key=_sort_key)


def allows(entries: Dict[int, int], dev_type: str, major: int, minor: int, access: str) -> bool:
    """libvirt's lookup semantics over one map's raw entries (for explain and tests)."""
    want = (access_bits(access) << 16) | TYPE_BITS[dev_type]
    for key in (encode_key(major, minor), encode_key(major, None),
                encode_key(None, minor), encode_key(None, None)):
        value = entries.get(key)
        if value is not None and value & want == want:
            return True
    return False
