"""Helpers shared by the engine's kernel tests and the stress runs (issue 7).

* building blocks: a private bpffs + state dir, device nodes, opens from inside a cgroup,
  a libvirt-like program + map and libvirt's own map growth;
* kernel truth: what a cgroup's filter holds right now (``filter_state``), which of our
  programs exist at all (``tagged_programs``: the "no pile-up" check);
* the engine in a separate process (``stress/worker.py``), so that a SIGKILL — from a crash
  point or at a random moment — kills only it;
* scale: the same tests run shortened in CI and long under ``python -m stress``
  (``scaled``), and report what they ran and what held (``record``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Sequence

from kernel_fixtures import make_node, open_in_cgroup

from libvirt_bpfcg import detect as det
from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.devfilter import PIN_DENIALS, PIN_OVERLAY, read_entries
from libvirt_bpfcg.rules import Rule, RuleSet
from libvirt_bpfcg.state import StateDirs, cgroup_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = Rule.parse

# --------------------------------------------------------------------------------------------
# Scale and results


def stress_mode() -> bool:
    """True under ``python -m stress`` (BPFCG_STRESS=1): the long runs of docs/reliability.md."""
    return os.environ.get("BPFCG_STRESS", "") not in ("", "0")


def scaled(ci: int, full: int) -> int:
    """``ci`` runs in the test suite, ``full`` in the stress run."""
    return full if stress_mode() else ci


def record(scenario: str, runs: int, held: str, seconds: float, **extra: object) -> None:
    """Append one result line for the reliability table (only when the stress runner asks)."""
    path = os.environ.get("BPFCG_STRESS_RESULTS")
    if not path:
        return
    line = {"scenario": scenario, "runs": runs, "held": held, "seconds": round(seconds, 1),
            **extra}
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


# --------------------------------------------------------------------------------------------
# Building blocks


@contextlib.contextmanager
def private_state_dirs(base: str) -> Iterator[StateDirs]:
    """A state dir and a bpffs of our own under ``base`` (never the host's /sys/fs/bpf)."""
    bpffs = os.path.join(str(base), "bpffs")
    os.makedirs(bpffs, exist_ok=True)
    bpf.ensure_bpffs(bpffs)
    try:
        yield StateDirs(state_dir=os.path.join(str(base), "state"), bpffs=bpffs)
    finally:
        subprocess.run(["umount", "-n", bpffs], check=True)


def nodes(node_dir: str, *specs: str) -> List[str]:
    """'c 240:1' → path of a mknod'ed node with those numbers."""
    out = []
    for spec in specs:
        dev_type, numbers = spec.split()
        major, minor = numbers.split(":")
        out.append(make_node(node_dir, dev_type, int(major), int(minor)))
    return out


def rule_node(node_dir: str, rule: Rule) -> str:
    """A node for an exact rule (``c 3001:7 rw`` → a char node 3001:7)."""
    assert rule.major is not None and rule.minor is not None, rule
    return make_node(node_dir, "b" if rule.type == "b" else "c", rule.major, rule.minor)


def opens(cgroup: str, paths: List[str], flags: int = os.O_RDONLY) -> List[bool]:
    """True where the filter let the open through (ENXIO from a driverless node counts)."""
    return [e != errno.EPERM for e in open_in_cgroup(cgroup, [(p, flags) for p in paths])]


def attached_ids(cgroup: str) -> List[int]:
    fd = bpf.open_cgroup(cgroup)
    try:
        return bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE).prog_ids
    finally:
        bpf.close(fd)


def install_libvirt_like(cgroup: str, rules: List[Rule], size: int = 64) -> int:
    """What libvirt does for a guest: unnamed map + unnamed program, attach flags 0.
    Returns the map fd (the caller closes it), as libvirtd keeps its fd."""
    map_fd = devprog.create_libvirt_map(size)
    for key, value in RuleSet.of(rules).as_map().items():
        bpf.map_update(map_fd, bpf.key_bytes(key), bpf.value_bytes(value))
    prog_fd = devprog.load_libvirt_program(map_fd)
    bpf.attach_to_cgroup(cgroup, prog_fd)
    return map_fd


def libvirt_realloc(cgroup: str, old_map_fd: int) -> int:
    """libvirt's ReallocMap + AttachProg: a map twice as big, copied, its own program."""
    size = bpf.map_info(old_map_fd).max_entries * 2
    new_fd = devprog.create_libvirt_map(size)
    for key, value in bpf.map_items(old_map_fd, 8, 4):
        bpf.map_update(new_fd, key, value)
    prog_fd = devprog.load_libvirt_program(new_fd)
    bpf.attach_to_cgroup(cgroup, prog_fd)
    bpf.close(old_map_fd)
    return new_fd


def entries_of(rules: Iterable[Rule]) -> Dict[int, int]:
    """Map content (key → value) that granting ``rules`` on an empty map produces."""
    return RuleSet.of(rules).as_map()


# --------------------------------------------------------------------------------------------
# Kernel truth


@dataclass
class FilterState:
    """What is attached to one cgroup and what its rule maps hold, read from the kernel."""

    prog_ids: List[int]
    mode: str
    base: Dict[int, int]  # own mode: our map; libvirt mode: libvirt's map
    overlay: Dict[int, int] | None  # entries of our attached overlay; None: not attached
    base_id: int | None = None
    overlay_id: int | None = None
    denials_id: int | None = None

    @property
    def ours(self) -> Dict[int, int]:
        """What our filter grants: the own map, or the attached overlay (empty if none)."""
        if self.mode == det.MODE_OWN:
            return self.base
        return self.overlay or {}


def filter_state(cgroup: str) -> FilterState:
    d = det.detect(cgroup)
    base = _map_entries(d.base.id) if d.base else {}
    overlay = _map_entries(d.overlay.id) if d.overlay else None
    return FilterState([p.id for p in d.programs], d.mode, base, overlay,
                       d.base.id if d.base else None, d.overlay.id if d.overlay else None,
                       d.denials.id if d.denials else None)


def _map_entries(map_id: int) -> Dict[int, int]:
    with det.opened(bpf.map_get_fd_by_id(map_id)) as fd:
        return read_entries(fd)


def pinned_ids(dirs: StateDirs, cgroup: str) -> Dict[str, int]:
    """name → map id of this cgroup's pins (overlay, denials) in ``dirs``' bpffs."""
    found = {}
    for name in (PIN_OVERLAY, PIN_DENIALS):
        fd = dirs.get_pinned(cgroup, name)
        if fd is not None:
            with det.opened(fd):
                found[name] = bpf.map_info(fd).id
    return found


def pin_entries(dirs: StateDirs, cgroup: str) -> List[str]:
    """Every name in this cgroup's pin directory (leftover ``*_new`` pins would show here)."""
    directory = dirs.pin_dir(cgroup, create=False)
    return sorted(os.listdir(directory)) if directory else []


def check_pins_follow_attached(dirs: StateDirs, cgroup: str, state: FilterState) -> None:
    """libvirt mode: the pins are the maps our attached program uses (DESIGN §4.1)."""
    pins = pinned_ids(dirs, cgroup)
    assert pins.get(PIN_OVERLAY) == state.overlay_id, (pins, state)
    if state.denials_id is not None:
        assert pins.get(PIN_DENIALS) == state.denials_id, (pins, state)
    assert set(pin_entries(dirs, cgroup)) <= {PIN_OVERLAY, PIN_DENIALS}


def leftover_state(dirs: StateDirs, ident: int) -> List[str]:
    """Pins and lock/grant files still present for a cgroup id (after it was removed)."""
    left = []
    root = dirs.pin_root(create=False)
    if root and os.path.exists(os.path.join(root, str(ident))):
        left.append(os.path.join(root, str(ident)))
    for sub, suffix in (("locks", ".lock"), ("grants", ".json")):
        path = os.path.join(dirs.state_dir, sub, f"{ident}{suffix}")
        if os.path.exists(path):
            left.append(path)
    return left


_BPF_PROG_GET_NEXT_ID = 11


def all_program_ids() -> List[int]:
    """Every BPF program id on the machine (BPF_PROG_GET_NEXT_ID)."""
    ids, current = [], 0
    while True:
        attr = bpf._new_attr()
        struct.pack_into("=I", attr, 0, current)  # start_id; the kernel writes next_id @4
        try:
            bpf._bpf(_BPF_PROG_GET_NEXT_ID, attr)
        except bpf.BpfError as exc:
            if exc.errno == errno.ENOENT:
                return ids
            raise
        current = struct.unpack_from("=I", attr, 4)[0]
        ids.append(current)


def tagged_programs(tag_major: int) -> List[int]:
    """Ids of our programs (by name) whose rule maps hold a key with major ``tag_major``.

    Each stress scenario grants rules under a major of its own, so this finds every program
    it ever made that still exists — attached or leaked — whatever else runs on the machine.
    """
    found = []
    for prog_id in all_program_ids():
        try:
            with det.opened(bpf.prog_get_fd_by_id(prog_id)) as fd:
                info = bpf.prog_info(fd)
            if info.name != devprog.PROG_NAME:
                continue
            for map_id in info.map_ids:
                view = det.map_view(map_id)
                if view.is_rule_map and any(k >> 32 == tag_major
                                            for k in _map_entries(map_id)):
                    found.append(prog_id)
                    break
        except bpf.BpfError:
            continue  # freed while we looked
    return found


def wait_programs_settle(tag_major: int, allowed: Sequence[int],
                         timeout: float = 5.0) -> List[int]:
    """Programs of a killed process are freed asynchronously (RCU): wait until every
    remaining program of ours is one of ``allowed`` (or the timeout); return what remains.
    (An attached program whose maps hold no key of the tag — everything revoked — is not
    found at all, hence "one of", not "exactly".)"""
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(tagged_programs(tag_major))
        if set(left) <= set(allowed) or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# The engine in another process (stress/worker.py)


def worker_spec(cgroup: str, dirs: StateDirs, ops: Sequence[Sequence[object]],
                **extra: object) -> Dict[str, object]:
    """Spec for stress/worker.py: ops are ("grant"|"revoke"|"ensure", [rule texts])."""
    spec: Dict[str, object] = {"cgroup": cgroup, "state_dir": dirs.state_dir,
                               "bpffs": dirs.bpffs,
                               "ops": [[verb, [str(r) for r in rules]] for verb, rules in ops]}
    spec.update(extra)
    return spec


def worker_command(spec_path: str) -> List[str]:
    return [sys.executable, "-m", "stress.worker", spec_path]


def worker_env(crash_at: str | None = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("BPFCG_CRASH_AT", None)
    if crash_at:
        env["BPFCG_CRASH_AT"] = crash_at
    return env


def write_spec(directory: str, spec: Dict[str, object], name: str = "spec") -> str:
    path = os.path.join(str(directory), f"{name}-{time.monotonic_ns()}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    return path


def run_worker(directory: str, spec: Dict[str, object], crash_at: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the worker to completion (or to its crash point); stdout lines tell progress."""
    path = write_spec(directory, spec)
    return subprocess.run(worker_command(path), cwd=ROOT, env=worker_env(crash_at),
                          capture_output=True, text=True, timeout=timeout, check=False)


def completed_ops(stdout: str) -> int:
    """How many ops the worker finished (it prints 'done I' after each, flushed)."""
    return sum(1 for line in stdout.splitlines() if line.startswith("done "))


def ensure_cgroup_gone(cgroup: str) -> int:
    """rmdir an empty test cgroup; return its id (for leftover checks)."""
    ident = cgroup_id(cgroup)
    os.rmdir(cgroup)
    return ident


__all__ = [
    "FilterState", "R", "ROOT", "all_program_ids", "attached_ids", "check_pins_follow_attached",
    "completed_ops", "ensure_cgroup_gone", "entries_of", "filter_state", "install_libvirt_like",
    "leftover_state", "libvirt_realloc", "nodes", "opens", "pin_entries", "pinned_ids",
    "private_state_dirs", "record", "rule_node", "run_worker", "scaled", "stress_mode",
    "tagged_programs", "wait_programs_settle", "worker_command", "worker_env", "worker_spec",
    "write_spec",
]


# --------------------------------------------------------------------------------------------
# The hook against scratch cgroups


def rule_extras_domain(name: str, tag: int) -> bytes:
    """A small domain with two metadata rule extras (no path extras: no nodes to create)."""
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices><serial type='pty'/></devices>
  <metadata>
    <bpfcg:extras xmlns:bpfcg='https://libvirt-bpfcg.org/xmlns/extras/1'>
      <bpfcg:rule>c {tag}:40000 rw</bpfcg:rule>
      <bpfcg:rule>c {tag}:40001 r</bpfcg:rule>
    </bpfcg:extras>
  </metadata>
</domain>""".encode()


class FakeQemu:
    """A sleeping process in the guest cgroup, and libvirt's pid file naming it."""

    def __init__(self, cgroup: str, run_dir: str, name: str) -> None:
        self.proc = subprocess.Popen(["sleep", "600"])
        with open(os.path.join(cgroup, "cgroup.procs"), "w", encoding="ascii") as procs:
            procs.write(str(self.proc.pid))
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, f"{name}.pid"), "w", encoding="ascii") as pidfile:
            pidfile.write(f"{self.proc.pid}\n")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def hook_config(directory: str, dirs: StateDirs, run_dir: str) -> str:
    """A config file for hook runs against scratch cgroups: our state dirs, the fake QEMU's
    pid files, libvirt 9.0's default ACL."""
    path = os.path.join(directory, "bpfcg.conf")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"[acl]\nlibvirt_version = 9.0.0\nqemu_conf = {directory}/no-qemu.conf\n"
                     f"[hook]\nstate_dir = {dirs.state_dir}\n"
                     f"[host]\nqemu_run_dir = {run_dir}\nbpffs = {dirs.bpffs}\n")
    return path
