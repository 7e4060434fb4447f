"""Crash safety against the real kernel (issue 7, part 1).

The engine runs in a worker process of its own (stress/worker.py) and is killed with
SIGKILL — a kill no ``finally`` can clean up after:

* at every named crash point (``devfilter.crash_point``), in every path that reaches it:
  creating the own filter, growing it, installing the overlay on libvirt's program,
  re-installing it after libvirt's own map growth (in the pinned overlay or a bigger one),
  growing the overlay, revoking;
* at a random moment of a long series of grants (crossing growth boundaries) and revokes —
  ``scaled(…)`` iterations here, 1,000 under ``python -m stress``.

After each kill, read from the kernel (BPF_PROG_QUERY, the attached program's maps, opens
from inside the cgroup):

* exactly one program attached — zero only when the very first install was interrupted;
* our filter holds everything granted before the interrupted call and nothing but that plus
  some of the call's own rules (a kill mid in-place update leaves some of them);
* enforcement matches the maps: granted devices open, devices never asked for do not;
* libvirt's map is never written and stays the program's first map;
* no program of ours exists besides the attached one (the killed process's are freed);
* the next call converges to exactly the expected rules, with the pins on the attached
  overlay; after the cgroup is gone, collecting leaves no pin, lock or grant file for it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import pytest
from engine_helpers import (
    ROOT,
    check_pins_follow_attached,
    entries_of,
    filter_state,
    install_libvirt_like,
    leftover_state,
    libvirt_realloc,
    opens,
    private_state_dirs,
    record,
    rule_node,
    run_worker,
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
from libvirt_bpfcg.devfilter import DeviceFilter, read_entries
from libvirt_bpfcg.grants import GrantStore
from libvirt_bpfcg.rules import Rule
from libvirt_bpfcg.state import StateDirs, cgroup_id

pytestmark = pytest.mark.kernel

Entries = Dict[int, int]
Op = Tuple[str, List[Rule]]
LIBVIRT_MINOR = 99990  # a device only libvirt's map grants
NEVER_MINOR = 99999  # a device nobody ever grants


@pytest.fixture
def dirs(tmp_path) -> StateDirs:
    with private_state_dirs(str(tmp_path)) as state_dirs:
        yield state_dirs


def new_tag() -> int:
    """A major of this test's own (see engine_helpers.tagged_programs)."""
    return random.randrange(2000, 4000)


def tag_rules(tag: int, start: int, count: int, access: str = "rw") -> List[Rule]:
    return [Rule("c", tag, start + i, access) for i in range(count)]


def libvirt_rules(tag: int) -> List[Rule]:
    return [Rule.parse("c 1:3 rw"), Rule("c", tag, LIBVIRT_MINOR, "rw")]


def apply(model: Entries, op: Op) -> Entries:
    verb, rules = op
    result = dict(model)
    if verb == "grant":
        result.update(entries_of(rules))
    elif verb == "revoke":
        for rule in rules:
            result.pop(rule.key, None)
    return result


def bounds(model: Entries, op: Op | None) -> Tuple[Entries, Entries]:
    """What our filter may hold after a kill during ``op``: at least ``lo``, at most ``hi``."""
    if op is None:
        return model, model
    after = apply(model, op)
    if op[0] == "revoke":
        return after, model
    return model, after


def is_subset(small: Entries, big: Entries) -> bool:
    return all(big.get(k) == v for k, v in small.items())


# --------------------------------------------------------------------------------------------
# The checks


@dataclass
class Guest:
    """One scratch cgroup under test, in own or libvirt mode."""

    cgroup: str
    dirs: StateDirs
    node_dir: str
    tag: int
    libvirt_fd: int | None = None
    libvirt_snapshot: Entries = field(default_factory=dict)

    def start_libvirt(self) -> None:
        self.libvirt_fd = install_libvirt_like(self.cgroup, libvirt_rules(self.tag))
        self.libvirt_snapshot = read_entries(self.libvirt_fd)

    def libvirt_grows(self) -> None:
        assert self.libvirt_fd is not None
        self.libvirt_fd = libvirt_realloc(self.cgroup, self.libvirt_fd)

    def close(self) -> None:
        if self.libvirt_fd is not None:
            bpf.close(self.libvirt_fd)
            self.libvirt_fd = None

    def filter(self) -> DeviceFilter:
        return DeviceFilter(self.cgroup, self.dirs)

    def run(self, op: Op | None) -> None:
        """The "next call": redo the interrupted op (or just re-check the overlay)."""
        f = self.filter()
        if op is None:
            f.ensure_overlay()
        elif op[0] == "grant":
            f.grant(op[1])
        else:
            f.revoke(op[1])


def check_after_kill(guest: Guest, lo: Entries, hi: Entries, may_be_empty: bool,
                     rng: random.Random) -> det.Detection:
    """The invariants that must hold whenever the worker died, whatever it was doing."""
    state = filter_state(guest.cgroup)
    if may_be_empty and not state.prog_ids:
        assert not lo, "nothing attached although rules were granted before"
        return det.detect(guest.cgroup)
    assert len(state.prog_ids) == 1, f"{len(state.prog_ids)} programs attached"
    _check_libvirt_untouched(guest, state)
    ours = state.ours
    assert is_subset(lo, ours), f"lost {_show(set(lo) - set(ours))}"
    assert is_subset(ours, hi), f"unexpected entries {_show(set(ours) - set(hi))}"
    _check_enforcement(guest, ours, hi, rng)
    attached = [p.id for p in det.detect(guest.cgroup).programs if p.owner == det.OWNER_BPFCG]
    left = wait_programs_settle(guest.tag, attached)
    assert set(left) <= set(attached), f"programs of ours besides the attached {attached}: {left}"
    return det.detect(guest.cgroup)


def check_converged(guest: Guest, expected: Entries, rng: random.Random) -> None:
    state = filter_state(guest.cgroup)
    assert len(state.prog_ids) == 1
    _check_libvirt_untouched(guest, state)
    assert state.ours == expected, (
        f"missing {_show(set(expected) - set(state.ours))}, "
        f"extra {_show(set(state.ours) - set(expected))}")
    _check_enforcement(guest, state.ours, expected, rng)
    if guest.libvirt_fd is not None:
        assert state.overlay is not None, "our overlay program is not attached"
        check_pins_follow_attached(guest.dirs, guest.cgroup, state)


def _show(keys) -> List[str]:
    """A few keys as 'M:m' (messages stay short)."""
    return [f"{k >> 32}:{k & 0xFFFFFFFF}" for k in sorted(keys)[:5]]


def _check_libvirt_untouched(guest: Guest, state) -> None:
    if guest.libvirt_fd is None:
        assert state.mode == det.MODE_OWN
        return
    assert state.mode == det.MODE_LIBVIRT
    assert read_entries(guest.libvirt_fd) == guest.libvirt_snapshot, "libvirt's map changed"
    assert state.base_id == bpf.map_info(guest.libvirt_fd).id, "not on libvirt's live map"


def _check_enforcement(guest: Guest, ours: Entries, candidates: Entries,
                       rng: random.Random, sample: int = 16) -> None:
    """Opens from inside the cgroup agree with the maps, for a sample of devices."""
    keys = sorted(candidates)
    if len(keys) > sample:
        keys = [keys[0], keys[-1]] + rng.sample(keys[1:-1], sample - 2)
    rules = [Rule("c", k >> 32, k & 0xFFFFFFFF, "r") for k in keys]
    rules.append(Rule("c", guest.tag, NEVER_MINOR, "r"))
    libvirt = guest.libvirt_snapshot
    if guest.libvirt_fd is not None:
        rules.append(Rule("c", guest.tag, LIBVIRT_MINOR, "r"))
    want = [r.key in ours or r.key in libvirt for r in rules]
    got = opens(guest.cgroup, [rule_node(guest.node_dir, r) for r in rules])
    wrong = [str(r) for r, w, g in zip(rules, want, got) if w != g]
    assert not wrong, f"enforcement differs from the maps for {wrong}"


def check_nothing_left(guest: Guest) -> None:
    """Remove the cgroup (the guest stopped), collect: no pin, lock or grant file remains."""
    guest.close()
    ident = cgroup_id(guest.cgroup)
    os.rmdir(guest.cgroup)
    root = cgroup2_root()
    guest.dirs.collect_stale_pins(root)
    GrantStore(guest.dirs.state_dir).collect_stale(root)
    assert leftover_state(guest.dirs, ident) == []


# --------------------------------------------------------------------------------------------
# Every crash point in every path that reaches it

Setup = Tuple[Entries, Entries, Op, bool]  # granted, enforced before, the call, first install


def _setup(name: str, guest: Guest) -> Setup:
    """Bring the guest to the state before the interrupted call; say what it had."""
    tag, f = guest.tag, guest.filter()
    old10, old60 = tag_rules(tag, 0, 10), tag_rules(tag, 0, 60)
    new = ("grant", tag_rules(tag, 100, 10))
    if name == "create":
        return {}, {}, new, True
    if name in ("overlay-install", "overlay-grow", "overlay-reinstall",
                "overlay-reinstall-grow", "revoke-overlay"):
        guest.start_libvirt()
    if name == "overlay-install":
        return {}, {}, new, False
    old = old10 if name in ("overlay-reinstall", "revoke-own", "revoke-overlay") else old60
    f.grant(old)
    granted = entries_of(old)
    if name.startswith("overlay-reinstall"):
        guest.libvirt_grows()  # libvirt's growth dropped our program: nothing of ours runs
        return granted, {}, new, False
    if name.startswith("revoke"):
        return granted, granted, ("revoke", old[:3]), False
    return granted, granted, new, False  # own-grow, overlay-grow


CRASH_CASES = [
    ("create", "create-after-fill"), ("create", "after-load"), ("create", "after-attach"),
    ("own-grow", "grow-after-fill"), ("own-grow", "after-load"),
    ("own-grow", "after-attach"), ("own-grow", "grow-before-release"),
    ("overlay-install", "overlay-after-fill"), ("overlay-install", "after-load"),
    ("overlay-install", "after-attach"), ("overlay-install", "overlay-before-pin"),
    ("overlay-reinstall", "overlay-after-fill"), ("overlay-reinstall", "after-load"),
    ("overlay-reinstall", "after-attach"), ("overlay-reinstall", "overlay-before-pin"),
    ("overlay-reinstall-grow", "overlay-after-fill"), ("overlay-reinstall-grow", "after-load"),
    ("overlay-reinstall-grow", "after-attach"),
    ("overlay-reinstall-grow", "overlay-before-pin"),
    ("overlay-grow", "grow-after-fill"), ("overlay-grow", "after-load"),
    ("overlay-grow", "after-attach"), ("overlay-grow", "grow-before-release"),
    ("revoke-own", "revoke-after-delete"), ("revoke-overlay", "revoke-after-delete"),
]


@pytest.mark.parametrize(("scenario", "point"), CRASH_CASES,
                         ids=[f"{s}@{p}" for s, p in CRASH_CASES])
def test_kill_at_crash_point(scenario, point, cgroup_parent, node_dir, dirs, tmp_path):
    repetitions = scaled(1, 12)
    started = time.monotonic()
    for rep in range(repetitions):
        cgroup = os.path.join(cgroup_parent, f"crash-{scenario}-{point}-{rep}")
        os.mkdir(cgroup)
        try:
            _kill_at(scenario, point, Guest(cgroup, dirs, node_dir, new_tag()), str(tmp_path))
        except AssertionError as exc:
            raise AssertionError(f"repetition {rep}: {exc}") from exc
    record(f"crash point {point} during {scenario}", repetitions,
           "bounds, enforcement, one program, no leaked programs, convergence, no leftovers",
           time.monotonic() - started)


def _kill_at(scenario: str, point: str, guest: Guest, directory: str) -> None:
    rng = random.Random(f"{scenario}@{point}@{guest.tag}")
    try:
        granted, enforced, call, first = _setup(scenario, guest)
        spec = worker_spec(guest.cgroup, guest.dirs, [call])
        done = run_worker(directory, spec, crash_at=point)
        assert done.returncode == -signal.SIGKILL, (
            f"crash point {point} not reached: rc {done.returncode}, {done.stdout!r} "
            f"{done.stderr[-2000:]!r}")
        assert "done 0" not in done.stdout
        lo, hi = bounds(enforced, call)
        hi = apply(granted, call) if call[0] == "grant" else hi
        check_after_kill(guest, lo, hi, first, rng)
        guest.run(call)  # the next call converges
        check_converged(guest, apply(granted, call), rng)
        check_nothing_left(guest)
    finally:
        guest.close()


def test_every_crash_point_is_covered():
    """Each crash point in devfilter.py appears in CRASH_CASES (a new one must be added)."""
    import re

    with open(os.path.join(ROOT, "libvirt_bpfcg", "devfilter.py"), encoding="utf-8") as src:
        points = set(re.findall(r'crash_point\("([a-z-]+)"\)', src.read()))
    assert points, "no crash points found"
    assert points <= {p for _s, p in CRASH_CASES}, points - {p for _s, p in CRASH_CASES}


# --------------------------------------------------------------------------------------------
# SIGKILL at random moments


def random_series(rng: random.Random, tag: int, n_ops: int) -> List[Op]:
    """Grants of 1 … 150 new rules (so the map grows 64 → 128 → … → 1024) and revokes of
    rules granted earlier, every key distinct."""
    ops: List[Op] = []
    live: List[Rule] = []
    next_minor = 0
    for _ in range(n_ops):
        if live and rng.random() < 0.2:
            victims = rng.sample(live, min(len(live), rng.randint(1, 8)))
            live = [r for r in live if r not in victims]
            ops.append(("revoke", victims))
            continue
        size = rng.choice((1, 2, 5, 20, 40, 90, 150))
        rules = [Rule("c", tag, next_minor + j, rng.choice(("r", "rw"))) for j in range(size)]
        next_minor += size
        live += rules
        ops.append(("grant", rules))
    return ops


def run_and_kill(directory: str, spec: dict, delay: float) -> Tuple[int, str]:
    """Start the worker, SIGKILL it ``delay`` s after it is ready; (ops completed, stdout).

    stdout is read unbuffered: a buffered readline() may read ahead past "ready", and what
    it buffered would be missing from communicate()'s result (a "done" line lost makes a
    finished op look interrupted).
    """
    path = write_spec(directory, spec)
    proc = subprocess.Popen(worker_command(path), cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # unbuffered: reads up to the newline, no further
        assert first == b"ready\n", first + (proc.stderr.read() if proc.stderr else b"")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = rest.decode()
    assert "error" not in text, text + err.decode(errors="replace")
    return sum(1 for line in text.splitlines() if line.startswith("done ")), text


def _series_duration(directory: str, guest: Guest, ops: Sequence[Op]) -> float:
    """Run one whole series unkilled: seconds from "ready" to the last op's "done"."""
    spec = worker_spec(guest.cgroup, guest.dirs, ops)
    path = write_spec(directory, spec)
    proc = subprocess.Popen(worker_command(path), cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    for _op in ops:
        assert proc.stdout.readline().startswith("done ")
    duration = time.monotonic() - start
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    return duration


@pytest.mark.parametrize("mode", ["own", "libvirt"])
def test_sigkill_at_random_moments(mode, cgroup_parent, node_dir, tmp_path):
    iterations = scaled(8, 500)
    seed = int(os.environ.get("BPFCG_STRESS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    tag = new_tag()
    stats = {"killed-mid-series": 0, "after-last-op": 0, "in-grant": 0, "in-revoke": 0,
             "in-growth": 0}
    started = time.monotonic()
    with private_state_dirs(str(tmp_path)) as dirs:
        window = _calibrate(str(tmp_path), cgroup_parent, dirs, node_dir, tag, mode, rng)
        for iteration in range(iterations):
            where = f"seed {seed}, iteration {iteration}"
            # Its own generator per iteration: with BPFCG_STRESS_SEED, iteration N gets the
            # same series again (only the moment of the kill differs).
            it_rng = random.Random(f"{seed}:{mode}:{iteration}")
            try:
                kind = _one_random_kill(str(tmp_path), cgroup_parent, dirs, node_dir, tag,
                                        mode, it_rng, window, iteration)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from exc
            for key in kind:
                stats[key] += 1
            if "after-last-op" in kind:
                window *= 0.9  # series run faster than calibrated: aim inside them
    elapsed = time.monotonic() - started
    record(f"random SIGKILL during grant/revoke series ({mode} mode)", iterations,
           "bounds, enforcement, one program, no leaked programs, convergence, no leftovers",
           elapsed, seed=seed, **stats)
    assert stats["killed-mid-series"] >= iterations // 2, stats


def _guest(cgroup_parent: str, dirs: StateDirs, node_dir: str, tag: int, mode: str,
           name: str) -> Guest:
    path = os.path.join(cgroup_parent, name)
    os.mkdir(path)
    guest = Guest(path, dirs, node_dir, tag)
    if mode == "libvirt":
        guest.start_libvirt()
    return guest


def _calibrate(directory: str, cgroup_parent: str, dirs: StateDirs, node_dir: str, tag: int,
               mode: str, rng: random.Random) -> float:
    """The kill window: the shortest of three whole series (also checked for the result)."""
    durations = []
    for attempt in range(3):
        guest = _guest(cgroup_parent, dirs, node_dir, tag, mode, f"calib-{mode}-{attempt}")
        try:
            ops = random_series(rng, tag, 25)
            durations.append(_series_duration(directory, guest, ops))
            model: Entries = {}
            for op in ops:
                model = apply(model, op)
            check_converged(guest, model, rng)
            check_nothing_left(guest)
        finally:
            guest.close()
    return min(durations)


def _one_random_kill(directory: str, cgroup_parent: str, dirs: StateDirs, node_dir: str,
                     tag: int, mode: str, rng: random.Random, window: float,
                     iteration: int) -> List[str]:
    guest = _guest(cgroup_parent, dirs, node_dir, tag, mode, f"kill-{mode}-{iteration}")
    try:
        ops = random_series(rng, tag, 25)
        done, _out = run_and_kill(directory, worker_spec(guest.cgroup, dirs, ops),
                                  rng.uniform(0, window))
        model: Entries = {}
        for op in ops[:done]:
            model = apply(model, op)
        inflight = ops[done] if done < len(ops) else None
        lo, hi = bounds(model, inflight)
        before = check_after_kill(guest, lo, hi, may_be_empty=done == 0 and mode == "own",
                                  rng=rng)
        guest.run(inflight)
        check_converged(guest, apply(model, inflight) if inflight else model, rng)
        kind = _kill_kind(before, det.detect(guest.cgroup), inflight)
        check_nothing_left(guest)
        return kind
    finally:
        guest.close()


def _kill_kind(before: det.Detection, after: det.Detection, inflight: Op | None) -> List[str]:
    """Where the kill landed, for the reliability table."""
    if inflight is None:
        return ["after-last-op"]
    kinds = ["killed-mid-series", "in-grant" if inflight[0] == "grant" else "in-revoke"]
    view_before = before.base if before.mode == det.MODE_OWN else before.overlay
    view_after = after.base if after.mode == det.MODE_OWN else after.overlay
    if view_before and view_after and view_after.max_entries > view_before.max_entries:
        kinds.append("in-growth")
    return kinds
