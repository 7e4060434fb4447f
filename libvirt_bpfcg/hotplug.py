"""Hotplug through libvirt-python, keeping the guest's device filter right.

libvirt runs no hook on hotplug. When libvirt filters the guest itself (libvirt mode) it also
updates its own map on hotplug, and all we must do is put our overlay back if libvirt's map
growth dropped it. When *we* own the filter (own mode: libvirtd may not use bpf(2)) libvirt
updates nothing, so:

* attach: plan the device snippet, refuse forbidden devices, grant its rules, then
  ``attachDeviceFlags``; if libvirt refuses, put back exactly what this call changed;
* detach: ``detachDeviceFlags``, wait for libvirt's device-removed event, then revoke what
  nothing left in the live XML needs (``/dev/vfio/vfio`` stays while a VFIO device remains).

This module and watch.py are the only ones that import libvirt (lazily: the hook never may).
Connections use libvirt's default event loop, run in a daemon thread, so that events and
connection-close notifications arrive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, List, Set

from . import detect as det
from . import log
from .config import Config
from .devfilter import Change, DeviceFilter
from .errors import InputError, OperationError, UsageError
from .plan import plan_domain, plan_snippet
from .reconcile import HotplugEpoch, Reconciled, guest_filter, problem_line, reconcile
from .rules import Rule, sort_rules
from .state import StateDirs

logger = logging.getLogger(log.LOGGER_NAME)

DEFAULT_DETACH_TIMEOUT = 30.0  # seconds; SCSI unplug takes 0.07 s, PCI needs the guest OS


class LibvirtFailure(OperationError):
    """libvirt refused the operation; the message is libvirt's own."""


def libvirt_module() -> Any:
    try:
        import libvirt
    except ImportError:
        raise OperationError("libvirt-python is not installed (Debian: apt install "
                             "python3-libvirt; pip: libvirt-python)") from None
    return libvirt


# -- connection and event loop ------------------------------------------------------------

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def start_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread.

    Must happen before the first connection is opened, and only once per process."""
    global _loop_thread
    libvirt = libvirt_module()
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception as exc:  # noqa: BLE001 - keep the loop alive
                    logger.debug("libvirt event loop: %s", exc)
                    time.sleep(0.1)

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


def connect(uri: str | None) -> Any:
    """A read-write connection (``None``: libvirt's default URI, LIBVIRT_DEFAULT_URI)."""
    libvirt = libvirt_module()
    libvirt.registerErrorHandler(_quiet, None)
    start_event_loop()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise OperationError(f"failed to connect to the hypervisor"
                             f"{f' at {uri}' if uri else ''}: {error_text(exc)}") from None


def error_text(exc: BaseException) -> str:
    message = exc.get_error_message() if hasattr(exc, "get_error_message") else None
    return " ".join(str(message or exc).split())


def lookup_domain(conn: Any, text: str) -> Any:
    """Like virsh: an id, a UUID or a name."""
    libvirt = libvirt_module()
    attempts = []
    if text.isdigit():
        attempts.append(lambda: conn.lookupByID(int(text)))
    if len(text) in (32, 36):
        attempts.append(lambda: conn.lookupByUUIDString(text))
    attempts.append(lambda: conn.lookupByName(text))
    for attempt in attempts:
        try:
            return attempt()
        except libvirt.libvirtError:
            continue
    raise OperationError(f"failed to get domain '{text}'")


def affect_flags(live: bool, config: bool, persistent: bool, current: bool,
                 active: bool) -> int | None:
    """virsh's mapping of --live/--config/--persistent/--current to VIR_DOMAIN_AFFECT_*.

    ``None`` means "no option given": virsh then calls the flag-less API, which in the QEMU
    driver affects the live domain.
    """
    for first, second, a, b in (("persistent", "current", persistent, current),
                                ("current", "live", current, live),
                                ("current", "config", current, config)):
        if a and b:
            raise UsageError(f"options --{first} and --{second} are mutually exclusive")
    flags = 0
    if config or persistent:
        flags |= 2  # VIR_DOMAIN_AFFECT_CONFIG
    if live or (persistent and active):
        flags |= 1  # VIR_DOMAIN_AFFECT_LIVE
    if not flags and not current:
        return None
    return flags


def affects_live(flags: int | None, active: bool) -> bool:
    return active and (flags is None or flags == 0 or bool(flags & 1))


# -- the operations -----------------------------------------------------------------------


@dataclass
class HotplugResult:
    """What the filter side of one hotplug did, for the command's report."""

    mode: str = ""
    granted: List[Rule] = field(default_factory=list)
    revoked: List[Rule] = field(default_factory=list)
    installed: bool = False
    notes: List[str] = field(default_factory=list)  # shown to the user
    warnings: List[str] = field(default_factory=list)

    def add(self, result: Reconciled) -> None:
        self.mode = result.mode
        self.granted += result.granted
        self.revoked += result.revoked
        self.installed = self.installed or result.installed
        if result.held_back and result.problems:
            self.warnings.append("nothing revoked: the live domain XML has problems: "
                                 + "; ".join(result.problems))

    def lines(self) -> List[str]:
        out = [f"filter: granted {r} ({self.mode} mode)" for r in sort_rules(self.granted)]
        out += [f"filter: revoked {r} ({self.mode} mode)" for r in sort_rules(self.revoked)]
        if self.installed:
            out.append(f"filter: program (re)installed ({self.mode} mode)")
        return out + [f"filter: {note}" for note in self.notes]


class Hotplug:
    """attach/detach on one domain of one connection."""

    def __init__(self, conn: Any, dom: Any, config: Config, dirs: StateDirs,
                 run_dir: str) -> None:
        self.conn = conn
        self.dom = dom
        self.config = config
        self.dirs = dirs
        self.run_dir = run_dir
        self.name = dom.name()

    def _filter(self) -> DeviceFilter:
        return guest_filter(self.name, self.dirs, self.run_dir, self.config.record_denials)

    def _live_xml(self) -> str:
        return self.dom.XMLDesc(0)

    def attach(self, xml: bytes, flags: int | None) -> HotplugResult:
        libvirt = libvirt_module()
        plan = plan_snippet(xml, self.config)
        if plan.problems:
            raise InputError("refusing to attach: "
                             + "; ".join(problem_line(dev) for dev in plan.problems))
        result = HotplugResult()
        text = xml.decode("utf-8")
        if not affects_live(flags, bool(self.dom.isActive())):
            self._call(lambda: self._attach_call(text, flags), "attach")
            result.notes.append("persistent definition only: the filter is unchanged")
            return result
        dfilter = self._filter()
        mode = dfilter.mode
        result.mode = mode
        if mode != det.MODE_OWN:
            # libvirt mode: libvirt grants the device in its own map (our overlay holds only
            # metadata extras); none: nobody filters this guest; foreign: not ours to change
            self._call(lambda: self._attach_call(text, flags), "attach")
            self._after(dfilter, result, keys=None)
            return result
        epoch = HotplugEpoch(dfilter)
        with dfilter.locked():
            epoch.begin()  # a reconcile that reads the XML from now on only adds
            try:
                change = dfilter.grant(plan.rules.rules())
            except BaseException:
                epoch.end()
                raise
        try:
            self._attach_call(text, flags)
        except libvirt.libvirtError as exc:
            with dfilter.locked():
                try:
                    dfilter.undo(change)
                finally:
                    epoch.end()
            raise LibvirtFailure(error_text(exc)) from None
        except BaseException:
            with dfilter.locked():
                epoch.end()  # interrupted: keep the grant, libvirt may have the device
            raise
        with dfilter.locked():
            epoch.end()
        _report_grant(result, change)
        return result

    def _attach_call(self, text: str, flags: int | None) -> None:
        if flags is None:
            self.dom.attachDevice(text)
        else:
            self.dom.attachDeviceFlags(text, flags)

    def detach(self, xml: bytes, flags: int | None,
               timeout: float = DEFAULT_DETACH_TIMEOUT) -> HotplugResult:
        libvirt = libvirt_module()
        snippet = plan_snippet(xml, self.config)  # problems do not matter: it is going away
        result = HotplugResult()
        text = xml.decode("utf-8")
        if not affects_live(flags, bool(self.dom.isActive())):
            self._call(lambda: self._detach_call(text, flags), "detach")
            result.notes.append("persistent definition only: the filter is unchanged")
            return result
        dfilter = self._filter()
        mode = dfilter.mode
        result.mode = mode
        keys: Set[int] | None = None
        if mode == det.MODE_OWN:
            # Candidates for revocation: what the guest used before plus the snippet's rules
            # (a snippet naming only <target dev='sda'/> resolves to nothing by itself).
            before = plan_domain(self._live_xml(), self.config)
            keys = set(before.rules.entries) | set(snippet.rules.entries)
        waiter = RemovalWaiter(self.conn, self.dom)
        try:
            try:
                self._detach_call(text, flags)
            except libvirt.libvirtError as exc:
                raise LibvirtFailure(error_text(exc)) from None
            outcome = waiter.wait(timeout)
        finally:
            waiter.close()
        if outcome == RemovalWaiter.FAILED:
            raise OperationError("the guest refused to release the device (device removal "
                                 "failed); its device rules stay")
        if outcome == RemovalWaiter.TIMEOUT:
            result.warnings.append(
                f"device removal not confirmed within {timeout:g} s; rules still needed by "
                "the live XML stay (the watch service revokes them once it is gone)")
        self._after(dfilter, result, keys)
        return result

    def _detach_call(self, text: str, flags: int | None) -> None:
        if flags is None:
            self.dom.detachDevice(text)
        else:
            self.dom.detachDeviceFlags(text, flags)

    def _call(self, func: Any, what: str) -> None:
        libvirt = libvirt_module()
        try:
            func()
        except libvirt.libvirtError as exc:
            raise LibvirtFailure(error_text(exc)) from None

    def _after(self, dfilter: DeviceFilter, result: HotplugResult,
               keys: Set[int] | None) -> None:
        """Reconcile after libvirt changed the guest: in libvirt mode its map growth may have
        dropped our overlay; in own mode a detach revokes what is no longer needed."""
        if result.mode not in (det.MODE_OWN, det.MODE_LIBVIRT):
            if result.mode == det.MODE_FOREIGN:
                result.notes.append(f"not changed: {dfilter.detect().reason}")
            else:
                result.notes.append("the guest has no device filter: nothing to change")
            return
        result.add(reconcile(dfilter, self._live_xml, self.config, keys=keys))


def _report_grant(result: HotplugResult, change: Change) -> None:
    result.mode = change.mode
    result.granted += change.changed
    result.installed = result.installed or change.installed


class RemovalWaiter:
    """Waits for libvirt's DEVICE_REMOVED (or DEVICE_REMOVAL_FAILED) event of one domain.

    Registered before the detach call: libvirt may emit the event before the call returns.
    Any removal of this domain counts: the reconcile afterwards recomputes from the live XML,
    so an unrelated removal can only make us keep rules, never drop needed ones.
    """

    REMOVED = "removed"
    FAILED = "failed"
    TIMEOUT = "timeout"

    def __init__(self, conn: Any, dom: Any) -> None:
        libvirt = libvirt_module()
        self.conn = conn
        self.done = threading.Event()
        self.outcome = self.TIMEOUT
        self.aliases: List[str] = []
        self.ids: List[int] = []
        for event_id, outcome in ((libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self.REMOVED),
                                  (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED,
                                   self.FAILED)):
            self.ids.append(conn.domainEventRegisterAny(dom, event_id, self._callback,
                                                        outcome))

    def _callback(self, _conn: Any, _dom: Any, alias: str, outcome: str) -> None:
        self.aliases.append(alias)
        if not self.done.is_set():
            self.outcome = outcome
            self.done.set()

    def wait(self, timeout: float) -> str:
        self.done.wait(max(0.0, timeout))
        return self.outcome

    def close(self) -> None:
        for ident in self.ids:
            with contextlib.suppress(Exception):
                self.conn.domainEventDeregisterAny(ident)
        self.ids = []


__all__ = ["DEFAULT_DETACH_TIMEOUT", "Hotplug", "HotplugResult", "LibvirtFailure",
           "RemovalWaiter", "affect_flags", "affects_live", "connect", "error_text",
           "libvirt_module", "lookup_domain", "start_event_loop"]
