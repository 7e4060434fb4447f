"""The watcher: keeps every running guest's filter reconciled, across hotplug and restarts.

Triggers, each followed by a reconcile of the guest concerned (reconcile.py):

* libvirt events: lifecycle started/resumed, device added, device removed;
* libvirt's own map growth, which swaps programs *without any event*: one BPF_PROG_QUERY per
  guest every ``poll_interval`` seconds, compared with the program ids the last reconcile left
  attached (read under the cgroup lock, so a swap right after it is still noticed);
* (re)connection: after libvirtd restarts (connection closed → reconnect, backoff 0.5 s
  doubling to 10 s) every running guest is reconciled.

libvirt's callbacks run in the event-loop thread and only queue work; the main thread does the
reconciles, so a slow one never stalls event delivery. Every change made is logged.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from . import log
from .bpf import sys as bpf
from .cgroup import cgroup2_root
from .config import Config
from .errors import BpfcgError
from .grants import GrantStore
from .hotplug import connect, error_text, libvirt_module
from .reconcile import attached_programs, collect_stale_epochs, guest_filter, reconcile
from .state import StateDirs

logger = logging.getLogger(log.LOGGER_NAME)

DEFAULT_POLL_INTERVAL = 0.5
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
_STARTING_UP = 11  # VIR_DOMAIN_PAUSED_STARTING_UP: the started hook has not run yet


@dataclass
class Guest:
    """What we last left attached to one guest's cgroup."""

    name: str
    cgroup: str
    programs: List[int] = field(default_factory=list)
    last_report: str = ""  # last problem/failure line logged, to log each only once


class Watcher:
    def __init__(self, uri: str | None, config: Config, dirs: StateDirs, run_dir: str,
                 poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
        self.uri = uri
        self.config = config
        self.dirs = dirs
        self.run_dir = run_dir
        self.poll_interval = poll_interval
        self.conn: Any = None
        self.callback_ids: List[int] = []
        self.guests: Dict[str, Guest] = {}  # by UUID
        self.work: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.failures = 0  # reconciles that failed (``--once`` exits 1 if any)

    # -- running ----------------------------------------------------------------------------

    def run(self, once: bool = False) -> int:
        """Serve until SIGTERM/SIGINT (exit 0); ``once``: reconcile all and return."""
        bpf.raise_memlock()
        if once:
            self._connect()
            self.reconcile_all("once")
            self._disconnect()
            return 1 if self.failures else 0
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._disconnect()
        logger.info("watch: stopped")
        return 0

    def stop(self) -> None:
        self.stopping.set()
        self.work.put(("stop",))

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stop()

    def _serve(self) -> None:
        backoff = BACKOFF_FIRST
        announced = False
        next_poll = time.monotonic()
        while not self.stopping.is_set():
            if self.conn is None:
                try:
                    self._connect()
                except BpfcgError as exc:
                    if not announced:
                        logger.warning("watch: %s; retrying", exc)
                        announced = True
                    else:
                        logger.debug("watch: %s; retrying in %.1f s", exc, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                backoff, announced = BACKOFF_FIRST, False
                self.reconcile_all("connected")
                next_poll = time.monotonic() + self.poll_interval
            timeout = max(0.0, next_poll - time.monotonic())
            self._handle(self._take(timeout))
            if self.conn is not None and time.monotonic() >= next_poll:
                self.poll_programs()
                next_poll = time.monotonic() + self.poll_interval

    def _take(self, timeout: float) -> List[Tuple]:
        """Everything queued: wait up to ``timeout`` for the first item, then drain."""
        items = []
        try:
            items.append(self.work.get(timeout=timeout))
            while True:
                items.append(self.work.get_nowait())
        except queue.Empty:
            pass
        return items

    def _handle(self, items: List[Tuple]) -> None:
        todo: Dict[str, Tuple[str, str]] = {}  # uuid -> (name, why); one reconcile per guest
        for item in items:
            kind = item[0]
            if kind == "stop":
                return
            if kind == "closed":
                if item[1] is self.conn:
                    logger.warning("watch: connection to libvirtd lost (%s); reconnecting",
                                   item[2])
                    self._disconnect()
                    todo.clear()
                continue
            if self.conn is None:
                continue
            if kind == "forget":
                todo.pop(item[1], None)
                self.forget(item[1], item[2])
            elif kind == "reconcile":
                todo.setdefault(item[1], (item[2], item[3]))
        for uuid, (_name, why) in todo.items():
            if self.conn is None:
                break
            self.reconcile_uuid(uuid, why)

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> None:
        libvirt = libvirt_module()
        conn = connect(self.uri)
        try:
            ids = [
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                            self._on_lifecycle, None),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                                            self._on_device, "device added"),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                                            self._on_device, "device removed"),
            ]
            conn.registerCloseCallback(self._on_close, None)
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(5, 3)  # notice a hung daemon, not only a dead socket
        except libvirt.libvirtError as exc:
            with contextlib.suppress(Exception):
                conn.close()
            raise BpfcgError(f"cannot subscribe to libvirt events: {error_text(exc)}") from None
        self.conn, self.callback_ids = conn, ids
        logger.info("watch: connected to %s", conn.getURI())

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        for ident in self.callback_ids:
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(ident)
        self.callback_ids = []
        with contextlib.suppress(Exception):
            conn.unregisterCloseCallback()
        with contextlib.suppress(Exception):
            conn.close()

    # -- libvirt callbacks (event-loop thread: queue only) ------------------------------------

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int,
                      _opaque: object) -> None:
        libvirt = libvirt_module()
        if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            why = "started" if event == libvirt.VIR_DOMAIN_EVENT_STARTED else "resumed"
            self.work.put(("reconcile", dom.UUIDString(), dom.name(), why))
        elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self.work.put(("forget", dom.UUIDString(), dom.name()))

    def _on_device(self, _conn: Any, dom: Any, alias: str, why: str) -> None:
        self.work.put(("reconcile", dom.UUIDString(), dom.name(), f"{why} {alias}"))

    def _on_close(self, conn: Any, reason: int, _opaque: object) -> None:
        reasons = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "client closed"}
        self.work.put(("closed", conn, reasons.get(reason, f"reason {reason}")))

    # -- reconciling ------------------------------------------------------------------------

    def reconcile_all(self, why: str) -> None:
        libvirt = libvirt_module()
        try:
            domains = self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            self._libvirt_failed(exc, "listing running domains")
            return
        alive = set()
        for dom in domains:
            alive.add(dom.UUIDString())
            self.reconcile_domain(dom, why)
        for uuid in set(self.guests) - alive:
            self.forget(uuid, self.guests[uuid].name)
        self._collect_stale()

    def reconcile_uuid(self, uuid: str, why: str) -> None:
        libvirt = libvirt_module()
        try:
            dom = self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                self.guests.pop(uuid, None)
                return
            self._libvirt_failed(exc, "looking up a domain")
            return
        self.reconcile_domain(dom, why)

    def reconcile_domain(self, dom: Any, why: str) -> None:
        libvirt = libvirt_module()
        uuid, name = dom.UUIDString(), dom.name()
        try:
            state, reason = dom.state()
            if not dom.isActive():
                self.forget(uuid, name)
                return
            if state == libvirt.VIR_DOMAIN_PAUSED and reason == _STARTING_UP:
                return  # libvirt is still setting it up; its started event follows
            dfilter = guest_filter(name, self.dirs, self.run_dir, self.config.record_denials)
            result = reconcile(dfilter, lambda: dom.XMLDesc(0), self.config)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                self.forget(uuid, name)
            else:
                self._libvirt_failed(exc, f"domain {name}")
            return
        except BpfcgError as exc:
            self.failures += 1
            self._report_once(uuid, name, f"domain {name}: {why}: {exc}")
            return
        guest = self.guests.get(uuid)
        if guest is None or guest.cgroup != dfilter.cgroup:
            guest = self.guests[uuid] = Guest(name, dfilter.cgroup)
        guest.programs = result.programs
        if result.changed:
            logger.info("domain %s: %s: %s", name, why, result.summary())
        else:
            logger.debug("domain %s: %s: %s", name, why, result.summary())
        notes = []
        if result.note:
            notes.append(result.summary())
        if result.problems:
            notes.append("live plan has problems, nothing revoked: "
                         + "; ".join(result.problems))
        self._report_once(uuid, name, f"domain {name}: " + " / ".join(notes) if notes else "")

    def _report_once(self, uuid: str, name: str, line: str) -> None:
        guest = self.guests.get(uuid)
        if guest is None:
            guest = self.guests[uuid] = Guest(name, "")
        if line and line != guest.last_report:
            logger.warning("%s", line)
        guest.last_report = line

    def forget(self, uuid: str, name: str) -> None:
        if self.guests.pop(uuid, None) is not None:
            logger.info("domain %s: stopped; no longer watched", name)
        self._collect_stale()

    def _collect_stale(self) -> None:
        """Pins, runtime grants and hotplug counters of guests that are gone (the release hook
        does the same where a hook runs)."""
        try:
            root = cgroup2_root()
            pins = self.dirs.collect_stale_pins(root)
            grants = GrantStore(self.dirs.state_dir).collect_stale(root)
            collect_stale_epochs(self.dirs.state_dir, root)
        except (BpfcgError, OSError) as exc:
            logger.debug("watch: collecting stale state: %s", exc)
            return
        for what, ids in (("pinned maps", pins), ("runtime grants", grants)):
            if ids:
                logger.info("watch: dropped the %s of %d cgroup(s) that are gone", what,
                            len(ids))

    def _libvirt_failed(self, exc: Exception, what: str) -> None:
        conn = self.conn
        alive = False
        with contextlib.suppress(Exception):
            alive = bool(conn.isAlive())
        self.failures += 1
        if not alive:
            self.work.put(("closed", conn, "not alive"))
            return
        logger.warning("watch: %s: %s", what, error_text(exc))

    # -- libvirt's silent program swaps ------------------------------------------------------

    def poll_programs(self) -> None:
        """One BPF_PROG_QUERY per guest: a change we did not leave there means libvirt (its
        map growth) or someone else swapped programs: reconcile that guest now."""
        for uuid, guest in list(self.guests.items()):
            if not guest.cgroup:
                continue
            try:
                now = attached_programs(guest.cgroup)
            except (BpfcgError, OSError):
                continue  # cgroup gone: the stopped event follows
            if now != guest.programs:
                logger.info("domain %s: device programs changed %s -> %s", guest.name,
                            guest.programs, now)
                self.reconcile_uuid(uuid, "program swapped")
