"""The filter engine: grant, revoke and inspect one cgroup's device filter.

Every change runs under the per-cgroup lock and starts with a fresh detection, because libvirt
may have swapped programs since anyone last looked. Changes only ever go through states that
are safe for the guest:

* adding access to an existing entry or adding a key is one atomic map update;
* growing a full map builds a bigger copy, loads a program on it and swaps it in with one
  flags-0 attach — before the swap the old program still allows everything it allowed, after
  it the new one allows the same plus the new rules;
* the attach carries the revision read by the detection (``expected_revision``), so an attach
  that raced libvirt's own program swap fails with ESTALE and is redone on libvirt's new map
  instead of resurrecting an abandoned one (overlay-experiment.md, 2b/2c).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Sequence, Set, Tuple

from . import detect as det
from .bpf import devprog
from .bpf import sys as bpf
from .cgroup import cgroup2_root, check_guest_cgroup, is_mount_root
from .detect import Detection, MapView
from .devnames import DeviceNames
from .errors import OperationError
from .grants import GrantStore
from .rules import Rule, RuleSet, access_string, decode_key, encode_key
from .state import StateDirs

INITIAL_MAP_SIZE = 64  # libvirt's VIR_CGROUP_V2_INITIAL_BPF_MAP_SIZE
ATTACH_RETRIES = 5
PIN_OVERLAY = "overlay"
PIN_DENIALS = "denials"

MAP_OWN = "own"
MAP_OVERLAY = "overlay"
MAP_LIBVIRT = "libvirt"


@dataclass
class Change:
    """What one grant or revoke did."""

    mode: str
    # grant: each touched entry as now stored; revoke: each requested rule that took effect
    changed: List[Rule] = field(default_factory=list)
    unchanged: List[Rule] = field(default_factory=list)  # already covered / not present
    conflicts: List[Tuple[Rule, Rule]] = field(default_factory=list)  # b/c sharing a key
    installed: bool = False  # a program was (re)attached
    grew_to: int | None = None  # new map size when the map grew
    # sync: entries deleted because nothing wants them any more (as they were)
    removed: List[Rule] = field(default_factory=list)
    # grant: raw value of each key this call wrote, before it (None: the key was absent);
    # what undo() puts back when the operation the grant prepared for fails
    before: Dict[int, int | None] = field(default_factory=dict)

    def merge(self, other: Change) -> None:
        """Fold a later step's changes into this one (sync = trim + grant)."""
        self.mode = other.mode
        self.changed += other.changed
        self.unchanged += other.unchanged
        self.conflicts += other.conflicts
        self.removed += other.removed
        self.installed = self.installed or other.installed
        self.grew_to = other.grew_to or self.grew_to
        for key, value in other.before.items():
            self.before.setdefault(key, value)


def crash_point(name: str) -> None:
    """Test-only: SIGKILL this process at the named step when BPFCG_CRASH_AT names it.

    The stress tests (issue 7) kill the engine between every pair of kernel operations and
    check that the guest's filter is still whole. One environment lookup when unset.
    """
    if os.environ.get("BPFCG_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _size_for(count: int, current: int) -> int:
    """libvirt's growth: double until it fits (never below the current size)."""
    size = max(current, INITIAL_MAP_SIZE)
    while size < count:
        size *= 2
    return size


def read_entries(map_fd: int) -> Dict[int, int]:
    return {bpf.parse_key(k): bpf.parse_value(v)
            for k, v in bpf.map_items(map_fd, devprog.RULE_KEY_SIZE, devprog.RULE_VALUE_SIZE)}


def _ruleset(entries: Dict[int, int]) -> RuleSet:
    rules = RuleSet()
    for key, value in entries.items():
        rule = Rule.from_entry(key, value)
        if rule is not None:
            rules.entries[key] = rule
    return rules


def _write_entries(map_fd: int, entries: Dict[int, int]) -> None:
    for key, value in entries.items():
        bpf.map_update(map_fd, bpf.key_bytes(key), bpf.value_bytes(value))


class DeviceFilter:
    """Handle on one cgroup's device filter. Holds no kernel objects between calls."""

    def __init__(self, cgroup_dir: str, dirs: StateDirs | None = None,
                 record_denials: bool = True, what: str | None = None,
                 allow_root: bool = False) -> None:
        self.cgroup = cgroup_dir.rstrip("/") or "/"
        self.dirs = dirs or StateDirs()
        self.record_denials = record_denials
        self.what = what or f"cgroup {self.cgroup}"
        self._lock_depth = 0
        if not allow_root and is_mount_root(self.cgroup):
            check_guest_cgroup(self.cgroup, self.what)  # raises with the reason

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cgroup's lock across several calls on this handle (re-entrant here).

        For read-modify-write cycles that span calls: a reconcile that reads the live XML and
        the runtime grants and then syncs the map, or a hotplug that grants, asks libvirt and
        undoes the grant if libvirt refuses. Other processes (hook, CLI, watcher) wait.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with self.dirs.lock(self.cgroup):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    # -- inspection ---------------------------------------------------------------------------

    def detect(self) -> Detection:
        for _attempt in range(ATTACH_RETRIES):
            try:
                d = det.detect(self.cgroup)
            except FileNotFoundError:
                raise self._gone() from None
            # "Foreign" without a single readable program: what the query listed was freed
            # before we could look (libvirt swapping programs), not someone else's filter.
            if d.mode != det.MODE_FOREIGN or d.programs:
                return d
        return d

    def _gone(self) -> OperationError:
        return OperationError(f"{self.what}: cgroup {self.cgroup} does not exist "
                              "(guest stopped?)")

    @property
    def mode(self) -> str:
        return self.detect().mode

    def rules(self) -> List[Tuple[Rule, str]]:
        """Every rule in effect through this cgroup's filter, with the map holding it."""
        d = self.detect()
        result: List[Tuple[Rule, str]] = []
        if d.base is not None:
            label = MAP_OWN if d.mode == det.MODE_OWN else MAP_LIBVIRT
            result += [(r, label) for r in self._map_rules(d.base.id)]
        overlay_id = d.overlay.id if d.overlay else None
        if overlay_id is None and d.mode == det.MODE_LIBVIRT:
            overlay_id = self._pinned_id(PIN_OVERLAY)
        if overlay_id is not None:
            result += [(r, MAP_OVERLAY) for r in self._map_rules(overlay_id)]
        return result

    def _map_rules(self, map_id: int) -> List[Rule]:
        with det.opened(bpf.map_get_fd_by_id(map_id)) as fd:
            return _ruleset(read_entries(fd)).rules()

    def _pinned_id(self, name: str) -> int | None:
        fd = self.dirs.get_pinned(self.cgroup, name)
        if fd is None:
            return None
        with det.opened(fd):
            return bpf.map_info(fd).id

    def denials(self) -> List[devprog.Denial]:
        d = self.detect()
        denial_id = d.denials.id if d.denials else None
        if denial_id is None and d.mode == det.MODE_LIBVIRT:
            denial_id = self._pinned_id(PIN_DENIALS)
        if denial_id is None:
            return []
        with det.opened(bpf.map_get_fd_by_id(denial_id)) as fd:
            found = list(devprog.read_denials(fd).values())
        return sorted(found, key=lambda x: x.last_ns, reverse=True)

    def status(self, names: DeviceNames | None = None) -> Dict[str, object]:
        names = names or DeviceNames()
        d = self.detect()
        capacity: Dict[str, Dict[str, int]] = {}
        rules = self.rules()
        for label, view in ((MAP_OWN if d.mode == det.MODE_OWN else MAP_LIBVIRT, d.base),
                            (MAP_OVERLAY, d.overlay)):
            if view is not None:
                used = sum(1 for _r, m in rules if m == label)
                capacity[label] = {"used": used, "max": view.max_entries}
        runtime = self.runtime_grants()
        boot_offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        denials = []
        for item in self.denials():
            dev_type = item.type_letter
            rule = Rule(dev_type if dev_type in "bc" else "a", item.major, item.minor,
                        access_string(item.access_bits) or "r")
            denials.append({
                "rule": f"{dev_type} {item.major}:{item.minor}",
                "devices": names.for_rule(rule),
                "access": access_string(item.access_bits),
                "count": item.count,
                "last": _iso(boot_offset + item.last_ns / 1e9),
            })
        return {
            "cgroup": self.cgroup,
            "mode": d.mode,
            "reason": d.reason,
            "overlay_installed": d.overlay_installed,
            "programs": [p.to_json() for p in d.programs],
            "rules": [{"rule": str(r), "map": m, "devices": names.for_rule(r),
                       "runtime_grant": any(g.key == r.key for g in runtime)}
                      for r, m in rules],
            "capacity": capacity,
            "denials": denials,
        }

    # -- changes ------------------------------------------------------------------------------

    @property
    def grants(self) -> GrantStore:
        return GrantStore(self.dirs.state_dir)

    def runtime_grants(self) -> List[Rule]:
        """Rules an admin added with ``allow`` to this cgroup (kept until revoked)."""
        return self.grants.get(self.cgroup)

    def grant(self, rules: Iterable[Rule], remember: bool = False) -> Change:
        """Grant ``rules``; ``remember`` records them as runtime grants that every later
        reconcile keeps (``allow``), as opposed to rules derived from the domain."""
        rules = list(rules)
        with self.locked():
            change = self._grant_locked(rules)
            if remember and rules:
                self.grants.add(self.cgroup, rules)
            return change

    def _grant_locked(self, rules: List[Rule]) -> Change:
        for _attempt in range(ATTACH_RETRIES):
            d = self.detect()
            self._refuse_foreign(d)
            self._refuse_ancestors(rules)
            try:
                if d.mode == det.MODE_NONE:
                    return self._create_own(d, rules)
                if d.mode == det.MODE_OWN:
                    return self._grow_or_update(d, rules, overlay=False)
                return self._grant_libvirt(d, rules)
            except bpf.BpfError as exc:
                if not _raced(exc):
                    raise
                continue  # libvirt swapped programs under us: re-detect and redo
        raise OperationError(f"{self.what}: the cgroup's programs kept changing during "
                             f"{ATTACH_RETRIES} attempts; try again")

    def ensure_overlay(self) -> Change:
        """libvirt mode: make sure our program (overlay + denials) sits on libvirt's current
        map, re-installing it after libvirt replaced it. No-op in other modes."""
        return self.grant([])

    def revoke(self, rules: Iterable[Rule], forget: bool = True) -> Change:
        """Take ``rules`` away (from our map or overlay only); ``forget`` also drops them from
        the runtime grants."""
        rules = list(rules)
        with self.locked():
            if forget:
                self.grants.remove(self.cgroup, rules)
            d = self.detect()
            if d.mode == det.MODE_FOREIGN:
                raise OperationError(f"{self.what}: {d.reason}")
            change = Change(d.mode)
            if d.mode == det.MODE_NONE:
                change.unchanged = rules
                return change
            if d.mode == det.MODE_OWN:
                map_id: int | None = d.base.id if d.base else None
            else:
                map_id = d.overlay.id if d.overlay else self._pinned_id(PIN_OVERLAY)
            if map_id is None:
                change.unchanged = rules
                return change
            with det.opened(bpf.map_get_fd_by_id(map_id)) as fd:
                current = _ruleset(_lookup_keys(fd, rules))
                for rule in rules:
                    before = current.entries.get(rule.key)
                    after = current.remove(rule)
                    if before == after:
                        change.unchanged.append(rule)
                        continue
                    key = bpf.key_bytes(rule.key)
                    if after is None:
                        bpf.map_delete(fd, key)
                        crash_point("revoke-after-delete")
                    else:
                        bpf.map_update(fd, key, bpf.value_bytes(after.value))
                    change.changed.append(rule)
            return change

    def sync(self, rules: Iterable[Rule], keys: Iterable[int] | None = None,
             revoke: bool = True) -> Change:
        """Make our map (own mode) or overlay (libvirt mode) hold exactly ``rules``.

        Entries nobody asks for any more are deleted, entries whose access differs are set
        to what is asked (one atomic update each: never a wider intermediate value), then the
        missing ones are granted — which also grows the map, creates the own filter in mode
        ``none`` and re-installs the overlay libvirt's own growth dropped. ``keys`` limits the
        trimming to those map keys (a detach touches only what the device used);
        ``revoke=False`` only adds (used when the plan is incomplete and a device it could
        not resolve may still be in use). libvirt's own map is never written.
        """
        wanted = RuleSet.of(rules)
        target = wanted.as_map()
        only = None if keys is None else set(keys)
        with self.locked():
            d = self.detect()
            self._refuse_foreign(d)
            change = Change(d.mode, conflicts=list(wanted.conflicts))
            map_id = self._our_map_id(d)
            present: Dict[int, int] = {}
            if map_id is not None:
                with det.opened(bpf.map_get_fd_by_id(map_id)) as fd:
                    present = read_entries(fd) if only is None else \
                        _lookup_keys(fd, _key_rules(only))
                    if revoke:
                        self._trim(fd, present, target, only, change)
            missing = [rule for key, rule in wanted.entries.items()
                       if key not in present or (not revoke and present[key] != rule.value)]
            if d.mode == det.MODE_NONE and not missing:
                return change  # never install a filter that allows nothing
            if missing or d.mode == det.MODE_LIBVIRT and not d.overlay_installed:
                change.merge(self.grant(missing))
            else:
                change.unchanged += wanted.rules()
            return change

    def _trim(self, fd: int, present: Dict[int, int], target: Dict[int, int],
              only: Set[int] | None, change: Change) -> None:
        for key, value in sorted(present.items()):
            if only is not None and key not in only:
                continue
            want = target.get(key)
            if want == value:
                continue
            old = Rule.from_entry(key, value)
            change.before.setdefault(key, value)
            if want is None:
                bpf.map_delete(fd, bpf.key_bytes(key))
                if old is not None:
                    change.removed.append(old)
                continue
            bpf.map_update(fd, bpf.key_bytes(key), bpf.value_bytes(want))
            present[key] = want
            new = Rule.from_entry(key, want)
            if new is not None:
                change.changed.append(new)
            if old is not None and _access_bits_of(value) & ~_access_bits_of(want):
                change.removed.append(old)  # narrowed: report what it allowed before

    def undo(self, change: Change) -> List[Rule]:
        """Put back the entries a grant wrote (``change.before``), keeping runtime grants.

        An entry that no longer holds what the grant wrote was changed by someone since
        (another grant, a reconcile): it is left alone. A grant that created the filter (mode
        ``none``) is not undone: removing a guest's filter is never done behind its back.
        Returns the rules taken away.
        """
        if not change.before:
            return []
        written = {rule.key: rule.value for rule in change.changed}
        taken: List[Rule] = []
        with self.locked():
            d = self.detect()
            map_id = self._our_map_id(d)
            if map_id is None or d.mode == det.MODE_FOREIGN:
                return taken
            runtime = self.runtime_grants()
            with det.opened(bpf.map_get_fd_by_id(map_id)) as fd:
                for key, before in change.before.items():
                    raw = bpf.map_lookup(fd, bpf.key_bytes(key), devprog.RULE_VALUE_SIZE)
                    now = None if raw is None else bpf.parse_value(raw)
                    if now is None or now != written.get(key, now):
                        continue
                    kept = RuleSet()
                    old = None if before is None else Rule.from_entry(key, before)
                    if old is not None:
                        kept.add(old)
                    for grant in runtime:
                        if grant.key == key:
                            kept.add(grant)
                    value = kept.entries[key].value if key in kept.entries else before
                    if value == now:
                        continue
                    if value is None:
                        bpf.map_delete(fd, bpf.key_bytes(key))
                    else:
                        bpf.map_update(fd, bpf.key_bytes(key), bpf.value_bytes(value))
                    rule = Rule.from_entry(key, now)
                    if rule is not None:
                        taken.append(rule)
        return taken

    def _our_map_id(self, d: Detection) -> int | None:
        """The map our rules live in: the own base map, or the (attached or pinned) overlay."""
        if d.mode == det.MODE_OWN:
            return d.base.id if d.base else None
        if d.mode == det.MODE_LIBVIRT:
            return d.overlay.id if d.overlay else self._pinned_id(PIN_OVERLAY)
        return None

    # -- internals ----------------------------------------------------------------------------

    def _refuse_foreign(self, d: Detection) -> None:
        if d.mode == det.MODE_FOREIGN:
            raise OperationError(f"{self.what}: {d.reason}; not changing it")

    def _refuse_ancestors(self, rules: Sequence[Rule]) -> None:
        """A program on an ancestor cgroup also judges every open here: refuse to grant what
        it would deny (our own or libvirt's format we can read; anything else we cannot)."""
        try:
            root = cgroup2_root()
        except OperationError:
            return
        for anc in det.ancestor_programs(self.cgroup, root):
            prog = anc.program
            if prog.owner == det.OWNER_OTHER:
                raise OperationError(
                    f"{self.what}: ancestor cgroup {anc.cgroup} has {prog.describe()}, which "
                    "may deny what we would grant; refusing")
            entries: Dict[int, int] = {}
            for view in prog.maps:
                if view.is_rule_map:
                    with det.opened(bpf.map_get_fd_by_id(view.id)) as fd:
                        entries.update(read_entries(fd))
            for rule in rules:
                if not _map_covers(entries, rule):
                    raise OperationError(
                        f"{self.what}: {rule} would still be denied by {prog.describe()} on "
                        f"ancestor cgroup {anc.cgroup}; grant it there first")

    def _denial_fd(self, d: Detection, pinned: bool) -> int | None:
        """The denial map to carry over (or a new one), None when not recording."""
        if not self.record_denials or not devprog.denials_supported():
            return None
        if d.denials is not None:
            return bpf.map_get_fd_by_id(d.denials.id)
        if pinned:
            fd = self.dirs.get_pinned(self.cgroup, PIN_DENIALS)
            if fd is not None:
                return fd
        return devprog.create_denial_map()

    def _attach(self, d: Detection, map_fds: Sequence[int], denial_fd: int | None) -> int:
        """Load our program over ``map_fds`` and swap it in; return the new program id."""
        prog_fd = devprog.load_device_program(map_fds, denial_fd)
        crash_point("after-load")
        try:
            self._check_map_order(prog_fd, map_fds, denial_fd)
            with det.opened(self._open_cgroup()) as cg_fd:
                try:
                    bpf.prog_attach(cg_fd, prog_fd, bpf.BPF_CGROUP_DEVICE, 0,
                                    expected_revision=d.revision)
                except bpf.BpfError as exc:
                    # Removed since we opened it (the guest stopped): the kernel says
                    # ENOENT, "the program to replace is not attached" — misleading.
                    if exc.errno == errno.ENOENT and not os.path.isdir(self.cgroup):
                        raise self._gone() from None
                    raise
                crash_point("after-attach")
                prog_id = bpf.prog_info(prog_fd).id
                after = bpf.prog_query(cg_fd, bpf.BPF_CGROUP_DEVICE)
            if after.prog_ids != [prog_id]:
                # Kernels without revisions: someone attached between our query and attach.
                raise bpf.BpfError("BPF_PROG_ATTACH", errno.ESTALE,
                                   "program list changed during attach")
            return prog_id
        finally:
            bpf.close(prog_fd)

    def _open_cgroup(self) -> int:
        """The cgroup's fd; removed since detection (the guest stopped) is a clear error."""
        try:
            return bpf.open_cgroup(self.cgroup)
        except FileNotFoundError:
            raise self._gone() from None

    @staticmethod
    def _check_map_order(prog_fd: int, map_fds: Sequence[int],
                         denial_fd: int | None) -> None:
        """map_ids[0] must be the base map: libvirt re-detects its map there (DESIGN §4.3)."""
        expected = [bpf.map_info(fd).id for fd in map_fds]
        if denial_fd is not None:
            expected.append(bpf.map_info(denial_fd).id)
        actual = bpf.prog_info(prog_fd).map_ids
        if actual != expected:
            raise OperationError(f"loaded program references maps {actual}, expected "
                                 f"{expected}; refusing to attach")

    def _create_own(self, d: Detection, rules: Sequence[Rule]) -> Change:
        wanted = RuleSet.of(rules)
        # ``before`` stays empty: there was no filter, and undo() never takes one away
        change = Change(det.MODE_OWN, changed=wanted.rules(), conflicts=wanted.conflicts)
        base_fd = devprog.create_rule_map(devprog.BASE_MAP_NAME,
                                          _size_for(len(wanted), INITIAL_MAP_SIZE))
        denial_fd = None
        try:
            _write_entries(base_fd, wanted.as_map())
            crash_point("create-after-fill")
            denial_fd = self._denial_fd(d, pinned=False)
            self._attach(d, [base_fd], denial_fd)
            change.installed = True
            return change
        finally:
            bpf.close(base_fd)
            if denial_fd is not None:
                bpf.close(denial_fd)

    def _grant_libvirt(self, d: Detection, rules: Sequence[Rule]) -> Change:
        if d.overlay_installed:
            change = self._grow_or_update(d, rules, overlay=True)
            if not change.installed:
                self._repin(d)
            return change
        # libvirt's program is attached (first install, or libvirt replaced ours when its map
        # grew): put our program on libvirt's live map, reusing pinned overlay and denials.
        assert d.base is not None
        overlay_fd = self.dirs.get_pinned(self.cgroup, PIN_OVERLAY)
        fds: List[int] = []
        try:
            if overlay_fd is None:
                overlay_fd = devprog.create_rule_map(devprog.OVERLAY_MAP_NAME, INITIAL_MAP_SIZE)
            fds.append(overlay_fd)
            current = read_entries(overlay_fd)
            merged, change = _merge(current, rules, det.MODE_LIBVIRT)
            needed = _size_for(len(merged), bpf.map_info(overlay_fd).max_entries)
            if needed > bpf.map_info(overlay_fd).max_entries:
                overlay_fd = devprog.create_rule_map(devprog.OVERLAY_MAP_NAME, needed)
                fds.append(overlay_fd)
                change.grew_to = needed
                _write_entries(overlay_fd, merged)
            else:
                _write_entries(overlay_fd, {k: merged[k] for k in _diff(current, merged)})
            denial_fd = self._denial_fd(d, pinned=True)
            if denial_fd is not None:
                fds.append(denial_fd)
            base_fd = bpf.map_get_fd_by_id(d.base.id)
            fds.append(base_fd)
            crash_point("overlay-after-fill")
            self._attach(d, [base_fd, overlay_fd], denial_fd)
            crash_point("overlay-before-pin")
            self.dirs.pin(self.cgroup, PIN_OVERLAY, overlay_fd)
            if denial_fd is not None:
                self.dirs.pin(self.cgroup, PIN_DENIALS, denial_fd)
            change.installed = True
            return change
        finally:
            for fd in fds:
                bpf.close(fd)

    def _repin(self, d: Detection) -> None:
        """Pin the attached overlay and denial maps if the pins are missing or stale (a run
        killed between attach and pin): libvirt's next growth would otherwise free them."""
        for name, view in ((PIN_OVERLAY, d.overlay), (PIN_DENIALS, d.denials)):
            if view is None or self._pinned_id(name) == view.id:
                continue
            with det.opened(bpf.map_get_fd_by_id(view.id)) as fd:
                self.dirs.pin(self.cgroup, name, fd)

    def _grow_or_update(self, d: Detection, rules: Sequence[Rule], overlay: bool) -> Change:
        """Own base map or attached overlay: update in place, or grow and swap programs.

        Only the keys being granted are read (one lookup each), so a grant costs the same
        whatever the map holds. If the map fills up midway, or the swap fails, every entry
        this call wrote is put back as it was: the guest keeps its old, working filter.
        """
        view: MapView | None = d.overlay if overlay else d.base
        assert view is not None
        fds: List[int] = []
        try:
            target_fd = bpf.map_get_fd_by_id(view.id)
            fds.append(target_fd)
            current = _lookup_keys(target_fd, rules)
            merged, change = _merge(current, rules, d.mode)
            written: Dict[int, int | None] = {}
            try:
                if self._update_in_place(target_fd, current, merged, written):
                    return change
                # Full: take back what we wrote before building the bigger copy, so that a
                # kill at any point of the growth leaves exactly the old filter enforced.
                _restore(target_fd, written)
                written.clear()
                entries = read_entries(target_fd)
                entries.update(merged)
                size = _size_for(len(entries), view.max_entries * 2)
                new_fd = devprog.create_rule_map(
                    devprog.OVERLAY_MAP_NAME if overlay else devprog.BASE_MAP_NAME, size)
                fds.append(new_fd)
                _write_entries(new_fd, entries)
                crash_point("grow-after-fill")
                denial_fd = bpf.map_get_fd_by_id(d.denials.id) if d.denials else None
                if denial_fd is not None:
                    fds.append(denial_fd)
                if overlay:
                    assert d.base is not None
                    base_fd = bpf.map_get_fd_by_id(d.base.id)
                    fds.append(base_fd)
                    self._attach(d, [base_fd, new_fd], denial_fd)
                    self.dirs.pin(self.cgroup, PIN_OVERLAY, new_fd)
                else:
                    self._attach(d, [new_fd], denial_fd)
                crash_point("grow-before-release")
            except BaseException:
                _restore(target_fd, written)
                raise
            change.installed = True
            change.grew_to = size
            return change
        finally:
            for fd in fds:
                bpf.close(fd)

    @staticmethod
    def _update_in_place(map_fd: int, current: Dict[int, int], merged: Dict[int, int],
                         written: Dict[int, int | None]) -> bool:
        """Write the changed keys; False when the map is full (the caller grows it)."""
        for key in _diff(current, merged):
            try:
                bpf.map_update(map_fd, bpf.key_bytes(key), bpf.value_bytes(merged[key]))
            except bpf.BpfError as exc:
                if exc.errno == errno.E2BIG:
                    return False
                raise
            written[key] = current.get(key)
        return True

    def release_pins(self) -> None:
        """Drop this cgroup's pinned maps (the guest is gone or we are handing it back)."""
        from .state import cgroup_id
        self.dirs.unpin_cgroup_id(cgroup_id(self.cgroup))


def _raced(exc: bpf.BpfError) -> bool:
    """Did libvirt swap programs since our detection? Either the attach saw the revision
    change (ESTALE), or an object the detection named was freed before we opened it (libvirt's
    growth frees its old map and program: ENOENT from *_GET_FD_BY_ID)."""
    return exc.errno == errno.ESTALE or (
        exc.errno == errno.ENOENT and exc.op in ("BPF_MAP_GET_FD_BY_ID",
                                                 "BPF_PROG_GET_FD_BY_ID"))


def _merge(current: Dict[int, int], rules: Sequence[Rule],
           mode: str) -> Tuple[Dict[int, int], Change]:
    """New map content after granting ``rules`` on top of ``current``."""
    merged_set = _ruleset(current)
    change = Change(mode)
    for rule in rules:
        before = merged_set.entries.get(rule.key)
        after = merged_set.add(rule)
        if before == after:
            change.unchanged.append(after)
        else:
            change.changed.append(after)
            change.before.setdefault(rule.key, current.get(rule.key))
    change.conflicts = merged_set.conflicts
    merged = dict(current)
    for key, rule in merged_set.entries.items():
        merged[key] = rule.value
    return merged, change


def _lookup_keys(map_fd: int, rules: Sequence[Rule]) -> Dict[int, int]:
    """Current values of the keys ``rules`` touch (absent keys are left out)."""
    found: Dict[int, int] = {}
    for key in {rule.key for rule in rules}:
        raw = bpf.map_lookup(map_fd, bpf.key_bytes(key), devprog.RULE_VALUE_SIZE)
        if raw is not None:
            found[key] = bpf.parse_value(raw)
    return found


def _key_rules(keys: Iterable[int]) -> List[Rule]:
    """Placeholder rules for looking keys up (only ``.key`` is used)."""
    return [Rule("a", *decode_key(key), "r") for key in keys]


def _access_bits_of(value: int) -> int:
    """The access half of a raw map value."""
    return (value >> 16) & 0x7


def _restore(map_fd: int, written: Dict[int, int | None]) -> None:
    """Undo our writes: old values back, keys we added deleted."""
    for key, old in written.items():
        if old is None:
            bpf.map_delete(map_fd, bpf.key_bytes(key))
        else:
            bpf.map_update(map_fd, bpf.key_bytes(key), bpf.value_bytes(old))


def _diff(current: Dict[int, int], merged: Dict[int, int]) -> List[int]:
    return [k for k, v in merged.items() if current.get(k) != v]


def _map_covers(entries: Dict[int, int], rule: Rule) -> bool:
    """Would a map allow everything ``rule`` allows? Only keys at least as wide count."""
    wanted = rule.value
    keys = [encode_key(None, None)]
    if rule.major is not None:
        keys.append(encode_key(rule.major, None))
    if rule.minor is not None:
        keys.append(encode_key(None, rule.minor))
    if rule.major is not None and rule.minor is not None:
        keys.append(encode_key(rule.major, rule.minor))
    if rule.major is None or rule.minor is None:
        keys = [k for k in keys if _key_covers(k, rule)]
    return any(entries.get(k, 0) & wanted == wanted for k in keys)


def _key_covers(key: int, rule: Rule) -> bool:
    major, minor = key >> 32, key & 0xFFFFFFFF
    return ((major == 0xFFFFFFFF or rule.major is not None and major == rule.major)
            and (minor == 0xFFFFFFFF or rule.minor is not None and minor == rule.minor))


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
