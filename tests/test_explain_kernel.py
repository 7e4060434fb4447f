"""explain against the real kernel: its verdict must be what an open() inside the cgroup gets,
for allowed, denied, wildcard-allowed and ancestor-denied devices, in own and libvirt mode;
and it must name why (the domain element, the extra, the runtime grant)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

import pytest
from engine_helpers import install_libvirt_like, libvirt_realloc, nodes, opens, private_state_dirs
from kernel_fixtures import open_in_cgroup

from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.devfilter import DeviceFilter
from libvirt_bpfcg.domain_extras import NAMESPACE
from libvirt_bpfcg.explain import ALLOWED, DENIED, UNKNOWN, DeviceQuery, explain
from libvirt_bpfcg.rules import Rule

pytestmark = pytest.mark.kernel

R = Rule.parse
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}


@pytest.fixture
def dirs(tmp_path):
    with private_state_dirs(str(tmp_path)) as state_dirs:
        yield state_dirs


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libvirt_bpfcg", *args], cwd=ROOT,
                          capture_output=True, text=True)


def state_args(dirs) -> List[str]:
    return ["--state-dir", dirs.state_dir, "--bpffs", dirs.bpffs]


def query(path: str, access: str = "rw") -> DeviceQuery:
    st = os.stat(path)
    kind = "b" if (st.st_mode & 0o170000) == 0o060000 else "c"
    return DeviceQuery(kind, os.major(st.st_rdev), os.minor(st.st_rdev), access, path)


def kernel_allows(cgroup: str, path: str, access: str) -> bool:
    return opens(cgroup, [path], FLAGS[access])[0]


def attach(cgroup: str, prog_fd: int, flags: int) -> None:
    fd = bpf.open_cgroup(cgroup)
    try:
        bpf.prog_attach(fd, prog_fd, bpf.BPF_CGROUP_DEVICE, flags)
    finally:
        bpf.close(fd)


def attach_libvirt_like(cgroup: str, rules: List[str], flags: int) -> None:
    map_fd = devprog.create_libvirt_map()
    try:
        for text in rules:
            bpf.map_update(map_fd, bpf.key_bytes(R(text).key), bpf.value_bytes(R(text).value))
        prog_fd = devprog.load_libvirt_program(map_fd)
        try:
            attach(cgroup, prog_fd, flags)
        finally:
            bpf.close(prog_fd)
    finally:
        bpf.close(map_fd)


# --- own mode ---------------------------------------------------------------------------------


def test_verdicts_match_the_kernel_for_exact_wildcard_and_type_keys(scratch_cgroup, node_dir,
                                                                    dirs):
    exact, wild, minor_wild, blk, other = nodes(
        node_dir, "c 240:1", "c 241:5", "c 242:77", "b 240:1", "c 243:1")
    f = DeviceFilter(scratch_cgroup, dirs)
    f.grant([R("c 240:1 rw"), R("c 241:* r"), R("c *:77 w"), R("b 240:2 r")], remember=True)
    for path in (exact, wild, minor_wild, blk, other):
        for access in ("r", "w", "rw"):
            got = explain(scratch_cgroup, query(path, access), dirs)
            expected = ALLOWED if kernel_allows(scratch_cgroup, path, access) else DENIED
            assert got.verdict == expected, (path, access, got.to_json())

    allowed = explain(scratch_cgroup, query(wild, "r"), dirs)
    assert allowed.allowed_by["key"] == "major:*" and allowed.allowed_by["map"] == "own"
    assert allowed.allowed_by["rule"] == "c 241:* r"
    assert [s.kind for s in allowed.sources] == ["runtime-grant"]
    by_minor = explain(scratch_cgroup, query(minor_wild, "w"), dirs)
    assert by_minor.allowed_by["key"] == "*:minor"
    # b 240:1 and c 240:1 share one key: the char entry does not let a block open through
    block = explain(scratch_cgroup, query(blk, "r"), dirs)
    assert block.verdict == DENIED
    (hit,) = block.programs[0].maps[0].hits
    assert hit.kind == "exact" and not hit.allows


def test_denied_names_partial_access_recorded_denials_and_the_fix(scratch_cgroup, node_dir,
                                                                   dirs):
    (wild,) = nodes(node_dir, "c 241:6")
    DeviceFilter(scratch_cgroup, dirs).grant([R("c 241:* r")])
    assert open_in_cgroup(scratch_cgroup, [(wild, os.O_RDWR)] * 3) == [1, 1, 1]  # EPERM
    proc = cli("explain", "--cgroup", scratch_cgroup, *state_args(dirs), wild, "--json")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["verdict"] == "denied" and data["access"] == "rw"
    assert data["partial"] == {"r": "allowed", "w": "denied"}
    assert data["denials"]["count"] == 3 and data["denials"]["access"] == "rw"
    (fix,) = data["suggestions"]
    assert fix["command"] == f"libvirt-bpfcg allow --cgroup {scratch_cgroup} '{wild} rw'"
    # following the advice makes the kernel and explain agree on "allowed"
    assert cli("allow", "--cgroup", scratch_cgroup, *state_args(dirs), f"{wild} rw"
               ).returncode == 0
    assert kernel_allows(scratch_cgroup, wild, "rw")
    proc = cli("explain", "--cgroup", scratch_cgroup, *state_args(dirs), wild)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: ALLOWED" in proc.stdout and "key exact" in proc.stdout
    assert "[runtime-grant]" in proc.stdout


def test_without_a_domain_the_source_is_left_open(scratch_cgroup, dirs):
    DeviceFilter(scratch_cgroup, dirs).grant([R("c 1:3 rw")])  # not a runtime grant
    result = explain(scratch_cgroup, DeviceQuery("c", 1, 3, "r", "/dev/null"), dirs)
    assert result.verdict == ALLOWED and [s.kind for s in result.sources] == ["unknown"]
    assert "--domain" in result.sources[0].detail


def test_no_program_anywhere_allows_everything(scratch_cgroup, dirs):
    result = explain(scratch_cgroup, DeviceQuery("c", 1, 3, "rw"), dirs)
    assert result.verdict == ALLOWED and result.programs == []
    assert result.mode == "none" and "allows every device" in result.notes[0]


# --- ancestors ----------------------------------------------------------------------------------


def test_ancestor_multi_program_still_denies(scratch_cgroup, node_dir, dirs):
    (node,) = nodes(node_dir, "c 240:30")
    child = os.path.join(scratch_cgroup, "guest")
    os.mkdir(child)
    DeviceFilter(child, dirs).grant([R("c 240:30 rw"), R("c 1:3 rw")])
    attach_libvirt_like(scratch_cgroup, ["c 1:3 rw"], bpf.BPF_F_ALLOW_MULTI)
    assert not kernel_allows(child, node, "rw")
    assert kernel_allows(child, "/dev/null", "rw")

    result = explain(child, query(node), dirs)
    assert result.verdict == DENIED
    own, ancestor = result.programs
    assert (own.is_own_cgroup, own.verdict) == (True, ALLOWED)
    assert (ancestor.cgroup, ancestor.verdict) == (scratch_cgroup, DENIED)
    assert result.allowed_by["rule"] == "c 240:30 rw"  # allowed here, denied above
    assert any("ancestor " + scratch_cgroup in n and "would still deny" in n
               for n in result.notes), result.notes
    assert result.suggestions == [], "allowing it here would change nothing"
    proc = cli("explain", "--cgroup", child, *state_args(dirs), node)
    assert proc.returncode == 1 and f"on ancestor {scratch_cgroup}: denied" in proc.stdout
    assert explain(child, query("/dev/null"), dirs).verdict == ALLOWED


def test_ancestor_override_program_is_replaced_by_the_cgroups_own(scratch_cgroup, node_dir,
                                                                  dirs):
    """Kernel rule: an ALLOW_OVERRIDE ancestor runs only for cgroups without a program."""
    (node,) = nodes(node_dir, "c 240:31")
    child = os.path.join(scratch_cgroup, "guest")
    os.mkdir(child)
    attach_libvirt_like(scratch_cgroup, ["c 1:3 rw"], bpf.BPF_F_ALLOW_OVERRIDE)
    bare = explain(child, query(node), dirs)
    assert bare.verdict == DENIED and not bare.programs[0].is_own_cgroup
    assert not kernel_allows(child, node, "rw")

    prog_fd = devprog.load_device_program([_map_with("c 240:31 rw")])
    try:
        attach(child, prog_fd, 0)
    finally:
        bpf.close(prog_fd)
    assert kernel_allows(child, node, "rw")
    result = explain(child, query(node), dirs)
    assert result.verdict == ALLOWED and len(result.programs) == 1


def _map_with(*rules: str) -> int:
    """A base map (closed when the program that references it goes)."""
    fd = devprog.create_rule_map(devprog.BASE_MAP_NAME, 8)
    for text in rules:
        bpf.map_update(fd, bpf.key_bytes(R(text).key), bpf.value_bytes(R(text).value))
    return fd


def test_a_program_we_cannot_read_gives_unknown(scratch_cgroup, dirs):
    prog_fd = devprog.load_linear_program([R("c 1:3 rw")], name="someone_else")
    try:
        attach(scratch_cgroup, prog_fd, 0)
    finally:
        bpf.close(prog_fd)
    result = explain(scratch_cgroup, DeviceQuery("c", 1, 3, "r"), dirs)
    assert result.verdict == UNKNOWN and result.exit_code == 1
    assert "cannot be read" in result.programs[0].note


# --- libvirt mode and a domain ----------------------------------------------------------------


@pytest.fixture
def fake_domain(tmp_path, scratch_cgroup, node_dir, dirs):
    """A process in the scratch cgroup standing in for QEMU, with libvirt's run files
    (NAME.pid, and NAME.xml as <domstatus>) and a config that points at them."""
    blk, extra = nodes(node_dir, "b 240:7", "c 240:8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    with open(os.path.join(scratch_cgroup, "cgroup.procs"), "w") as procs:
        procs.write(str(sleeper.pid))
    (run_dir / "vm1.pid").write_text(f"{sleeper.pid}\n")
    domain = f"""<domain type='kvm' id='3'><name>vm1</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <metadata><bpfcg:extras xmlns:bpfcg="{NAMESPACE}">
    <bpfcg:device path="{extra}" access="rw"/></bpfcg:extras></metadata>
  <devices>
    <disk type='block' device='disk'><source dev='{blk}'/><target dev='vda'/><readonly/></disk>
    <serial type='pty'/>
  </devices></domain>"""
    (run_dir / "vm1.xml").write_text(f"<domstatus state='running' pid='{sleeper.pid}'>"
                                     f"<monitor path='/x'/>{domain}</domstatus>")
    config = tmp_path / "bpfcg.conf"
    config.write_text(f"[acl]\nqemu_conf = {tmp_path}/no-qemu.conf\n[hook]\n"
                      f"state_dir = {dirs.state_dir}\n[host]\nqemu_run_dir = {run_dir}\n"
                      f"bpffs = {dirs.bpffs}\n")
    try:
        yield {"blk": blk, "extra": extra, "config": str(config)}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_libvirt_mode_names_the_element_the_extra_and_the_map(scratch_cgroup, node_dir, dirs,
                                                              fake_domain):
    # What libvirt and our hook would have done at start: the XML's rules in libvirt's map,
    # the extra in our overlay.
    libvirt_rules = [R(r) for r in ("c 1:3 rw", "c 1:5 rw", "b 240:7 r", "c 136:* rw",
                                    "c 10:200 rw")]  # the last one: not from this XML
    map_fd = install_libvirt_like(scratch_cgroup, libvirt_rules)
    try:
        DeviceFilter(scratch_cgroup, dirs).grant([R("c 240:8 rw")])

        def ask(*device: str) -> subprocess.CompletedProcess:
            return cli("explain", "--domain", "vm1", "--config", fake_domain["config"],
                       *device, "--json")

        null = json.loads(ask("/dev/null").stdout)
        assert null["mode"] == "libvirt (our overlay installed)"
        assert null["allowed_by"]["map"] == "libvirt"
        assert [(s["kind"], s["where"]) for s in null["sources"]] == [
            ("default-acl", "libvirt:default-acl[1]")]

        disk = json.loads(ask(fake_domain["blk"], "r").stdout)
        assert disk["verdict"] == "allowed"
        assert [s["where"] for s in disk["sources"]] == ["devices/disk[1]/source/@dev"]
        assert disk["plan_source"].startswith("live XML ")

        extra = json.loads(ask(fake_domain["extra"]).stdout)
        assert extra["allowed_by"]["map"] == "overlay"
        assert [(s["kind"], s["where"]) for s in extra["sources"]] == [
            ("extra", "metadata/bpfcg:extras[1]/bpfcg:device[1]/@path")]

        tun = json.loads(ask("c 10:200").stdout)
        assert tun["verdict"] == "allowed" and [s["kind"] for s in tun["sources"]] == [
            "outside"]

        pty = json.loads(ask("c", "136:4").stdout)
        assert pty["allowed_by"]["key"] == "major:*"
        assert [s["where"] for s in pty["sources"]] == ["libvirt:pty"]

        proc = ask(fake_domain["blk"])  # rw on a readonly disk
        assert proc.returncode == 1
        rw = json.loads(proc.stdout)
        assert rw["partial"] == {"r": "allowed", "w": "denied"}
        assert any("grants it only as b 240:7 r" in n for n in rw["notes"]), rw["notes"]

        (unknown,) = nodes(node_dir, "c 240:9")
        proc = ask(unknown)
        assert proc.returncode == 1
        denied = json.loads(proc.stdout)
        kinds = {s["kind"]: s["command"] for s in denied["suggestions"]}
        assert kinds["allow-now"] == f"libvirt-bpfcg allow --domain vm1 '{unknown} rw'"
        metadata = kinds["metadata"]
        assert fake_domain["extra"] in metadata and f'path="{unknown}"' in metadata, \
            "the snippet keeps the existing extra and adds this device"
        assert denied["plan_rows"] == []

        human = cli("explain", "--domain", "vm1", "--config", fake_domain["config"], unknown)
        assert "to allow it at every start" in human.stdout and "virsh metadata vm1" in \
            human.stdout

        # libvirt's own map growth replaces our program: the extra is denied until reinstalled
        map_fd = libvirt_realloc(scratch_cgroup, map_fd)
        gone = json.loads(ask(fake_domain["extra"]).stdout)
        assert gone["verdict"] == "denied" and gone["mode"] == "libvirt (libvirt's program only)"
        assert any("pinned" in n and "c 240:8 rw" in n for n in gone["notes"]), gone["notes"]
    finally:
        bpf.close(map_fd)


def test_v1_devices_list_is_read_on_hybrid_hosts():
    """This machine is hybrid: our own process sits in the v1 devices root, which allows
    everything ("a *:* rwm")."""
    from libvirt_bpfcg.explain import v1_devices

    result = v1_devices(os.getpid(), DeviceQuery("c", 1, 3, "rw"))
    if result is None:
        pytest.fail("no cgroup v1 devices controller here: this test expects the CI host's "
                    "hybrid layout")
    assert result.verdict == ALLOWED and result.entry == "a *:* rwm"
