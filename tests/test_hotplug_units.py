"""The virsh-compatible parts of attach-device/detach-device and watch that need no libvirtd:
flag mapping, argument errors, the report lines."""

from __future__ import annotations

import subprocess
import sys

import pytest

from libvirt_bpfcg import cli
from libvirt_bpfcg.errors import UsageError
from libvirt_bpfcg.hotplug import HotplugResult, affect_flags, affects_live
from libvirt_bpfcg.rules import Rule

LIVE, CONFIG = 1, 2  # VIR_DOMAIN_AFFECT_LIVE, VIR_DOMAIN_AFFECT_CONFIG


@pytest.mark.parametrize("options, active, flags", [
    ({}, True, None),  # virsh calls the flag-less API: live in the QEMU driver
    ({}, False, None),
    ({"current": True}, True, 0),
    ({"live": True}, False, LIVE),
    ({"config": True}, True, CONFIG),
    ({"live": True, "config": True}, True, LIVE | CONFIG),
    ({"persistent": True}, True, LIVE | CONFIG),
    ({"persistent": True}, False, CONFIG),
])
def test_flags_follow_virsh(options, active, flags):
    args = {"live": False, "config": False, "persistent": False, "current": False, **options}
    assert affect_flags(active=active, **args) == flags


@pytest.mark.parametrize("first, second", [("persistent", "current"), ("current", "live"),
                                           ("current", "config")])
def test_exclusive_options(first, second):
    args = {"live": False, "config": False, "persistent": False, "current": False,
            first: True, second: True}
    with pytest.raises(UsageError, match=f"--{first} and --{second} are mutually exclusive"):
        affect_flags(active=True, **args)


@pytest.mark.parametrize("flags, active, live", [
    (None, True, True), (None, False, False), (0, True, True), (0, False, False),
    (CONFIG, True, False), (LIVE, True, True), (LIVE | CONFIG, True, True),
])
def test_which_calls_touch_the_running_guest(flags, active, live):
    assert affects_live(flags, active) is live


def test_report_lines():
    result = HotplugResult(mode="own", granted=[Rule.parse("b 7:3 rw")],
                           revoked=[Rule.parse("c 240:1 rw")], installed=True,
                           notes=["x"])
    assert result.lines() == ["filter: granted b 7:3 rw (own mode)",
                              "filter: revoked c 240:1 rw (own mode)",
                              "filter: program (re)installed (own mode)",
                              "filter: x"]


@pytest.mark.parametrize("argv, message", [
    (["detach-device", "g", "f.xml", "--timeout", "-1"], "use 0 seconds or more"),
    (["detach-device", "g", "f.xml", "--timeout", "soon"], "not a number of seconds"),
    (["attach-device", "g"], "required: FILE"),
    (["watch", "--poll-interval", "0"], "use 0.05 to 3600 seconds"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_device_file_is_a_usage_error_before_connecting(capsys, tmp_path):
    code = cli.main(["attach-device", "-c", "test:///nowhere", "g",
                     str(tmp_path / "none.xml")])
    assert code == 2
    assert "none.xml: no such file" in capsys.readouterr().err


def test_hook_and_cli_never_import_libvirt_python():
    """The hook runs inside libvirtd's job: calling back into libvirt would deadlock, so it
    must not even import the bindings; the CLI imports them only for the verbs that talk to
    libvirtd."""
    code = ("import sys; import libvirt_bpfcg.hook, libvirt_bpfcg.hookplan, "
            "libvirt_bpfcg.reconcile, libvirt_bpfcg.hotplug, libvirt_bpfcg.watch; "
            "from libvirt_bpfcg.cli import build_parser; build_parser(); "
            "print('libvirt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
