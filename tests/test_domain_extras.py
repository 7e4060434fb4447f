"""Extras in our <metadata> namespace: the documented format and its error messages."""

from __future__ import annotations

import pytest

from libvirt_bpfcg.domain import LOOKUP_CLASS, ORIGIN_EXTRA
from libvirt_bpfcg.domain_extras import NAMESPACE, extras_refs
from libvirt_bpfcg.errors import InputError
from libvirt_bpfcg.xmlsafe import parse_xml


def extras(body: str, wrapper: str = "extras") -> list:
    xml = (f"<domain><metadata><other xmlns='urn:other'><device path='/dev/nope'/></other>"
           f"<bpfcg:{wrapper} xmlns:bpfcg='{NAMESPACE}'>{body}</bpfcg:{wrapper}>"
           "</metadata></domain>")
    return extras_refs(parse_xml(xml))


def test_documented_example() -> None:
    refs = extras("""<bpfcg:device path="/dev/kvmfr0" access="rw"/>
        <bpfcg:rule>c 195:* rw</bpfcg:rule>
        <bpfcg:class access="rw" optional="yes">char-nvidia*</bpfcg:class>""")
    assert [(r.source, r.kind, r.access, r.path, str(r.rule) if r.rule else None,
             r.lookup and r.lookup.kind, r.required, r.origin) for r in refs] == [
        ("metadata/bpfcg:extras[1]/bpfcg:device[1]/@path", "extra-device", "rw",
         "/dev/kvmfr0", None, None, True, ORIGIN_EXTRA),
        ("metadata/bpfcg:extras[1]/bpfcg:rule[1]", "extra-rule", "rw", None, "c 195:* rw",
         None, False, ORIGIN_EXTRA),
        ("metadata/bpfcg:extras[1]/bpfcg:class[1]", "extra-class", "rw", None, None,
         LOOKUP_CLASS, False, ORIGIN_EXTRA)]


def test_virsh_metadata_style_unprefixed_children() -> None:
    """virsh metadata --set may leave children without the namespace: accepted."""
    xml = (f"<domain><metadata><bpfcg:anything xmlns:bpfcg='{NAMESPACE}'>"
           "<device path='/dev/uinput'/><rule>c 10:223 r</rule></bpfcg:anything>"
           "</metadata></domain>")
    refs = extras_refs(parse_xml(xml))
    assert [(r.path, str(r.rule) if r.rule else None) for r in refs] == [
        ("/dev/uinput", None), (None, "c 10:223 r")]
    assert refs[0].access == "rw"


def test_default_namespace_and_direct_entries() -> None:
    xml = (f"<domain><metadata><device xmlns='{NAMESPACE}' path='/dev/a' access='r'/>"
           "</metadata></domain>")
    refs = extras_refs(parse_xml(xml))
    assert [(r.source, r.path, r.access) for r in refs] == [
        ("metadata/bpfcg:device[1]/@path", "/dev/a", "r")]


def test_no_metadata() -> None:
    assert extras_refs(parse_xml("<domain/>")) == []
    assert extras_refs(parse_xml("<domain><metadata/></domain>")) == []


def test_counting_per_element() -> None:
    refs = extras("<bpfcg:device path='/dev/a'/><bpfcg:rule>b 8:* r</bpfcg:rule>"
                  "<bpfcg:device path='/dev/b' optional='yes'/>")
    assert [r.source for r in refs] == [
        "metadata/bpfcg:extras[1]/bpfcg:device[1]/@path",
        "metadata/bpfcg:extras[1]/bpfcg:rule[1]",
        "metadata/bpfcg:extras[1]/bpfcg:device[2]/@path"]
    assert [r.required for r in refs] == [True, False, False]


@pytest.mark.parametrize("body, message", [
    ("<bpfcg:device/>", "absolute path"),
    ("<bpfcg:device path='dev/x'/>", "absolute path"),
    ("<bpfcg:device path='/dev/x' access='w'/>", "access must be r, rw or rwm"),
    ("<bpfcg:device path='/dev/x' access='rwx'/>", "access must be r, rw or rwm"),
    ("<bpfcg:device path='/dev/x' optional='maybe'/>", "'yes' or 'no'"),
    ("<bpfcg:device path='/dev/x' acess='rw'/>", "unknown attribute 'acess'"),
    ("<bpfcg:rule>c 195 rw</bpfcg:rule>", "bad rule"),
    ("<bpfcg:rule>x 1:2 rw</bpfcg:rule>", "bad device type"),
    ("<bpfcg:rule>c 1:3 w</bpfcg:rule>", "access must be r, rw or rwm"),
    ("<bpfcg:rule/>", "bad rule"),
    ("<bpfcg:class>nvidia</bpfcg:class>", "char-NAME or block-NAME"),
    ("<bpfcg:class>char-</bpfcg:class>", "char-NAME or block-NAME"),
    ("<bpfcg:devices path='/dev/x'/>", "unknown element"),
])
def test_bad_extras_name_the_element(body: str, message: str) -> None:
    with pytest.raises(InputError, match="metadata/bpfcg:extras") as info:
        extras(body)
    assert message in str(info.value)
