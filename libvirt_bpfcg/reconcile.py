"""Bring one running guest's filter in line with its live domain XML.

Shared by the ``reconnect`` hook, the ``watch`` service and the hotplug commands:

* own mode (and ``none``: the guest is unfiltered, as when libvirtd may not use bpf(2)):
  our map becomes exactly the live plan's rules plus the runtime grants (``allow``);
* libvirt mode: our overlay, on libvirt's *current* map, holds exactly the metadata extras
  plus the runtime grants — re-installed when libvirt's own map growth dropped it;
* foreign: reported, nothing changed.

Two rules keep a running guest safe:

* a plan with problems (a device that vanished, a lookup that failed) never refuses a guest
  that is already running; its problems are reported and nothing is *revoked* — a device
  the plan could not resolve may be the very one QEMU is using — while missing rules are
  still granted;
* nothing here calls libvirt while holding the cgroup lock (the hook holds libvirt's domain
  lock while it waits for ours: that would deadlock). The live XML is read first; a hotplug
  command that pre-grants a device before libvirt has it in the XML marks the cgroup's
  :class:`HotplugEpoch`, and a reconcile whose XML read overlapped a hotplug only adds.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Tuple, Union

from . import cgroup as cg
from . import detect as det
from . import stale
from .bpf import sys as bpf
from .config import Config
from .devfilter import Change, DeviceFilter
from .plan import Plan, PlannedDevice, plan_domain
from .resolve import Host
from .rules import Rule, sort_rules
from .state import StateDirs, cgroup_id, make_private_dir

XmlSource = Union[bytes, str, Callable[[], Union[bytes, str]]]


@dataclass
class Reconciled:
    """What one reconcile found and did."""

    what: str
    mode: str
    granted: List[Rule] = field(default_factory=list)  # entries written, as now stored
    revoked: List[Rule] = field(default_factory=list)  # entries deleted or narrowed
    installed: bool = False  # a program was (re)attached
    grew_to: int | None = None
    conflicts: List[Tuple[Rule, Rule]] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)  # plan findings, one line each
    held_back: bool = False  # revocations skipped (problems, or a concurrent hotplug)
    note: str = ""  # why nothing was done (foreign filter)
    plan: Plan | None = None
    programs: List[int] = field(default_factory=list)  # attached program ids afterwards

    @property
    def changed(self) -> bool:
        return bool(self.granted or self.revoked or self.installed)

    def summary(self) -> str:
        """One line for the log: ``own mode: granted b 7:3 rw; revoked c 240:1 rw; ...``."""
        if self.note:
            return f"{self.mode} mode: {self.note}; nothing changed"
        parts = []
        if self.granted:
            parts.append("granted " + ", ".join(map(str, sort_rules(self.granted))))
        if self.revoked:
            parts.append("revoked " + ", ".join(map(str, sort_rules(self.revoked))))
        if self.installed:
            parts.append("program installed")
        if self.grew_to:
            parts.append(f"map grown to {self.grew_to} entries")
        if not parts:
            parts.append("in line, nothing to do")
        return f"{self.mode} mode: " + "; ".join(parts)


def problem_line(dev: PlannedDevice) -> str:
    where = f"{dev.source} ({dev.path})" if dev.path else dev.source
    return f"{where}: {dev.status}: {dev.reason}"


def domain_rules(plan: Plan, mode: str) -> List[Rule]:
    """What the domain itself asks of our map in ``mode``: everything in own mode, only the
    metadata extras in libvirt mode (libvirt grants the rest in its own map)."""
    rules = plan.extra_rules if mode == det.MODE_LIBVIRT else plan.rules
    return rules.rules()


def reconcile(dfilter: DeviceFilter, live_xml: XmlSource, config: Config | None = None,
              keys: Iterable[int] | None = None, host: Host | None = None,
              plan: Plan | None = None) -> Reconciled:
    """Make ``dfilter`` match the live domain XML plus the runtime grants.

    ``live_xml`` may be a callable (the watcher passes one that asks libvirt): it is called
    before the lock is taken. ``keys`` limits revocation to those map keys (detach).
    ``host`` overrides where devices are looked up (tests). ``plan``: the caller already
    planned ``live_xml`` (the reconnect hook), so it is not planned twice.
    """
    config = config or Config()
    epoch = HotplugEpoch(dfilter)
    started = epoch.read()
    if plan is None:
        xml = live_xml() if callable(live_xml) else live_xml
        plan = plan_domain(xml, config, host)
    result = Reconciled(dfilter.what, det.MODE_NONE, plan=plan,
                        problems=[problem_line(dev) for dev in plan.problems])
    with dfilter.locked():
        d = dfilter.detect()
        result.mode = d.mode
        if d.mode == det.MODE_FOREIGN:
            result.note = d.reason
            result.programs = [p.id for p in d.programs]
            return result
        # A hotplug in flight (or finished) since we read the XML: the XML may lack a device
        # whose rules were granted ahead of libvirt. Only add, never take away, this time.
        quiet = epoch.read()
        result.held_back = bool(plan.problems) or quiet != started or epoch.in_progress()
        wanted = domain_rules(plan, d.mode) + dfilter.runtime_grants()
        change = dfilter.sync(wanted, keys=keys, revoke=not result.held_back)
        # What is attached now, read under the lock: a watcher compares later queries with
        # it, so a program swap right after we let go is still noticed.
        result.programs = attached_programs(dfilter.cgroup)
    _fold(result, change)
    return result


def attached_programs(cgroup_dir: str) -> List[int]:
    """Ids of the device programs attached to the cgroup (one BPF_PROG_QUERY)."""
    with det.opened(bpf.open_cgroup(cgroup_dir)) as fd:
        return bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE).prog_ids


def _fold(result: Reconciled, change: Change) -> None:
    result.mode = change.mode
    result.granted = list(change.changed)
    result.revoked = list(change.removed)
    result.installed = change.installed
    result.grew_to = change.grew_to
    result.conflicts = list(change.conflicts)


def guest_filter(name: str, dirs: StateDirs, run_dir: str = cg.DEFAULT_QEMU_RUN_DIR,
                 record_denials: bool = True) -> DeviceFilter:
    """The filter of the running libvirt domain ``name``: its cgroup from QEMU's pid file
    (never from the domain name: cgroup names are reused and stale ones linger)."""
    pid = cg.domain_pid(name, run_dir)
    directory = cg.guest_cgroup_of_pid(pid, f"domain {name}")
    return DeviceFilter(directory, dirs, what=f"domain {name}", record_denials=record_denials)


class HotplugEpoch:
    """A per-cgroup counter the hotplug commands bump around each attach: odd while one is in
    flight. A reconcile compares it before reading the live XML and under the lock.

    ``<state_dir>/hotplug/<cgroup-id>`` holds ``COUNT PID``. A hotplug killed midway leaves
    an odd count, which stops counting as "in flight" once its pid is gone.
    Callers of begin/end hold the cgroup lock.
    """

    def __init__(self, dfilter: DeviceFilter) -> None:
        self.directory = os.path.join(dfilter.dirs.state_dir, "hotplug")
        try:
            self.path: str | None = os.path.join(self.directory,
                                                 str(cgroup_id(dfilter.cgroup)))
        except Exception:  # noqa: BLE001 - the cgroup is gone: the detection will say so
            self.path = None

    def _load(self) -> Tuple[int, int]:
        if self.path is None:
            return 0, 0
        try:
            with open(self.path, encoding="ascii") as handle:
                count, pid = (int(x) for x in handle.read().split())
            return count, pid
        except (OSError, ValueError):
            return 0, 0

    def read(self) -> int:
        return self._load()[0]

    def in_progress(self) -> bool:
        count, pid = self._load()
        return count % 2 == 1 and _alive(pid)

    def _store(self, count: int) -> None:
        if self.path is None:
            return
        make_private_dir(self.directory)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as handle:
            handle.write(f"{count} {os.getpid()}\n")
        os.replace(tmp, self.path)

    def begin(self) -> None:
        count = self.read()
        self._store(count + 1 if count % 2 == 0 else count + 2)

    def end(self) -> None:
        count = self.read()
        self._store(count + 1 if count % 2 == 1 else count + 2)

    def drop(self) -> None:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def collect_stale_epochs(state_dir: str, cgroup_root: str) -> int:
    """Delete hotplug counters whose cgroup is gone (like pins and runtime grants)."""
    return len(stale.collect_files(os.path.join(state_dir, "hotplug"), "", cgroup_root))
