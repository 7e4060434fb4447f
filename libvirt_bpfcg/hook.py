"""The libvirt QEMU hook: ``run(argv, stdin)``, called by ``hooks/qemu``.

The op table is DESIGN §3. What each op does here:

* ``prepare begin``   plan the domain, refuse forbidden / missing required devices (our stderr
                      line becomes libvirt's error), keep the plan under the domain's UUID;
* ``started begin``   find the guest cgroup from QEMU's pid and install: the whole plan in own
                      mode, the extras (overlay) in libvirt mode; refuse foreign filters;
* ``reconnect begin`` reconcile with the live XML after a daemon restart (reconcile.py: own map =
                      live plan + runtime grants, overlay re-installed) — but a failing reconnect
                      hook makes libvirt kill the running guest, so errors are logged and we
                      exit 0 unless ``strict`` is configured;
* ``release end``     drop our state and pins of cgroups that are gone;
* ``migrate begin`` / ``restore begin``  validate only (these are filters: print nothing).

stdout stays empty whatever happens (scripts in qemu.d are chained through it) and no
traceback ever reaches libvirt: every failure is one line on stderr and in syslog.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Dict, List, Sequence, TextIO, Tuple

from . import log
from .errors import EXIT_FAILED, BpfcgError, InputError
from .hookclient import MAX_XML_BYTES

if TYPE_CHECKING:  # the hook imports config (and lxml) only for ops it handles
    from .config import Config
    from .plan import Plan

OPS = {
    ("prepare", "begin"): "prepare",
    ("started", "begin"): "started",
    ("reconnect", "begin"): "reconnect",
    ("release", "end"): "release",
    ("migrate", "begin"): "validate",
    ("restore", "begin"): "validate",
}
_UUID_RE = re.compile(rb"<uuid>\s*([0-9a-fA-F-]{36})\s*</uuid>")

logger = logging.getLogger(log.LOGGER_NAME)


@dataclass
class DomainPlan:
    """What the hook records of a guest's plan (JSON in the state dir; ``explain`` reads it
    when libvirt's status XML is not there)."""

    name: str
    uuid: str
    rules: List[str]  # every rule the guest needs (own mode installs these)
    extra_rules: List[str]  # from our <metadata> extras (libvirt mode installs these)
    extra_nodes: List[Dict[str, str]] = field(default_factory=list)  # {"path", "rule"}
    warnings: List[str] = field(default_factory=list)
    planned_at: float = 0.0

    def to_json(self) -> Dict[str, object]:
        return dict(self.__dict__)


def run(argv: Sequence[str], stdin: BinaryIO, stderr: TextIO | None = None) -> int:
    """Process entry point (``hooks/qemu``): never raises, never writes to stdout."""
    stderr = stderr or sys.stderr
    real_stdout = sys.stdout
    sys.stdout = stderr  # anything printed by accident must not reach libvirt's XML filter
    try:
        log.setup(stream=stderr, use_syslog=True)
        return handle(argv, stdin, os.environ.get("LIBVIRT_BPFCG_CONFIG"))
    except Exception as exc:  # noqa: BLE001 - logging itself failed: still one line, no traceback
        stderr.write(log.one_line(f"{log.LOGGER_NAME}: internal error: {type(exc).__name__}: "
                                  f"{exc}") + "\n")
        return EXIT_FAILED
    finally:
        sys.stdout = real_stdout


def handle(argv: Sequence[str], stdin: BinaryIO, config_path: str | None) -> int:
    """One event, logged through the libvirt-bpfcg logger as its caller set it up (the hook
    process above, or the hook server relaying what this logs as the hook's stderr).
    ``config_path``: our config file (None: the default). Never raises."""
    try:
        return _dispatch(list(argv), stdin, config_path)
    except BpfcgError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the hook must never show libvirt a traceback
        logger.error("internal error: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILED


def _dispatch(argv: List[str], stdin: BinaryIO, config_path: str | None) -> int:
    if len(argv) < 4:
        return 0
    name, op = argv[1], OPS.get((argv[2], argv[3]))
    if op is None:
        return 0
    from .config import load_config  # only now: ignored ops stay import-free

    config = load_config(config_path)
    hook = Hook(config, name)
    if op == "release":
        return hook.release(_read_xml(stdin))
    xml = _read_xml(stdin)
    if op == "prepare":
        return hook.prepare(xml)
    if op == "validate":
        hook.plan(xml, save=False)
        return 0
    if op == "started":
        return hook.install(xml, reconnect=False)
    try:
        return hook.install(xml, reconnect=True)
    except Exception as exc:  # noqa: BLE001
        if hook.strict:
            raise
        message = str(exc) if isinstance(exc, BpfcgError) else f"{type(exc).__name__}: {exc}"
        logger.error("domain %s: reconnect: %s (guest left running; set strict = true in "
                     "[hook] to stop it instead)", name, message)
        return 0


def _uuid_of(xml: bytes) -> str:
    """The domain's <uuid> without parsing the document: release must stay cheap (no lxml),
    and a wrong match can only miss our own plan file, whose name is checked anyway."""
    found = _UUID_RE.search(xml[:65536])
    if found is None:
        raise InputError("the domain XML has no <uuid>")
    return found.group(1).decode()


def _read_xml(stdin: BinaryIO) -> bytes:
    data = stdin.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise InputError(f"domain XML on stdin is larger than {MAX_XML_BYTES} bytes")
    return data


class Hook:
    def __init__(self, config: Config, name: str) -> None:
        self.config = config
        self.name = name
        self.strict = config.strict
        self.state_dir = config.state_dir

    # -- plan -------------------------------------------------------------------------------

    def plan(self, xml: bytes, save: bool, refuse_problems: bool = True
             ) -> Tuple[DomainPlan, Plan]:
        from .hookplan import plan_for_hook

        kept, plan = plan_for_hook(xml, self.config, self.name, refuse_problems)
        for warning in kept.warnings:
            logger.warning("domain %s: %s", self.name, warning)
        if save:
            self._save(kept)
        return kept, plan

    def prepare(self, xml: bytes) -> int:
        self.plan(xml, save=True)
        return 0

    def _plan_path(self, uuid: str) -> str:
        safe = "".join(ch for ch in uuid.lower() if ch in "0123456789abcdef-")
        if len(safe) != 36:
            raise InputError(f"domain {self.name}: bad UUID {uuid!r} in the domain XML")
        return os.path.join(self.state_dir, "domains", safe + ".json")

    def _save(self, plan: DomainPlan) -> None:
        import json  # here, not at the top: release and ignored ops never need it

        from .state import make_private_dir

        path = self._plan_path(plan.uuid)
        make_private_dir(os.path.dirname(path))
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(plan.to_json(), handle)
        os.replace(tmp, path)

    # -- install ----------------------------------------------------------------------------

    def install(self, xml: bytes, reconnect: bool) -> int:
        if reconnect:
            return self.reconnect(xml)
        from . import cgroup as cg
        from . import detect as det
        from .bpf import sys as bpf
        from .devfilter import DeviceFilter
        from .rules import Rule
        from .state import StateDirs

        # Plan again from the XML libvirt hands us now: managed VFIO nodes that did not
        # exist at prepare do now.
        kept, _plan = self.plan(xml, save=True)
        pid = cg.domain_pid(self.name, self.config.qemu_run_dir)
        directory = cg.guest_cgroup_of_pid(pid, f"domain {self.name}")
        bpf.raise_memlock()
        dirs = StateDirs(state_dir=self.state_dir, bpffs=self.config.bpffs)
        dfilter = DeviceFilter(directory, dirs, what=f"domain {self.name}",
                               record_denials=self.config.record_denials)
        mode = dfilter.mode
        if mode == det.MODE_FOREIGN:
            raise BpfcgError(f"domain {self.name}: {dfilter.detect().reason}")
        wanted = kept.rules if mode in (det.MODE_NONE, det.MODE_OWN) else kept.extra_rules
        change = dfilter.grant([Rule.parse(r) for r in wanted])
        if change.changed or change.installed:
            logger.info("domain %s: started: %s mode, %d rule(s) set%s", self.name,
                        change.mode, len(change.changed),
                        ", program installed" if change.installed else "")
        self._create_extra_nodes(pid, kept)
        return 0

    def reconnect(self, xml: bytes) -> int:
        """After a daemon restart: reconcile with the live XML (hotplug may have changed it,
        libvirt's own growth may have dropped our overlay). Own map = live plan + runtime
        grants; overlay = extras + runtime grants. Problems of the live plan are warnings
        and hold back revocations; the guest is never refused."""
        from . import cgroup as cg
        from .bpf import sys as bpf
        from .reconcile import guest_filter, reconcile
        from .state import StateDirs

        kept, plan = self.plan(xml, save=True, refuse_problems=False)
        bpf.raise_memlock()
        dirs = StateDirs(state_dir=self.state_dir, bpffs=self.config.bpffs)
        dfilter = guest_filter(self.name, dirs, self.config.qemu_run_dir,
                               self.config.record_denials)
        result = reconcile(dfilter, xml, self.config, plan=plan)
        if result.note:
            raise BpfcgError(f"domain {self.name}: {result.note}")
        if result.changed:
            logger.info("domain %s: reconnect: %s", self.name, result.summary())
        if result.held_back and result.problems:
            logger.warning("domain %s: reconnect: nothing revoked while the live plan has "
                           "problems", self.name)
        self._create_extra_nodes(cg.domain_pid(self.name, self.config.qemu_run_dir), kept)
        return 0

    def _create_extra_nodes(self, pid: int, kept: DomainPlan) -> None:
        """Extra devices given by path, inside QEMU's private /dev (see nsdev)."""
        if not kept.extra_nodes or not self.config.create_extra_nodes:
            return
        from .nsdev import create_nodes_in_namespace

        for message in create_nodes_in_namespace(pid, kept.extra_nodes):
            logger.warning("domain %s: %s", self.name, message)

    # -- release ----------------------------------------------------------------------------

    def release(self, xml: bytes) -> int:
        """Drop our plan, and the pins, locks, runtime grants and hotplug counters of cgroups
        that are gone (this one was removed just before). Failures only log: libvirt ignores
        this op's exit status anyway."""
        try:
            path = self._plan_path(_uuid_of(xml))
            if os.path.exists(path):
                os.unlink(path)
        except (BpfcgError, OSError) as exc:
            logger.warning("domain %s: release: %s", self.name, exc)
        try:
            from . import stale
            from .cgroup import cgroup2_root

            stale.collect(self.state_dir, self.config.bpffs, cgroup2_root())
        except (BpfcgError, OSError) as exc:
            logger.warning("domain %s: release: collecting stale state: %s", self.name, exc)
        return 0
