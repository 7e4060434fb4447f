"""The hook server (``libvirt-bpfcg hook-server``): handles the QEMU hook's events for it.

Why, and the wire format: hookclient. The server runs exactly the code the hook would run
in-process (``hook.handle``) and relays what it logs at warning level and above as the
hook's stderr, so libvirt's error messages read the same either way.

It serves only root peers in its own mount, cgroup and PID namespaces: the hook resolves pid
files, cgroup paths and device nodes as libvirtd sees them, and a server anywhere else would
see other ones. Every other peer gets NOT_SERVED and handles the event itself.

Requests are handled one at a time, in arrival order: each takes milliseconds, the engine's
per-cgroup locks already order work on one guest across processes, and one thread means no
process-wide state (the logger, setns in nsdev's child, rlimits) is ever shared between two
requests.

The listening socket comes from systemd (libvirt-bpfcg-hook.socket) or is bound at --socket
in a root-only directory. With ``idle_exit`` the server exits after that many seconds
without a request; under socket activation systemd starts it again on the next connection.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import stat
import struct
import time

from . import hook, log
from .errors import OperationError, UsageError
from .hookclient import (
    MAGIC,
    MAX_ITEM_BYTES,
    MAX_ITEMS,
    NOT_SERVED,
    ProtocolError,
    decode_items,
    encode_reply,
    receive_all,
)

logger = logging.getLogger(log.LOGGER_NAME)

SD_LISTEN_FDS_START = 3
NAMESPACES = ("mnt", "cgroup", "pid")
REQUEST_TIMEOUT = 10.0  # to receive a request: a client sends it at once
POLL_INTERVAL = 0.5  # how often the accept loop looks at the stop flag and the idle time
MAX_REQUEST_BYTES = len(MAGIC) + 4 + MAX_ITEMS * 4 + 2 * MAX_ITEM_BYTES + 64 * 1024


def systemd_listener() -> socket.socket | None:
    """The socket systemd passed us (socket activation), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    if count == 0:
        return None
    if count != 1:
        raise UsageError(f"systemd passed {count} sockets; the hook server takes exactly one "
                         "(ListenStream= once in libvirt-bpfcg-hook.socket)")
    try:
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    except OSError as exc:
        raise OperationError(f"the socket systemd passed (fd {SD_LISTEN_FDS_START}) is "
                             f"unusable: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise UsageError("the socket systemd passed is not a unix stream socket "
                         "(use ListenStream=/run/libvirt-bpfcg/hook.sock)")
    sock.set_inheritable(False)
    return sock


def answering(path: str) -> bool:
    """Whether something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def bind_listener(path: str) -> socket.socket:
    """Listen on ``path`` (mode 0600), replacing a dead socket. A missing directory is made
    root-only; an existing one is left as it is (``--socket /tmp/x.sock`` must not close
    /tmp): the socket's own mode is what keeps other users out."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise OperationError(f"{path} exists and is not a socket; remove it or pass "
                                 "another --socket")
        if answering(path):
            raise OperationError(f"{path}: another hook server is listening there; stop it "
                                 "first (systemctl stop libvirt-bpfcg-hook.socket)")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise OperationError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def peer_problem(conn: socket.socket) -> str | None:
    """Why this peer is not served here, or None."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid != 0:
        return f"peer uid {uid} is not root"
    if pid <= 0:
        return "peer is in another PID namespace"
    for ns in NAMESPACES:
        try:
            mine = os.stat(f"/proc/self/ns/{ns}")
            theirs = os.stat(f"/proc/{pid}/ns/{ns}")
        except OSError as exc:
            return f"cannot compare namespaces with pid {pid}: {exc.strerror}"
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            return f"pid {pid} is in another {ns} namespace"
    return None


def parse_request(data: bytes) -> tuple[list[str], bytes, str | None]:
    """(argv, domain XML, config path) from one request."""
    if not data.startswith(MAGIC):
        raise ProtocolError("not a hook request")
    items = decode_items(data[len(MAGIC):])
    if len(items) < 2:
        raise ProtocolError("a request needs a config path and a domain XML")
    config_path = os.fsdecode(items[0]) or None
    argv = ["hook-server", *(os.fsdecode(arg) for arg in items[2:])]
    return argv, items[1], config_path


class HookServer:
    def __init__(self, listener: socket.socket, idle_exit: float | None = None) -> None:
        self.listener = listener
        self.idle_exit = idle_exit
        self.stopping = False
        self.served = 0

    def stop(self, *_args: object) -> None:
        """Signal handler: finish the request in hand, then return from serve()."""
        self.stopping = True

    def serve(self) -> int:
        self.listener.settimeout(POLL_INTERVAL)
        last = time.monotonic()
        while not self.stopping:
            try:
                conn, _addr = self.listener.accept()
            except TimeoutError:
                if self.idle_exit and time.monotonic() - last >= self.idle_exit:
                    logger.info("hook server: no request for %g s, exiting", self.idle_exit)
                    break
                continue
            with conn:
                self.serve_one(conn)
            last = time.monotonic()
        return 0

    def serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            # Read first, even from a peer we will not serve: one that is still sending a
            # large XML would take our early close for a failed server.
            request = receive_all(conn, MAX_REQUEST_BYTES)
            problem = peer_problem(conn)
            if problem is not None:
                logger.debug("hook server: not serving: %s", problem)
                conn.sendall(encode_reply(NOT_SERVED, ""))
                return
            argv, xml, config_path = parse_request(request)
            started = time.monotonic()
            with log.CapturedWarnings() as stderr:
                status = hook.handle(argv, io.BytesIO(xml), config_path)
            self.served += 1
            logger.debug("hook server: %s -> %d in %.1f ms", " ".join(argv[1:4]), status,
                         (time.monotonic() - started) * 1e3)
            conn.sendall(encode_reply(status, stderr.getvalue()))
        except (OSError, ProtocolError) as exc:
            # The client handles the event itself when it gets no reply.
            logger.warning("hook server: dropped a request: %s", exc)


def unlink_if_same(path: str, inode: int) -> None:
    """Remove the socket file we bound (``inode``), unless another server replaced it."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
