"""Our configuration file: defaults, every key, and one-line errors naming file and key."""

from __future__ import annotations

import os

import pytest

from libvirt_bpfcg.config import Config, load_config, parse_config, split_list
from libvirt_bpfcg.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "packaging", "libvirt-bpfcg.conf")


def test_shipped_file_is_all_defaults() -> None:
    config = load_config(SHIPPED)
    assert config == Config()
    assert config.source == SHIPPED


def test_missing_default_file_means_defaults(monkeypatch) -> None:
    monkeypatch.setattr("libvirt_bpfcg.config.DEFAULT_CONFIG_PATH", "/nonexistent/x.conf")
    assert load_config() == Config()


def test_missing_explicit_file_is_an_error(tmp_path) -> None:
    with pytest.raises(InputError, match="no such configuration file"):
        load_config(str(tmp_path / "nope.conf"))


def test_every_key(tmp_path) -> None:
    text = """
[acl]
default_acl =
    /dev/null
    /dev/kvm r, c 10:200 rwm
qemu_conf = /srv/qemu.conf
libvirt_version = 10.1
[guardrails]
allow_forbidden = /dev/sdb
    b 8:32
    c 1:1 r
[hook]
strict = yes
state_dir = /run/x
[host]
sysfs_root = /tmp/sys
proc_devices = /tmp/devices
mountinfo = /tmp/mountinfo
swaps = /tmp/swaps
storage_dirs = /a, /b
"""
    config = parse_config(text, "test.conf")
    assert config.default_acl == ("/dev/null", "/dev/kvm r", "c 10:200 rwm")
    assert config.qemu_conf == "/srv/qemu.conf"
    assert config.libvirt_version == "10.1.0"
    assert config.allow_forbidden == ("/dev/sdb", "b 8:32 rwm", "c 1:1 r")
    assert config.strict is True and config.state_dir == "/run/x"
    assert (config.sysfs_root, config.proc_devices, config.mountinfo, config.swaps) == (
        "/tmp/sys", "/tmp/devices", "/tmp/mountinfo", "/tmp/swaps")
    assert config.storage_dirs == ("/a", "/b")


@pytest.mark.parametrize("text, message", [
    ("[acl]\nstrict = yes\n", "unknown key 'strict' in [acl]"),
    ("[hooks]\nstrict = yes\n", "unknown section [hooks]"),
    ("[hook]\nstrict = maybe\n", "bad boolean 'maybe'"),
    ("[acl]\nlibvirt_version = ten\n", "bad libvirt version"),
    ("[acl]\ndefault_acl = dev/null\n", "bad entry 'dev/null'"),
    ("[acl]\ndefault_acl = /dev/null w\n", "access in '/dev/null w'"),
    ("[acl]\ndefault_acl = c 1:x rw\n", "bad minor"),
    ("[guardrails]\nallow_forbidden = sdb\n", "bad entry 'sdb'"),
    ("[host]\nsysfs_root = sys\n", "not an absolute path"),
    ("strict = yes\n", "test.conf"),
    ("[hook]\nstrict = yes\nstrict = no\n", "test.conf"),
])
def test_errors_name_file_and_key(text: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        parse_config(text, "test.conf")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("test.conf")


def test_split_list() -> None:
    assert split_list("a, b\n  c d \n\n,e") == ["a", "b", "c d", "e"]
