"""The "QEMU says Permission denied" walk-through on a real libvirtd 9.0 + QEMU guest: QEMU
itself is refused a device, ``status`` shows the denial, ``explain`` says why and what to run,
running it fixes QEMU's open. Also: denials recorded in own mode, and ``doctor`` inside the
lab's namespace (pure cgroup2, a hook, a running guest).

The CLI runs inside the lab's mount namespace, as an admin on that host would run it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Dict

import pytest
from lab_cli import EXTRAS_NS, STATE_DIR

pytestmark = pytest.mark.lab

EPERM = 1


def cli(lab, *args: str, expect: int = 0) -> str:
    proc = lab.ns_run([sys.executable, "-m", "libvirt_bpfcg", *args], check=False)
    assert proc.returncode == expect, f"{args}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def cli_json(lab, *args: str, expect: int = 0) -> Dict:
    return json.loads(cli(lab, *args, "--json", expect=expect))


def extras_xml(*paths: str) -> str:
    devices = "".join(f"<bpfcg:device path='{p}' access='rw'/>" for p in paths)
    return f"<bpfcg:extras xmlns:bpfcg='{EXTRAS_NS}'>{devices}</bpfcg:extras>"


def node_outside_dev(lab, device: str, name: str) -> str:
    """A node for ``device`` where QEMU can see it: QEMU's /dev is private (libvirt's mount
    namespace), the lab directory is shared."""
    path = os.path.join(lab.lab_dir, "images", name)
    os.mknod(path, 0o600 | 0o060000, os.stat(device).st_rdev)
    return path


def qmp_open(lab, guest: str, path: str, node_name: str) -> Dict:
    """QEMU opens ``path`` itself (blockdev-add), as it does for a disk hot-added behind
    libvirt's back."""
    command = {"execute": "blockdev-add", "arguments": {
        "driver": "host_device", "node-name": node_name, "filename": path, "read-only": True}}
    return json.loads(lab.virsh("qemu-monitor-command", guest, json.dumps(command)).stdout)


def checks_by_name(report: Dict) -> Dict[str, Dict]:
    return {check["name"]: check for check in report["checks"]}


def test_qemu_permission_denied_answered_by_status_and_explain(hooked_lab, lab_guest):
    lab = hooked_lab
    extra = lab.new_loop("ex-extra")
    refused = lab.new_loop("ex-refused")
    guest = lab_guest(lab=lab, name="explain1", metadata_xml=extras_xml(extra))
    state = ("--state-dir", STATE_DIR)
    node = node_outside_dev(lab, refused, "ex-refused-node")

    reply = qmp_open(lab, guest.name, node, "probe1")
    assert "Operation not permitted" in reply["error"]["desc"], reply

    # status: what was denied, by name and numbers, with the access QEMU asked for
    (denial,) = cli_json(lab, "status", "--domain", guest.name, *state)["denials"]
    numbers = os.stat(refused).st_rdev
    assert denial["rule"] == f"b {os.major(numbers)}:{os.minor(numbers)}"
    assert (denial["access"], denial["count"], denial["devices"]) == ("r", 1, [refused])

    # explain: denied, counted, and the commands that fix it
    why = cli_json(lab, "explain", "--domain", guest.name, *state, node, "r", expect=1)
    assert why["verdict"] == "denied" and why["mode"] == "libvirt (our overlay installed)"
    assert why["denials"]["count"] == 1 and why["plan_rows"] == []
    fixes = {s["kind"]: s["command"] for s in why["suggestions"]}
    assert f'path="{extra}"' in fixes["metadata"] and f'path="{node}"' in fixes["metadata"]

    # allowed devices say which element, map and key
    disk = cli_json(lab, "explain", "--domain", guest.name, *state, guest.disks[0])
    assert (disk["allowed_by"]["map"], disk["allowed_by"]["key"]) == ("libvirt", "exact")
    assert [s["where"] for s in disk["sources"]] == ["devices/disk[1]/source/@dev"]
    ext = cli_json(lab, "explain", "--domain", guest.name, *state, extra)
    assert ext["allowed_by"]["map"] == "overlay"
    assert [(s["kind"], s["where"]) for s in ext["sources"]] == [
        ("extra", "metadata/bpfcg:extras[1]/bpfcg:device[1]/@path")]
    pty = cli_json(lab, "explain", "--domain", guest.name, *state, "c 136:0")
    assert (pty["allowed_by"]["key"], pty["sources"][0]["where"]) == ("major:*", "libvirt:pty")

    # the suggested command, run as printed, fixes QEMU's open
    argv = shlex.split(fixes["allow-now"])
    assert argv[0] == "libvirt-bpfcg"
    cli(lab, *argv[1:], *state)
    now = cli_json(lab, "explain", "--domain", guest.name, *state, node, "r")
    assert now["verdict"] == "allowed" and now["allowed_by"]["map"] == "overlay"
    assert [s["kind"] for s in now["sources"]] == ["runtime-grant"]
    reply = qmp_open(lab, guest.name, node, "probe2")
    assert "error" not in reply, reply


def test_own_mode_guest_denials_and_explain(hooked_nobpf, lab_guest):
    lab = hooked_nobpf
    refused = lab.new_loop("own-refused")
    guest = lab_guest(lab=lab, name="explain2")
    assert guest.open_in_cgroup([(refused, os.O_RDWR)] * 2) == [EPERM, EPERM]
    state = ("--state-dir", STATE_DIR)
    (denial,) = cli_json(lab, "status", "--domain", guest.name, *state)["denials"]
    assert (denial["access"], denial["count"], denial["devices"]) == ("rw", 2, [refused])
    why = cli_json(lab, "explain", "--domain", guest.name, *state, refused, expect=1)
    assert why["mode"] == "own" and why["denials"]["count"] == 2
    null = cli_json(lab, "explain", "--domain", guest.name, *state, "/dev/null")
    assert null["allowed_by"]["map"] == "own"
    assert [s["kind"] for s in null["sources"]] == ["default-acl"]


def test_doctor_in_the_lab_namespace(hooked_lab, lab_guest):
    lab = hooked_lab
    guest = lab_guest(lab=lab, name="doctor1")
    report = cli_json(lab, "doctor")
    checks = checks_by_name(report)
    assert report["summary"]["fail"] == 0, report
    assert checks["cgroup2"]["status"] == "ok"
    assert "cgroup2 at /sys/fs/cgroup; pure cgroup v2" in checks["cgroup2"]["detail"]
    assert "devices controller" not in checks, "no cgroup v1 inside the lab"
    for name in ("bpf(2)", "denial recording", "memlock", "hook", "qemu.d support"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "50-libvirt-bpfcg" in checks["hook"]["detail"]
    # the lab keeps a no-op hooks/qemu from before libvirtd starts: ours is picked up
    pickup = checks["hook pickup"]
    assert pickup["status"] == "ok" and f"pid {lab.libvirtd_pid}" in pickup["detail"]
    assert checks["libvirt version"]["detail"].startswith("libvirt 9.0.0")
    row = checks[f"guest {guest.name}"]
    assert row["status"] == "ok" and "libvirt mode, our overlay installed" in row["detail"]
    assert not any(name.startswith("guest driver") for name in checks), "driver.pid is no guest"

    lab.remove_hook()
    broken = checks_by_name(cli_json(lab, "doctor", expect=1))
    assert broken["hook"]["status"] == "fail" and "install" in broken["hook"]["fix"]
    text = cli(lab, "doctor", expect=1)
    assert text.splitlines()[0].startswith("libvirt-bpfcg doctor: ")
    assert any(line.startswith("FAIL  hook") for line in text.splitlines()), text

