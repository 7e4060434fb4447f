"""``libvirt-bpfcg watch`` against a real libvirtd 9.0 + QEMU guest.

* libvirt mode: libvirt's own map growth (56+ hotplugged disks) swaps its program in without
  any hook or event for the swap itself; the watcher puts our overlay back within 2 s. The
  fail-closed window is measured by a thread that watches the guest cgroup's program list.
* a silent swap (no libvirt event at all) is caught by the watcher's program poll.
* the watcher survives a libvirtd restart, reconciles every running guest after it and keeps
  receiving events; without a hook it does the hook's job (own mode at start).
* hook, ``allow`` and ``watch`` racing on one guest lose no grant.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from typing import List, Tuple

import pytest
from lab_cli import (
    HOOK,
    STATE_DIR,
    WatchProcess,
    cli,
    cli_argv,
    extras_xml,
    ns_argv,
    wait_until,
)
from test_hook_lab import _letters, map_entries

from libvirt_bpfcg import detect as det
from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.devfilter import DeviceFilter
from libvirt_bpfcg.rules import Rule, RuleSet
from libvirt_bpfcg.state import StateDirs

pytestmark = pytest.mark.lab

EPERM = 1
REINSTALL_BUDGET = 2.0  # seconds, the target


def opens(guest, paths):
    return guest.open_in_cgroup([(p, os.O_RDONLY) for p in paths])


def host_dirs(lab) -> StateDirs:
    """The lab's state dir seen from the host (locks and runtime grants are shared through
    it; own mode pins nothing, so the bpffs path is never used)."""
    return StateDirs(state_dir=os.path.join(lab.lab_dir, "run", "bpfcg"),
                     bpffs=os.path.join(lab.lab_dir, "no-bpffs"))


class ProgramTimeline(threading.Thread):
    """Records every change of a cgroup's attached device programs, with a timestamp, by
    querying every millisecond: libvirt's swap and our re-install show as two entries."""

    def __init__(self, cgroup: str) -> None:
        super().__init__(daemon=True)
        self.cgroup = cgroup
        self.events: List[Tuple[float, List[int], bool]] = []  # (time, ids, ours)
        self.halt = threading.Event()

    def run(self) -> None:
        last: List[int] = []
        while True:
            # Look once more after halt is set: the test halts the timeline as soon as it
            # sees our re-install itself, possibly before this thread's next query did.
            stopping = self.halt.is_set()
            fd = bpf.open_cgroup(self.cgroup)
            try:
                ids = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE).prog_ids
            finally:
                bpf.close(fd)
            if ids != last:
                try:
                    ours = det.detect(self.cgroup).overlay_installed
                except bpf.BpfError:
                    continue  # swapped again while we looked: query anew
                self.events.append((time.monotonic(), ids, ours))
                last = ids
            if stopping:
                return
            time.sleep(0.001)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)

    def windows(self) -> List[float]:
        """Seconds from each loss of our overlay to its re-install."""
        out, lost = [], None
        for when, _ids, ours in self.events:
            if not ours and lost is None:
                lost = when
            elif ours and lost is not None:
                out.append(when - lost)
                lost = None
        return out


def test_watch_reinstalls_overlay_after_libvirts_map_growth(hooked_lab, lab_guest):
    lab = hooked_lab
    extra = lab.new_loop("wgrow-extra")
    guest = lab_guest(lab=lab, name="wgrow", metadata_xml=extras_xml(extra))
    assert det.detect(guest.cgroup).overlay_installed and opens(guest, [extra]) == [0]
    loops = [lab.new_loop(f"wgrow{i}", size_mb=1) for i in range(60)]
    timeline = ProgramTimeline(guest.cgroup)
    try:
        with WatchProcess(lab) as watch:
            watch.wait_for("connected to")
            timeline.start()
            grown_at = None
            for i, loop in enumerate(loops):
                lab.virsh("attach-disk", guest.name, loop, f"sd{_letters(i)}", "--targetbus",
                          "scsi", "--address", f"scsi:0.0.{i}", "--live")
                if det.detect(guest.cgroup).base.max_entries >= 128:
                    grown_at = (i, time.monotonic())
                    break
            assert grown_at is not None, "libvirt never grew its map"
            index, returned = grown_at
            wait_until(lambda: det.detect(guest.cgroup).overlay_installed, REINSTALL_BUDGET)
            after_return = time.monotonic() - returned
            timeline.stop()
            assert det.detect(guest.cgroup).base.max_entries >= 128, "libvirt's new map"
            assert opens(guest, [extra, loops[index]]) == [0, 0]
            # libvirt's own hotplug keeps working through our re-installed program
            lab.virsh("detach-disk", guest.name, "sda", "--live")
            assert opens(guest, [loops[0]]) == [EPERM]
        assert watch.returncode == 0
        windows = timeline.windows()
        assert windows and max(windows) < REINSTALL_BUDGET, timeline.events
        trigger = re.search(r"domain wgrow: (.*?): libvirt mode: program installed",
                            watch.log())
        assert trigger, watch.log()
        print(f"\ngrowth at disk {index + 1}: fail-closed window {max(windows) * 1000:.1f} ms "
              f"(libvirt's swap -> our re-install, on {trigger.group(1)!r}); overlay back "
              f"{after_return * 1000:.1f} ms after attach-disk returned")
    finally:
        timeline.stop()
        lab.destroy(guest.name)
        for loop in loops:
            lab.free_loop(loop)


def silent_swap(cgroup: str) -> int:
    """Attach a libvirt-format program over libvirt's *current* map, as libvirt's growth
    would but without any libvirt event (libvirt's cached map stays the attached one, so
    libvirt itself is unaffected). Returns the new program id."""
    d = det.detect(cgroup)
    map_fd = bpf.map_get_fd_by_id(d.base.id)
    prog_fd = devprog.load_libvirt_program(map_fd)
    cg_fd = bpf.open_cgroup(cgroup)
    try:
        bpf.prog_attach(cg_fd, prog_fd, bpf.BPF_CGROUP_DEVICE, 0, expected_revision=d.revision)
        return bpf.prog_info(prog_fd).id
    finally:
        for fd in (cg_fd, prog_fd, map_fd):
            bpf.close(fd)


def test_watch_poll_catches_a_silent_swap_and_once_repairs(hooked_lab, lab_guest):
    lab = hooked_lab
    extra = lab.new_loop("wpoll-extra")
    guest = lab_guest(lab=lab, name="wpoll", metadata_xml=extras_xml(extra))
    with WatchProcess(lab, "--poll-interval", "0.5", debug=True) as watch:
        watch.wait_for("domain wpoll: connected: libvirt mode")  # its first reconcile is done
        swapped = silent_swap(guest.cgroup)
        assert not det.detect(guest.cgroup).overlay_installed
        assert opens(guest, [extra]) == [EPERM]
        took = wait_until(lambda: det.detect(guest.cgroup).overlay_installed, REINSTALL_BUDGET)
        watch.wait_for("program swapped: libvirt mode: program installed")
        assert f"-> [{swapped}]" in watch.log()
        assert opens(guest, [extra]) == [0]
        print(f"\nsilent swap re-installed by the poll after {took * 1000:.0f} ms")
    assert watch.returncode == 0 and "watch: stopped" in watch.log()

    silent_swap(guest.cgroup)  # nobody watching now: --once repairs it
    proc = cli(lab, "watch", "--once", "-c", lab.uri, "--state-dir", STATE_DIR)
    assert "libvirt mode: program installed" in proc.stderr, proc.stderr
    assert opens(guest, [extra]) == [0]


def test_watch_survives_libvirtd_restart_and_does_the_hooks_job(lab_nobpf, lab_guest):
    """No hook here: libvirtd runs without bpf(2) and, as in a container where the hook may
    not use bpf(2) either, the watcher installs the filter on the guest's started event."""
    lab = lab_nobpf
    lab.remove_hook()
    dirs = host_dirs(lab)
    with WatchProcess(lab) as watch:
        watch.wait_for("connected to")
        first = lab_guest(lab=lab, name="wrst1")
        took = wait_until(lambda: det.detect(first.cgroup).mode == det.MODE_OWN, 5)
        print(f"\nown filter installed {took * 1000:.0f} ms after virsh start returned")
        planned = map_entries(first.cgroup)
        assert opens(first, [first.disks[0]]) == [0]

        lab.stop_libvirtd()
        watch.wait_for("connection to libvirtd lost")
        dfilter = DeviceFilter(first.cgroup, dirs)
        dfilter.grant([Rule.parse("c 240:77 rw")])  # not derived from anything: goes
        dfilter.grant([Rule.parse("c 240:78 rw")], remember=True)  # an allow: stays
        lab.start_libvirtd()
        watch.wait_for("connected to", count=2, timeout=20)
        expected = dict(planned)
        expected.update(RuleSet.of([Rule.parse("c 240:78 rw")]).as_map())
        wait_until(lambda: map_entries(first.cgroup) == expected, 5)

        second = lab_guest(lab=lab, name="wrst2")  # events arrive on the new connection
        wait_until(lambda: det.detect(second.cgroup).mode == det.MODE_OWN, 5)
        assert opens(second, [second.disks[0], first.disks[0]]) == [0, EPERM]
    assert watch.returncode == 0, watch.log()
    log = watch.log()
    assert "domain wrst1: connected: own mode: revoked c 240:77 rw" in log, log
    assert re.search(r"domain wrst2: (started|resumed): own mode: granted", log), log


class GrantMonitor(threading.Thread):
    """Checks, as fast as it can, that every runtime grant already recorded is in the map:
    ``allow`` writes the map before the record (both under the lock), so a rule recorded but
    missing from the map means some reconcile dropped it, if only for a moment."""

    def __init__(self, cgroup: str, dirs: StateDirs) -> None:
        super().__init__(daemon=True)
        self.dfilter = DeviceFilter(cgroup, dirs)
        self.halt = threading.Event()
        self.checks = 0
        self.lost: List[str] = []

    def run(self) -> None:
        while not self.halt.is_set():
            recorded = self.dfilter.runtime_grants()
            try:
                entries = map_entries(self.dfilter.cgroup)
            except (bpf.BpfError, AssertionError):
                continue  # the map was swapped (grown) while we read it
            self.checks += 1
            self.lost += [str(r) for r in recorded
                          if entries.get(r.key, 0) & r.value != r.value]

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


def test_hook_allow_and_watch_racing_on_one_guest_lose_no_grant(hooked_nobpf, lab_guest):
    lab = hooked_nobpf
    guest = lab_guest(lab=lab, name="wrace")
    planned = map_entries(guest.cgroup)
    xml = lab.virsh("dumpxml", guest.name).stdout
    with open(os.path.join(lab.lab_dir, "run", "race.xml"), "w") as handle:
        handle.write(xml)
    batches = [[f"c {240 + w}:{b * 10 + i} rw" for i in range(10)] for w in range(3)
               for b in range(2)]  # 3 workers x 2 calls x 10 rules: 60, the map must grow
    monitor = GrantMonitor(guest.cgroup, host_dirs(lab))
    with WatchProcess(lab, "--poll-interval", "0.1", debug=True) as watch:
        watch.wait_for("connected to")
        monitor.start()
        try:
            procs = []
            for worker in range(3):
                calls = " && ".join(
                    " ".join([*map(_sh, cli_argv("allow", "--domain", guest.name,
                                                 "--state-dir", STATE_DIR)), *map(_sh, batch)])
                    for batch in batches[worker * 2:(worker + 1) * 2])
                procs.append(_popen(lab, ["/bin/sh", "-c", calls]))
            hook = " && ".join([f"{_sh(sys.executable)} -S {_sh(HOOK)} {guest.name} "
                                "reconnect begin - < /run/libvirt/race.xml"] * 3)
            procs.append(_popen(lab, ["/bin/sh", "-c", hook]))
            for _ in range(3):  # resumed events: the watcher reconciles meanwhile
                lab.virsh("suspend", guest.name)
                lab.virsh("resume", guest.name)
            for proc in procs:
                _out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
            granted = [Rule.parse(r) for batch in batches for r in batch]
            expected = dict(planned)
            expected.update(RuleSet.of(granted).as_map())
            wait_until(lambda: map_entries(guest.cgroup) == expected, 5)
            time.sleep(0.3)  # whatever the watcher still had queued: nothing may be lost
        finally:
            monitor.stop()
        assert map_entries(guest.cgroup) == expected
        assert det.detect(guest.cgroup).base.max_entries == 128
    assert watch.returncode == 0
    assert monitor.checks > 20 and not monitor.lost, (monitor.checks, monitor.lost[:5])
    log = watch.log()
    assert "domain wrace: resumed: own mode" in log and "program swapped" in log, log
    stored = DeviceFilter(guest.cgroup, host_dirs(lab)).runtime_grants()
    assert sorted(map(str, stored)) == sorted(map(str, granted))


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _popen(lab, cmd: List[str]) -> subprocess.Popen:
    return subprocess.Popen(ns_argv(lab, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
