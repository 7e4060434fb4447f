"""The filter engine against the real kernel: scratch cgroups, real opens, real maps."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from engine_helpers import (
    attached_ids,
    install_libvirt_like,
    libvirt_realloc,
    nodes,
    opens,
    private_state_dirs,
)
from kernel_fixtures import make_node

from libvirt_bpfcg import detect as det
from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.devfilter import DeviceFilter, read_entries
from libvirt_bpfcg.errors import OperationError
from libvirt_bpfcg.rules import Rule, encode_key
from libvirt_bpfcg.state import StateDirs

pytestmark = pytest.mark.kernel

R = Rule.parse
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dirs(tmp_path) -> StateDirs:
    """A private state dir and a private bpffs (never the host's /sys/fs/bpf)."""
    with private_state_dirs(str(tmp_path)) as state_dirs:
        yield state_dirs


def test_none_mode_then_own_grant_enforced_and_revoked(scratch_cgroup, node_dir, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    assert f.mode == det.MODE_NONE
    allowed, other = nodes(node_dir, "c 240:1", "c 240:2")
    change = f.grant([R("c 240:1 r"), R("c 1:3 rw")])
    assert change.installed and change.mode == "own"
    assert f.mode == det.MODE_OWN
    assert opens(scratch_cgroup, [allowed, other, "/dev/null"]) == [True, False, True]
    # read-only grant: write is refused
    assert opens(scratch_cgroup, [allowed], os.O_WRONLY) == [False]
    f.revoke([R("c 240:1 r")])
    assert opens(scratch_cgroup, [allowed, "/dev/null"]) == [False, True]
    assert len(attached_ids(scratch_cgroup)) == 1


def test_access_union_and_partial_revoke(scratch_cgroup, node_dir, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    (node,) = nodes(node_dir, "c 240:5")
    f.grant([R("c 240:5 r")])
    f.grant([R("c 240:5 w")])
    assert [str(r) for r, _m in f.rules()] == ["c 240:5 rw"]
    assert opens(scratch_cgroup, [node], os.O_RDWR) == [True]
    f.revoke([R("c 240:5 w")])
    assert [str(r) for r, _m in f.rules()] == ["c 240:5 r"]
    assert opens(scratch_cgroup, [node], os.O_RDWR) == [False]
    assert opens(scratch_cgroup, [node]) == [True]


def test_wildcards(scratch_cgroup, node_dir, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    a, b, c, d = nodes(node_dir, "c 241:1", "c 241:2", "c 242:7", "b 243:7")
    f.grant([R("c 241:* rw"), R("c *:7 r")])
    assert opens(scratch_cgroup, [a, b, c, d]) == [True, True, True, False]
    f.grant([R("a *:* r")])
    assert opens(scratch_cgroup, [d]) == [True]
    assert opens(scratch_cgroup, [d], os.O_WRONLY) == [False]


def test_block_and_char_sharing_a_key_never_widen(scratch_cgroup, node_dir, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    blk, chr_ = nodes(node_dir, "b 240:9", "c 240:9")
    change = f.grant([R("b 240:9 r"), R("c 240:9 rw")])
    assert change.conflicts, "the collision is reported"
    # one entry, type both, only the access both asked for
    assert [str(r) for r, _m in f.rules()] == ["a 240:9 r"]
    assert opens(scratch_cgroup, [blk, chr_]) == [True, True]
    assert opens(scratch_cgroup, [blk, chr_], os.O_WRONLY) == [False, False]
    # same access: exact
    f.grant([R("b 240:10 rw"), R("c 240:10 rw")])
    assert ("a 240:10 rw", "own") in [(str(r), m) for r, m in f.rules()]


def test_growth_to_10000_entries_enforced_after_each_growth(scratch_cgroup, node_dir, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    probes = nodes(node_dir, "c 250:0", "c 250:1")
    granted = 0
    sizes = []
    batch_sizes = [40, 30, 60, 128, 300, 700, 1800, 3000, 3942]  # ends at exactly 10,000
    seen_ids = set()
    for batch in batch_sizes:
        rules = [Rule("c", 251 + (granted + i) // 4000, (granted + i) % 4000, "rw")
                 for i in range(batch)]
        granted += batch
        change = f.grant(rules)
        if change.grew_to:
            sizes.append(change.grew_to)
        ids = attached_ids(scratch_cgroup)
        assert len(ids) == 1, "exactly one program attached throughout"
        seen_ids.add(ids[0])
        # enforcement: the first and the newest granted devices open, unlisted ones do not
        first = make_node(node_dir, "c", 251, 0)
        last_rule = rules[-1]
        last = make_node(node_dir, "c", last_rule.major, last_rule.minor)
        assert opens(scratch_cgroup, [first, last] + probes) == [True, True, False, False]
    assert granted == 10000
    assert len(f.rules()) == 10000
    assert sizes == sorted(sizes) and sizes[-1] == 16384
    d = f.detect()
    assert d.base.max_entries == 16384 and d.mode == det.MODE_OWN


def test_fresh_process_sees_the_same_rules(scratch_cgroup, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    f.grant([R("c 240:1 r"), R("b 7:* rw"), R("c 136:* rw")])
    code = (
        "import json,sys; from libvirt_bpfcg.devfilter import DeviceFilter; "
        "from libvirt_bpfcg.state import StateDirs; "
        f"f = DeviceFilter({scratch_cgroup!r}, StateDirs({dirs.state_dir!r}, {dirs.bpffs!r})); "
        "print(json.dumps([f.mode] + sorted(str(r) for r, m in f.rules())))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == '["own", "b 7:* rw", "c 136:* rw", "c 240:1 r"]'


def test_libvirt_mode_overlay_never_writes_libvirt_map(scratch_cgroup, node_dir, dirs):
    libvirt_rules = [R("c 1:3 rw"), R("c 240:20 rw")]
    map_fd = install_libvirt_like(scratch_cgroup, libvirt_rules)
    try:
        f = DeviceFilter(scratch_cgroup, dirs)
        d = f.detect()
        assert d.mode == det.MODE_LIBVIRT and not d.overlay_installed
        before = read_entries(map_fd)
        lv_dev, extra, hotplugged, other = nodes(node_dir, "c 240:20", "c 240:21",
                                                 "c 240:22", "c 240:23")
        f.grant([R("c 240:21 rw")])
        d = f.detect()
        assert d.overlay_installed and d.base.id == bpf.map_info(map_fd).id
        assert read_entries(map_fd) == before, "libvirt's map is never written"
        assert opens(scratch_cgroup, [lv_dev, extra, hotplugged, other]) == \
            [True, True, False, False]
        # libvirt's own hotplug after our install writes to its cached map fd: still effective
        bpf.map_update(map_fd, bpf.key_bytes(encode_key(240, 22)),
                       bpf.value_bytes(R("c 240:22 rw").value))
        assert opens(scratch_cgroup, [hotplugged]) == [True]
        bpf.map_delete(map_fd, bpf.key_bytes(encode_key(240, 20)))
        assert opens(scratch_cgroup, [lv_dev]) == [False]
        labels = {(str(r), m) for r, m in f.rules()}
        assert ("c 240:21 rw", "overlay") in labels and ("c 1:3 rw", "libvirt") in labels
        # prog map order: libvirt's map first (libvirt re-detects map_ids[0])
        prog = d.attached
        assert prog.maps[0].id == bpf.map_info(map_fd).id
        assert prog.maps[1].name == devprog.OVERLAY_MAP_NAME
    finally:
        bpf.close(map_fd)


def test_libvirt_growth_drops_overlay_and_ensure_reinstalls_from_pins(
        scratch_cgroup, node_dir, dirs):
    map_fd = install_libvirt_like(scratch_cgroup, [R("c 1:3 rw")])
    try:
        f = DeviceFilter(scratch_cgroup, dirs)
        extra, denied = nodes(node_dir, "c 240:31", "c 240:32")
        f.grant([R("c 240:31 rw")])
        assert opens(scratch_cgroup, [extra, denied]) == [True, False]
        map_fd = libvirt_realloc(scratch_cgroup, map_fd)  # replaces our program
        d = f.detect()
        assert d.mode == det.MODE_LIBVIRT and not d.overlay_installed
        assert opens(scratch_cgroup, [extra]) == [False], "fail-closed until re-install"
        # the pinned overlay is still listed, and a re-install restores it
        assert ("c 240:31 rw", "overlay") in {(str(r), m) for r, m in f.rules()}
        change = f.ensure_overlay()
        assert change.installed
        d = f.detect()
        assert d.overlay_installed and d.base.id == bpf.map_info(map_fd).id
        assert d.base.max_entries == 128
        assert opens(scratch_cgroup, [extra, denied]) == [True, False]
        counts = {(x.major, x.minor): x.count for x in f.denials()}
        if devprog.denials_supported():
            assert counts[(240, 32)] == 2, "denial counts continue across the swap"
    finally:
        bpf.close(map_fd)


def test_stale_attach_is_redone_on_libvirts_new_map(scratch_cgroup, node_dir, dirs, mocker):
    """libvirt swaps programs between our detection and our attach: the revision check
    makes the attach fail (ESTALE) and the retry builds on libvirt's new map."""
    map_fd = install_libvirt_like(scratch_cgroup, [R("c 1:3 rw")])
    holder = {"fd": map_fd}
    real_attach = bpf.prog_attach
    calls = {"n": 0}

    def racing_attach(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            holder["fd"] = libvirt_realloc(scratch_cgroup, holder["fd"])
        return real_attach(*args, **kwargs)

    mocker.patch.object(bpf, "prog_attach", side_effect=racing_attach)
    try:
        f = DeviceFilter(scratch_cgroup, dirs)
        f.grant([R("c 240:41 rw")])
        d = f.detect()
        assert calls["n"] >= 2
        assert d.overlay_installed and d.base.id == bpf.map_info(holder["fd"]).id
    finally:
        bpf.close(holder["fd"])


def test_foreign_multi_program_is_refused(scratch_cgroup, dirs):
    prog_fd = devprog.load_linear_program([R("c 1:3 rw")])
    bpf.attach_to_cgroup(scratch_cgroup, prog_fd, bpf.BPF_F_ALLOW_MULTI)
    f = DeviceFilter(scratch_cgroup, dirs)
    assert f.mode == det.MODE_FOREIGN
    with pytest.raises(OperationError, match="ALLOW_MULTI"):
        f.grant([R("c 240:1 rw")])
    assert len(attached_ids(scratch_cgroup)) == 1


def test_foreign_exclusive_unknown_program_is_refused(scratch_cgroup, dirs):
    prog_fd = devprog.load_linear_program([R("c 1:3 rw")], name="someone_else")
    cg = bpf.open_cgroup(scratch_cgroup)
    try:
        bpf.prog_attach(cg, prog_fd, bpf.BPF_CGROUP_DEVICE, 0)
        before = bpf.prog_query(cg, bpf.BPF_CGROUP_DEVICE).prog_ids
    finally:
        bpf.close(cg)
        bpf.close(prog_fd)
    f = DeviceFilter(scratch_cgroup, dirs)
    assert f.mode == det.MODE_FOREIGN and "someone_else" in f.detect().reason
    with pytest.raises(OperationError, match="not libvirt's or ours"):
        f.grant([R("c 240:1 rw")])
    assert attached_ids(scratch_cgroup) == before


def test_ancestor_that_would_deny_is_reported(scratch_cgroup, node_dir, dirs):
    child = os.path.join(scratch_cgroup, "child")
    os.mkdir(child)
    # an ancestor program under ALLOW_MULTI still judges every open below it
    map_fd = devprog.create_libvirt_map()
    bpf.map_update(map_fd, bpf.key_bytes(R("c 1:3 rw").key), bpf.value_bytes(R("c 1:3 rw").value))
    prog_fd = devprog.load_libvirt_program(map_fd)
    bpf.attach_to_cgroup(scratch_cgroup, prog_fd, bpf.BPF_F_ALLOW_MULTI)
    bpf.close(map_fd)
    f = DeviceFilter(child, dirs)
    f.grant([R("c 1:3 rw")])  # the ancestor allows it too: fine
    with pytest.raises(OperationError, match="ancestor cgroup"):
        f.grant([R("c 240:50 rw")])


def test_cgroup2_root_is_refused(dirs):
    from libvirt_bpfcg.cgroup import cgroup2_root
    with pytest.raises(OperationError, match="cgroup2 root"):
        DeviceFilter(cgroup2_root(), dirs)


def test_vanished_cgroup_gives_a_clear_error(cgroup_parent, dirs):
    path = os.path.join(cgroup_parent, "gone")
    os.mkdir(path)
    f = DeviceFilter(path, dirs)
    os.rmdir(path)
    with pytest.raises(OperationError, match="does not exist"):
        f.grant([R("c 1:3 rw")])


def test_status_lists_rules_devices_capacity_and_denials(scratch_cgroup, node_dir, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    (denied,) = nodes(node_dir, "c 240:77")
    f.grant([R("c 1:3 rw"), R("c 1:5 r")])
    opens(scratch_cgroup, [denied, denied, "/dev/null"])
    status = f.status()
    assert status["mode"] == "own"
    assert status["programs"][0]["name"] == "bpfcg_dev"
    assert status["capacity"] == {"own": {"used": 2, "max": 64}}
    rules = {r["rule"]: r for r in status["rules"]}
    assert rules["c 1:3 rw"]["devices"] == ["/dev/null"] and rules["c 1:3 rw"]["map"] == "own"
    if devprog.denials_supported():
        (den,) = status["denials"]
        assert den["rule"] == "c 240:77" and den["count"] == 2 and den["access"] == "r"


def test_failed_growth_leaves_the_old_filter(scratch_cgroup, node_dir, dirs, mocker):
    """A crash point between filling the new map and attaching: the old program, its map and
    exactly the old grants stay; nothing of the failed call is left enforced."""
    f = DeviceFilter(scratch_cgroup, dirs)
    old = [Rule("c", 252, i, "rw") for i in range(64)]
    f.grant(old)
    prog_before = attached_ids(scratch_cgroup)
    entries_before = sorted(str(r) for r, _m in f.rules())
    mocker.patch.object(devprog, "load_device_program",
                        side_effect=bpf.BpfError("BPF_PROG_LOAD", errno.ENOMEM, "injected"))
    new = [Rule("c", 253, i, "rw") for i in range(10)]
    with pytest.raises(bpf.BpfError, match="injected"):
        f.grant(new)
    mocker.stopall()
    assert attached_ids(scratch_cgroup) == prog_before
    assert sorted(str(r) for r, _m in f.rules()) == entries_before
    old_node, new_node = nodes(node_dir, "c 252:63", "c 253:0")
    assert opens(scratch_cgroup, [old_node, new_node]) == [True, False]
    f.grant(new)  # and the next call converges
    assert opens(scratch_cgroup, [old_node, new_node]) == [True, True]


def test_runtime_grants_are_remembered_until_revoked(scratch_cgroup, dirs):
    f = DeviceFilter(scratch_cgroup, dirs)
    f.grant([R("c 1:3 rw")])  # derived from a domain: not a runtime grant
    f.grant([R("c 240:90 rw")], remember=True)
    assert [str(r) for r in f.runtime_grants()] == ["c 240:90 rw"]
    marks = {r["rule"]: r["runtime_grant"] for r in f.status()["rules"]}
    assert marks == {"c 1:3 rw": False, "c 240:90 rw": True}
    path = os.path.join(dirs.state_dir, "grants", f"{os.stat(scratch_cgroup).st_ino}.json")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600", "state files are root-only"
    f.revoke([R("c 240:90 rw")])
    assert f.runtime_grants() == [] and not os.path.exists(path)
