"""Denials recorded from real denied opens inside a scratch cgroup, as ``status`` shows them:
device node name, type and numbers, access tried, how many times, when last, newest first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from engine_helpers import install_libvirt_like, libvirt_realloc, nodes, private_state_dirs
from kernel_fixtures import open_in_cgroup

from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.devfilter import DeviceFilter
from libvirt_bpfcg.rules import Rule

pytestmark = pytest.mark.kernel

R = Rule.parse
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPERM = 1


@pytest.fixture
def dirs(tmp_path):
    with private_state_dirs(str(tmp_path)) as state_dirs:
        yield state_dirs


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def test_denials_newest_first_with_names_access_counts_and_times(scratch_cgroup, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    f.grant([R("c 1:3 rw")])
    before = iso_now()
    assert open_in_cgroup(scratch_cgroup, [("/dev/zero", os.O_RDONLY)] * 2) == [EPERM] * 2
    time.sleep(0.01)
    assert open_in_cgroup(scratch_cgroup, [("/dev/full", os.O_WRONLY),
                                           ("/dev/null", os.O_RDWR)]) == [EPERM, 0]
    after = iso_now()
    denials = f.status()["denials"]
    assert [(d["rule"], d["devices"], d["access"], d["count"]) for d in denials] == [
        ("c 1:7", ["/dev/full"], "w", 1),
        ("c 1:5", ["/dev/zero"], "r", 2),
    ]
    assert all(before <= d["last"] <= after for d in denials)


def test_the_latest_access_tried_is_the_one_shown(scratch_cgroup, node_dir, dirs):
    (node,) = nodes(node_dir, "b 240:40")
    DeviceFilter(scratch_cgroup, dirs).grant([R("c 1:3 rw")])
    open_in_cgroup(scratch_cgroup, [(node, os.O_RDONLY), (node, os.O_RDWR)])
    (denial,) = DeviceFilter(scratch_cgroup, dirs).status()["denials"]
    assert (denial["rule"], denial["access"], denial["count"]) == ("b 240:40", "rw", 2)
    assert denial["devices"] == [], "a node without sysfs entry has no name to show"


def test_libvirt_mode_denials_survive_libvirts_program_swap(scratch_cgroup, node_dir, dirs):
    """Our overlay program records; libvirt's own growth drops it, the pinned denial map
    keeps the count, and the re-installed program continues it."""
    (node,) = nodes(node_dir, "c 240:41")
    map_fd = install_libvirt_like(scratch_cgroup, [R("c 1:3 rw")])
    try:
        f = DeviceFilter(scratch_cgroup, dirs)
        f.grant([R("c 240:42 rw")])
        open_in_cgroup(scratch_cgroup, [(node, os.O_RDONLY)] * 2)
        map_fd = libvirt_realloc(scratch_cgroup, map_fd)
        open_in_cgroup(scratch_cgroup, [(node, os.O_RDONLY)])  # libvirt's program: unrecorded
        assert [d["count"] for d in f.status()["denials"]] == [2], "read from the pin"
        f.ensure_overlay()
        open_in_cgroup(scratch_cgroup, [(node, os.O_RDONLY)])
        (denial,) = f.status()["denials"]
        assert (denial["rule"], denial["count"]) == ("c 240:41", 3)
    finally:
        bpf.close(map_fd)


def test_status_cli_shows_denials_in_text_and_json(scratch_cgroup, dirs):
    state = ["--state-dir", dirs.state_dir, "--bpffs", dirs.bpffs]
    DeviceFilter(scratch_cgroup, dirs).grant([R("c 1:3 rw")])
    open_in_cgroup(scratch_cgroup, [("/dev/zero", os.O_RDWR)])

    def status(*extra: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "libvirt_bpfcg", "status", "--cgroup",
                               scratch_cgroup, *state, *extra], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    (denial,) = json.loads(status("--json"))["denials"]
    assert denial["rule"] == "c 1:5" and denial["access"] == "rw" and denial["count"] == 1
    text = status()
    line = text.split("denials (1):\n", 1)[1].splitlines()[0]
    assert line.split()[:4] == ["c", "1:5", "rw", "x1"] and line.endswith("/dev/zero")
