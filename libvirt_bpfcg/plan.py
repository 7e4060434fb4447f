"""The domain plan: every device a guest needs, why, and the rules that grant them.

``plan_domain(xml, config)`` is what the hook, the hotplug CLI and ``libvirt-bpfcg plan``
call. It ties the layers together:

    xmlsafe (parse) → domain / domain_extras (references, pure) → policy (default ACL,
    qemu.conf gates) → resolve (stat, sysfs) → policy.Guardrails → Plan

A :class:`Plan` lists one :class:`PlannedDevice` per reference (with provenance), the
merged rule set (``rules``), the metadata extras alone (``extra_rules``: what libvirt mode
installs), rule conflicts, and ``problems``: the findings that must stop a guest start
(forbidden devices, required devices that are missing or could not be looked up).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Set, Tuple, Union

from lxml import etree

from .config import Config
from .domain import (
    DEVICE_TAGS,
    ORIGIN_ACL,
    ORIGIN_DOMAIN,
    ORIGIN_EXTRA,
    DeviceRef,
    DomainInfo,
    domain_info,
    domain_refs,
    snippet_refs,
)
from .domain_extras import extras_refs
from .errors import InputError
from .policy import (
    Guardrails,
    QemuConf,
    default_acl,
    gate_open,
    read_qemu_conf,
    version_text,
)
from .resolve import (
    FORBIDDEN,
    LOOKUP_FAILED,
    MISSING,
    OK,
    SKIPPED,
    Host,
    Resolved,
    dm_rows,
    resolve,
)
from .rules import Rule, RuleSet
from .xmlsafe import expect_root, parse_xml

XmlInput = Union[bytes, str, etree._Element]


class PlannedDevice:
    """One row of a plan: a reference, what it resolved to, and whether that is fine."""

    __slots__ = ("source", "path", "access", "status", "rule", "note", "detail", "origin",
                 "kind", "required")

    def __init__(self, source: str, path: str | None, access: str, status: str,
                 rule: Rule | None, note: str, detail: str, origin: str, kind: str,
                 required: bool) -> None:
        self.source = source      # provenance, e.g. devices/disk[2]/source/@dev
        self.path = path          # as written in the XML (derived path for lookups)
        self.access = access      # r, rw or rwm
        self.status = status      # ok, missing, not-a-device, skipped, forbidden, lookup-failed
        self.rule = rule          # the resolved rule (also shown for forbidden rows)
        self.note = note          # why libvirt grants it ("disk source type='block'")
        self.detail = detail      # what the host said ("block device /dev/dm-3")
        self.origin = origin      # default-acl, domain or extra
        self.kind = kind          # disk, backing, hostdev-pci, chardev, acl, extra-rule, …
        self.required = required  # a missing required device is a problem

    @property
    def reason(self) -> str:
        """Why this row exists and what became of it, in one line."""
        if self.note and self.detail:
            return f"{self.note}; {self.detail}"
        return self.note or self.detail

    @property
    def grants(self) -> bool:
        """Does this row put its rule into the filter?"""
        return self.status == OK and self.rule is not None

    @property
    def blocking(self) -> bool:
        """Must this row stop the guest from starting?"""
        return self.status == FORBIDDEN or (
            self.required and self.status in (MISSING, LOOKUP_FAILED))

    def to_json(self) -> Dict[str, object]:
        return {"source": self.source, "path": self.path, "access": self.access,
                "status": self.status, "rule": str(self.rule) if self.rule else None,
                "reason": self.reason, "origin": self.origin, "kind": self.kind,
                "required": self.required}

    def __repr__(self) -> str:
        return (f"PlannedDevice({self.source!r}, {self.path!r}, {self.access!r}, "
                f"{self.status!r}, {str(self.rule) if self.rule else None!r})")


class Plan:
    """The result of planning one domain (or one hotplug snippet)."""

    def __init__(self, domain: DomainInfo | None, devices: List[PlannedDevice],
                 settings: Dict[str, object]) -> None:
        self.domain = domain
        self.devices = devices
        self.settings = settings
        granted: List[Rule] = []
        extras: List[Rule] = []
        self.problems: List[PlannedDevice] = []
        for device in devices:  # one pass: plans of big domains are on the hook's clock
            status = device.status
            if status == OK:
                if device.rule is not None:
                    granted.append(device.rule)
                    if device.origin == ORIGIN_EXTRA:
                        extras.append(device.rule)
            elif device.blocking:
                self.problems.append(device)
        self.rules = RuleSet.of(_unique(granted))
        self.extra_rules = RuleSet.of(_unique(extras))

    @property
    def conflicts(self) -> List[Tuple[Rule, Rule]]:
        """``b M:m`` vs ``c M:m`` pairs that share one map key (see rules.RuleSet)."""
        return self.rules.conflicts

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem_text(self, limit: int = 3) -> str:
        """The problems as one line, for the hook's stderr (libvirt shows it to the user)."""
        parts = [f"{d.source}{f' ({d.path})' if d.path else ''}: {d.status}: {d.reason}"
                 for d in self.problems[:limit]]
        if len(self.problems) > limit:
            parts.append(f"and {len(self.problems) - limit} more")
        return "; ".join(parts)

    def rule_list(self) -> List[str]:
        return [str(rule) for rule in self.rules]

    def to_json(self) -> Dict[str, object]:
        return {
            "domain": self.domain.to_json() if self.domain else None,
            "devices": [device.to_json() for device in self.devices],
            "rules": self.rule_list(),
            "extra_rules": [str(rule) for rule in self.extra_rules],
            "conflicts": [{"rules": [str(a), str(b)],
                           "merged": str(self.rules.entries[b.key])}
                          for a, b in self.conflicts],
            "problems": [{"source": d.source, "path": d.path, "status": d.status,
                          "reason": d.reason} for d in self.problems],
            "settings": self.settings,
        }


def _unique(rules: Iterable[Rule]) -> List[Rule]:
    """Drop repeated Rule objects (ten /dev/null chardevs share one), keeping the order that
    decides how b/c collisions are reported. By identity: the dataclass hash is slow, and
    equal rules that are distinct objects merge correctly in RuleSet anyway."""
    seen: Set[int] = set()
    result: List[Rule] = []
    for rule in rules:
        if id(rule) not in seen:
            seen.add(id(rule))
            result.append(rule)
    return result


# ---------------------------------------------------------------------------------------
# Entry points


def plan_domain(xml: XmlInput, config: Config | None = None,
                host: Host | None = None) -> Plan:
    """Plan a whole ``<domain>`` (live or inactive XML): default ACL, devices, extras."""
    root = _root(xml, "domain XML")
    expect_root(root, ("domain",), "domain XML",
                hint="use plan_snippet for a single device" if root.tag in DEVICE_TAGS
                else None)
    config = config or Config()
    host = host or Host.from_config(config)
    info = domain_info(root)
    refs = domain_refs(root)
    extras = extras_refs(root)
    qemu_conf = read_qemu_conf(config.qemu_conf)
    acl = default_acl(config, qemu_conf)
    settings = {
        "default_acl": acl.origin,
        "libvirt_version": version_text(acl.libvirt_version),
        "libvirt_version_source": acl.version_source,
        "qemu_conf": qemu_conf.path if qemu_conf.found else None,
    }
    devices = _plan_refs(acl.refs + refs + extras, config, host, qemu_conf)
    return Plan(info, devices, settings)


def plan_snippet(xml: XmlInput, config: Config | None = None,
                 host: Host | None = None) -> Plan:
    """Plan one device element (``<disk>``, ``<hostdev>`` … as given to attach-device).

    Only that device's rows: the default ACL, PTY and sound belong to the whole domain.
    """
    root = _root(xml, "device XML")
    tag = root.tag if isinstance(root.tag, str) else ""
    if tag == "domain":
        raise InputError("device XML: got a whole <domain>; use plan_domain")
    if tag not in DEVICE_TAGS:
        raise InputError(f"device XML: root element <{tag or '?'}> is not a libvirt device")
    config = config or Config()
    host = host or Host.from_config(config)
    refs = snippet_refs(root)
    qemu_conf = QemuConf(config.qemu_conf, False)  # snippets have no qemu.conf gates
    devices = _plan_refs(refs, config, host, qemu_conf)
    return Plan(None, devices, {"snippet": tag})


def plan_document(xml: XmlInput, config: Config | None = None,
                  host: Host | None = None) -> Plan:
    """``plan_domain`` for a ``<domain>``, ``plan_snippet`` for a device element."""
    root = _root(xml, "XML")
    tag = root.tag if isinstance(root.tag, str) else ""
    if tag == "domain":
        return plan_domain(root, config, host)
    if tag in DEVICE_TAGS:
        return plan_snippet(root, config, host)
    expect_root(root, ("domain",), "XML",
                hint="or a device element such as <disk> or <hostdev>")
    raise AssertionError("unreachable")  # pragma: no cover


def _root(xml: XmlInput, what: str) -> etree._Element:
    if isinstance(xml, etree._Element):
        return xml
    return parse_xml(xml, what)


# ---------------------------------------------------------------------------------------
# Resolution and judgement of every reference


def _plan_refs(refs: Sequence[DeviceRef], config: Config, host: Host,
               qemu_conf: QemuConf) -> List[PlannedDevice]:
    guard = Guardrails(host, config.allow_forbidden)
    rows: List[PlannedDevice] = []
    add = rows.append
    for ref in refs:
        if ref.gate is not None and not gate_open(ref.gate, qemu_conf):
            add(PlannedDevice(ref.source, ref.path, ref.access, SKIPPED, ref.rule, ref.note,
                              f"off: qemu.conf {ref.gate} is not set", ref.origin, ref.kind,
                              False))
            continue
        if ref.path is not None and ref.lookup is None and ref.skip is None \
                and ref.rule is None:
            # The common case, inlined: a path to stat (resolve() does the same).
            found = host.stat_path(ref.path, ref.access)
            add(_judge(ref, found, guard))
            if ref.follow_dm and found.rule is not None and found.rule.type == "b":
                for target in dm_rows(found.rule, ref.access, host):
                    add(_judge(ref, target, guard))
            continue
        for found in resolve(ref, host):
            add(_judge(ref, found, guard))
    return rows


def _judge(ref: DeviceRef, found: Resolved, guard: Guardrails) -> PlannedDevice:
    status, rule, detail = found.status, found.rule, found.reason
    path = found.path if found.source_suffix or ref.path is None else ref.path
    if status == OK and rule is not None and ref.origin != ORIGIN_ACL:
        # The default ACL is the admin's own configuration: trusted, never refused.
        verdict = guard.check(rule, path)
        if verdict is not None:
            if verdict.allowed_by is None:
                status = FORBIDDEN
                detail = (f"{verdict.reason}; refused (allow it with allow_forbidden in "
                          "the config if you really mean it)")
            else:
                detail += (f"; {verdict.reason}, allowed by allow_forbidden "
                           f"{verdict.allowed_by!r}")
    required = ref.required
    if ref.late and status == MISSING:
        # A managed VFIO device's nodes appear only once libvirt rebinds the device.
        required = False
        detail += ("; managed='yes': libvirt binds the device to vfio-pci after the prepare "
                   "hook, so the node may appear only then")
    return PlannedDevice(ref.source + found.source_suffix, path, ref.access, status, rule,
                         ref.note, detail, ref.origin, found.kind or ref.kind, required)


__all__ = [
    "ORIGIN_ACL", "ORIGIN_DOMAIN", "ORIGIN_EXTRA", "Plan", "PlannedDevice", "plan_document",
    "plan_domain", "plan_snippet",
]
