"""``explain``: may this guest open this device, and why (not)?

The answer is computed the way the kernel decides, not from our own bookkeeping:

* the programs that really run for the cgroup are its *effective* programs
  (``BPF_PROG_QUERY`` with ``BPF_F_QUERY_EFFECTIVE``): the cgroup's own program plus those of
  ancestors attached with ALLOW_MULTI (or the nearest ancestor's when the cgroup has none).
  Every one of them must allow the open;
* each program we can read (libvirt's or ours) is evaluated with libvirt's lookup semantics,
  map by map in program order (libvirt's / our base map first, the overlay second), keys
  ``major:minor``, ``major:*``, ``*:minor``, ``*:*``; a key whose value lacks the access or the
  type falls through to the next key (DESIGN §3). Programs of anyone else cannot be read:
  the verdict is then "unknown", never a guess;
* on hybrid hosts a cgroup v1 ``devices`` controller judges the open too (the kernel runs
  the cgroup v2 programs first, then the v1 list): its ``devices.list`` is checked as well.

Then the allowing entry is traced back to why it is there: the domain plan (re-planned from
libvirt's live status XML, else the hook's saved plan), a runtime grant (``allow``), or
nothing we know of. A denied device gets the commands that would allow it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from lxml import etree

from . import cgroup as cg
from . import detect as det
from .bpf import devprog
from .bpf import sys as bpf
from .config import Config
from .devnames import DeviceNames
from .domain import ORIGIN_ACL, ORIGIN_DOMAIN, ORIGIN_EXTRA, first_child
from .domain_extras import NAMESPACE as EXTRAS_NS
from .domain_extras import PREFIX as EXTRAS_PREFIX
from .errors import BpfcgError, OperationError, RuleError, UsageError
from .grants import GrantStore
from .rules import (
    TYPE_BITS,
    Rule,
    access_bits,
    access_string,
    encode_key,
    rule_for_path,
)
from .state import StateDirs

ALLOWED = "allowed"
DENIED = "denied"
UNKNOWN = "unknown"

# libvirt's lookup order (virCgroupV2DevicesGetKey callers in its program).
KEY_KINDS = ("exact", "major:*", "*:minor", "*:*")

MAP_LABELS = {devprog.BASE_MAP_NAME: "own", devprog.OVERLAY_MAP_NAME: "overlay", "": "libvirt"}


# ---------------------------------------------------------------------------------------
# The question


@dataclass(frozen=True)
class DeviceQuery:
    """One concrete device node and the access an open would ask for."""

    type: str  # "b" or "c"
    major: int
    minor: int
    access: str  # canonical r/w/m subset
    path: str | None = None  # as the admin gave it

    @property
    def numbers(self) -> str:
        return f"{self.type} {self.major}:{self.minor}"

    @property
    def rule(self) -> Rule:
        """The narrowest rule that would allow exactly this."""
        return Rule(self.type, self.major, self.minor, self.access)

    def with_access(self, access: str) -> DeviceQuery:
        return DeviceQuery(self.type, self.major, self.minor, access, self.path)


def parse_device(words: Sequence[str]) -> DeviceQuery:
    """``/dev/loop3``, ``/dev/loop3 r``, ``c 1:3``, ``c 1:3 rw`` — as one argument or several.

    Paths are resolved like ``allow`` resolves them (stat following symlinks); numbers must
    name one device (no ``*``: explain answers for a node, not a class of them).
    """
    parts = " ".join(words).split()
    if not parts:
        raise UsageError("no device: give a path such as /dev/loop3 or numbers such as 'c 1:3'")
    head = parts[0]
    if head in ("b", "c"):
        if len(parts) not in (2, 3):
            raise RuleError(f"bad device {' '.join(parts)!r}: expected 'c MAJOR:MINOR [ACCESS]'")
        access = parts[2] if len(parts) == 3 else "rw"
        if "*" in parts[1]:
            raise RuleError(f"{parts[1]}: explain needs one device, not a wildcard")
        rule = Rule.parse(f"{head} {parts[1]} {access}")
        assert rule.major is not None and rule.minor is not None
        return DeviceQuery(head, rule.major, rule.minor, rule.access)
    if head == "a":
        raise RuleError("type 'a' matches any device: name one, 'b MAJOR:MINOR' or "
                        "'c MAJOR:MINOR'")
    if not head.startswith("/"):
        raise RuleError(f"bad device {head!r}: give an absolute path or 'c MAJOR:MINOR'")
    if len(parts) > 2:
        raise RuleError(f"bad device {' '.join(parts)!r}: expected 'PATH [ACCESS]'")
    access = parts[1] if len(parts) == 2 else "rw"
    access_bits(access)
    rule = rule_for_path(head, access)
    assert rule.major is not None and rule.minor is not None
    return DeviceQuery(rule.type, rule.major, rule.minor, rule.access, head)


# ---------------------------------------------------------------------------------------
# libvirt's lookup, reporting which key decided


@dataclass(frozen=True)
class KeyHit:
    """A key present in a map for this device: the entry, and whether it allows the open."""

    kind: str  # one of KEY_KINDS
    key: int
    value: int
    allows: bool

    @property
    def rule(self) -> Rule | None:
        return Rule.from_entry(self.key, self.value)

    def describe(self) -> str:
        rule = self.rule
        return str(rule) if rule is not None else f"dead entry {self.value:#x} (matches nothing)"


def candidate_keys(major: int, minor: int) -> List[Tuple[str, int]]:
    return list(zip(KEY_KINDS, (encode_key(major, minor), encode_key(major, None),
                                encode_key(None, minor), encode_key(None, None))))


def evaluate_entries(entries: Dict[int, int], query: DeviceQuery) -> List[KeyHit]:
    """Every key of this device present in ``entries``, in lookup order; the map allows iff
    one of them allows (the first that does is the one the program stops at)."""
    want = (access_bits(query.access) << 16) | TYPE_BITS[query.type]
    hits = []
    for kind, key in candidate_keys(query.major, query.minor):
        value = entries.get(key)
        if value is not None:
            hits.append(KeyHit(kind, key, value, value & want == want))
    return hits


def why_not(hit: KeyHit, query: DeviceQuery) -> str:
    """Why a present key does not allow: the wrong type, or which access it lacks."""
    type_bits = hit.value & 0xFFFF
    if not type_bits & TYPE_BITS[query.type]:
        return f"type {'block' if query.type == 'b' else 'char'} not in the entry"
    missing = access_bits(query.access) & ~(hit.value >> 16)
    return f"no {access_string(missing)} access"


# ---------------------------------------------------------------------------------------
# Programs


@dataclass
class MapResult:
    label: str  # own, libvirt, overlay (or the map's name)
    map_id: int
    hits: List[KeyHit]

    @property
    def match(self) -> KeyHit | None:
        return next((h for h in self.hits if h.allows), None)

    def to_json(self, query: DeviceQuery) -> Dict[str, object]:
        return {"map": self.label, "map_id": self.map_id,
                "keys": [{"kind": h.kind, "rule": h.describe(), "allows": h.allows,
                          **({} if h.allows else {"why_not": why_not(h, query)})}
                         for h in self.hits]}


@dataclass
class ProgramResult:
    """One effective program's verdict on the open."""

    program: det.ProgramView
    cgroup: str | None  # where it is attached (None: above what we can see)
    is_own_cgroup: bool
    verdict: str
    maps: List[MapResult] = field(default_factory=list)
    note: str = ""

    @property
    def match(self) -> Tuple[MapResult, KeyHit] | None:
        for result in self.maps:
            hit = result.match
            if hit is not None:
                return result, hit
        return None

    def where(self) -> str:
        if self.is_own_cgroup:
            return "this cgroup"
        return f"ancestor {self.cgroup}" if self.cgroup else \
            "an ancestor outside this cgroup namespace"

    def to_json(self, query: DeviceQuery) -> Dict[str, object]:
        return {"cgroup": self.cgroup, "own_cgroup": self.is_own_cgroup,
                **self.program.to_json(), "verdict": self.verdict,
                "maps": [m.to_json(query) for m in self.maps], "note": self.note}


def rule_maps(prog: det.ProgramView) -> List[Tuple[str, det.MapView]] | None:
    """The rule maps a program looks up, in order; None when we cannot read its logic."""
    if prog.owner == det.OWNER_LIBVIRT:
        return [("libvirt", prog.maps[0])]
    if prog.owner == det.OWNER_BPFCG:
        # The denial map is HASH u64 -> 24 bytes: not a rule map, never consulted to allow.
        return [(MAP_LABELS.get(m.name, m.name), m) for m in prog.maps if m.is_rule_map]
    return None


def _lookup_keys(map_id: int, query: DeviceQuery) -> Dict[int, int]:
    """Only the four keys the program would look up: O(1) whatever the map holds."""
    found: Dict[int, int] = {}
    with det.opened(bpf.map_get_fd_by_id(map_id)) as fd:
        for _kind, key in candidate_keys(query.major, query.minor):
            raw = bpf.map_lookup(fd, bpf.key_bytes(key), devprog.RULE_VALUE_SIZE)
            if raw is not None:
                found[key] = bpf.parse_value(raw)
    return found


def evaluate_program(prog: det.ProgramView, cgroup: str | None, own: bool,
                     query: DeviceQuery) -> ProgramResult:
    maps = rule_maps(prog)
    if maps is None:
        return ProgramResult(prog, cgroup, own, UNKNOWN, note=(
            f"{prog.describe()} is neither libvirt's nor ours: its logic cannot be read"))
    result = ProgramResult(prog, cgroup, own, DENIED)
    for label, view in maps:
        try:
            entries = _lookup_keys(view.id, query)
        except bpf.BpfError as exc:
            result.verdict = UNKNOWN
            result.note = f"map {view.id} could not be read ({exc}); the filter changed? " \
                          "run explain again"
            return result
        result.maps.append(MapResult(label, view.id, evaluate_entries(entries, query)))
        if result.maps[-1].match is not None:
            result.verdict = ALLOWED
            break  # the program returns at the first allowing key
    return result


def _mount_of(directory: str) -> str | None:
    """The cgroup2 mount point ``directory`` lives under (the longest that matches)."""
    real = os.path.realpath(directory)
    best = None
    for mount in cg.cgroup2_mounts():
        point = os.path.realpath(mount.mountpoint)
        if (real == point or real.startswith(point.rstrip("/") + "/")) and (
                best is None or len(point) > len(best)):
            best = point
    return best


def effective_programs(cgroup: str, query: DeviceQuery) -> List[ProgramResult]:
    """The verdict of every program that runs when a process of ``cgroup`` opens a device."""
    try:
        with det.opened(bpf.open_cgroup(cgroup)) as fd:
            ids = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE, bpf.BPF_F_QUERY_EFFECTIVE).prog_ids
    except FileNotFoundError:
        raise OperationError(f"cgroup {cgroup} does not exist (guest stopped?)") from None
    if not ids:
        return []
    where: Dict[int, Tuple[str, det.ProgramView, bool]] = {}
    for prog in det.detect(cgroup).programs:
        where[prog.id] = (cgroup, prog, True)
    mount = _mount_of(cgroup)
    if mount is not None:
        for anc in det.ancestor_programs(cgroup, mount):
            where.setdefault(anc.program.id, (anc.cgroup, anc.program, False))
    results = []
    for prog_id in ids:
        if prog_id in where:
            directory, prog, own = where[prog_id]
            results.append(evaluate_program(prog, directory, own, query))
            continue
        # Attached above our cgroup namespace or mount (a container, the test lab).
        try:
            prog = det.program_view(prog_id, 0)
        except bpf.BpfError:
            continue  # detached meanwhile: no longer runs
        results.append(evaluate_program(prog, None, False, query))
    return results


# ---------------------------------------------------------------------------------------
# cgroup v1 devices (hybrid hosts)


@dataclass
class V1Result:
    pid: int  # v1 membership is per process: the one judged
    directory: str
    verdict: str
    entry: str | None  # the devices.list line that allows


def _v1_devices_mount(mountinfo: str = "/proc/self/mountinfo") -> Tuple[str, str] | None:
    """(mount point, root) of the cgroup v1 hierarchy carrying the devices controller."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                left, sep, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if sep and len(rest) >= 3 and rest[0] == "cgroup" and \
                        "devices" in rest[2].split(","):
                    return fields[4], fields[3]
    except OSError:
        return None
    return None


def v1_devices(pid: int, query: DeviceQuery, proc: str = "/proc") -> V1Result | None:
    """The v1 devices controller's verdict for ``pid``; None when there is none here."""
    mount = _v1_devices_mount()
    if mount is None:
        return None
    point, root = mount
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    rel = next((line.split(":", 2)[2] for line in lines
                if line.count(":") >= 2 and "devices" in line.split(":", 2)[1].split(",")), None)
    if rel is None:
        return None
    if root != "/" and rel.startswith(root):
        rel = rel[len(root):]
    directory = os.path.join(point, rel.lstrip("/"))
    try:
        with open(os.path.join(directory, "devices.list"), encoding="ascii") as handle:
            listing = handle.read().splitlines()
    except OSError:
        return None
    for line in listing:
        try:
            rule = Rule.parse(line)
        except RuleError:
            continue
        if rule.covers(query.type, query.major, query.minor, query.access):
            return V1Result(pid, directory, ALLOWED, line.strip())
    return V1Result(pid, directory, DENIED, None)


# ---------------------------------------------------------------------------------------
# Why an entry is there: the domain plan, runtime grants


@dataclass
class Source:
    kind: str  # domain, default-acl, extra, runtime-grant, hook-plan, outside
    where: str  # the XML element, config key or command
    detail: str
    rule: str

    def to_json(self) -> Dict[str, str]:
        return dict(self.__dict__)


@dataclass
class PlanRow:
    """A plan row naming this device, whatever became of it (granted, skipped, missing)."""

    source: str
    status: str
    rule: str | None
    origin: str
    reason: str

    def to_json(self) -> Dict[str, object]:
        return dict(self.__dict__)


@dataclass
class DomainContext:
    """What we know about the domain behind the cgroup."""

    name: str
    pid: int | None = None
    plan: object | None = None  # plan.Plan, re-planned from the live XML
    plan_source: str = ""
    saved: Dict[str, object] | None = None  # the hook's DomainPlan JSON
    extras: List[etree._Element] = field(default_factory=list)  # our metadata entries
    notes: List[str] = field(default_factory=list)


def live_domain_xml(name: str, run_dir: str) -> etree._Element:
    """libvirt's status file ``RUN_DIR/NAME.xml``: a ``<domstatus>`` wrapping the live
    ``<domain>`` (with hotplugged devices), root-only readable."""
    from .xmlsafe import parse_xml

    path = os.path.join(run_dir, f"{name}.xml")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise OperationError(f"{path} does not exist") from None
    except OSError as exc:
        raise OperationError(f"{path}: cannot read: {exc.strerror}") from None
    root = parse_xml(raw, path)
    if root.tag == "domain":
        return root
    domain = first_child(root, "domain")
    if root.tag != "domstatus" or domain is None:
        raise OperationError(f"{path}: expected <domstatus> with a <domain> inside")
    return domain


def extras_entries(domain: etree._Element) -> List[etree._Element]:
    """Our metadata entries (device/rule/class) as they are, for a merged snippet."""
    metadata = first_child(domain, "metadata")
    found: List[etree._Element] = []
    if metadata is None:
        return found
    ns_tag = f"{{{EXTRAS_NS}}}"
    for child in metadata:
        if not isinstance(child.tag, str) or not child.tag.startswith(ns_tag):
            continue
        local = child.tag[len(ns_tag):]
        entries = [child] if local in ("device", "rule", "class") else list(child)
        found.extend(e for e in entries if isinstance(e.tag, str))
    return found


def _saved_plan(state_dir: str, name: str, uuid: str | None) -> Dict[str, object] | None:
    directory = os.path.join(state_dir, "domains")
    paths = [os.path.join(directory, f"{uuid}.json")] if uuid else \
        sorted(glob.glob(os.path.join(directory, "*.json")))
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("name") == name:
            return data
    return None


def domain_context(name: str, run_dir: str, state_dir: str, config: Config) -> DomainContext:
    """Re-plan from libvirt's live XML when it is readable (it names the element behind
    every rule); else fall back to the plan the hook saved at prepare (rules only)."""
    from .domain import domain_info
    from .plan import plan_domain

    ctx = DomainContext(name)
    uuid = None
    try:
        domain = live_domain_xml(name, run_dir)
        uuid = domain_info(domain).uuid
        ctx.extras = extras_entries(domain)
        ctx.plan = plan_domain(domain, config)
        ctx.plan_source = f"live XML {os.path.join(run_dir, name + '.xml')}"
    except BpfcgError as exc:
        ctx.notes.append(f"cannot re-plan the live domain XML: {exc}")
    ctx.saved = _saved_plan(state_dir, name, uuid)
    if ctx.plan is None and ctx.saved is not None:
        ctx.plan_source = f"the hook's plan in {os.path.join(state_dir, 'domains')}"
    return ctx


def _same_device(rule: Rule, query: DeviceQuery) -> bool:
    return ((rule.type == "a" or rule.type == query.type)
            and rule.major in (None, query.major) and rule.minor in (None, query.minor))


def plan_rows(ctx: DomainContext | None, query: DeviceQuery) -> List[PlanRow]:
    """Rows of the live plan whose rule covers this device node (any access, any status)."""
    if ctx is None or ctx.plan is None:
        return []
    rows = []
    for dev in ctx.plan.devices:  # type: ignore[attr-defined]
        if dev.rule is not None and _same_device(dev.rule, query):
            rows.append(PlanRow(dev.source, dev.status, str(dev.rule), dev.origin, dev.reason))
    return rows


def sources_for(hit: KeyHit, label: str, ctx: DomainContext | None,
                grants: List[Rule]) -> List[Source]:
    """Why the allowing entry is in its map. libvirt's map holds what libvirt derives from
    the XML and its default ACL; our overlay the extras and runtime grants; our own map all
    of those."""
    origins = {"libvirt": (ORIGIN_DOMAIN, ORIGIN_ACL), "overlay": (ORIGIN_EXTRA,),
               "own": (ORIGIN_DOMAIN, ORIGIN_ACL, ORIGIN_EXTRA)}.get(label, ())
    found: List[Source] = []
    if ctx is not None and ctx.plan is not None:
        for dev in ctx.plan.devices:  # type: ignore[attr-defined]
            if dev.grants and dev.rule.key == hit.key and dev.origin in origins:
                found.append(Source(dev.origin, dev.source, dev.reason, str(dev.rule)))
    elif ctx is not None and ctx.saved is not None:
        keys = "extra_rules" if label == "overlay" else "rules"
        for text in ctx.saved.get(keys, []) or []:  # type: ignore[union-attr]
            with contextlib.suppress(RuleError):
                rule = Rule.parse(str(text))
                if rule.key == hit.key:
                    kind = "extra" if text in (ctx.saved.get("extra_rules") or []) else \
                        "hook-plan"
                    found.append(Source(kind, ctx.plan_source, "planned by the hook at "
                                        "guest start", str(rule)))
    if label in ("overlay", "own"):
        for rule in grants:
            if rule.key == hit.key:
                found.append(Source("runtime-grant", "libvirt-bpfcg allow",
                                    "granted at runtime; kept until revoked or the guest "
                                    "stops", str(rule)))
    if found:
        return found
    if ctx is None:
        return [Source("unknown", "-", "not a runtime grant; run explain with --domain NAME to "
                       "trace it to the domain XML", hit.describe())]
    who = "libvirt, for something not in the live XML as we plan it, or someone else " \
          "writing libvirt's map" if label == "libvirt" else "someone outside " \
          "libvirt-bpfcg's plan and runtime grants (or the domain changed since)"
    return [Source("outside", "-", f"added by {who}", hit.describe())]


# ---------------------------------------------------------------------------------------
# What would allow it


def metadata_access(access: str) -> str:
    """Our metadata accepts r, rw or rwm: the smallest of them covering ``access``."""
    bits = access_bits(access)
    for choice in ("r", "rw", "rwm"):
        if bits & ~access_bits(choice) == 0:
            return choice
    return "rwm"


def extras_snippet(query: DeviceQuery, existing: Sequence[etree._Element]) -> str:
    """``<extras>…</extras>`` for ``virsh metadata --set``: the entries already there (--set
    replaces the whole element) plus this device, by path when it was given as one."""
    root = etree.Element("extras")
    for old in existing:
        local = etree.QName(old).localname
        copy = etree.SubElement(root, local, {k: v for k, v in old.attrib.items()
                                              if not k.startswith("{")})
        copy.text = (old.text or "").strip() or None
    access = metadata_access(query.access)
    if query.path:
        etree.SubElement(root, "device", {"path": query.path, "access": access})
    else:
        etree.SubElement(root, "rule").text = f"{query.type} {query.major}:{query.minor} " \
                                              f"{access}"
    return etree.tostring(root, encoding="unicode")


def allow_command(target: Dict[str, str | None], query: DeviceQuery) -> str:
    flag, value = ("--domain", target["domain"]) if target.get("domain") else \
        ("--cgroup", target["cgroup"])
    rule = f"{query.path} {query.access}" if query.path else str(query.rule)
    return f"libvirt-bpfcg allow {flag} {shlex.quote(str(value))} {shlex.quote(rule)}"


def metadata_command(name: str, snippet: str) -> str:
    return (f"virsh metadata {shlex.quote(name)} --live --config --uri {EXTRAS_NS} "
            f"--key {EXTRAS_PREFIX} --set {shlex.quote(snippet)}")


# ---------------------------------------------------------------------------------------
# The whole answer


@dataclass
class Explanation:
    query: DeviceQuery
    target: Dict[str, str | None]  # domain, cgroup
    mode: str
    verdict: str
    programs: List[ProgramResult]
    v1: V1Result | None = None
    allowed_by: Dict[str, object] | None = None
    sources: List[Source] = field(default_factory=list)
    partial: Dict[str, str] = field(default_factory=dict)  # access letter -> verdict
    plan_rows: List[PlanRow] = field(default_factory=list)
    plan_source: str = ""
    denials: Dict[str, object] | None = None
    names: List[str] = field(default_factory=list)
    qemu_dev: Dict[str, object] | None = None
    suggestions: List[Dict[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == ALLOWED else 1

    def to_json(self) -> Dict[str, object]:
        q = self.query
        return {
            "device": {"type": q.type, "major": q.major, "minor": q.minor, "path": q.path,
                       "names": self.names},
            "access": q.access,
            "target": self.target,
            "mode": self.mode,
            "verdict": self.verdict,
            "allowed_by": self.allowed_by,
            "sources": [s.to_json() for s in self.sources],
            "programs": [p.to_json(q) for p in self.programs],
            "cgroup_v1": None if self.v1 is None else dict(self.v1.__dict__),
            "partial": self.partial,
            "plan_rows": [r.to_json() for r in self.plan_rows],
            "plan_source": self.plan_source or None,
            "denials": self.denials,
            "qemu_dev": self.qemu_dev,
            "suggestions": self.suggestions,
            "notes": self.notes,
        }


def _combine(programs: List[ProgramResult], v1: V1Result | None) -> str:
    verdicts = [p.verdict for p in programs] + ([v1.verdict] if v1 else [])
    if DENIED in verdicts:
        return DENIED
    if UNKNOWN in verdicts:
        return UNKNOWN
    return ALLOWED


def _first_pid(cgroup: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(cgroup, "cgroup.procs"), encoding="ascii") as handle:
            first = handle.readline().strip()
        return int(first) if first else None
    return None


def _recorded_denials(cgroup: str, dirs: StateDirs,
                      query: DeviceQuery) -> Dict[str, object] | None:
    from .devfilter import DeviceFilter

    try:
        found = DeviceFilter(cgroup, dirs, allow_root=True).denials()
    except (BpfcgError, OSError):
        return None
    boot_offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    for item in found:
        if (item.major, item.minor) == (query.major, query.minor):
            # The denial map's key carries no type, like libvirt's: b and c share it.
            return {"count": item.count, "type": item.type_letter,
                    "access": access_string(item.access_bits),
                    "last": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                          time.gmtime(boot_offset + item.last_ns / 1e9))}
    return None


def _qemu_dev(pid: int, query: DeviceQuery) -> Dict[str, object] | None:
    """Is the node in QEMU's own /dev? libvirt gives QEMU a private /dev (namespaces=mount)
    holding only the devices it knows: a node missing there fails with ENOENT, not EPERM,
    whatever the filter says. /proc/PID/root walks QEMU's mount namespace."""
    if not query.path or not query.path.startswith("/dev/"):
        return None
    real = os.path.realpath(query.path)
    try:
        if os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            return None  # QEMU shares our /dev (namespaces = [] in qemu.conf): nothing to tell
    except OSError:
        return None
    for path in dict.fromkeys((query.path, real)):
        try:
            st = os.stat(f"/proc/{pid}/root{path}")
        except OSError:
            continue
        same = os.major(st.st_rdev) == query.major and os.minor(st.st_rdev) == query.minor
        return {"path": path, "present": True, "same_numbers": same}
    return {"path": query.path, "present": False, "same_numbers": False}


def explain(cgroup: str, query: DeviceQuery, dirs: StateDirs,
            domain: str | None = None, ctx: DomainContext | None = None,
            names: DeviceNames | None = None) -> Explanation:
    """The verdict on ``query`` for processes of ``cgroup`` (of domain ``domain``)."""
    names = names or DeviceNames()
    programs = effective_programs(cgroup, query)  # first: says so if the cgroup is gone
    d = det.detect(cgroup)
    mode = d.mode
    if mode == det.MODE_LIBVIRT:
        mode += " (our overlay installed)" if d.overlay_installed else " (libvirt's program only)"
    pid = ctx.pid if ctx is not None and ctx.pid else _first_pid(cgroup)
    v1 = v1_devices(pid, query) if pid else None
    result = Explanation(query, {"domain": domain, "cgroup": cgroup}, mode,
                         _combine(programs, v1), programs, v1)
    name = names.name(query.type, query.major, query.minor)
    result.names = [name] if name else []
    grants = GrantStore(dirs.state_dir).get(cgroup)
    if ctx is not None:
        result.plan_source = ctx.plan_source
        result.notes.extend(ctx.notes)
        result.plan_rows = plan_rows(ctx, query)
    own = next((p for p in programs if p.is_own_cgroup), None)
    if own is not None and own.match is not None:
        found, hit = own.match
        result.allowed_by = {"program": own.program.id, "map": found.label,
                             "map_id": found.map_id, "key": hit.kind, "rule": hit.describe()}
        result.sources = sources_for(hit, found.label, ctx, grants)
    if not programs:
        result.notes.append("no device program applies to this cgroup: cgroup v2 allows "
                            "every device here")
    if result.verdict != ALLOWED and len(query.access) > 1:
        for letter in query.access:
            alone = query.with_access(letter)
            result.partial[letter] = _combine(
                [evaluate_program(p.program, p.cgroup, p.is_own_cgroup, alone)
                 for p in programs], v1_devices(pid, alone) if pid else None)
    result.denials = _recorded_denials(cgroup, dirs, query)
    if ctx is not None and ctx.pid:
        result.qemu_dev = _qemu_dev(ctx.pid, query)
    _advise(result, d, ctx, dirs)
    return result


def _advise(result: Explanation, d: det.Detection, ctx: DomainContext | None,
            dirs: StateDirs) -> None:
    """Notes and the commands that would allow a denied device."""
    query = result.query
    qemu_dev = result.qemu_dev
    if qemu_dev is not None and not qemu_dev["present"]:
        result.notes.append(
            f"{qemu_dev['path']} does not exist in QEMU's private /dev: QEMU would get "
            "'No such file or directory' whatever the filter says (libvirt creates nodes only "
            "for devices in the domain XML; extras given by path are created by our hook at "
            "guest start)")
    if result.verdict == ALLOWED:
        return
    self_denies = any(p.is_own_cgroup and p.verdict == DENIED for p in result.programs)
    # Widening the cgroup's own filter helps only when nothing else denies: an ancestor's
    # program and the v1 list judge every open too (and allow refuses such a grant).
    elsewhere = any(not p.is_own_cgroup and p.verdict != ALLOWED for p in result.programs) \
        or (result.v1 is not None and result.v1.verdict == DENIED)
    for prog in result.programs:
        if prog.is_own_cgroup or prog.verdict == ALLOWED:
            continue
        flags = prog.program.describe()
        verb = "would still deny it" if prog.verdict == DENIED else "may deny it"
        result.notes.append(
            f"{flags} on {prog.where()} also judges every open here and {verb}: it must "
            "allow it too; change it there (libvirt-bpfcg never widens another cgroup's "
            "program)")
    if result.v1 is not None and result.v1.verdict == DENIED:
        result.notes.append(
            f"the cgroup v1 devices controller ({result.v1.directory}) denies it too: "
            "libvirt manages that list on hybrid hosts (qemu.conf cgroup_device_acl or the "
            "domain XML)")
    if d.mode == det.MODE_FOREIGN:
        result.notes.append(f"the guest cgroup's filter is foreign ({d.reason}): "
                            "libvirt-bpfcg cannot widen it")
        return
    for row in result.plan_rows:
        if row.status != "ok":
            result.notes.append(f"the domain names this device at {row.source} but it was not "
                                f"granted: {row.status}: {row.reason}")
        elif row.rule and not Rule.parse(row.rule).covers(query.type, query.major,
                                                          query.minor, query.access):
            result.notes.append(f"{row.source} grants it only as {row.rule}: {row.reason}")
    if d.mode == det.MODE_LIBVIRT and not d.overlay_installed:
        pinned = _pinned_overlay_allows(result.target["cgroup"] or "", dirs, query)
        if pinned:
            result.notes.append(
                f"our overlay (pinned) holds {pinned} but is not attached: libvirt replaced "
                "our program when its map grew. The reconnect hook, the watcher or any "
                "'libvirt-bpfcg allow' on this guest re-installs it")
    if self_denies and not elsewhere:
        result.suggestions.append({"kind": "allow-now",
                                   "command": allow_command(result.target, query)})
        if ctx is not None:
            snippet = extras_snippet(query, ctx.extras)
            result.suggestions.append({"kind": "metadata",
                                       "command": metadata_command(ctx.name, snippet)})


def _pinned_overlay_allows(cgroup: str, dirs: StateDirs, query: DeviceQuery) -> str | None:
    from .devfilter import PIN_OVERLAY

    try:
        fd = dirs.get_pinned(cgroup, PIN_OVERLAY)
    except (BpfcgError, OSError):
        return None
    if fd is None:
        return None
    with det.opened(fd):
        map_id = bpf.map_info(fd).id
    hit = next((h for h in evaluate_entries(_lookup_keys(map_id, query), query) if h.allows),
               None)
    return hit.describe() if hit else None


__all__ = [
    "ALLOWED", "DENIED", "UNKNOWN", "DeviceQuery", "DomainContext", "Explanation", "KeyHit",
    "domain_context", "evaluate_entries", "explain", "extras_snippet", "parse_device",
]
