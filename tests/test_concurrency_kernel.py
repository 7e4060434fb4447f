"""Many writers on one guest cgroup at once, against the real kernel (issue 7, part 2).

Released at the same moment (each worker waits for "go" on stdin):

* 8 worker processes grant disjoint sets of 200 rules each, in batches of 5 … 40, so the
  map grows 512 → 1024 → 2048 while they race;
* a 9th revokes, in batches, half of the 300 rules granted before the start;
* a 10th grants a fixed "plan" set and re-checks the overlay (what the CLI's hotplug does);
* the real hook (``hook.run``: ``started begin``, in its own process, with a fake QEMU — a
  sleeping process in the cgroup — and its pid file) installs its domain plan;
* in libvirt mode, "libvirt" itself (this process) hotplugs into its own map and grows it,
  which drops our program while the others run.

Then the next call (``ensure_overlay``) and an exact comparison: our map (own) or overlay
(libvirt) is exactly the union expected — nothing lost, nothing extra —, libvirt's map holds
exactly its own entries and is our program's first map, one program is attached, no other
program of ours exists, the pins are the attached overlay's, and opens agree.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

import pytest
from engine_helpers import (
    ROOT,
    FakeQemu,
    check_pins_follow_attached,
    entries_of,
    filter_state,
    hook_config,
    install_libvirt_like,
    leftover_state,
    libvirt_realloc,
    opens,
    private_state_dirs,
    record,
    rule_extras_domain,
    rule_node,
    scaled,
    wait_programs_settle,
    worker_command,
    worker_env,
    worker_spec,
    write_spec,
)

from libvirt_bpfcg import detect as det
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.cgroup import cgroup2_root
from libvirt_bpfcg.config import load_config
from libvirt_bpfcg.devfilter import DeviceFilter, read_entries
from libvirt_bpfcg.grants import GrantStore
from libvirt_bpfcg.plan import plan_domain
from libvirt_bpfcg.rules import Rule
from libvirt_bpfcg.state import StateDirs, cgroup_id

pytestmark = pytest.mark.kernel

GRANTERS = 8
PER_GRANTER = 200
PRE_GRANTED = 300
Op = Tuple[str, List[Rule]]

HOOK_DRIVER = ("import sys; from libvirt_bpfcg.hook import run; "
               "sys.exit(run(sys.argv[1:], sys.stdin.buffer))")


def batches(rng: random.Random, rules: List[Rule], low: int, high: int) -> List[List[Rule]]:
    out, i = [], 0
    while i < len(rules):
        size = rng.randint(low, high)
        out.append(rules[i:i + size])
        i += size
    return out


@pytest.mark.parametrize("mode", ["own", "libvirt"])
def test_concurrent_grants_revokes_and_hook(mode, cgroup_parent, node_dir, tmp_path):
    runs = scaled(1, 25)
    seed = int(os.environ.get("BPFCG_STRESS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    started = time.monotonic()
    stats: Dict[str, int] = {"max_map_size": 0, "libvirt_growths": 0}
    for run in range(runs):
        directory = tmp_path / f"run{run}"
        directory.mkdir()
        with private_state_dirs(str(directory)) as dirs:
            try:
                size, grew = _one_run(mode, cgroup_parent, node_dir, str(directory), dirs, rng,
                                      run)
            except AssertionError as exc:
                raise AssertionError(f"seed {seed}, run {run}: {exc}") from exc
            stats["max_map_size"] = max(stats["max_map_size"], size)
            stats["libvirt_growths"] += grew
    record(f"concurrency: 8 granters x 200 + revoker + plan granter + hook ({mode} mode)",
           runs, "final map == expected union exactly; libvirt's map exactly its own; one "
           "program; pins on the attached overlay", time.monotonic() - started, seed=seed,
           **stats)


def _one_run(mode: str, cgroup_parent: str, node_dir: str, directory: str, dirs: StateDirs,
             rng: random.Random, run: int) -> Tuple[int, int]:
    tag = rng.randrange(2000, 4000)
    name = f"stress-{os.getpid()}-{run}"
    cgroup = os.path.join(cgroup_parent, f"conc-{mode}-{run}")
    os.mkdir(cgroup)
    libvirt_fd = None
    libvirt_entries: Dict[int, int] = {}
    if mode == "libvirt":
        lv_rules = [Rule.parse("c 1:3 rw"), Rule("c", tag, 99990, "rw")]
        libvirt_fd = install_libvirt_like(cgroup, lv_rules)
        libvirt_entries = entries_of(lv_rules)
    qemu = FakeQemu(cgroup, os.path.join(directory, "qemu-run"), name)
    procs: List[subprocess.Popen] = []
    try:
        pre = [Rule("c", tag, i, "rw") for i in range(PRE_GRANTED)]
        DeviceFilter(cgroup, dirs).grant(pre)
        revoked = pre[:PRE_GRANTED // 2]
        granted = [[Rule("c", tag, 1000 + g * 1000 + j, rng.choice(("r", "rw")))
                    for j in range(PER_GRANTER)] for g in range(GRANTERS)]
        plan_set = [Rule("c", tag, 30000 + j, "rw") for j in range(50)]
        workers: List[List[Op]] = [[("grant", b) for b in batches(rng, rules, 5, 40)]
                                   for rules in granted]
        workers.append([("revoke", b) for b in batches(rng, revoked, 5, 20)])
        workers.append([("grant", plan_set), ("ensure", []), ("grant", plan_set[:10])])
        for ops in workers:
            path = write_spec(directory, worker_spec(cgroup, dirs, ops, wait_go=True))
            procs.append(subprocess.Popen(worker_command(path), cwd=ROOT, env=worker_env(),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, bufsize=0))
        for proc in procs:  # unbuffered: readline() must not read past "ready"
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        xml = rule_extras_domain(name, tag)
        xml_path = os.path.join(directory, "domain.xml")
        with open(xml_path, "wb") as handle:
            handle.write(xml)
        config = hook_config(directory, dirs, os.path.join(directory, "qemu-run"))
        env = dict(worker_env(), LIBVIRT_BPFCG_CONFIG=config)
        with open(xml_path, "rb") as stdin:
            hook = subprocess.Popen([sys.executable, "-c", HOOK_DRIVER,
                                     "/etc/libvirt/hooks/qemu", name, "started", "begin", "-"],
                                    cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        for proc in procs:  # go
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        grew = 0
        if libvirt_fd is not None:
            libvirt_fd, grew = _libvirt_meanwhile(cgroup, libvirt_fd, libvirt_entries, tag, rng)
        for proc, ops in zip(procs, workers):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, (out + err).decode(errors="replace")
            assert out.count(b"done ") == len(ops), out
        hook_out, hook_err = hook.communicate(timeout=300)
        assert hook.returncode == 0 and hook_out == b"", hook_err.decode(errors="replace")
        # The next call converges (libvirt's growth may have come after the last of ours).
        DeviceFilter(cgroup, dirs).ensure_overlay()
        hook_plan = plan_domain(xml, load_config(config))
        hook_rules = list(hook_plan.rules) if mode == "own" else list(hook_plan.extra_rules)
        assert {str(r) for r in hook_plan.extra_rules} == {f"c {tag}:40000 rw",
                                                           f"c {tag}:40001 r"}
        expected = entries_of(pre[PRE_GRANTED // 2:] + [r for g in granted for r in g]
                              + plan_set + hook_rules)
        size = _check_final(cgroup, dirs, node_dir, tag, expected, libvirt_fd, libvirt_entries,
                            rng)
        return size, grew
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        qemu.stop()
        if libvirt_fd is not None:
            bpf.close(libvirt_fd)
        _remove_and_collect(cgroup, dirs, tag)


def _libvirt_meanwhile(cgroup: str, map_fd: int, entries: Dict[int, int], tag: int,
                       rng: random.Random) -> Tuple[int, int]:
    """libvirt's own writes while we run: hotplugs into its map, and one growth of it
    (a new map and program, attached with flags 0: it silently drops our overlay)."""
    grew = 0
    for step in range(5):
        time.sleep(rng.uniform(0, 0.1))
        if step == 2:
            map_fd = libvirt_realloc(cgroup, map_fd)
            grew += 1
            continue
        rule = Rule("c", tag, 99900 + step, "rw")
        bpf.map_update(map_fd, bpf.key_bytes(rule.key), bpf.value_bytes(rule.value))
        entries[rule.key] = rule.value
    return map_fd, grew


def _check_final(cgroup: str, dirs: StateDirs, node_dir: str, tag: int,
                 expected: Dict[int, int], libvirt_fd: int | None,
                 libvirt_entries: Dict[int, int], rng: random.Random) -> int:
    state = filter_state(cgroup)
    assert len(state.prog_ids) == 1
    ours = state.ours
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    changed = [k for k in expected if k in ours and ours[k] != expected[k]]
    assert not missing and not extra and not changed, (
        f"missing {len(missing)}, extra {len(extra)}, changed {len(changed)}")
    if libvirt_fd is not None:
        assert state.mode == det.MODE_LIBVIRT and state.overlay is not None
        assert read_entries(libvirt_fd) == libvirt_entries, "libvirt's map is exactly its own"
        assert state.base_id == bpf.map_info(libvirt_fd).id, "first map: libvirt's live map"
        check_pins_follow_attached(dirs, cgroup, state)
    else:
        assert state.mode == det.MODE_OWN
    attached = [p.id for p in det.detect(cgroup).programs if p.owner == det.OWNER_BPFCG]
    assert set(wait_programs_settle(tag, attached)) <= set(attached)
    keys = rng.sample(sorted(k for k in expected if k >> 32 == tag), 12)  # exact, ours
    never = Rule("c", tag, 99999, "r")
    probe = [Rule("c", k >> 32, k & 0xFFFFFFFF, "r") for k in keys] + [never]
    # Only rules with read access open read-only; every expected entry here has it.
    assert opens(cgroup, [rule_node(node_dir, r) for r in probe]) == [True] * 12 + [False]
    view = state.base_id if libvirt_fd is None else state.overlay_id
    assert view is not None
    return det.map_view(view).max_entries


def _remove_and_collect(cgroup: str, dirs: StateDirs, tag: int) -> None:
    ident = cgroup_id(cgroup)
    deadline = time.monotonic() + 10
    while True:
        try:
            os.rmdir(cgroup)  # EBUSY until the killed fake QEMU has left
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    root = cgroup2_root()
    dirs.collect_stale_pins(root)
    GrantStore(dirs.state_dir).collect_stale(root)
    assert leftover_state(dirs, ident) == []


# --------------------------------------------------------------------------------------------
# The races the stress runs found, made deterministic (libvirt's growth frees its old map
# and program between our detection and our use of them).


@pytest.fixture
def dirs(tmp_path) -> StateDirs:
    with private_state_dirs(str(tmp_path)) as state_dirs:
        yield state_dirs


def _race_once(mocker, owner: object, name: str, victim: Callable[[int], bool],
               libvirt_grows: Callable[[], None], op: str,
               callers: Tuple[str, ...]) -> Dict[str, int]:
    """Patch ``owner.name``: on the first call from a module in ``callers`` for an id that
    ``victim`` picks, libvirt grows and the object is gone (ENOENT, as the kernel answers
    once the free completed)."""
    real = getattr(owner, name)
    fired = {"count": 0}

    def racing(obj_id, *args):
        frame = sys._getframe(1)
        while frame.f_globals.get("__name__") == "unittest.mock":
            frame = frame.f_back
        caller = frame.f_globals.get("__name__", "")
        if not fired["count"] and victim(obj_id) and caller in callers:
            fired["count"] += 1
            libvirt_grows()
            raise bpf.BpfError(op, errno.ENOENT, f"id {obj_id}")
        return real(obj_id, *args)

    mocker.patch.object(owner, name, side_effect=racing)
    return fired


@pytest.mark.parametrize("full", [False, True], ids=["reinstall", "overlay-growth"])
def test_grant_racing_libvirt_growth_that_frees_its_old_map(full, scratch_cgroup, node_dir,
                                                           dirs, mocker):
    tag = random.randrange(2000, 4000)
    holder = {"fd": install_libvirt_like(scratch_cgroup, [Rule.parse("c 1:3 rw")])}
    try:
        f = DeviceFilter(scratch_cgroup, dirs)
        old = [Rule("c", tag, i, "rw") for i in range(64 if full else 3)]
        f.grant(old)
        if not full:  # libvirt already grew once: the next grant re-installs
            holder["fd"] = libvirt_realloc(scratch_cgroup, holder["fd"])
        old_id = bpf.map_info(holder["fd"]).id

        def grow() -> None:
            holder["fd"] = libvirt_realloc(scratch_cgroup, holder["fd"])

        # Only the engine's own lookup races (detection's is the other test's case).
        fired = _race_once(mocker, bpf, "map_get_fd_by_id", lambda i: i == old_id, grow,
                           "BPF_MAP_GET_FD_BY_ID", ("libvirt_bpfcg.devfilter",))
        new = [Rule("c", tag, 100 + i, "rw") for i in range(5)]
        f.grant(new)  # re-detects and redoes the grant on libvirt's new map
        mocker.stopall()
        assert fired["count"] == 1, "the race was not exercised"
        state = filter_state(scratch_cgroup)
        assert state.base_id == bpf.map_info(holder["fd"]).id
        assert state.ours == entries_of(old + new)
        check_pins_follow_attached(dirs, scratch_cgroup, state)
        assert opens(scratch_cgroup, [rule_node(node_dir, new[0]),
                                      rule_node(node_dir, old[0])]) == [True, True]
    finally:
        bpf.close(holder["fd"])


@pytest.mark.parametrize("verb", ["grant", "revoke"])
def test_detection_racing_libvirt_growth_is_not_foreign(verb, scratch_cgroup, dirs, mocker):
    """The program BPF_PROG_QUERY listed is freed before we read it: that is libvirt
    swapping programs, not a foreign filter — re-detect instead of refusing."""
    holder = {"fd": install_libvirt_like(scratch_cgroup, [Rule.parse("c 1:3 rw")])}
    try:
        f = DeviceFilter(scratch_cgroup, dirs)
        f.grant([Rule.parse("c 240:1 rw")])

        def grow() -> None:
            holder["fd"] = libvirt_realloc(scratch_cgroup, holder["fd"])

        fired = _race_once(mocker, det, "program_view", lambda _i: True, grow,
                           "BPF_PROG_GET_FD_BY_ID", ("libvirt_bpfcg.detect",))
        if verb == "grant":
            f.grant([Rule.parse("c 240:2 rw")])
        else:
            f.revoke([Rule.parse("c 240:1 rw")])
        mocker.stopall()
        assert fired["count"] == 1
        assert f.detect().mode == det.MODE_LIBVIRT
    finally:
        bpf.close(holder["fd"])
