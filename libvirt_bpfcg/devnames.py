"""Device node names for rules and device numbers, from sysfs (``/sys/dev/{char,block}``).

Used only for display (``status``, ``explain``): the filter itself works on numbers.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

from .rules import Rule

DEFAULT_SYSFS = "/sys"
_KIND_DIR = {"c": "char", "b": "block"}


def _devname(sysfs: str, kind: str, major: int, minor: int) -> str | None:
    path = os.path.join(sysfs, "dev", kind, f"{major}:{minor}", "uevent")
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("DEVNAME="):
                    return "/dev/" + line[len("DEVNAME="):].strip()
    except OSError:
        return None
    return None


class DeviceNames:
    """Caches one listing of /sys/dev per instance (a status call looks up many rules)."""

    def __init__(self, sysfs: str = DEFAULT_SYSFS) -> None:
        self.sysfs = sysfs
        self._listing: Dict[str, List[Tuple[int, int]]] = {}

    def _numbers(self, dev_type: str) -> List[Tuple[int, int]]:
        if dev_type not in self._listing:
            numbers = []
            try:
                entries = os.listdir(os.path.join(self.sysfs, "dev", _KIND_DIR[dev_type]))
            except OSError:
                entries = []
            for entry in entries:
                major, _, minor = entry.partition(":")
                if major.isdigit() and minor.isdigit():
                    numbers.append((int(major), int(minor)))
            self._listing[dev_type] = sorted(numbers)
        return self._listing[dev_type]

    def name(self, dev_type: str, major: int, minor: int) -> str | None:
        if dev_type not in _KIND_DIR:
            return None
        return _devname(self.sysfs, _KIND_DIR[dev_type], major, minor)

    def _driver(self, dev_type: str, major: int) -> str | None:
        """The /proc/devices name of a major ("pts" for c 136), for nodes sysfs lacks."""
        try:
            from .rules import read_proc_devices
            for typ, number, name in read_proc_devices():
                if typ == dev_type and number == major:
                    return name
        except Exception:  # noqa: BLE001 - display only
            return None
        return None

    def for_rule(self, rule: Rule, limit: int = 16) -> List[str]:
        """Names of the device nodes a rule covers, at most ``limit`` (wildcards can be many).

        Nodes without a sysfs entry (the pts of ``c 136:*``) are shown by driver name,
        ``[pts]``."""
        types = ("b", "c") if rule.type == "a" else (rule.type,)
        names: List[str] = []
        for dev_type in types:
            if rule.major is not None and rule.minor is not None:
                candidates = [(rule.major, rule.minor)]
            else:
                candidates = [
                    (major, minor) for major, minor in self._numbers(dev_type)
                    if (rule.major is None or major == rule.major)
                    and (rule.minor is None or minor == rule.minor)
                ]
            for major, minor in candidates:
                name = _devname(self.sysfs, _KIND_DIR[dev_type], major, minor)
                if name:
                    names.append(name)
                if len(names) >= limit:
                    names.append("…")
                    return names
            if not names and rule.major is not None and rule.minor is None:
                driver = self._driver(dev_type, rule.major)
                if driver:
                    names.append(f"[{driver}]")
        return names
