"""Hostile domain XML for the fuzz tests (tests/test_fuzz_*.py).

Three sources:

* **mutated real devices** — every device element of the libvirt corpus
  (``<repo>/../shared/corpus/libvirt``), plus templates that reach every path-taking device
  kind, with attribute values and texts replaced by hostile values: ``../`` paths, newlines,
  control characters (raw, or as character references), huge strings, lone surrogates
  (invalid UTF-8 once encoded), numbers out of range, device nodes outside /dev that carry
  /dev/mem's numbers, symlink loops;
* **byte-level mutations** of those documents: truncation, flipped bytes, invalid UTF-8
  sequences, deleted or duplicated slices, a BOM, UTF-16;
* **fixed hostile documents** (``hostile_documents``): XXE (file:// and http://, parameter
  entities, external DTD), billion laughs, quadratic blow-up, XInclude, 50 MB documents,
  deep nesting, NULs, empty input.

Documents are built as text by our own serializer: lxml refuses to *write* most of what a
hostile peer can send (control characters in attributes, broken escaping).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

from hypothesis import strategies as st
from lxml import etree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.normpath(os.path.join(ROOT, "..", "shared", "corpus", "libvirt"))
EXTRAS_NS = "https://libvirt-bpfcg.org/xmlns/extras/1"

# Escaping of one value: "esc" (XML-escaped, control characters raw), "ref" (control
# characters as &#N; references, invalid in XML 1.0), "raw" (not escaped at all).
ESCAPES = ("esc",) * 6 + ("ref", "raw")


class Node(NamedTuple):
    """An element: tag, [[name, value, escape]], [text or None, escape], children. The
    lists are what mutations change in place."""

    tag: str
    attrs: List[List[str]]
    text: List[str | None]
    children: List[Node]


# --------------------------------------------------------------------------------------------
# Templates


def _from_lxml(el: etree._Element) -> Node | None:
    if not isinstance(el.tag, str) or el.tag.startswith("{"):
        return None  # other namespaces: kept out (they are metadata, not devices)
    attrs = [[k, v, "esc"] for k, v in el.attrib.items() if not k.startswith("{")]
    text = el.text.strip() if el.text and el.text.strip() else None
    children = [c for c in (_from_lxml(ch) for ch in el) if c is not None]
    return Node(el.tag, attrs, [text, "esc"], children)


def _parse_template(text: str) -> Node:
    node = _from_lxml(etree.fromstring(text))
    assert node is not None
    return node


# Every kind of device that names a host path, so each fuzz run reaches them all (the corpus
# has most of them, but not in every shape).
BUILTIN_TEMPLATES = [
    "<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vda'/></disk>",
    "<disk type='block' device='cdrom'><source dev='/dev/sr0'/><target dev='hdc'/>"
    "<readonly/></disk>",
    "<disk type='file' device='disk'><source file='/var/lib/x.qcow2'/>"
    "<backingStore type='block'><format type='raw'/><source dev='/dev/loop0'/>"
    "<backingStore/></backingStore><target dev='vdb'/></disk>",
    "<disk type='volume' device='disk'><source pool='default' volume='v.img'/>"
    "<target dev='vdc'/></disk>",
    "<disk type='nvme' device='disk'><source type='pci' managed='yes' namespace='1'>"
    "<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>"
    "<target dev='vde'/></disk>",
    "<hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block></source>"
    "</hostdev>",
    "<hostdev mode='capabilities' type='misc'><source><char>/dev/input/event3</char></source>"
    "</hostdev>",
    "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
    "<address domain='0x0000' bus='0x06' slot='0x12' function='0x5'/></source></hostdev>",
    "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/>"
    "<product id='0xbeef'/><address bus='1' device='3'/></source></hostdev>",
    "<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host0'/>"
    "<address bus='0' target='0' unit='0'/></source></hostdev>",
    "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
    "<address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source></hostdev>",
    "<serial type='dev'><source path='/dev/ttyS0'/><target port='0'/></serial>",
    "<parallel type='dev'><source path='/dev/parport0'/></parallel>",
    "<channel type='dev'><source path='/dev/ttyS1'/><target type='virtio'/></channel>",
    "<console type='dev'><source path='/dev/ttyS2'/></console>",
    "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend>"
    "</tpm>",
    "<input type='evdev'><source dev='/dev/input/event1' grab='all'/></input>",
    "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event2'/></input>",
    "<rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>",
    "<memory model='nvdimm'><source><path>/dev/pmem0</path></source>"
    "<target><size unit='KiB'>524288</size></target></memory>",
    "<graphics type='spice'><gl enable='yes' rendernode='/dev/dri/renderD128'/></graphics>",
    "<video><model type='virtio'><acceleration accel3d='yes' rendernode='/dev/dri/renderD129'/>"
    "</model></video>",
    "<interface type='vdpa'><source dev='/dev/vhost-vdpa-0'/></interface>",
    "<interface type='ethernet'><target dev='tap0'/></interface>",
    "<sound model='ich9'/>",
    "<shmem name='my_shmem0'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>",
]

OS_TEMPLATE = ("<os><type arch='x86_64' machine='q35'>hvm</type>"
               "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
               "<nvram>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram></os>")


def load_templates(corpus: str = CORPUS) -> List[Node]:
    """Device elements of the libvirt corpus (domains and hotplug snippets) + builtins."""
    files = sorted(glob.glob(os.path.join(corpus, "**", "*.xml"), recursive=True))
    if len(files) < 100:
        raise RuntimeError(f"libvirt corpus not found at {corpus} ({len(files)} files)")
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    seen, templates = set(), []
    for path in files:
        try:
            root = etree.parse(path, parser).getroot()
        except etree.XMLSyntaxError:
            continue
        devices = root.find("devices") if root.tag == "domain" else None
        elements = list(devices) if devices is not None else [root]
        if root.tag == "domain" and root.find("os") is not None:
            elements.append(root.find("os"))
        for el in elements:
            key = etree.tostring(el)
            if key in seen or el.tag == "emulator":
                continue
            seen.add(key)
            node = _from_lxml(el)
            if node is not None:
                templates.append(node)
    templates += [_parse_template(t) for t in BUILTIN_TEMPLATES + [OS_TEMPLATE]]
    return templates


# --------------------------------------------------------------------------------------------
# Hostile values

FIXED_VALUES = [
    "/dev/mem", "/dev/kmem", "/dev/port", "/dev/../dev/mem", "/dev/./mem", "//dev//mem",
    "/dev/null/../mem", "../../../../etc/shadow", "../dev/mem", "dev/mem", "./mem",
    "/dev/" + "../" * 40 + "etc/passwd", "/proc/self/root/dev/mem", "/proc/self/fd/0",
    "/dev/stdin", "/dev/tty", "/dev/null", "/dev/zero", "/dev/kvm", "/dev/sda", "/dev/loop0",
    "/dev/vfio/vfio", "/dev/mapper/control", "/sys/kernel", "/", "", " ", "\n", "\t",
    "/dev/null\n", "/dev/nu\nll", "\n/dev/null", "/dev/\x01null", "/dev/\x1b[31mred",
    "/dev/null\r\n<injected/>", "'\"<&>", "&amp;", "]]>", "-1", "0", "0x1", "0xffffffff",
    "4294967296", "99999999999999999999999", "1e9", "scsi_host", "scsi_host-1",
    "scsi_host99999999999", "c 1:1 rw", "c 1:2 rw", "c 1:4 rw", "c 1:* rw", "c *:1 r",
    "a *:* rwm", "b *:* rw", "c *:* r", "b 8:* rw", "c 136:* rw", "c 1:3", "c 1:3 rwx",
    "c -1:3 r", "c 4294967295:0 r", "c 1:3 r extra", "char-mem", "char-*", "block-*",
    "char-", "*", "rwm", "rwx", "yes", "no", "on", "../../../../../../../../../../../tmp/x",
    "00000000-0000-0000-0000-000000000000", "\u202e/dev/null", "/dev/\u00fc",
    "/dev/\ud800", "\udcff", "\U0001f4a9",
]


def huge(draw_size: int) -> str:
    return "/" + "a" * draw_size


def hostile_values(paths: Sequence[str]) -> st.SearchStrategy[str]:
    """Any one value an attacker could put in an attribute or text."""
    controls = "".join(chr(c) for c in range(1, 32)) + "\x7f"
    paths = list(paths)
    # Weighted towards values that keep the document well-formed (so that they reach the
    # planner's path handling); one control character anywhere refuses the whole document.
    return weighted(
        (4, st.sampled_from(FIXED_VALUES + paths)),
        (2, st.sampled_from(paths).map(lambda p: p + "/../" + os.path.basename(p))),
        (1, st.text(alphabet=st.sampled_from(controls + "/.-_:*abc019 \\&<>'\"\u00e9"),
                    max_size=40)),
        (1, st.text(max_size=20)),  # anything, lone surrogates included
        (1, st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str)),
        (1, st.sampled_from((300, 5000, 70_000)).map(huge)),
    )


def weighted(*choices: Tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """one_of with weights (one_of itself merges equal branches and picks evenly)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


# --------------------------------------------------------------------------------------------
# Documents


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _escape(value: str, mode: str, quote: bool) -> str:
    if mode == "raw":
        return value
    value = (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
    if quote:
        value = value.replace("'", "&apos;")
    if mode == "ref":
        value = _CONTROL.sub(lambda m: f"&#{ord(m.group())};", value)
    return value


def render(node: Node, out: List[str]) -> None:
    out.append("<" + node.tag)
    for name, value, mode in node.attrs:
        out.append(f" {name}='{_escape(value, mode, quote=True)}'")
    text, mode = node.text
    if text is None and not node.children:
        out.append("/>")
        return
    out.append(">")
    if text is not None:
        out.append(_escape(text, mode or "esc", quote=False))
    for child in node.children:
        render(child, out)
    out.append(f"</{node.tag}>")


def _copy(node: Node) -> Node:
    return Node(node.tag, [list(a) for a in node.attrs], list(node.text),
                [_copy(c) for c in node.children])


def _slots(node: Node, found: List[Tuple[Node, int]]) -> List[Tuple[Node, int]]:
    """Every attribute (index ≥ 0) and text (-1) of a tree, as mutation targets."""
    for index in range(len(node.attrs)):
        found.append((node, index))
    found.append((node, -1))
    for child in node.children:
        _slots(child, found)
    return found


JUNK = [
    "<!-- a comment -->", "<![CDATA[<devices/>]]>", "<?php echo 1; ?>",
    "<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='file:///etc/passwd' "
    "parse='text'/>", "&xxe;", "&#0;", "&#xD800;", "&lt;", "<!-- <!DOCTYPE x> -->",
    "<foo:bar xmlns:foo='http://example.invalid/'/>", "</devices>", "<devices>",
]
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80",
            b"\xf8\x88\x80\x80", b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80"]
# Most documents stay well-formed so that they reach the planner; the rest are broken.
MUTATIONS = ("none",) * 14 + ("truncate", "flip", "bad-utf8", "delete", "duplicate", "bom",
                              "utf16", "nul")


class Generator:
    """The strategies, built once (hypothesis strategies are costly to create per draw)."""

    def __init__(self, templates: Sequence[Node], paths: Sequence[str]) -> None:
        self.templates = list(templates)
        self.values = hostile_values(paths)
        self.escapes = st.sampled_from(ESCAPES)
        self.template_index = st.integers(0, len(self.templates) - 1)
        self.names = weighted((2, st.sampled_from(("guest", "foo=1,bar=2", "../../etc/x"))),
                              (1, self.values))
        self.uuids = weighted((3, st.uuids().map(str)), (1, self.values))
        self.junk = st.sampled_from(JUNK)
        self.kinds = st.sampled_from(("device", "device", "rule", "rule", "class", "bogus"))
        self.accesses = st.sampled_from(("r", "rw", "rwm", "x", ""))
        self.bogus = st.sampled_from(("x", "device2", "rules"))
        self.mutations = st.sampled_from(MUTATIONS)
        self.bad = st.sampled_from(BAD_UTF8)
        self.devices = st.lists(self.device(), max_size=8)
        self.ids = weighted((5, st.integers(1, 9999).map(str)), (1, self.values))
        self.documents = self.document()

    @st.composite
    def device(draw, self) -> Node:  # noqa: N805 - composite passes draw first
        node = _copy(self.templates[draw(self.template_index)])
        slots = _slots(node, [])
        for _ in range(draw(st.integers(0, 3))):
            target, index = slots[draw(st.integers(0, len(slots) - 1))]
            value, mode = draw(self.values), draw(self.escapes)
            if index >= 0:
                target.attrs[index][1:] = [value, mode]
            else:
                target.text[:] = [value, mode]  # beside children too: mixed content
        return node

    @st.composite
    def extras(draw, self) -> str:  # noqa: N805
        """Our <metadata> extras with hostile paths, rules and classes."""
        entries = []
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(self.kinds)
            text = _escape(draw(self.values), draw(self.escapes), quote=True)
            access = draw(self.accesses)
            if kind == "device":
                entries.append(f"<bpfcg:device path='{text}' access='{access}'/>")
            elif kind == "rule":
                entries.append(f"<bpfcg:rule>{text}</bpfcg:rule>")
            elif kind == "class":
                entries.append(f"<bpfcg:class access='{access}'>{text}</bpfcg:class>")
            else:
                entries.append(f"<bpfcg:{draw(self.bogus)}/>")
        return (f"<metadata><bpfcg:extras xmlns:bpfcg='{EXTRAS_NS}'>{''.join(entries)}"
                "</bpfcg:extras></metadata>")

    @st.composite
    def text(draw, self) -> str:  # noqa: N805
        head = "<domain type='kvm'"
        if draw(st.booleans()):
            head += f" id='{_escape(draw(self.ids), draw(self.escapes), True)}'"
        parts = [head + ">"]
        parts.append(f"<name>{_escape(draw(self.names), draw(self.escapes), False)}</name>")
        if draw(st.integers(0, 9)):
            parts.append(f"<uuid>{_escape(draw(self.uuids), draw(self.escapes), False)}"
                         "</uuid>")
        devices = draw(self.devices)
        out: List[str] = []
        for node in [d for d in devices if d.tag == "os"][:1]:
            render(node, out)
        out.append("<devices>")
        for node in devices:
            if node.tag != "os":
                render(node, out)
        out.append("</devices>")
        parts.append("".join(out))
        if draw(st.booleans()):
            parts.append(draw(self.extras()))
        if not draw(st.integers(0, 4)):
            parts.insert(draw(st.integers(1, len(parts))), draw(self.junk))
        parts.append("</domain>")
        return "".join(parts)

    @st.composite
    def document(draw, self) -> bytes:  # noqa: N805
        data = draw(self.text()).encode("utf-8", "surrogatepass")  # surrogates: bad UTF-8
        kind = draw(self.mutations)
        if kind == "none" or not data:
            return data
        i, j = sorted((draw(st.integers(0, len(data) - 1)), draw(st.integers(0, len(data) - 1))))
        if kind == "truncate":
            return data[:i]
        if kind == "flip":
            return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
        if kind == "bad-utf8":
            return data[:i] + draw(self.bad) + data[i:]
        if kind == "delete":
            return data[:i] + data[j:]
        if kind == "duplicate":
            return data[:j] + data[i:j] + data[j:]
        if kind == "bom":
            return b"\xef\xbb\xbf" + data
        if kind == "utf16":
            return data.decode("utf-8", "replace").encode("utf-16")
        return data[:i] + b"\x00" + data[i:]


def domain_documents(templates: Sequence[Node], paths: Sequence[str]) -> st.SearchStrategy:
    """Hostile domain documents (bytes)."""
    return Generator(templates, paths).documents


# --------------------------------------------------------------------------------------------
# Host objects that look like devices, and fixed hostile documents


def make_hostile_nodes(directory: str) -> Dict[str, str]:
    """Device nodes outside /dev with /dev/mem's (and kmem's, port's) numbers, symlink
    loops, and things that are no device at all."""
    def node(name: str, major: int, minor: int, block: bool = False) -> str:
        path = os.path.join(directory, name)
        os.mknod(path, (0o060000 if block else 0o020000) | 0o600, os.makedev(major, minor))
        return path

    paths = {"mem": node("mem-alias", 1, 1), "kmem": node("kmem-alias", 1, 2),
             "port": node("port-alias", 1, 4), "null": node("null-alias", 1, 3),
             "blk11": node("block-1-1", 1, 1, block=True)}
    loop_a, loop_b = os.path.join(directory, "loop-a"), os.path.join(directory, "loop-b")
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    paths["loop"] = loop_a
    paths["self-loop"] = os.path.join(directory, "self")
    os.symlink(paths["self-loop"], paths["self-loop"])
    paths["through-loop"] = os.path.join(loop_a, "x")
    paths["link-to-mem"] = os.path.join(directory, "link-to-mem")
    os.symlink(paths["mem"], paths["link-to-mem"])
    chain = paths["mem"]
    for index in range(45):  # more links than the kernel follows (ELOOP)
        link = os.path.join(directory, f"chain{index}")
        os.symlink(chain, link)
        chain = link
    paths["long-chain"] = chain
    paths["dir"] = os.path.join(directory, "a-dir")
    os.mkdir(paths["dir"])
    paths["fifo"] = os.path.join(directory, "a-fifo")
    os.mkfifo(paths["fifo"])
    paths["file"] = os.path.join(directory, "a-file")
    with open(paths["file"], "w", encoding="ascii") as handle:
        handle.write("x")
    paths["missing"] = os.path.join(directory, "missing")
    return paths


FORBIDDEN_NUMBERS = {(1, 1), (1, 2), (1, 4)}  # /dev/mem, /dev/kmem, /dev/port


def _wrap(devices: str, name: str = "hostile", extra: str = "") -> bytes:
    return (f"<domain type='kvm'><name>{name}</name>"
            f"<uuid>6a1b2c3d-0000-4000-8000-00000000000{len(name) % 10}</uuid>"
            f"<devices>{devices}</devices>{extra}</domain>").encode()


def hostile_documents(paths: Dict[str, str]) -> List[Tuple[str, Callable[[], bytes]]]:
    """(name, document factory): each must give a clean error or a safe plan."""
    lol = "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">'
                  for i in range(1, 10))
    laughs = (f'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol0 "lol">{lol}]>'
              "<domain><name>&lol9;</name></domain>").encode()
    big_entity = "a" * 50_000
    quadratic = (f'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "{big_entity}">]>'
                 f"<domain><name>{'&a;' * 5000}</name></domain>").encode()
    serial = "<serial type='dev'><source path='/dev/null'/></serial>"
    cases: List[Tuple[str, Callable[[], bytes]]] = [
        ("xxe-file", lambda: b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM '
                             b'"file:///etc/passwd">]><domain><name>&x;</name></domain>'),
        ("xxe-http", lambda: b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM '
                             b'"http://127.0.0.1:9/x">]><domain><name>&x;</name></domain>'),
        ("xxe-parameter", lambda: b'<!DOCTYPE d [<!ENTITY % p SYSTEM "file:///etc/passwd">'
                                  b" %p;]><domain/>"),
        ("external-dtd", lambda: b'<!DOCTYPE domain SYSTEM "http://example.invalid/d.dtd">'
                                 b"<domain><name>x</name></domain>"),
        ("doctype-lowercase", lambda: b"<!doctype domain><domain/>"),
        ("billion-laughs", lambda: laughs),
        ("quadratic-blowup", lambda: quadratic),
        ("xinclude", lambda: _wrap("<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' "
                                   "href='file:///etc/passwd' parse='text'/>")),
        ("doctype-in-comment", lambda: b"<!-- <!DOCTYPE x> --><domain/>"),
        ("50MB-devices", lambda: _wrap(serial * (50_000_000 // len(serial)))),
        ("50MB-comment", lambda: _wrap("", extra="<!--" + "x" * 50_000_000 + "-->")),
        ("70MB-stdin", lambda: b"<domain>" + b" " * 70_000_000 + b"</domain>"),
        ("15MB-text-node", lambda: _wrap("", extra="<description>" + "x" * 15_000_000
                                         + "</description>")),
        ("100k-devices", lambda: _wrap(serial * 100_000)),
        ("deep-nesting", lambda: _wrap("<a>" * 100_000 + "</a>" * 100_000)),
        ("nul-byte", lambda: b"<domain>\x00</domain>"),
        ("empty", lambda: b""),
        ("whitespace", lambda: b"  \n\t "),
        ("xml-decl-only", lambda: b'<?xml version="1.0"?>'),
        ("truncated", lambda: _wrap(serial)[:60]),
        ("utf16-bom", lambda: _wrap(serial).decode().encode("utf-16")),
        ("latin1-declared", lambda: b'<?xml version="1.0" encoding="ISO-8859-1"?>'
                                    b"<domain><name>\xe9</name></domain>"),
        ("invalid-utf8-name", lambda: b"<domain><name>\xff\xfe</name><uuid>"
                                      b"6a1b2c3d-0000-4000-8000-000000000000</uuid></domain>"),
        ("not-domain-root", lambda: b"<disk type='block'/>"),
        ("name-traversal", lambda: _wrap("", name="../../../../etc/cron.d/x")),
        ("name-newline", lambda: _wrap("", name="a&#10;b\nc")),
        ("uuid-traversal", lambda: b"<domain><name>x</name><uuid>../../../../../../../../../"
                                   b"../tmp/evil</uuid></domain>"),
        ("uuid-newline", lambda: b"<domain><name>x</name><uuid>6a1b2c3d-0000-4000-8000-"
                                 b"00000000000\n0</uuid></domain>"),
        ("rule-extras-mem", lambda: _wrap("", extra=(
            f"<metadata><b:extras xmlns:b='{EXTRAS_NS}'><b:rule>c 1:1 rw</b:rule>"
            "<b:rule>a *:* rwm</b:rule><b:rule>c *:1 r</b:rule>"
            "</b:extras></metadata>"))),
    ]
    for key in ("mem", "kmem", "port", "link-to-mem", "long-chain", "loop", "self-loop",
                "through-loop", "blk11", "dir", "fifo", "file", "missing"):
        path = paths[key]
        cases.append((f"serial-{key}", lambda p=path: _wrap(
            f"<serial type='dev'><source path='{p}'/></serial>")))
        cases.append((f"hostdev-misc-{key}", lambda p=path: _wrap(
            f"<hostdev mode='capabilities' type='misc'><source><char>{p}</char></source>"
            "</hostdev>")))
        cases.append((f"disk-{key}", lambda p=path: _wrap(
            f"<disk type='block' device='disk'><source dev='{p}'/><target dev='vda'/></disk>")))
        cases.append((f"extra-device-{key}", lambda p=path: _wrap("", extra=(
            f"<metadata><b:extras xmlns:b='{EXTRAS_NS}'><b:device path='{p}'/></b:extras>"
            "</metadata>"))))
    return cases
