"""Hardened XML parsing: bytes in, an lxml element or one clean :class:`InputError` out.

Domain XML reaches us from libvirt (the hook's stdin), from files and from users, so the
parser is locked down: no DTDs, no entity expansion, no network, no huge trees, no input
beyond :data:`MAX_INPUT_BYTES`. libvirt never writes a DOCTYPE, so a document carrying one
(the vehicle of XXE and "billion laughs") is refused outright, before libxml2 sees it.

Every failure is an :class:`~libvirt_bpfcg.errors.InputError` whose message is one line.
"""

from __future__ import annotations

import re
from typing import Iterable, Union

from lxml import etree

from .errors import InputError

# libvirt's own domain XML is a few kB; 16 MiB is far beyond any real document and keeps a
# hostile stdin from using the hook's memory.
MAX_INPUT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
# DOCTYPE and ENTITY declarations are the only ways to define entities. The scan runs on
# raw bytes, so a declaration hidden in a comment is refused too (libvirt writes none).
_DECLARATION = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)


def _make_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,  # never substitute an entity, internal or external
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,         # keep libxml2's depth and node-size limits
        collect_ids=False,
        remove_pis=True,
        encoding="utf-8",        # we checked the bytes are UTF-8; ignore any other claim
    )


_PARSER = _make_parser()


def one_line(text: str) -> str:
    """Collapse a multi-line message to one line (stderr of the hook is one line)."""
    return " ".join(str(text).split())


def to_bytes(data: Union[bytes, bytearray, memoryview, str], what: str) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"{what}: text is not encodable as UTF-8 "
                             f"(character {exc.start})") from None
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, bytes):
        return data
    raise InputError(f"{what}: expected bytes or text, got {type(data).__name__}")


def parse_xml(data: Union[bytes, bytearray, memoryview, str],
              what: str = "domain XML") -> etree._Element:
    """Parse one XML document with the hardened parser and return its root element."""
    raw = to_bytes(data, what)
    if len(raw) > MAX_INPUT_BYTES:
        raise InputError(f"{what}: input is {len(raw)} bytes, more than the "
                         f"{MAX_INPUT_BYTES} bytes allowed")
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    if not raw or raw.isspace():
        raise InputError(f"{what}: empty input")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise InputError(f"{what}: NUL byte at offset {nul} (UTF-16 or binary data?)")
    found = _DECLARATION.search(raw) if b"<!" in raw else None
    if found:
        kind = found.group(1).decode().upper()
        raise InputError(f"{what}: <!{kind}> declarations are not allowed (entities and DTDs "
                         f"are refused; libvirt never writes them)")
    try:
        root = etree.fromstring(raw, _PARSER)
    except etree.XMLSyntaxError as exc:
        _check_utf8(raw, what)  # the clearer message when that is the cause
        raise InputError(f"{what}: not well-formed XML: {one_line(exc.msg or exc)}") from None
    except (etree.LxmlError, ValueError) as exc:
        raise InputError(f"{what}: cannot parse: {one_line(str(exc))}") from None
    if root is None:
        raise InputError(f"{what}: no root element")
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.doctype:
        raise InputError(f"{what}: DTDs are not allowed")
    return root


def _check_utf8(raw: bytes, what: str) -> None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what}: not UTF-8 (invalid byte 0x{raw[exc.start]:02x} at offset "
                         f"{exc.start})") from None


def expect_root(root: etree._Element, names: Iterable[str], what: str = "domain XML",
                hint: str | None = None) -> str:
    """Return the root's tag when it is one of ``names``; else a one-line InputError."""
    tag = root.tag if isinstance(root.tag, str) else ""
    allowed = list(names)
    if tag in allowed:
        return tag
    shown = tag or "(not an element)"
    if len(allowed) == 1:
        message = f"{what}: root element is <{shown}>, expected <{allowed[0]}>"
    else:
        message = f"{what}: root element is <{shown}>, expected one of " + ", ".join(
            f"<{name}>" for name in allowed)
    if hint:
        message += f" ({hint})"
    raise InputError(message)


def read_input(path: str, stdin: object | None = None, what: str = "") -> bytes:
    """Bytes of ``path`` (``-`` = stdin), as one clean InputError when unreadable."""
    label = what or ("standard input" if path == "-" else path)
    if path == "-":
        import sys

        stream = stdin if stdin is not None else sys.stdin
        buffer = getattr(stream, "buffer", stream)
        data = buffer.read(MAX_INPUT_BYTES + 1)
        return to_bytes(data, label)
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_INPUT_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: is a directory") from None
    except OSError as exc:
        raise InputError(f"{label}: cannot read: {exc.strerror}") from None
