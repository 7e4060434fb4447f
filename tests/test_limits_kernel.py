"""Resource limits against the real kernel (issue 7, part 4).

* RLIMIT_MEMLOCK: before Linux 5.11 BPF maps and programs are charged against it; since
  then they are charged to the memory cgroup instead. A worker with RLIMIT_MEMLOCK = 0
  creates, grows and overlays filters on a ≥ 5.11 kernel, and fails with the limit named
  in the error on an older one.
* The memory cgroup (where the kernel charges maps now): a worker whose memory cgroup has
  almost no room left when the engine creates a bigger map gets the kernel's ENOMEM as a
  one-line error; the guest keeps exactly its old filter; the next call converges.
* The guest cgroup vanishes (guest stopped) between detection and attach, after loading,
  between opening the cgroup and attaching, before pinning: a clear "does not exist"
  OperationError each time, and once collected no pin, lock or grant file is left for it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import pytest
from engine_helpers import (
    ROOT,
    entries_of,
    filter_state,
    install_libvirt_like,
    leftover_state,
    opens,
    private_state_dirs,
    record,
    rule_node,
    run_worker,
    scaled,
    tagged_programs,
    wait_programs_settle,
    worker_spec,
)

from libvirt_bpfcg import detect as det
from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.cgroup import cgroup2_root
from libvirt_bpfcg.devfilter import DeviceFilter, read_entries
from libvirt_bpfcg.errors import BpfcgError, OperationError
from libvirt_bpfcg.grants import GrantStore
from libvirt_bpfcg.rules import Rule
from libvirt_bpfcg.state import StateDirs, cgroup_id

pytestmark = pytest.mark.kernel


@pytest.fixture
def dirs(tmp_path) -> StateDirs:
    with private_state_dirs(str(tmp_path)) as state_dirs:
        yield state_dirs


def tag_rules(tag: int, start: int, count: int) -> List[Rule]:
    return [Rule("c", tag, start + i, "rw") for i in range(count)]


def kernel_version() -> Tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_nothing_left(cgroup: str, dirs: StateDirs, tag: int) -> None:
    """The cgroup is gone: once collected, nothing of ours remains for it."""
    ident = cgroup_id(cgroup) if os.path.isdir(cgroup) else None
    if ident is not None:
        os.rmdir(cgroup)
    root = cgroup2_root()
    dirs.collect_stale_pins(root)
    GrantStore(dirs.state_dir).collect_stale(root)
    if ident is not None:
        assert leftover_state(dirs, ident) == []
    # Detached programs of a removed cgroup are freed asynchronously.
    assert wait_programs_settle(tag, [], timeout=10) == []


# --------------------------------------------------------------------------------------------
# RLIMIT_MEMLOCK


@pytest.mark.parametrize("mode", ["own", "libvirt"])
def test_memlock_zero(mode, cgroup_parent, node_dir, dirs, tmp_path):
    repetitions = scaled(1, 10)
    started = time.monotonic()
    for rep in range(repetitions):
        cgroup = os.path.join(cgroup_parent, f"memlock-{mode}-{rep}")
        os.mkdir(cgroup)
        _memlock_once(mode, cgroup, node_dir, dirs, str(tmp_path))
    record(f"RLIMIT_MEMLOCK=0 on kernel {os.uname().release} ({mode} mode)", repetitions,
           "create, growth and revoke work (memcg accounting since 5.11)",
           time.monotonic() - started)


def _memlock_once(mode: str, scratch_cgroup: str, node_dir: str, dirs: StateDirs,
                  tmp_path: str) -> None:
    tag = random.randrange(2000, 4000)
    libvirt_fd = None
    if mode == "libvirt":
        libvirt_fd = install_libvirt_like(scratch_cgroup, [Rule.parse("c 1:3 rw")])
    try:
        ops = [("grant", tag_rules(tag, 0, 10)), ("grant", tag_rules(tag, 10, 300)),
               ("revoke", tag_rules(tag, 0, 5))]
        result = run_worker(tmp_path, worker_spec(scratch_cgroup, dirs, ops, memlock=0))
        state = filter_state(scratch_cgroup)
        if kernel_version() >= (5, 11):
            # memcg accounting: RLIMIT_MEMLOCK is not consulted at all any more.
            assert result.returncode == 0, result.stdout + result.stderr
            assert state.ours == entries_of(tag_rules(tag, 5, 305))
            granted, revoked = tag_rules(tag, 309, 1)[0], tag_rules(tag, 0, 1)[0]
            assert opens(scratch_cgroup, [rule_node(node_dir, granted),
                                          rule_node(node_dir, revoked)]) == [True, False]
        else:  # pragma: no cover - this VM runs 6.18
            assert result.returncode == 3 and "RLIMIT_MEMLOCK" in result.stdout
            assert len(state.prog_ids) == (1 if mode == "libvirt" else 0)
    finally:
        if libvirt_fd is not None:
            bpf.close(libvirt_fd)
    check_nothing_left(scratch_cgroup, dirs, tag)


# --------------------------------------------------------------------------------------------
# The memory cgroup

# Runs in its own process: joins the memory cgroup, and just before the engine creates a
# big map, lowers the limit to what is in use plus a little — the kernel's charge for the
# map then fails (ENOMEM) while the Python heap, built before, is already paid for.
MEMCG_DRIVER = r"""
import json, os, sys
from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.devfilter import DeviceFilter
from libvirt_bpfcg.errors import BpfcgError
from libvirt_bpfcg.rules import Rule
from libvirt_bpfcg.state import StateDirs

spec = json.loads(sys.argv[1])
rules = [Rule("c", spec["tag"], spec["start"] + i, "rw") for i in range(spec["count"])]
f = DeviceFilter(spec["cgroup"], StateDirs(spec["state_dir"], spec["bpffs"]))
devprog.denials_supported()  # the probe's own maps are not what we test
with open(os.path.join(spec["memcg"], "cgroup.procs"), "w") as procs:
    procs.write(str(os.getpid()))
real_create = devprog.create_rule_map

def tight_create(name, size):
    if size >= spec["min_size"]:
        with open(os.path.join(spec["memcg"], spec["usage"])) as usage:
            used = int(usage.read())
        with open(os.path.join(spec["memcg"], spec["limit"]), "w") as limit:
            limit.write(str(used + spec["headroom"]))
    return real_create(name, size)

devprog.create_rule_map = tight_create
try:
    f.grant(rules)
except BpfcgError as exc:
    print("error", type(exc).__name__, " ".join(str(exc).split()))
    sys.exit(3)
print("ok")
"""


def memory_cgroup(name: str) -> Dict[str, str]:
    """A fresh memory cgroup: v2 if cgroup2 has the controller, else the v1 hierarchy."""
    root = cgroup2_root()
    with open(os.path.join(root, "cgroup.subtree_control"), encoding="ascii") as handle:
        if "memory" in handle.read().split():
            path = os.path.join(root, name)
            os.mkdir(path)
            return {"memcg": path, "usage": "memory.current", "limit": "memory.max"}
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            left, _sep, right = line.partition(" - ")
            fields = right.split()
            if fields and fields[0] == "cgroup" and "memory" in fields[-1].split(","):
                path = os.path.join(left.split()[4], name)
                os.mkdir(path)
                return {"memcg": path, "usage": "memory.usage_in_bytes",
                        "limit": "memory.limit_in_bytes"}
    pytest.fail("no memory cgroup controller (neither in cgroup2 nor a v1 hierarchy)")
    raise AssertionError  # unreachable


def _rmdir_when_empty(path: str) -> None:
    deadline = time.monotonic() + 10
    while os.path.isdir(path):
        try:
            os.rmdir(path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("mode", ["own", "libvirt"])
def test_map_creation_refused_by_the_memory_cgroup(mode, cgroup_parent, node_dir, dirs):
    repetitions = scaled(1, 10)
    started = time.monotonic()
    for rep in range(repetitions):
        cgroup = os.path.join(cgroup_parent, f"memcg-{mode}-{rep}")
        os.mkdir(cgroup)
        _memcg_once(mode, cgroup, node_dir, dirs)
    record(f"map creation refused by the memory cgroup ({mode} mode)", repetitions,
           "one-line ENOMEM error; exactly the old filter; convergence; nothing left",
           time.monotonic() - started)


def _memcg_once(mode: str, scratch_cgroup: str, node_dir: str, dirs: StateDirs) -> None:
    tag = random.randrange(2000, 4000)
    old, new = tag_rules(tag, 0, 40), tag_rules(tag, 1000, 20000)
    libvirt_fd = None
    if mode == "libvirt":
        libvirt_fd = install_libvirt_like(scratch_cgroup, [Rule.parse("c 1:3 rw")])
        libvirt_before = read_entries(libvirt_fd)
    memcg = memory_cgroup(f"bpfcg-mem-{os.getpid()}-{mode}")
    try:
        DeviceFilter(scratch_cgroup, dirs).grant(old)
        before = filter_state(scratch_cgroup)
        spec = {"cgroup": scratch_cgroup, "state_dir": dirs.state_dir, "bpffs": dirs.bpffs,
                "tag": tag, "start": 1000, "count": len(new), "min_size": 16384,
                "headroom": 256 * 1024, **memcg}
        result = subprocess.run([sys.executable, "-c", MEMCG_DRIVER, json.dumps(spec)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        _rmdir_when_empty(memcg["memcg"])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stdout.splitlines()
    assert "BPF_MAP_CREATE" in line and "ENOMEM" in line, line
    after = filter_state(scratch_cgroup)
    assert after.prog_ids == before.prog_ids, "the old program stays attached"
    assert after.ours == entries_of(old), "exactly the old rules, nothing of the failed call"
    if libvirt_fd is not None:
        assert read_entries(libvirt_fd) == libvirt_before
    probe = [rule_node(node_dir, old[-1]), rule_node(node_dir, new[0])]
    assert opens(scratch_cgroup, probe) == [True, False]
    # Without the limit, the next call converges.
    DeviceFilter(scratch_cgroup, dirs).grant(new)
    assert filter_state(scratch_cgroup).ours == entries_of(old + new)
    assert opens(scratch_cgroup, probe) == [True, True]
    if libvirt_fd is not None:
        bpf.close(libvirt_fd)
    check_nothing_left(scratch_cgroup, dirs, tag)


# --------------------------------------------------------------------------------------------
# The cgroup vanishes mid-operation

Setup = Callable[[str, StateDirs, int], None]


def _own_full(cgroup: str, dirs: StateDirs, tag: int) -> None:
    DeviceFilter(cgroup, dirs).grant(tag_rules(tag, 0, 64))  # the next grant must grow


def _libvirt(cgroup: str, dirs: StateDirs, tag: int) -> None:
    bpf.close(install_libvirt_like(cgroup, [Rule.parse("c 1:3 rw")]))


def _libvirt_full(cgroup: str, dirs: StateDirs, tag: int) -> None:
    _libvirt(cgroup, dirs, tag)
    DeviceFilter(cgroup, dirs).grant(tag_rules(tag, 0, 64))


# (name, setup before the call, what to patch, where) — patching runs the real step, and
# removes the cgroup just before or after it.
VANISH_CASES = [
    ("create: after detection", None, "detect", "after"),
    ("create: after loading the program", None, "load", "after"),
    ("create: between opening the cgroup and attaching", None, "attach", "before"),
    ("own growth: after detection", _own_full, "detect", "after"),
    ("own growth: before attaching", _own_full, "attach", "before"),
    ("overlay install: after detection", _libvirt, "detect", "after"),
    ("overlay install: before attaching", _libvirt, "attach", "before"),
    ("overlay install: before pinning", _libvirt, "pin", "before"),
    ("overlay growth: before attaching", _libvirt_full, "attach", "before"),
    ("overlay growth: before pinning", _libvirt_full, "pin", "before"),
]


def _patch_step(mocker, step: str, when: str, vanish: Callable[[], None]) -> None:
    targets = {"detect": (det, "detect"), "load": (devprog, "load_device_program"),
               "attach": (bpf, "prog_attach"), "pin": (StateDirs, "pin")}
    owner, name = targets[step]
    real = getattr(owner, name)
    fired = {"done": False}

    def wrapper(*args, **kwargs):
        if fired["done"]:
            return real(*args, **kwargs)
        fired["done"] = True
        if when == "before":
            vanish()
            return real(*args, **kwargs)
        result = real(*args, **kwargs)
        vanish()
        return result

    mocker.patch.object(owner, name, side_effect=wrapper, autospec=step == "pin")


@pytest.mark.parametrize(("name", "setup", "step", "when"), VANISH_CASES,
                         ids=[c[0] for c in VANISH_CASES])
def test_cgroup_vanishes_mid_operation(name, setup, step, when, cgroup_parent, dirs, mocker):
    repetitions = scaled(1, 20)
    started = time.monotonic()
    for _rep in range(repetitions):
        _vanish_once(setup, step, when, cgroup_parent, dirs, mocker)
    record(f"cgroup removed mid-operation: {name}", repetitions,
           "one-line 'does not exist' OperationError; no pin/lock/grant file or program left",
           time.monotonic() - started)


def _vanish_once(setup: Setup | None, step: str, when: str, cgroup_parent: str,
                 dirs: StateDirs, mocker) -> None:
    tag = random.randrange(2000, 4000)
    cgroup = os.path.join(cgroup_parent, f"vanish-{tag}-{time.monotonic_ns()}")
    os.mkdir(cgroup)
    if setup is not None:
        setup(cgroup, dirs, tag)
    ident = cgroup_id(cgroup)
    devprog.denials_supported()  # probe first: it loads programs of its own
    f = DeviceFilter(cgroup, dirs)
    _patch_step(mocker, step, when, lambda: os.rmdir(cgroup))
    try:
        with pytest.raises(OperationError) as caught:
            f.grant(tag_rules(tag, 500, 10), remember=True)
    finally:
        mocker.stopall()
    message = str(caught.value)
    assert "does not exist" in message and "\n" not in message, message
    assert not os.path.exists(cgroup)
    root = cgroup2_root()
    dirs.collect_stale_pins(root)
    GrantStore(dirs.state_dir).collect_stale(root)
    assert leftover_state(dirs, ident) == []
    assert wait_programs_settle(tag, [], timeout=10) == []


def test_revoke_and_status_on_a_vanished_cgroup(cgroup_parent, dirs, mocker):
    """Revoke racing the guest's stop: done or a clear error, never anything else."""
    tag = random.randrange(2000, 4000)
    cgroup = os.path.join(cgroup_parent, f"vanish-revoke-{tag}")
    os.mkdir(cgroup)
    f = DeviceFilter(cgroup, dirs)
    f.grant(tag_rules(tag, 0, 10), remember=True)
    ident = cgroup_id(cgroup)
    _patch_step(mocker, "detect", "after", lambda: os.rmdir(cgroup))
    try:
        f.revoke(tag_rules(tag, 0, 3))
    except BpfcgError as exc:
        assert "\n" not in str(exc)
    mocker.stopall()
    for call in (f.status, f.rules, lambda: f.grant(tag_rules(tag, 0, 1))):
        with pytest.raises(OperationError, match="does not exist"):
            call()
    root = cgroup2_root()
    dirs.collect_stale_pins(root)
    GrantStore(dirs.state_dir).collect_stale(root)
    assert leftover_state(dirs, ident) == []
    assert tagged_programs(tag) == [] or wait_programs_settle(tag, [], timeout=10) == []

