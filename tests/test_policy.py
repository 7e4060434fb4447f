"""Default ACL (qemu.conf, built-in, libvirt version), the sound gate, and the guardrails."""

from __future__ import annotations

import os

import pytest
from fakesysfs import FakeHost

from libvirt_bpfcg import domain as dm
from libvirt_bpfcg.config import Config
from libvirt_bpfcg.errors import InputError
from libvirt_bpfcg.policy import (
    BUILTIN_ACL,
    Guardrails,
    QemuConf,
    default_acl,
    detect_libvirt_version,
    gate_open,
    library_candidates,
    parse_qemu_conf,
    read_qemu_conf,
    version_from_soname,
)
from libvirt_bpfcg.rules import Rule

SHIPPED_STYLE = """
# Master configuration file for the QEMU driver.
#
# cgroup_device_acl = [
#    "/dev/null", "/dev/full", "/dev/zero",
#    "/dev/random", "/dev/urandom",
#    "/dev/ptmx", "/dev/kvm",
#    "/dev/userfaultfd"
#]
#vnc_allow_host_audio = 0
"""


# -- qemu.conf ------------------------------------------------------------------------------

def test_commented_qemu_conf_sets_nothing() -> None:
    conf = parse_qemu_conf(SHIPPED_STYLE)
    assert conf.cgroup_device_acl is None
    assert not conf.vnc_allow_host_audio and not conf.nographics_allow_host_audio


def test_admin_settings() -> None:
    conf = parse_qemu_conf(SHIPPED_STYLE + """
vnc_allow_host_audio = 1
cgroup_device_acl = [
    "/dev/null", "/dev/full", # trailing comment with "quotes"
#   "/dev/zero",
    '/dev/kvm', "/dev/vfio/vfio",
]
nographics_allow_host_audio=1
some_other_setting = "cgroup_device_acl = [ 'x' ]"
""")
    assert conf.cgroup_device_acl == ("/dev/null", "/dev/full", "/dev/kvm", "/dev/vfio/vfio")
    assert conf.vnc_allow_host_audio and conf.nographics_allow_host_audio


def test_last_assignment_wins_and_empty_list() -> None:
    conf = parse_qemu_conf('cgroup_device_acl = ["/dev/a"]\ncgroup_device_acl = [ ]\n')
    assert conf.cgroup_device_acl == ()


@pytest.mark.parametrize("text, message", [
    ("cgroup_device_acl = 1\n", "must be a list"),
    ('cgroup_device_acl = [ "/dev/null"\n', "unterminated list"),
    ("vnc_allow_host_audio = yes\n", "unexpected"),
    ("cgroup_device_acl =\n", "no value"),
])
def test_broken_qemu_conf(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_qemu_conf(text, "/etc/libvirt/qemu.conf")


def test_read_qemu_conf(tmp_path) -> None:
    assert read_qemu_conf(str(tmp_path / "missing")) == QemuConf(str(tmp_path / "missing"),
                                                                  False)
    path = tmp_path / "qemu.conf"
    path.write_text('cgroup_device_acl = [ "/dev/null" ]\n')
    assert read_qemu_conf(str(path)).cgroup_device_acl == ("/dev/null",)


# -- libvirt version ------------------------------------------------------------------------

@pytest.mark.parametrize("name, version", [
    ("libvirt.so.0.9000.0", (9, 0, 0)),
    ("/usr/lib64/libvirt.so.0.10001.0", (10, 1, 0)),
    ("libvirt.so.0.12005.3", (12, 5, 3)),
    ("libvirt.so.0", None),
    ("libvirt-qemu.so.0.9000.0", None),
])
def test_version_from_soname(name: str, version: tuple | None) -> None:
    assert version_from_soname(name) == version


def test_version_from_config_wins(tmp_path) -> None:
    assert detect_libvirt_version(Config(libvirt_version="10.1.0"), [])[0] == (10, 1, 0)


def test_version_from_library_link(tmp_path) -> None:
    os.symlink("libvirt.so.0.10002.0", tmp_path / "libvirt.so.0")
    version, source = detect_libvirt_version(
        Config(), [str(tmp_path / "missing.so.0"), str(tmp_path / "libvirt.so.0")])
    assert version == (10, 2, 0) and source.endswith("libvirt.so.0.10002.0")
    assert detect_libvirt_version(Config(), [str(tmp_path / "nope")])[0] is None


def test_library_candidates_include_multiarch_and_lib64() -> None:
    candidates = library_candidates()
    assert "/usr/lib64/libvirt.so.0" in candidates
    assert any("-linux-gnu" in c for c in candidates) or os.uname().machine not in (
        "x86_64", "aarch64")


def test_this_hosts_libvirt_is_found() -> None:
    """Debian 12 ships libvirt0 9.0.0: the readlink finds it without running anything."""
    version, source = detect_libvirt_version(Config())
    assert version is not None and version >= (9, 0, 0), source


# -- the default ACL ------------------------------------------------------------------------

def acl_rows(config: Config, conf: QemuConf) -> list:
    return [(r.source, r.path, str(r.rule) if r.rule else None, r.skip is not None)
            for r in default_acl(config, conf, version_probe=[]).refs]


def test_builtin_acl_before_10_1() -> None:
    rows = acl_rows(Config(libvirt_version="9.0.0"), QemuConf("q", False))
    assert [path for _, path, _, skipped in rows if not skipped] == list(BUILTIN_ACL)
    assert rows[-1] == ("libvirt:default-acl[8]", "/dev/userfaultfd", None, True)
    assert all(r.required is False and r.access == "rw" for r in
               default_acl(Config(libvirt_version="9.0.0"), QemuConf("q", False), []).refs)


def test_builtin_acl_from_10_1_has_userfaultfd() -> None:
    rows = acl_rows(Config(libvirt_version="10.1.0"), QemuConf("q", False))
    assert rows[-1] == ("libvirt:default-acl[8]", "/dev/userfaultfd", None, False)


def test_unknown_version_leaves_userfaultfd_out_and_says_why() -> None:
    refs = default_acl(Config(), QemuConf("q", False), version_probe=[]).refs
    assert refs[-1].skip is not None and "version unknown" in refs[-1].skip


def test_qemu_conf_list_replaces_the_builtin_one() -> None:
    conf = QemuConf("/etc/libvirt/qemu.conf", True, ("/dev/null", "/dev/kvm", "/dev/rtc"))
    rows = acl_rows(Config(libvirt_version="10.1.0"), conf)
    assert rows == [("qemu.conf:cgroup_device_acl[1]", "/dev/null", None, False),
                    ("qemu.conf:cgroup_device_acl[2]", "/dev/kvm", None, False),
                    ("qemu.conf:cgroup_device_acl[3]", "/dev/rtc", None, False)]


def test_our_config_overrides_both() -> None:
    config = Config(default_acl=("/dev/null", "/dev/kvm r", "c 10:200 rwm"))
    conf = QemuConf("q", True, ("/dev/zero",))
    choice = default_acl(config, conf, version_probe=[])
    assert choice.origin == "config default_acl"
    assert [(r.source, r.path, r.access, str(r.rule) if r.rule else None)
            for r in choice.refs] == [
        ("config:default_acl[1]", "/dev/null", "rw", None),
        ("config:default_acl[2]", "/dev/kvm", "r", None),
        ("config:default_acl[3]", None, "rwm", "c 10:200 rwm")]


def test_sound_gate() -> None:
    closed = QemuConf("q", True)
    opened = QemuConf("q", True, None, True, True)
    assert gate_open(None, closed)
    for gate in (dm.GATE_SOUND_VNC, dm.GATE_SOUND_NOGRAPHICS):
        assert not gate_open(gate, closed) and gate_open(gate, opened)


# -- guardrails -----------------------------------------------------------------------------

@pytest.fixture
def fake(tmp_path) -> FakeHost:
    host = FakeHost(str(tmp_path))
    # sda: sda1 mounted on /boot, sda2 is an LVM PV under dm-0 (mounted on /), sda3 idle.
    host.block("sda", 8, 0)
    host.block("sda1", 8, 1, parent="sda")
    host.block("sda2", 8, 2, parent="sda")
    host.block("sda3", 8, 3, parent="sda")
    host.block("dm-0", 253, 0, dm=True, slaves=("sda2",))
    host.block("sdb", 8, 16)                       # a spare disk, free for guests
    host.block("sdc", 8, 32)
    host.block("sdc1", 8, 33, parent="sdc")        # swap
    host.mount("sda1", "/boot")
    host.mount("dm-0", "/")
    host.node("/dev/sdc1", "b", 8, 33)
    host.swap("/dev/sdc1")
    return host


def verdict(fake: FakeHost, text: str, allow: tuple = (), path: str | None = None):
    return Guardrails(fake.host(), allow).check(Rule.parse(text), path)


@pytest.mark.parametrize("rule, why", [
    ("b 8:1 r", "mounted on /boot"),
    ("b 253:0 rw", "mounted on /"),
    ("b 8:2 rw", "sda2 is under dm-0, mounted on /"),
    ("b 8:0 r", "holds partition"),
    ("b 8:33 rw", "swap"),
    ("b 8:32 rw", "holds partition sdc1, in use as swap"),
    ("b 8:* rw", "covers the host's block device"),
    ("a *:* rwm", "/dev/mem"),
    ("c 1:1 r", "/dev/mem (physical memory)"),
    ("c 1:2 rw", "/dev/kmem"),
    ("c 1:4 rw", "/dev/port"),
    ("c 1:* rw", "/dev/mem"),
])
def test_forbidden(fake: FakeHost, rule: str, why: str) -> None:
    found = verdict(fake, rule)
    assert found is not None and why in found.reason, found
    assert found.allowed_by is None


@pytest.mark.parametrize("rule", ["b 8:16 rw", "b 8:3 rw", "c 1:3 rw", "c 1:5 rw",
                                  "b 7:* rw", "c 136:* rw", "c 195:* rw"])
def test_harmless(fake: FakeHost, rule: str) -> None:
    assert verdict(fake, rule) is None


def test_exceptions_by_rule_and_by_path(fake: FakeHost) -> None:
    fake.node("/dev/mem", "c", 1, 1)
    assert verdict(fake, "c 1:1 r", allow=("c 1:1 r",)).allowed_by == "c 1:1 r"
    # The exception's access bounds what it allows.
    assert verdict(fake, "c 1:1 rw", allow=("c 1:1 r",)).allowed_by is None
    assert verdict(fake, "c 1:1 rw", allow=("/dev/mem",)).allowed_by == "/dev/mem"
    assert verdict(fake, "b 8:1 rw", allow=("b 8:* rwm",)).allowed_by == "b 8:* rwm"
    # A path that is no device on this host still matches by name.
    assert verdict(fake, "b 8:1 r", allow=("/dev/sda1",),
                   path="/dev/sda1").allowed_by == "/dev/sda1"
    assert verdict(fake, "b 8:1 r", allow=("/dev/sdz",), path="/dev/sda1").allowed_by is None
    # A narrow exception does not cover a wildcard rule.
    assert verdict(fake, "b 8:* rw", allow=("b 8:1 rw",)).allowed_by is None


def test_btrfs_style_mount_with_anonymous_numbers(tmp_path) -> None:
    fake = FakeHost(str(tmp_path))
    fake.block("nvme0n1", 259, 0)
    fake.node("/dev/nvme0n1", "b", 259, 0)
    fake.mount("nvme0n1", "/home", fstype="btrfs", numbers=(0, 35), source="/dev/nvme0n1")
    found = verdict(fake, "b 259:0 rw")
    assert found is not None and "mounted on /home" in found.reason


def test_mountinfo_escapes(tmp_path) -> None:
    fake = FakeHost(str(tmp_path))
    fake.block("sdx", 8, 96)
    fake.mount("sdx", "/mnt/with\\040space")
    assert "mounted on /mnt/with space" in verdict(fake, "b 8:96 r").reason
