"""The hook on a real libvirtd 9.0 + QEMU guest: own mode, libvirt mode, restarts, growth.

The hook is installed into the lab's hooks/qemu.d/ exactly as a package would install it,
wrapped only to run with this checkout's interpreter; its config file is the lab's
/etc/libvirt/libvirt-bpfcg.conf.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Dict, List

import pytest
from lab_cli import HOOK, STATE_DIR, HookServerProcess, extras_xml, install_hook

from libvirt_bpfcg import detect as det
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.devfilter import read_entries

pytestmark = pytest.mark.lab

EPERM = 1

def map_entries(cgroup: str, which: str = "base") -> Dict[int, int]:
    d = det.detect(cgroup)
    view = getattr(d, which)
    assert view is not None, f"no {which} map on {cgroup}: {d}"
    fd = bpf.map_get_fd_by_id(view.id)
    try:
        return read_entries(fd)
    finally:
        bpf.close(fd)


def cli_in_lab(lab, *args: str) -> str:
    """libvirt-bpfcg run inside the lab's namespace, as an admin on that host would."""
    proc = lab.ns_run([sys.executable, "-m", "libvirt_bpfcg", *args], check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def status(lab, name: str) -> Dict:
    return json.loads(cli_in_lab(lab, "status", "--domain", name, "--state-dir", STATE_DIR,
                                 "--json"))


def opens(guest, paths: List[str]) -> List[int]:
    return guest.open_in_cgroup([(p, os.O_RDONLY) for p in paths])


# --- own mode -------------------------------------------------------------------------------


def test_own_mode_matches_libvirts_native_map_entry_for_entry(lab, hooked_nobpf, lab_guest):
    disk, other = lab.new_loop("own-d0"), lab.new_loop("own-other")
    native = lab_guest([disk], lab=lab, name="cmpnative")
    native_entries = map_entries(native.cgroup)
    assert det.detect(native.cgroup).attached.owner == det.OWNER_LIBVIRT
    lab.destroy(native.name)

    guest = lab_guest([disk], lab=hooked_nobpf, name="cmpown")
    d = det.detect(guest.cgroup)
    assert d.mode == det.MODE_OWN and d.attached.name == "bpfcg_dev"
    assert map_entries(guest.cgroup) == native_entries, "own mode = libvirt's entries exactly"
    assert opens(guest, [disk, "/dev/null"]) == [0, 0]
    assert opens(guest, [other])[0] == EPERM, "devices outside the plan are denied"

    prog_id = d.attached.id
    hooked_nobpf.restart_libvirtd()  # reconnect hook runs (barrier in the harness)
    d2 = det.detect(guest.cgroup)
    assert d2.attached.id == prog_id and map_entries(guest.cgroup) == native_entries
    assert "Hook script execution failed" not in hooked_nobpf.libvirtd_log()
    st = status(hooked_nobpf, guest.name)
    assert st["mode"] == "own" and any(r["rule"] == "c 1:3 rw" for r in st["rules"])

    cgroup = guest.cgroup
    hooked_nobpf.destroy(guest.name)
    assert not os.path.exists(cgroup), "destroy leaves no cgroup"
    plans = os.path.join(hooked_nobpf.lab_dir, "run", "bpfcg", "domains")
    assert not os.path.isdir(plans) or os.listdir(plans) == [], "release drops our plan"


def test_forbidden_device_refuses_start_with_libvirts_error(hooked_nobpf, lab_guest):
    with pytest.raises(Exception) as info:
        lab_guest(lab=hooked_nobpf, name="forbid",
                  metadata_xml=extras_xml("/dev/port"))
    message = str(info.value)
    assert "/dev/port" in message, message


# --- libvirt mode ---------------------------------------------------------------------------


def test_libvirt_mode_extra_enforced_node_created_and_hotplug_keeps_working(
        hooked_lab, lab_guest):
    lab = hooked_lab
    extra = lab.new_loop("lv-extra")
    hot = lab.new_loop("lv-hot")
    guest = lab_guest(lab=lab, name="lvextra", metadata_xml=extras_xml(extra))
    d = det.detect(guest.cgroup)
    assert d.mode == det.MODE_LIBVIRT and d.overlay_installed
    assert opens(guest, [extra, guest.disks[0]]) == [0, 0]
    assert opens(guest, [hot])[0] == EPERM

    # the node exists inside QEMU's private /dev, as libvirt would have made it
    listing = lab.ns_run(["/usr/bin/nsenter", "-t", str(guest.qemu_pid), "-m", "/bin/ls",
                          "-l", extra]).stdout
    assert listing.startswith("b"), listing

    # libvirt's own hotplug writes through our program's first map
    lab.virsh("attach-disk", guest.name, hot, "sda", "--targetbus", "scsi", "--live")
    assert opens(guest, [hot]) == [0]
    lab.virsh("detach-disk", guest.name, "sda", "--live")
    assert opens(guest, [hot])[0] == EPERM

    lab.restart_libvirtd()
    assert det.detect(guest.cgroup).overlay_installed
    lab.virsh("attach-disk", guest.name, hot, "sda", "--targetbus", "scsi", "--live")
    assert opens(guest, [hot, extra]) == [0, 0]
    lab.virsh("detach-disk", guest.name, "sda", "--live")
    assert opens(guest, [hot])[0] == EPERM
    st = status(lab, guest.name)
    assert st["mode"] == "libvirt" and st["overlay_installed"]
    assert {"map": "overlay"}.items() <= next(
        r for r in st["rules"] if r["devices"] == [extra]).items()
    assert "BPF" not in _errors(lab.libvirtd_log())


def test_libvirt_growth_past_64_then_reconnect_reinstalls_overlay(hooked_lab, lab_guest):
    lab = hooked_lab
    extra = lab.new_loop("grow-extra")
    guest = lab_guest(lab=lab, name="lvgrow", metadata_xml=extras_xml(extra))
    assert opens(guest, [extra]) == [0]
    loops = [lab.new_loop(f"grow{i}", size_mb=1) for i in range(58)]
    try:
        for i, loop in enumerate(loops):
            lab.virsh("attach-disk", guest.name, loop, f"sd{_letters(i)}", "--targetbus",
                      "scsi", "--address", f"scsi:0.0.{i}", "--live")
        d = det.detect(guest.cgroup)
        assert d.base.max_entries >= 128, "libvirt grew its map"
        assert not d.overlay_installed, "libvirt's growth replaced our program"
        assert opens(guest, [extra])[0] == EPERM, "fail-closed until re-installed"
        lab.restart_libvirtd()  # the reconnect hook re-installs on libvirt's new map
        d = det.detect(guest.cgroup)
        assert d.overlay_installed and d.base.max_entries >= 128
        assert opens(guest, [extra, loops[-1]]) == [0, 0]
        lab.virsh("detach-disk", guest.name, f"sd{_letters(0)}", "--live")
        assert opens(guest, [loops[0]])[0] == EPERM, "libvirt's unplug still takes effect"
    finally:
        lab.destroy(guest.name)
        for loop in loops:
            lab.free_loop(loop)
    assert "BPF" not in _errors(lab.libvirtd_log())


def test_hook_server_serves_the_events_and_a_killed_one_changes_nothing(hooked_lab, lab_guest):
    """As the packages set it up (the hook server's socket enabled): the hook hands prepare,
    started and release to the server, refusals included. Killed, the server leaves a
    stale socket behind and the hook does the same work itself."""
    lab = hooked_lab
    extra = lab.new_loop("srv-extra")
    socket_path = os.path.join(lab.lab_dir, "bpfcg-run", "hook.sock")
    with HookServerProcess(lab) as server:
        guest = lab_guest(lab=lab, name="served", metadata_xml=extras_xml(extra))
        assert det.detect(guest.cgroup).overlay_installed
        assert opens(guest, [extra, guest.disks[0]]) == [0, 0]
        listing = lab.ns_run(["/usr/bin/nsenter", "-t", str(guest.qemu_pid), "-m",
                              "/bin/ls", "-l", extra]).stdout
        assert listing.startswith("b"), listing
        lab.destroy(guest.name)
        with pytest.raises(Exception) as info:
            lab_guest(lab=lab, name="srvforbid", metadata_xml=extras_xml("/dev/port"))
        assert "/dev/port" in str(info.value)
        log = server.log()
        for event in ("served prepare begin -> 0", "served started begin -> 0",
                      "served release end -> 0", "srvforbid prepare begin -> 1"):
            assert re.search(rf"hook server: {event} in ", log), (event, log)
        server.proc.kill()
        server.proc.wait(timeout=10)
    assert os.path.exists(socket_path), "SIGKILL leaves the socket file"
    try:
        guest = lab_guest(lab=lab, name="served2", metadata_xml=extras_xml(extra))
        assert det.detect(guest.cgroup).overlay_installed
        assert opens(guest, [extra]) == [0]
        lab.destroy(guest.name)
        assert not [line for line in lab.libvirtd_log().splitlines()
                    if "Hook script execution failed" in line and "served2" in line]
    finally:
        os.unlink(socket_path)


def test_reconnect_hook_that_raises_leaves_guest_running(lab, lab_guest):
    """An internal error during reconnect is logged; libvirt must not kill the guest."""
    marker = os.path.join(lab.lab_dir, "run", "boom")
    crash = (f"exec {sys.executable} -S -c 'import site, sys; site.main(); "
             "import libvirt_bpfcg.devfilter as d\n"
             "def boom(*a, **k):\n"
             f"    open(\"/run/libvirt/boom\", \"a\").write(sys.argv[3] + \"\\n\")\n"
             "    raise RuntimeError(\"injected\")\n"
             "d.DeviceFilter.grant = boom\n"
             "from libvirt_bpfcg.hook import run\n"
             "sys.exit(run(sys.argv[1:], sys.stdin.buffer))' "  # argv[0] is -c
             f'{HOOK} "$@"')
    guest = lab_guest(lab=lab, name="recon")
    install_hook(lab, crash)
    try:
        lab.restart_libvirtd()
        with open(marker) as handle:
            assert handle.read().split() == ["reconnect"], "the injected failure ran"
        assert guest.name in lab.virsh("list", "--name").stdout.split()
        assert os.path.exists(f"/proc/{guest.qemu_pid}")
    finally:
        lab.remove_hook()


def _errors(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if " error : " in line)


def _letters(i: int) -> str:
    """sda, sdb, … sdz, sdaa, … (SCSI disk target names)."""
    out = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        out = chr(ord("a") + rem) + out
    return out
