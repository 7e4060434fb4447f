"""doctor on this machine (hybrid cgroups: v1 controllers plus cgroup2 at
/sys/fs/cgroup/unified), with hooks directories, qemu.conf files and daemons made for the
test: a hook that is fine, not executable, missing its interpreter or its package; a daemon
(a real process named libvirtd) started before or after the hook appeared."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List

import pytest
from lab_cli import gate_script

from libvirt_bpfcg import doctor, hookserver
from libvirt_bpfcg.config import Config
from libvirt_bpfcg.doctor import FAIL, OK, WARN, Paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = os.path.join(ROOT, "hooks", "qemu")


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libvirt_bpfcg", "doctor", *args], cwd=ROOT,
                          capture_output=True, text=True)


def by_name(checks) -> Dict[str, object]:
    return {c.name if hasattr(c, "name") else c["name"]: c for c in checks}


def install_our_hook(hooks_dir: str, interpreter: str = sys.executable) -> str:
    """The packaged hook with its #! pointed at ``interpreter`` (the package installs it with
    /usr/bin/python3)."""
    os.makedirs(os.path.join(hooks_dir, "qemu.d"), exist_ok=True)
    target = os.path.join(hooks_dir, "qemu.d", doctor.HOOK_NAME)
    with open(HOOK) as handle:
        body = handle.read().split("\n", 1)[1]
    with open(target, "w") as handle:
        handle.write(f"#!{interpreter} -S\n{body}")
    os.chmod(target, 0o755)
    return target


@pytest.fixture
def host(tmp_path):
    """Doctor's paths on this host, with a hooks dir, run dir and config of the test's own."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = tmp_path / "bpfcg.conf"
    config.write_text(f"[acl]\nqemu_conf = {tmp_path}/qemu.conf\n[hook]\n"
                      f"state_dir = {tmp_path}/state\n")
    return {"hooks": str(tmp_path / "hooks"), "run": str(run_dir), "config": str(config),
            "qemu_conf": str(tmp_path / "qemu.conf"), "tmp": tmp_path}


def args_for(host) -> List[str]:
    return ["--hooks-dir", host["hooks"], "--qemu-run-dir", host["run"], "--config",
            host["config"]]


@pytest.mark.kernel
def test_this_hybrid_host_with_our_hook_is_ready(host):
    install_our_hook(host["hooks"])
    proc = run_doctor(*args_for(host), "--json")
    report = json.loads(proc.stdout)
    checks = by_name(report["checks"])
    assert proc.returncode == 0, proc.stdout
    assert report["summary"]["fail"] == 0
    cgroup2 = checks["cgroup2"]
    assert cgroup2["status"] == OK and "/sys/fs/cgroup/unified" in cgroup2["detail"]
    assert "hybrid host" in cgroup2["detail"] and "devices" in cgroup2["detail"]
    devices = checks["devices controller"]
    assert devices["status"] == WARN and "/sys/fs/cgroup/devices" in devices["detail"]
    assert devices["fix"]
    for name in ("bpf(2)", "denial recording", "memlock", "hook", "qemu.d support", "guests",
                 "libvirt version", "qemu.conf"):
        assert checks[name]["status"] == OK, checks[name]
    assert "imports libvirt_bpfcg" in checks["hook"]["detail"]
    assert checks["libvirt version"]["detail"].startswith("libvirt 9.0.0")
    text = run_doctor(*args_for(host)).stdout
    assert text.startswith("libvirt-bpfcg doctor: ") and "WARN  devices controller" in text
    fix_line = text.splitlines()[text.splitlines().index(next(
        line for line in text.splitlines() if line.startswith("WARN  devices controller"))) + 1]
    assert fix_line.lstrip().startswith("fix: ")


@pytest.mark.kernel
def test_default_paths_run_and_report_the_hook_as_installed_or_not():
    proc = run_doctor("--json")
    checks = by_name(json.loads(proc.stdout)["checks"])
    installed = any(f.ours for f in doctor.hook_files(doctor.DEFAULT_HOOKS_DIR))
    if not installed:
        assert checks["hook"]["status"] == FAIL
    assert proc.returncode == (1 if any(c["status"] == FAIL for c in checks.values()) else 0)


def hook_check(host) -> Dict[str, str]:
    checks, _ours = doctor.check_hook(Paths(hooks_dir=host["hooks"]), (9, 0, 0))
    return by_name(checks)["hook"].to_json()


def test_missing_hook_fails_with_the_install_command(host):
    check = hook_check(host)
    assert check["status"] == FAIL and "install -m 0755" in check["fix"]


def test_hook_not_executable_fails(host):
    os.chmod(install_our_hook(host["hooks"]), 0o644)
    check = hook_check(host)
    assert check["status"] == FAIL and check["fix"].startswith("chmod 0755")


def test_hook_interpreter_missing_or_without_the_package_fails(host):
    install_our_hook(host["hooks"], "/nonexistent/python3")
    check = hook_check(host)
    assert check["status"] == FAIL and "does not exist" in check["detail"]

    fake = host["tmp"] / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'libvirt_bpfcg'\""
                    " >&2\nexit 1\n")
    fake.chmod(0o755)
    install_our_hook(host["hooks"], str(fake))
    check = hook_check(host)
    assert check["status"] == FAIL and "cannot import libvirt_bpfcg" in check["detail"]
    assert "No module named" in check["detail"]


def test_wrapper_script_is_followed_to_its_python(host):
    os.makedirs(os.path.join(host["hooks"], "qemu.d"))
    target = os.path.join(host["hooks"], "qemu.d", doctor.HOOK_NAME)
    with open(target, "w") as handle:
        handle.write(f'#!/bin/sh\nexec {sys.executable} -S {HOOK} "$@"\n')
    os.chmod(target, 0o755)
    check = hook_check(host)
    assert check["status"] == OK and f"runs {sys.executable}" in check["detail"]


def install_gate(host, hook_path: str) -> str:
    """The packages' gate in qemu.d, handing events to ``hook_path``."""
    os.makedirs(os.path.join(host["hooks"], "qemu.d"), exist_ok=True)
    target = os.path.join(host["hooks"], "qemu.d", doctor.HOOK_NAME)
    with open(target, "w") as handle:
        handle.write(gate_script(hook_path))
    os.chmod(target, 0o755)
    return target


def test_the_packages_gate_is_followed_to_the_hook_it_runs(host):
    wrapper = host["tmp"] / "qemu-hook"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -S {HOOK} "$@"\n')
    wrapper.chmod(0o755)
    install_gate(host, str(wrapper))
    check = hook_check(host)
    assert check["status"] == OK, check
    assert f"gate, then {wrapper}" in check["detail"] and f"runs {sys.executable}" in \
        check["detail"]


def test_a_gate_whose_hook_is_gone_fails(host):
    install_gate(host, str(host["tmp"] / "removed"))
    check = hook_check(host)
    assert check["status"] == FAIL and "missing or not executable" in check["detail"]
    assert "reinstall" in check["fix"]


def test_hook_server_check_no_socket_stale_socket_and_a_live_server(host):
    path = str(host["tmp"] / "run-bpfcg" / "hook.sock")
    paths = Paths(hook_socket=path)
    (missing,) = doctor.check_hook_server(paths)
    assert missing.status == WARN and "nothing at" in missing.detail
    assert "libvirt-bpfcg-hook.socket" in missing.fix
    listener = hookserver.bind_listener(path)
    listener.close()  # bound, never served: what a killed server leaves
    (stale,) = doctor.check_hook_server(paths)
    assert stale.status == WARN and "no server answered" in stale.detail
    server = subprocess.Popen([sys.executable, "-m", "libvirt_bpfcg", "hook-server", "--socket",
                               path], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not hookserver.answering(path):
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        (live,) = doctor.check_hook_server(paths)
        assert live.status == OK and f"answering on {path}" in live.detail
        text = run_doctor(*args_for(host), "--hook-socket", path).stdout
        assert re.search(r"^ok +hook server +answering on", text, re.M), text
    finally:
        server.terminate()
        server.wait(timeout=15)


def test_our_hook_as_hooks_qemu_needs_no_qemu_d(host):
    os.makedirs(host["hooks"])
    target = os.path.join(host["hooks"], "qemu")
    shutil.copy(HOOK, target)
    os.chmod(target, 0o755)
    checks, ours = doctor.check_hook(Paths(hooks_dir=host["hooks"]), (6, 0, 0))
    assert ours is not None and ours.path == target
    assert "qemu.d support" not in by_name(checks), "libvirt 6.0 runs hooks/qemu fine"


@pytest.mark.parametrize("version, status", [((6, 4, 0), FAIL), ((6, 5, 0), OK), (None, WARN)])
def test_qemu_d_needs_libvirt_6_5(host, version, status):
    install_our_hook(host["hooks"])
    checks, _ours = doctor.check_hook(Paths(hooks_dir=host["hooks"]), version)
    assert by_name(checks)["qemu.d support"].status == status


@pytest.mark.parametrize("text, status, words", [
    ("", OK, "cgroup_controllers not set"),
    ('cgroup_controllers = [ "cpu", "devices" ]\n', OK, "includes devices"),
    ('cgroup_controllers = [ "cpu", "memory" ]\n', WARN, "leaves out devices"),
    ("cgroup_controllers = [ ]\n", FAIL, "libvirtd's own cgroup"),
    ('# cgroup_controllers = [ ]\ncgroup_device_acl = [ "/dev/null",\n "/dev/kvm" ]\n', OK,
     "cgroup_device_acl has 2 entries"),
])
def test_qemu_conf_cgroup_settings(host, text, status, words):
    with open(host["qemu_conf"], "w") as handle:
        handle.write("# libvirt's qemu.conf\nuser = \"root\"\n" + text)
    (check,) = doctor.check_qemu_conf(Config(qemu_conf=host["qemu_conf"]))
    assert check.status == status and words in check.detail, check
    assert check.status == OK or check.fix


def test_cgroup_layouts(tmp_path):
    def layout(*lines: str):
        path = tmp_path / "mountinfo"
        path.write_text("".join(line + "\n" for line in lines))
        return by_name(doctor.check_cgroups(Paths(mountinfo=str(path))))

    v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"
    v1 = "36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices"
    unified = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw"
    pure = layout(v2)
    assert pure["cgroup2"].detail.endswith("pure cgroup v2") and "devices controller" not in pure
    hybrid = layout(v1, unified)
    assert "hybrid host" in hybrid["cgroup2"].detail
    assert hybrid["devices controller"].status == WARN
    legacy = layout(v1)
    assert legacy["cgroup2"].status == FAIL and legacy["cgroup2"].fix


def fake_daemon(tmp_path) -> subprocess.Popen:
    """A real process whose comm is libvirtd (a copy of sleep): what doctor scans /proc for."""
    binary = tmp_path / "libvirtd"
    if not binary.exists():
        shutil.copy("/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "30"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # Popen may return before the child has exec'd
        with open(f"/proc/{proc.pid}/comm") as handle:
            if handle.read().strip() == "libvirtd":
                return proc
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the fake libvirtd never exec'd")


def test_pickup_real_daemon_before_and_after_the_hook(host):
    daemon_proc = fake_daemon(host["tmp"])
    try:
        (daemon,) = [d for d in doctor.find_daemons() if d.pid == daemon_proc.pid]
        assert daemon.name == "libvirtd" and daemon.same_mount_ns
        assert abs(daemon.start - time.time()) < 5
        time.sleep(0.05)
        ours = doctor.hook_files(host["hooks"])  # nothing yet
        install_our_hook(host["hooks"])
        files = doctor.hook_files(host["hooks"])
        assert ours == [] and [f.ours for f in files] == [True]
        late = doctor.pickup_verdict(daemon, files)
        assert late.status == WARN and f"kill -HUP {daemon.pid}" in late.fix
    finally:
        daemon_proc.kill()
        daemon_proc.wait()
    # a daemon started after the hook existed picks it up (start times have 10 ms ticks)
    time.sleep(0.05)
    daemon_proc = fake_daemon(host["tmp"])
    try:
        (daemon,) = [d for d in doctor.find_daemons() if d.pid == daemon_proc.pid]
        assert doctor.pickup_verdict(daemon, doctor.hook_files(host["hooks"])).status == OK
        checks = doctor.check_pickup(Paths(hooks_dir=host["hooks"]), [daemon],
                                     doctor.hook_files(host["hooks"])[0])
        assert [c.status for c in checks] == [OK]
    finally:
        daemon_proc.kill()
        daemon_proc.wait()


def test_another_hook_present_at_start_is_enough():
    daemon = doctor.Daemon(1234, "virtqemud", start=1000.0, same_mount_ns=True)
    older = doctor.HookFile("/etc/libvirt/hooks/qemu", False, True, 900.0)
    newer = doctor.HookFile("/etc/libvirt/hooks/qemu.d/50-libvirt-bpfcg", True, True, 1100.0)
    not_exec = doctor.HookFile("/etc/libvirt/hooks/qemu.d/x", False, False, 900.0)
    assert doctor.pickup_verdict(daemon, [older, newer]).status == OK
    assert doctor.pickup_verdict(daemon, [not_exec, newer]).status == WARN
    assert "systemctl reload virtqemud" in doctor.pickup_verdict(daemon, [newer]).fix


def test_daemons_elsewhere_are_not_judged():
    other = doctor.Daemon(1, "libvirtd", 0.0, same_mount_ns=False)
    (check,) = doctor.check_pickup(Paths(), [other], None)
    assert check.status == OK and "1 more in other mount namespaces" in check.detail


def test_guests_driver_pid_is_not_a_guest(host):
    with open(os.path.join(host["run"], "driver.pid"), "w") as handle:
        handle.write(f"{os.getpid()}\n")
    (check,) = doctor.check_guests(Config(), Paths(qemu_run_dir=host["run"]))
    assert check.name == "guests" and check.status == OK


@pytest.mark.kernel
def test_guest_rows_show_each_guests_mode(host, scratch_cgroup):
    """A process in a cgroup of its own stands in for QEMU (NAME.pid + NAME.xml)."""
    from engine_helpers import private_state_dirs

    from libvirt_bpfcg.devfilter import DeviceFilter
    from libvirt_bpfcg.rules import Rule

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with open(os.path.join(scratch_cgroup, "cgroup.procs"), "w") as procs:
            procs.write(str(sleeper.pid))
        for name in ("vm1",):
            with open(os.path.join(host["run"], f"{name}.pid"), "w") as handle:
                handle.write(f"{sleeper.pid}\n")
            with open(os.path.join(host["run"], f"{name}.xml"), "w") as handle:
                handle.write("<domstatus/>")
        with private_state_dirs(str(host["tmp"])) as dirs:
            paths = Paths(qemu_run_dir=host["run"], bpffs=dirs.bpffs)
            config = Config(state_dir=dirs.state_dir)
            (check,) = doctor.check_guests(config, paths)
            assert check.status == WARN and "no device program" in check.detail
            DeviceFilter(scratch_cgroup, dirs).grant([Rule.parse("c 1:3 rw")])
            (check,) = doctor.check_guests(config, paths)
            assert check.status == OK and check.detail.startswith("own mode")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_hook_interpreter_forms():
    assert doctor.hook_interpreter("#!/usr/bin/python3 -S\nimport sys\n")[0] == \
        ["/usr/bin/python3", "-S"]
    assert doctor.hook_interpreter("#!/usr/bin/env python3\n")[0] is None
    assert doctor.hook_interpreter("no shebang\n")[0] is None
    assert doctor.hook_interpreter("#!/bin/bash\nlogger hi\n")[0] is None


def test_kernel_version_parsing():
    assert doctor.kernel_version("6.18.44-fc-v657") == (6, 18)
    assert doctor.kernel_version("5.10.0-28-amd64") < doctor.MEMLOCK_CHARGED_BEFORE
