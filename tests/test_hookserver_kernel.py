"""The hook server killed in the middle of installing a guest's filter (real kernel).

The server runs the engine with BPFCG_CRASH_AT set, so it SIGKILLs itself between two
kernel operations of the ``started`` event (the crash points of the stress tests). The
hook, getting no reply, does the event itself, as hooks/qemu does: the guest must end up
with exactly the filter an undisturbed start gives it — one program, the extras granted,
libvirt's own map untouched, nothing else.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from typing import List

import pytest
from engine_helpers import (
    ROOT,
    FakeQemu,
    entries_of,
    filter_state,
    hook_config,
    install_libvirt_like,
    opens,
    private_state_dirs,
    rule_extras_domain,
    rule_node,
    worker_env,
)

from libvirt_bpfcg import hook, hookserver
from libvirt_bpfcg import log as bpfcg_log
from libvirt_bpfcg.hookclient import call_server
from libvirt_bpfcg.rules import Rule

pytestmark = pytest.mark.kernel

CRASH_POINTS = {
    "own": ["create-after-fill", "after-load", "after-attach"],
    "libvirt": ["overlay-after-fill", "overlay-before-pin", "after-load", "after-attach"],
}
TAG = 3170  # the extras' major (rule_extras_domain: TAG:40000 rw, TAG:40001 r)


@pytest.mark.parametrize("mode, point", [(m, p) for m, points in CRASH_POINTS.items()
                                         for p in points])
def test_server_killed_mid_install_and_the_hook_finishes_the_job(
        mode, point, scratch_cgroup, node_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("BPFCG_CRASH_AT", raising=False)  # only the server crashes
    cgroup, name = scratch_cgroup, f"crash-{mode}"
    extras = [Rule("c", TAG, 40000, "rw"), Rule("c", TAG, 40001, "r")]
    libvirt_rules = [Rule.parse("c 1:3 rw")]
    with private_state_dirs(str(tmp_path)) as dirs:
        libvirt_fd = install_libvirt_like(cgroup, libvirt_rules) if mode == "libvirt" else None
        qemu = FakeQemu(cgroup, str(tmp_path / "qemu-run"), name)
        try:
            config = hook_config(str(tmp_path), dirs, str(tmp_path / "qemu-run"))
            monkeypatch.setenv("LIBVIRT_BPFCG_CONFIG", config)
            xml = rule_extras_domain(name, TAG)
            argv = ["qemu", name, "started", "begin", "-"]

            code = served_then_killed(argv, xml, point, str(tmp_path / "hook.sock"))
            assert code == -signal.SIGKILL, f"the server did not reach {point}"
            stderr = io.StringIO()
            bpfcg_log.setup(stream=stderr, use_syslog=False)
            assert hook.handle(argv, io.BytesIO(xml), config) == 0, stderr.getvalue()

            state = filter_state(cgroup)
            assert len(state.prog_ids) == 1, state
            assert state.mode == mode
            if mode == "libvirt":
                assert state.ours == entries_of(extras)
                assert state.base == entries_of(libvirt_rules), "libvirt's map untouched"
            else:
                assert entries_of(extras).items() <= state.base.items()
            granted, other = rule_node(node_dir, extras[0]), \
                rule_node(node_dir, Rule("c", TAG, 40002, "rw"))
            assert opens(cgroup, [granted, other], os.O_RDWR) == [True, False]
        finally:
            qemu.stop()
            if libvirt_fd is not None:
                os.close(libvirt_fd)


def served_then_killed(argv: List[str], xml: bytes, point: str, socket_path: str) -> int:
    """Send the event to a server that will kill itself at ``point``; the exit status."""
    server = subprocess.Popen(
        [sys.executable, "-m", "libvirt_bpfcg", "hook-server", "--socket", socket_path],
        cwd=ROOT, env=worker_env(point), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not hookserver.answering(socket_path):
            assert server.poll() is None and time.monotonic() < deadline, "server not up"
            time.sleep(0.02)
        reports: List[str] = []
        assert call_server(argv, xml, path=socket_path, report=reports.append) is None
        assert len(reports) == 1 and "did not answer" in reports[0]
        return server.wait(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
