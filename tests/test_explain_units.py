"""explain's pure parts: the DEVICE argument, libvirt's lookup order with the deciding key,
and the suggestions (a metadata snippet that keeps existing extras, shell-safe commands)."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from libvirt_bpfcg.domain_extras import NAMESPACE, extras_refs
from libvirt_bpfcg.errors import RuleError, UsageError
from libvirt_bpfcg.explain import (
    DeviceQuery,
    allow_command,
    evaluate_entries,
    extras_entries,
    extras_snippet,
    metadata_access,
    metadata_command,
    parse_device,
    why_not,
)
from libvirt_bpfcg.rules import Rule, allows, encode_key

R = Rule.parse


@pytest.mark.parametrize("words, expected", [
    (["c 1:3"], ("c", 1, 3, "rw", None)),
    (["c", "1:3"], ("c", 1, 3, "rw", None)),
    (["b", "7:2", "r"], ("b", 7, 2, "r", None)),
    (["b 7:2 mw"], ("b", 7, 2, "wm", None)),
    (["/dev/null"], ("c", 1, 3, "rw", "/dev/null")),
    (["/dev/null", "r"], ("c", 1, 3, "r", "/dev/null")),
    (["/dev/zero w"], ("c", 1, 5, "w", "/dev/zero")),
])
def test_device_forms(words, expected):
    q = parse_device(words)
    assert (q.type, q.major, q.minor, q.access, q.path) == expected


def test_a_symlink_is_followed_and_kept_as_given(tmp_path):
    link = tmp_path / "null-link"
    link.symlink_to("/dev/null")
    q = parse_device([str(link)])
    assert (q.type, q.major, q.minor, q.path) == ("c", 1, 3, str(link))


@pytest.mark.parametrize("words, message", [
    (["c *:3"], "wildcard"),
    (["c 1:*"], "wildcard"),
    (["a 1:3"], "name one"),
    (["c 1:3 rx"], "bad access"),
    (["c 1"], "MAJOR:MINOR"),
    (["dev/null"], "absolute path"),
    (["/nonexistent/dev"], "no such device node"),
    (["/etc/hostname"], "not a device node"),
    (["/dev/null", "r", "w"], r"PATH \[ACCESS\]"),
])
def test_bad_devices_are_usage_errors(words, message):
    with pytest.raises(RuleError, match=message) as info:
        parse_device(words)
    assert info.value.exit_code == 2


def test_no_device_is_a_usage_error():
    with pytest.raises(UsageError):
        parse_device([])


def entries(*rules: str):
    return {R(r).key: R(r).value for r in rules}


def test_the_first_allowing_key_in_libvirts_order_is_reported():
    q = DeviceQuery("c", 4, 7, "r")
    hits = evaluate_entries(entries("c *:* r", "c 4:* r", "c 4:7 w"), q)
    assert [(h.kind, h.allows) for h in hits] == [("exact", False), ("major:*", True),
                                                  ("*:*", True)]
    assert why_not(hits[0], q) == "no r access"


def test_a_key_of_the_other_type_falls_through():
    q = DeviceQuery("c", 240, 1, "r")
    hits = evaluate_entries(entries("b 240:1 rw", "c *:1 r"), q)
    assert [(h.kind, h.allows) for h in hits] == [("exact", False), ("*:minor", True)]
    assert why_not(hits[0], q).startswith("type char")


def test_a_dead_entry_allows_nothing_and_says_so():
    q = DeviceQuery("c", 1, 3, "r")
    (hit,) = evaluate_entries({encode_key(1, 3): 0x2}, q)  # type bits, no access
    assert not hit.allows and "dead entry" in hit.describe()


numbers = st.integers(min_value=0, max_value=6)
maybe = st.one_of(st.none(), numbers)
accesses = st.sampled_from(["r", "w", "m", "rw", "rm", "wm", "rwm"])
rule_st = st.builds(Rule, st.sampled_from(["a", "b", "c"]), maybe, maybe, accesses)


@given(st.lists(rule_st, max_size=8), st.sampled_from(["b", "c"]), numbers, numbers, accesses)
def test_explain_agrees_with_libvirts_lookup(rules, dev_type, major, minor, access):
    raw = {rule.key: rule.value for rule in rules}
    hits = evaluate_entries(raw, DeviceQuery(dev_type, major, minor, access))
    assert any(h.allows for h in hits) == allows(raw, dev_type, major, minor, access)


@pytest.mark.parametrize("access, expected", [("r", "r"), ("w", "rw"), ("rw", "rw"),
                                              ("m", "rwm"), ("rm", "rwm")])
def test_metadata_access_is_the_smallest_choice_that_covers(access, expected):
    assert metadata_access(access) == expected


DOMAIN_WITH_EXTRAS = f"""<domain><name>vm1</name><metadata>
  <other:thing xmlns:other="urn:other"/>
  <bpfcg:extras xmlns:bpfcg="{NAMESPACE}">
    <bpfcg:device path="/dev/kvmfr0" access="rw"/>
    <rule>c 195:* rw</rule>
    <bpfcg:class access="r" optional="yes">char-nvidia*</bpfcg:class>
  </bpfcg:extras>
</metadata></domain>"""


def as_virsh_sets_it(snippet: str) -> etree._Element:
    """virsh metadata --uri NS --set puts the snippet's root into NS (children may stay
    unqualified): the domain as libvirt would store it."""
    inner = etree.fromstring(snippet)
    inner.tag = f"{{{NAMESPACE}}}extras"
    domain = etree.fromstring("<domain><name>vm1</name><metadata/></domain>")
    domain.find("metadata").append(inner)
    return domain


def test_snippet_keeps_existing_extras_and_adds_the_device():
    existing = extras_entries(etree.fromstring(DOMAIN_WITH_EXTRAS))
    assert len(existing) == 3
    snippet = extras_snippet(DeviceQuery("b", 7, 3, "r", "/dev/loop3"), existing)
    refs = extras_refs(as_virsh_sets_it(snippet))
    assert [(r.kind, r.path, str(r.rule) if r.rule else None, r.access) for r in refs] == [
        ("extra-device", "/dev/kvmfr0", None, "rw"),
        ("extra-rule", None, "c 195:* rw", "rw"),
        ("extra-class", None, None, "r"),
        ("extra-device", "/dev/loop3", None, "r"),
    ]
    assert 'optional="yes"' in snippet and "nvidia" in snippet


def test_snippet_by_numbers_is_a_rule():
    snippet = extras_snippet(DeviceQuery("c", 240, 1, "w"), [])
    assert snippet == "<extras><rule>c 240:1 rw</rule></extras>"
    (ref,) = extras_refs(as_virsh_sets_it(snippet))
    assert str(ref.rule) == "c 240:1 rw"


def test_commands_survive_the_shell():
    q = DeviceQuery("b", 7, 3, "rw", "/dev/disk/by-id/it's here")
    command = allow_command({"domain": "my vm", "cgroup": None}, q)
    assert shlex.split(command) == ["libvirt-bpfcg", "allow", "--domain", "my vm",
                                    "/dev/disk/by-id/it's here rw"]
    command = allow_command({"domain": None, "cgroup": "/sys/fs/cgroup/x"},
                            DeviceQuery("c", 1, 3, "r"))
    assert shlex.split(command)[-3:] == ["--cgroup", "/sys/fs/cgroup/x", "c 1:3 r"]
    snippet = extras_snippet(q, [])
    argv = shlex.split(metadata_command("my vm", snippet))
    assert argv[:3] == ["virsh", "metadata", "my vm"] and argv[-1] == snippet
    assert argv[argv.index("--uri") + 1] == NAMESPACE and "--live" in argv and "--config" in argv


def test_without_live_xml_the_hooks_saved_plan_gives_the_source():
    from libvirt_bpfcg.explain import DomainContext, KeyHit, sources_for

    ctx = DomainContext("vm1", saved={"name": "vm1", "rules": ["c 1:3 rw", "c 240:8 rw"],
                                      "extra_rules": ["c 240:8 rw"]},
                        plan_source="the hook's plan in /run/libvirt-bpfcg/domains")
    extra = R("c 240:8 rw")
    (source,) = sources_for(KeyHit("exact", extra.key, extra.value, True), "overlay", ctx, [])
    assert (source.kind, source.where) == ("extra", ctx.plan_source)
    null = R("c 1:3 rw")
    (source,) = sources_for(KeyHit("exact", null.key, null.value, True), "libvirt", ctx, [])
    assert source.kind == "hook-plan"
    other = R("c 1:5 rw")
    (source,) = sources_for(KeyHit("exact", other.key, other.value, True), "libvirt", ctx, [])
    assert source.kind == "outside"
