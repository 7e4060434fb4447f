"""The hook's fast path: hand the event to a running hook server (``hook-server``).

Every guest start runs the hook three times (prepare, started, release), each a fresh Python
process; importing lxml and the engine costs several times what the interpreter itself
does. A resident server has them loaded already, so the hook process only ships argv and the
domain XML over a root-only unix socket and relays the server's exit status and stderr.

No server listening, one in other namespaces, a server that dies or stops answering: the
caller handles the event itself (``call_server`` returns None) — every op is idempotent, so
a request half done by a server that died is simply done again.

This module runs in every hook process before anything else and imports only modules
built into the interpreter: ``_socket``, not ``socket.py`` (which pulls in enum and
selectors), and ``posix``, not ``os`` (2-3 ms, more than this whole file).

The wire format, version 1, on a stream socket:

* request: MAGIC, then a 4-byte big-endian item count, then each item as a 4-byte length
  and its bytes: ``config path`` (empty: the default), ``domain XML``, then ``argv[1:]``;
  the client then shuts down its sending side;
* reply: MAGIC, a 4-byte status (the hook's exit code, or NOT_SERVED when the server
  declines the request), then the hook's stderr text (UTF-8) up to end of stream.
"""

from __future__ import annotations

import _socket
import posix
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (ms per hook event)
if TYPE_CHECKING:
    from collections.abc import Callable

SOCKET_PATH = "/run/libvirt-bpfcg/hook.sock"
MAGIC = b"BPFCG-HOOK/1\n"
NOT_SERVED = 0x10000  # beyond any exit code: "handle it yourself"
MAX_ITEMS = 64
MAX_XML_BYTES = 64 * 1024 * 1024  # a domain XML is KBs; refuse to buffer absurd input
MAX_ITEM_BYTES = MAX_XML_BYTES + 1  # one byte more: the hook itself reports "too big"
MAX_REPLY_BYTES = 1024 * 1024
# A served event takes milliseconds (the longest wait is for a guest's lock, held for
# milliseconds by the CLI or the watcher). A server still silent after this is broken or
# hung: the hook then does the work itself rather than hold libvirt's domain job any longer.
# (A socket unit whose service cannot start queues connections until systemd gives up.)
REPLY_TIMEOUT = 15.0


class ProtocolError(Exception):
    """A malformed request or reply."""


def encode_items(items: list) -> bytes:
    parts = [len(items).to_bytes(4, "big")]
    for item in items:
        parts.append(len(item).to_bytes(4, "big"))
        parts.append(item)
    return b"".join(parts)


def decode_items(data: bytes) -> list:
    if len(data) < 4:
        raise ProtocolError("truncated item count")
    count = int.from_bytes(data[:4], "big")
    if count > MAX_ITEMS:
        raise ProtocolError(f"{count} items (at most {MAX_ITEMS})")
    items, pos = [], 4
    for _ in range(count):
        if pos + 4 > len(data):
            raise ProtocolError("truncated item length")
        size = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if size > MAX_ITEM_BYTES or pos + size > len(data):
            raise ProtocolError("truncated or oversized item")
        items.append(data[pos:pos + size])
        pos += size
    if pos != len(data):
        raise ProtocolError("trailing bytes after the last item")
    return items


CONFIG_ENV = b"LIBVIRT_BPFCG_CONFIG"  # our config file, when not the default one


def fsencode(text: str) -> bytes:
    """os.fsencode without os."""
    return text.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def encode_request(argv: list, xml: bytes, config_path: bytes) -> bytes:
    args = [fsencode(arg) for arg in argv[1:]]
    return MAGIC + encode_items([config_path, xml, *args])


def encode_reply(status: int, stderr_text: str) -> bytes:
    return MAGIC + status.to_bytes(4, "big") + stderr_text.encode("utf-8", "replace")


def decode_reply(data: bytes) -> tuple:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ProtocolError("not a hook server reply")
    status = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "big")
    return status, data[len(MAGIC) + 4:].decode("utf-8", "replace")


def receive_all(sock: _socket.socket, limit: int) -> bytes:
    """Everything up to end of stream; ProtocolError past ``limit`` bytes."""
    chunks, total = [], 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise ProtocolError(f"more than {limit} bytes")
        chunks.append(chunk)


def call_server(argv: list, xml: bytes, path: str = SOCKET_PATH,
                timeout: float = REPLY_TIMEOUT, report: Callable[[str], None] | None = None
                ) -> tuple | None:
    """(exit status, stderr text) from the server, or None: handle the event in-process.
    The server reads the config file this process would (``LIBVIRT_BPFCG_CONFIG``).

    None without a word when no server listens (the common case on hosts without one). A
    server that was reached but failed us is worth a line to the admin who enabled it:
    ``report`` gets it (default: syslog). Not stderr: the hook then does the work itself,
    and on success libvirt ignores stderr, on failure our one-line error would get two."""
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            return None
        sock.sendall(encode_request(argv, xml, posix.environ.get(CONFIG_ENV, b"")))
        sock.shutdown(_socket.SHUT_WR)
        status, text = decode_reply(receive_all(sock, MAX_REPLY_BYTES))
    except (OSError, ProtocolError) as exc:
        (report or to_syslog)(f"hook server at {path} did not answer ({exc}); handling the "
                              "event here")
        return None
    finally:
        sock.close()
    if status == NOT_SERVED:
        return None
    return status, text


def to_syslog(line: str) -> None:
    import syslog  # built in, and needed only here

    syslog.openlog("libvirt-bpfcg", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_WARNING, line.replace("\n", " "))


def ignore(_line: str) -> None:
    """A ``report`` for callers that judge the outcome themselves (doctor)."""
