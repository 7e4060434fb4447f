"""The allow / revoke / status verbs as an admin uses them: exit codes, one-line errors,
--json, --help on every verb."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kernel_fixtures import make_node, open_in_cgroup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "libvirt_bpfcg", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def state_args(tmp_path):
    bpffs = tmp_path / "bpffs"
    from libvirt_bpfcg.bpf import sys as bpf
    bpf.ensure_bpffs(str(bpffs))
    yield ["--state-dir", str(tmp_path / "state"), "--bpffs", str(bpffs)]
    subprocess.run(["umount", "-n", str(bpffs)], check=True)


@pytest.mark.parametrize("verb", ["allow", "revoke", "status", "plan"])
def test_every_verb_has_help(verb):
    proc = cli(verb, "--help", check=True)
    assert "usage: libvirt-bpfcg " + verb in proc.stdout


def test_top_level_help_and_version():
    assert "allow" in cli("--help", check=True).stdout
    assert cli("--version", check=True).stdout.startswith("libvirt-bpfcg ")


@pytest.mark.kernel
def test_allow_status_revoke_round_trip(scratch_cgroup, node_dir, state_args):
    node = make_node(node_dir, "c", 240, 60)
    cli("allow", "--cgroup", scratch_cgroup, *state_args, "/dev/null", "c 240:60 r",
        check=True)
    assert open_in_cgroup(scratch_cgroup, [(node, os.O_RDONLY), ("/dev/null", os.O_RDWR)]) \
        == [6, 0]  # ENXIO (driverless node, allowed) and opened
    status = json.loads(cli("status", "--cgroup", scratch_cgroup, *state_args, "--json",
                            check=True).stdout)
    assert status["mode"] == "own"
    assert {r["rule"] for r in status["rules"]} == {"c 1:3 rw", "c 240:60 r"}
    assert {"rule", "map", "devices"} <= set(status["rules"][0])
    for key in ("programs", "capacity", "denials"):
        assert key in status
    out = cli("revoke", "--cgroup", scratch_cgroup, *state_args, "c 240:60 r", check=True)
    assert "revoked c 240:60 r" in out.stdout
    assert open_in_cgroup(scratch_cgroup, [(node, os.O_RDONLY)]) == [1]  # EPERM
    human = cli("status", "--cgroup", scratch_cgroup, *state_args, check=True).stdout
    assert "mode:    own" in human and "/dev/null" in human


@pytest.mark.parametrize("rule", ["x 1:3 rw", "c 1:3 rq", "c a:3", "/nonexistent/dev",
                                  "char-nosuchdriver-xyz", "/etc/passwd", ""])
def test_bad_rule_is_one_line_and_exit_2(rule, tmp_path):
    proc = cli("allow", "--cgroup", str(tmp_path), rule)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("libvirt-bpfcg: ")


def test_not_a_cgroup_is_usage_error(tmp_path):
    proc = cli("status", "--cgroup", str(tmp_path))
    assert proc.returncode == 2 and "not a cgroup2 directory" in proc.stderr


def test_unknown_domain_fails_with_one_line(tmp_path):
    proc = cli("status", "--domain", "nosuchguest", "--qemu-run-dir", str(tmp_path))
    assert proc.returncode == 1
    assert "is the domain running?" in proc.stderr and proc.stderr.count("\n") == 1


def test_usage_errors_exit_2():
    assert cli("allow").returncode == 2
    assert cli("nosuchverb").returncode == 2


@pytest.mark.kernel
def test_cgroup2_root_refused(state_args):
    from libvirt_bpfcg.cgroup import cgroup2_root
    proc = cli("allow", "--cgroup", cgroup2_root(), *state_args, "/dev/null")
    assert proc.returncode == 1 and "cgroup2 root" in proc.stderr
