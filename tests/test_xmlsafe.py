"""Hardened parsing: hostile and broken documents give one clean InputError, never more."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_bpfcg.config import Config
from libvirt_bpfcg.errors import EXIT_USAGE, InputError
from libvirt_bpfcg.plan import plan_document
from libvirt_bpfcg.xmlsafe import MAX_INPUT_BYTES, expect_root, parse_xml, read_input

XXE_FILE = b"""<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain type='kvm'><name>&xxe;</name></domain>"""

XXE_NETWORK = b"""<!DOCTYPE domain [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]>
<domain><name>&x;</name></domain>"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol9 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
]>
<domain><name a="&lol9;">&lol9;</name></domain>"""

EXTERNAL_DTD = b"""<!DOCTYPE domain SYSTEM "file:///etc/libvirt/x.dtd"><domain/>"""


def one_line_error(data: object, **kwargs: object) -> str:
    with pytest.raises(InputError) as info:
        parse_xml(data, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert info.value.exit_code == EXIT_USAGE
    return message


@pytest.mark.parametrize("doc", [XXE_FILE, XXE_NETWORK, BILLION_LAUGHS, EXTERNAL_DTD])
def test_entities_and_dtds_are_refused(doc: bytes) -> None:
    message = one_line_error(doc)
    assert "DOCTYPE" in message and "not allowed" in message
    assert "root:" not in message  # nothing of /etc/passwd


def test_entity_declaration_alone_is_refused() -> None:
    assert "ENTITY" in one_line_error(b"<domain><!ENTITY x 'y'></domain>")


def test_undefined_entity_is_not_expanded() -> None:
    assert "not well-formed" in one_line_error(b"<domain><name>&xxe;</name></domain>")


def test_predefined_entities_and_char_refs_still_work() -> None:
    root = parse_xml(b"<domain><name>a&amp;b&#65;&lt;</name></domain>")
    assert root.findtext("name") == "a&bA<"


@pytest.mark.parametrize("data, expected", [
    (b"", "empty input"),
    (b"  \n\t ", "empty input"),
    ("", "empty input"),
    (b"\xef\xbb\xbf", "empty input"),
    (b"<domain><name>\xff</name></domain>", "not UTF-8 (invalid byte 0xff at offset 14)"),
    (b"<domain>\xc3</domain>", "not UTF-8"),
    ("<domain>\ud800</domain>", "not encodable as UTF-8"),
    (b"\xff\xfe<\x00d\x00/\x00>\x00", "NUL byte"),
    (b"<domain><name>x</domain>", "not well-formed XML"),
    (b"<domain/><domain/>", "not well-formed XML"),
    (b"just text", "not well-formed XML"),
])
def test_unusable_input(data: object, expected: str) -> None:
    assert expected in one_line_error(data)


def test_too_big() -> None:
    data = b"<domain>" + b" " * MAX_INPUT_BYTES + b"</domain>"
    assert "more than" in one_line_error(data)


def test_deep_nesting_is_limited() -> None:
    depth = 20000  # beyond libxml2's limit without XML_PARSE_HUGE
    data = b"<a>" * depth + b"</a>" * depth
    assert "not well-formed" in one_line_error(data)


def test_bom_and_declared_encodings() -> None:
    assert parse_xml(b"\xef\xbb\xbf<domain/>").tag == "domain"
    # libvirt writes UTF-8; a false declaration cannot make us decode as something else.
    root = parse_xml('<?xml version="1.0" encoding="ISO-8859-1"?><domain><name>é</name>'
                     '</domain>'.encode())
    assert root.findtext("name") == "é"
    assert parse_xml("<domain><name>ü</name></domain>").findtext("name") == "ü"


def test_wrong_root() -> None:
    root = parse_xml(b"<network/>")
    with pytest.raises(InputError, match=r"root element is <network>, expected <domain>"):
        expect_root(root, ("domain",))


def test_plan_refuses_non_domain_root() -> None:
    with pytest.raises(InputError, match="<network>"):
        plan_document(b"<network><name>x</name></network>", Config(qemu_conf="/nonexistent"))


def test_read_input(tmp_path) -> None:
    path = tmp_path / "d.xml"
    path.write_bytes(b"<domain/>")
    assert read_input(str(path)) == b"<domain/>"
    with pytest.raises(InputError, match="no such file"):
        read_input(str(tmp_path / "missing.xml"))
    with pytest.raises(InputError, match="is a directory"):
        read_input(str(tmp_path))


def test_read_stdin() -> None:
    import io

    class Stdin:
        buffer = io.BytesIO(b"<domain/>")

    assert read_input("-", stdin=Stdin()) == b"<domain/>"


# ---------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, parse_xml and the whole planner raise only InputError.

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_parse_bytes(data: bytes) -> None:
    with contextlib.suppress(InputError):
        parse_xml(data)


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_parse_text(data: str) -> None:
    with contextlib.suppress(InputError):
        parse_xml(data)


# Domain documents assembled from the element and attribute names the planner looks at,
# with hostile values: the planner must plan them or refuse them cleanly.
TAGS = ["disk", "source", "backingStore", "mirror", "dataStore", "reservations", "hostdev",
        "address", "vendor", "product", "adapter", "driver", "interface", "serial", "console",
        "channel", "parallel", "tpm", "backend", "device", "input", "rng", "memory", "path",
        "graphics", "gl", "video", "model", "acceleration", "sound", "readonly", "os",
        "loader", "nvram", "metadata", "launchSecurity"]
ATTRS = ["type", "device", "file", "dev", "dir", "pool", "volume", "mode", "protocol",
         "managed", "startupPolicy", "fdgroup", "domain", "bus", "slot", "function", "id",
         "name", "uuid", "target", "unit", "path", "evdev", "rendernode", "enable", "blob",
         "readonly", "model", "iommufd", "access", "optional"]
VALUES = st.one_of(
    st.sampled_from(["file", "block", "dir", "volume", "nvme", "network", "pci", "usb",
                     "scsi", "mdev", "dev", "evdev", "passthrough", "random", "yes", "on",
                     "sev", "sev-snp", "sgx-epc", "nvdimm", "0x1f", "08", "0xzz", "-1", "",
                     "/dev/null", "/dev/mem", "/dev/../dev/zero", "relative/path",
                     "scsi_host0", "scsi_hostX", "4294967296", "optional", "egl-headless"]),
    st.text(max_size=12))


@st.composite
def element(draw: st.DrawFn, depth: int = 0) -> str:
    tag = draw(st.sampled_from(TAGS))
    attrs = draw(st.dictionaries(st.sampled_from(ATTRS), VALUES, max_size=4))
    rendered = "".join(f' {key}="{_escape(value)}"' for key, value in attrs.items())
    # Three levels (disk/source/reservations, hostdev/source/address, video/model/accel)
    # reach every branch; deeper trees only slow generation down.
    children = draw(st.lists(element(depth + 1), max_size=3 - depth)) if depth < 2 else []
    text = _escape(draw(st.one_of(st.just(""), VALUES)))
    return f"<{tag}{rendered}>{text}{''.join(children)}</{tag}>"


def _escape(text: str) -> str:
    """Keep only characters XML allows, then escape the markup ones."""
    text = "".join(ch for ch in text if ch in "\t\n\r" or (
        ord(ch) >= 0x20 and not 0xD800 <= ord(ch) <= 0xDFFF and ch not in "\ufffe\uffff"))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(element(), max_size=4), st.booleans())
def test_fuzz_plan_domains(children: list, snippet: bool) -> None:
    config = Config(qemu_conf="/nonexistent/qemu.conf", libvirt_version="10.1.0",
                    sysfs_root=os.path.join(os.sep, "nonexistent-sysfs"))
    if snippet and children:
        document = children[0]
    else:
        document = "<domain><devices>" + "".join(children) + "</devices>" + \
            "".join(children[:1]) + "</domain>"
    try:
        plan = plan_document(document, config)
    except InputError:
        return
    plan.to_json()
