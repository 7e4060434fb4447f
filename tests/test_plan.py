"""plan_domain / plan_snippet end to end on a fake host, the JSON contract and the CLI verb."""

from __future__ import annotations

import io
import json
import os

import pytest
from fakesysfs import FakeHost

from libvirt_bpfcg import cli
from libvirt_bpfcg.domain_extras import NAMESPACE
from libvirt_bpfcg.errors import InputError
from libvirt_bpfcg.plan import Plan, plan_document, plan_domain, plan_snippet
from libvirt_bpfcg.resolve import FORBIDDEN, LOOKUP_FAILED, MISSING, NOT_A_DEVICE, OK, SKIPPED


@pytest.fixture
def fake(tmp_path) -> FakeHost:
    host = FakeHost(str(tmp_path))
    for path, numbers in (("/dev/null", (1, 3)), ("/dev/full", (1, 7)), ("/dev/zero", (1, 5)),
                          ("/dev/random", (1, 8)), ("/dev/urandom", (1, 9)),
                          ("/dev/ptmx", (5, 2)), ("/dev/kvm", (10, 232))):
        host.node(path, "c", *numbers)
    return host


def plan_of(fake: FakeHost, devices: str = "", extra: str = "", **config: object) -> Plan:
    xml = (f"<domain type='kvm' id='4'><name>vm1</name><uuid>u-1</uuid>{extra}"
           f"<devices>{devices}</devices></domain>")
    return plan_domain(xml, fake.config(**config), fake.host())


def metadata(body: str) -> str:
    return (f"<metadata><bpfcg:extras xmlns:bpfcg='{NAMESPACE}'>{body}</bpfcg:extras>"
            "</metadata>")


def test_minimal_domain(fake: FakeHost) -> None:
    plan = plan_of(fake)
    assert plan.domain == ("vm1", "u-1", 4)
    assert plan.rule_list() == ["c 1:3 rw", "c 1:5 rw", "c 1:7 rw", "c 1:8 rw", "c 1:9 rw",
                                "c 5:2 rw", "c 10:232 rw", "c 136:* rw"]
    assert plan.ok and plan.problems == [] and len(plan.extra_rules) == 0
    acl = [d for d in plan.devices if d.origin == "default-acl"]
    assert [d.status for d in acl] == [OK] * 7 + [SKIPPED]  # userfaultfd: libvirt 9.0
    assert plan.settings["default_acl"] == "libvirt built-in"
    assert plan.settings["libvirt_version"] == "9.0.0"


def test_json_contract(fake: FakeHost) -> None:
    fake.node("/dev/sdb", "b", 8, 16)
    data = plan_of(fake, "<disk type='block'><source dev='/dev/sdb'/><readonly/></disk>"
                         "<disk type='file'><source file='/missing.img'/></disk>").to_json()
    assert set(data) >= {"domain", "devices", "rules", "extra_rules", "conflicts",
                         "problems", "settings"}
    assert data["domain"] == {"name": "vm1", "uuid": "u-1", "id": 4}
    for device in data["devices"]:
        assert set(device) >= {"source", "path", "access", "status", "rule", "reason"}
        assert device["access"] in ("r", "rw", "rwm")
    disk = next(d for d in data["devices"] if d["source"] == "devices/disk[1]/source/@dev")
    assert (disk["path"], disk["status"], disk["rule"], disk["origin"]) == (
        "/dev/sdb", "ok", "b 8:16 r", "domain")
    assert "b 8:16 r" in data["rules"]
    assert data["problems"] == [{"source": "devices/disk[2]/source/@file",
                                 "path": "/missing.img", "status": "missing",
                                 "reason": "disk source type='file'; no such file or device "
                                           "node"}]
    json.dumps(data)


def test_path_is_as_written_and_node_in_reason(fake: FakeHost) -> None:
    fake.node("/dev/dm-1", "b", 253, 1)
    fake.link("/dev/mapper/vg-guest", "/dev/dm-1")
    plan = plan_of(fake, "<disk type='block'><source dev='/dev/mapper/vg-guest'/></disk>")
    disk = next(d for d in plan.devices if d.kind == "disk")
    assert disk.path == "/dev/mapper/vg-guest" and str(disk.rule) == "b 253:1 rw"
    assert "/dev/dm-1" in disk.reason


def test_required_vs_optional_missing(fake: FakeHost) -> None:
    plan = plan_of(fake, """
      <disk type='file' device='cdrom'><source file='/iso/gone.iso' startupPolicy='optional'/>
      </disk>
      <hostdev type='usb'><source startupPolicy='optional'><vendor id='0x1'/>
      <product id='0x2'/></source></hostdev>
      <hostdev type='usb'><source><vendor id='0x3'/><product id='0x4'/></source></hostdev>
      <hostdev type='pci'><source><address bus='5' slot='0'/></source></hostdev>
      <serial type='dev'><source path='/dev/ttyS9'/></serial>""")
    statuses = [(d.source, d.status, d.required) for d in plan.devices
                if d.origin == "domain" and d.kind != "pty"]
    assert statuses == [
        ("devices/disk[1]/source/@file", MISSING, False),
        ("devices/serial[1]/source/@path", MISSING, True),
        ("devices/hostdev[1]/source/vendor", MISSING, False),
        ("devices/hostdev[2]/source/vendor", MISSING, True),
        ("devices/hostdev[3]/source/address", LOOKUP_FAILED, True),
        ("devices/hostdev[3]", MISSING, True)]
    assert [d.source for d in plan.problems] == [
        "devices/serial[1]/source/@path", "devices/hostdev[2]/source/vendor",
        "devices/hostdev[3]/source/address", "devices/hostdev[3]"]


def test_things_libvirt_tolerates_are_no_problem(fake: FakeHost) -> None:
    fake.file("/images/disk.qcow2")
    plan = plan_of(fake, """
      <disk type='file' device='cdrom'><target dev='hdc'/></disk>
      <disk type='file'><source file='/images/disk.qcow2'/></disk>
      <disk type='network'><source protocol='nbd' name='x'/></disk>
      <memory model='sgx-epc'/>""",
                   extra="<os><loader readonly='yes'>/fw/CODE.fd</loader>"
                         "<nvram>/var/lib/nvram/vm1_VARS.fd</nvram></os>")
    assert plan.ok, [(d.source, d.status) for d in plan.problems]
    assert [d.status for d in plan.devices if d.kind == "disk"] == [SKIPPED, NOT_A_DEVICE,
                                                                     SKIPPED]


def test_forbidden_devices_are_problems(fake: FakeHost) -> None:
    fake.node("/dev/mem", "c", 1, 1)
    fake.block("sda", 8, 0)
    fake.block("sda1", 8, 1, parent="sda")
    fake.mount("sda1", "/")
    fake.node("/dev/sda", "b", 8, 0)
    plan = plan_of(fake, "<disk type='block'><source dev='/dev/sda'/></disk>"
                         "<serial type='dev'><source path='/dev/mem'/></serial>",
                   extra=metadata("<bpfcg:rule>c 1:* rw</bpfcg:rule>"))
    forbidden = [(d.source, d.status) for d in plan.devices if d.status == FORBIDDEN]
    assert forbidden == [("devices/disk[1]/source/@dev", FORBIDDEN),
                         ("devices/serial[1]/source/@path", FORBIDDEN),
                         ("metadata/bpfcg:extras[1]/bpfcg:rule[1]", FORBIDDEN)]
    assert len(plan.problems) == 3
    disk = plan.problems[0]
    assert "holds partition sda1, mounted on /" in disk.reason and str(disk.rule) == "b 8:0 rw"
    # Forbidden rules are shown but never granted.
    assert "b 8:0 rw" not in plan.rule_list() and "c 1:1 rw" not in plan.rule_list()


def test_exceptions_let_them_through(fake: FakeHost) -> None:
    fake.node("/dev/mem", "c", 1, 1)
    plan = plan_of(fake, "<serial type='dev'><source path='/dev/mem'/></serial>",
                   allow_forbidden=("/dev/mem",))
    row = next(d for d in plan.devices if d.kind == "chardev")
    assert row.status == OK and "allowed by allow_forbidden '/dev/mem'" in row.reason
    assert "c 1:1 rw" in plan.rule_list() and plan.ok


def test_default_acl_is_trusted(fake: FakeHost) -> None:
    fake.node("/dev/mem", "c", 1, 1)
    plan = plan_of(fake, default_acl=("/dev/mem r", "/dev/null"))
    assert [(d.source, d.status, str(d.rule)) for d in plan.devices
            if d.origin == "default-acl"] == [
        ("config:default_acl[1]", OK, "c 1:1 r"), ("config:default_acl[2]", OK, "c 1:3 rw")]


def test_extras(fake: FakeHost) -> None:
    fake.node("/dev/kvmfr0", "c", 242, 0)
    plan = plan_of(fake, extra=metadata(
        "<bpfcg:device path='/dev/kvmfr0' access='rw'/>"
        "<bpfcg:rule>c 195:* rw</bpfcg:rule>"
        "<bpfcg:class access='r'>char-nvidia*</bpfcg:class>"
        "<bpfcg:device path='/dev/uinput' optional='yes'/>"))
    assert [str(rule) for rule in plan.extra_rules] == [
        "c 195:* rw", "c 242:0 rw", "c 508:* r", "c 509:* r"]
    extras = [(d.source, d.status, str(d.rule) if d.rule else None) for d in plan.devices
              if d.origin == "extra"]
    assert extras == [
        ("metadata/bpfcg:extras[1]/bpfcg:device[1]/@path", OK, "c 242:0 rw"),
        ("metadata/bpfcg:extras[1]/bpfcg:rule[1]", OK, "c 195:* rw"),
        ("metadata/bpfcg:extras[1]/bpfcg:class[1]", OK, "c 195:* r"),
        ("metadata/bpfcg:extras[1]/bpfcg:class[1] (driver nvidia-uvm)", OK, "c 508:* r"),
        ("metadata/bpfcg:extras[1]/bpfcg:class[1] (driver nvidia-caps)", OK, "c 509:* r"),
        ("metadata/bpfcg:extras[1]/bpfcg:device[2]/@path", MISSING, None)]
    assert plan.ok  # the missing extra is optional
    # Extras merge with the domain's rules: c 195:* is rw (rule) + r (class) = rw.
    assert "c 195:* rw" in plan.rule_list()


def test_missing_required_extra_is_a_problem(fake: FakeHost) -> None:
    plan = plan_of(fake, extra=metadata("<bpfcg:device path='/dev/kvmfr0'/>"
                                        "<bpfcg:class>char-kvmfr</bpfcg:class>"))
    assert [d.status for d in plan.problems] == [MISSING, MISSING]


def test_block_char_conflicts_are_reported(fake: FakeHost) -> None:
    fake.node("/dev/ram3", "b", 1, 3)
    plan = plan_of(fake, "<disk type='block'><source dev='/dev/ram3'/><readonly/></disk>")
    assert [(str(a), str(b)) for a, b in plan.conflicts] == [("c 1:3 rw", "b 1:3 r")]
    assert "a 1:3 r" in plan.rule_list()
    assert plan.to_json()["conflicts"] == [{"rules": ["c 1:3 rw", "b 1:3 r"],
                                           "merged": "a 1:3 r"}]


def test_sound_follows_qemu_conf(fake: FakeHost, tmp_path) -> None:
    devices = "<sound model='ich9'/><graphics type='vnc'/>"
    plan = plan_of(fake, devices)
    assert "c 116:* rw" not in plan.rule_list()
    sound = next(d for d in plan.devices if d.kind == "sound")
    assert sound.status == SKIPPED and "vnc_allow_host_audio" in sound.reason
    (tmp_path / "qemu.conf").write_text("vnc_allow_host_audio = 1\n")
    assert "c 116:* rw" in plan_of(fake, devices).rule_list()


def test_qemu_conf_acl_replaces_builtin(fake: FakeHost, tmp_path) -> None:
    (tmp_path / "qemu.conf").write_text('cgroup_device_acl = [ "/dev/null", "/dev/rtc0" ]\n')
    plan = plan_of(fake)
    assert [(d.source, d.status) for d in plan.devices if d.origin == "default-acl"] == [
        ("qemu.conf:cgroup_device_acl[1]", OK), ("qemu.conf:cgroup_device_acl[2]", MISSING)]
    assert plan.settings["default_acl"] == "qemu.conf cgroup_device_acl"
    assert plan.ok


def test_dm_disk_grants_its_targets(fake: FakeHost) -> None:
    fake.block("sdb", 8, 16)
    fake.block("dm-4", 253, 4, dm=True, slaves=("sdb",))
    fake.node("/dev/dm-4", "b", 253, 4)
    plan = plan_of(fake, "<disk type='block'><source dev='/dev/dm-4'/></disk>")
    rows = [(d.source, d.path, str(d.rule), d.kind) for d in plan.devices
            if d.kind in ("disk", "dm-target")]
    assert rows == [("devices/disk[1]/source/@dev", "/dev/dm-4", "b 253:4 rw", "disk"),
                    ("devices/disk[1]/source/@dev (dm target sdb)", "/dev/sdb", "b 8:16 rw",
                     "dm-target")]


def test_snippets(fake: FakeHost) -> None:
    fake.pci("0000:06:12.2", 11)
    fake.node("/dev/vfio/11", "c", 243, 11)
    fake.node("/dev/vfio/vfio", "c", 10, 196)
    xml = ("<hostdev mode='subsystem' type='pci' managed='yes'><source>"
           "<address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/></source>"
           "</hostdev>")
    plan = plan_snippet(xml, fake.config(), fake.host())
    assert plan.domain is None and plan.rule_list() == ["c 10:196 rw", "c 243:11 rw"]
    assert plan.to_json()["domain"] is None
    assert plan_document(xml, fake.config(), fake.host()).rule_list() == plan.rule_list()
    with pytest.raises(InputError, match="use plan_domain"):
        plan_snippet("<domain/>", fake.config(), fake.host())
    with pytest.raises(InputError, match="plan_snippet"):
        plan_domain(xml, fake.config(), fake.host())


# -- the CLI verb ---------------------------------------------------------------------------

def run_cli(argv: list, capsys) -> tuple:
    out = io.StringIO()
    code = cli.main(argv, out=out)
    return code, out.getvalue(), capsys.readouterr().err


def write_config(fake: FakeHost, tmp_path) -> str:
    config = fake.config()
    path = tmp_path / "bpfcg.conf"
    path.write_text(
        f"[acl]\nqemu_conf = {config.qemu_conf}\nlibvirt_version = 9.0.0\n"
        f"[host]\nsysfs_root = {config.sysfs_root}\nproc_devices = {config.proc_devices}\n"
        f"mountinfo = {config.mountinfo}\nswaps = {config.swaps}\n")
    return str(path)


def test_cli_json(tmp_path, capsys, fake: FakeHost) -> None:
    domain = tmp_path / "vm.xml"
    domain.write_text("<domain><name>vm</name><devices><disk type='block'>"
                      "<source dev='/dev/nope'/></disk></devices></domain>")
    code, out, err = run_cli(["plan", "--json", "--config", write_config(fake, tmp_path),
                              str(domain)], capsys)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["domain"]["name"] == "vm"
    assert data["problems"][0]["source"] == "devices/disk[1]/source/@dev"
    assert "c 136:* rw" in data["rules"]


def test_cli_human(tmp_path, capsys, fake: FakeHost, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        b"<domain id='3'><name>vm</name><devices><serial type='dev'>"
        b"<source path='/dev/ttyNOPE9'/></serial></devices></domain>")))
    # The CLI looks at the real /dev (only sysfs and /proc are configurable).
    code, out, _ = run_cli(["plan", "--config", write_config(fake, tmp_path), "-"], capsys)
    assert code == 0
    assert out.startswith("Domain vm: id 3\nDefault ACL: libvirt built-in (libvirt 9.0.0)\n")
    assert "STATUS" in out and "devices/serial[1]/source/@path" in out
    assert "  c 1:3 rw\n" in out and "  c 136:* rw\n" in out
    assert "Problems (1) — a guest start would be refused:\n  devices/serial[1]/source/@path:" \
           " missing /dev/ttyNOPE9: <serial type='dev'>; no such file or device node" in out


@pytest.mark.parametrize("content, message", [
    (b"", "empty input"),
    (b"<network/>", "root element is <network>"),
    (b"<!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/shadow'>]><domain>&x;</domain>",
     "DOCTYPE"),
    (b"<domain><devices><hostdev type='pci'/></devices></domain>", "devices/hostdev[1]"),
])
def test_cli_unusable_input_exits_2(tmp_path, capsys, content: bytes, message: str,
                                    fake: FakeHost) -> None:
    path = tmp_path / "bad.xml"
    path.write_bytes(content)
    code, out, err = run_cli(["plan", "--config", write_config(fake, tmp_path), str(path)],
                             capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("libvirt-bpfcg: ")


def test_cli_missing_config_exits_2(tmp_path, capsys) -> None:
    code, _, err = run_cli(["plan", "--config", str(tmp_path / "none.conf"), "x.xml"], capsys)
    assert code == 2 and "no such configuration file" in err


def test_hook_style_call_does_not_import_libvirt() -> None:
    """The hook's path (plan_domain) stays light: lxml only, never libvirt-python."""
    import subprocess
    import sys

    code = ("import sys; import libvirt_bpfcg.plan; "
            "assert 'libvirt' not in sys.modules, 'libvirt imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_managed_vfio_nodes_may_appear_after_prepare(fake: FakeHost) -> None:
    """libvirt binds managed devices to vfio-pci after the prepare hook: a missing group
    node is a finding for them, a problem for unmanaged ones; a PCI device missing from
    sysfs is a problem either way."""
    fake.pci("0000:06:12.1", 12)
    fake.pci("0000:06:12.2", 13)
    plan = plan_of(fake, """
      <hostdev mode='subsystem' type='pci' managed='yes'><source>
        <address domain='0x0000' bus='0x06' slot='0x12' function='0x1'/></source></hostdev>
      <hostdev mode='subsystem' type='pci'><source>
        <address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/></source></hostdev>
      <hostdev mode='subsystem' type='pci' managed='yes'><source>
        <address domain='0x0000' bus='0x07' slot='0x00' function='0x0'/></source></hostdev>
      """)
    rows = [(d.source, d.status, d.required) for d in plan.devices if d.kind != "pty"
            and d.origin == "domain"]
    assert rows == [
        ("devices/hostdev[1]/source/address", MISSING, False),
        ("devices/hostdev[1]", MISSING, False),
        ("devices/hostdev[2]/source/address", MISSING, True),
        ("devices/hostdev[2]", MISSING, True),
        ("devices/hostdev[3]/source/address", LOOKUP_FAILED, True),
        ("devices/hostdev[3]", MISSING, False)]
    first = next(d for d in plan.devices if d.source == "devices/hostdev[1]/source/address")
    assert "after the prepare hook" in first.reason


def test_problem_text_is_one_line(fake: FakeHost) -> None:
    plan = plan_of(fake, "".join(f"<serial type='dev'><source path='/dev/ttyX{i}'/></serial>"
                                 for i in range(5)))
    text = plan.problem_text(limit=2)
    assert "\n" not in text
    assert text.startswith("devices/serial[1]/source/@path (/dev/ttyX0): missing: ")
    assert text.endswith("; and 3 more")
    assert plan_of(fake).problem_text() == ""
