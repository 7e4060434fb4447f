"""The hook server and the hook's fast path (hookclient, hookserver, hooks/50-libvirt-bpfcg).

Real sockets, real processes, the real hook code behind the server: a served event must
answer exactly what the in-process hook answers, a peer the server must not serve (not
root, other namespaces) and a server that fails mid-request leave the event to the hook
itself. The lab tests (test_hook_lab.py) run the same path under a real libvirtd.
"""

from __future__ import annotations

import ctypes
import io
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Iterator, List

import pytest
from lab_cli import GATE, gate_script

from libvirt_bpfcg import hook, hookclient, hookserver
from libvirt_bpfcg import log as bpfcg_log
from libvirt_bpfcg.errors import OperationError
from libvirt_bpfcg.hookclient import ProtocolError, call_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY_HOOK = os.path.join(ROOT, "hooks", "qemu")
UUID = "6a1f0c1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"
CLONE_NEWNS = 0x00020000


def domain(disk: str) -> bytes:
    return (f"<domain type='kvm'><name>vm</name><uuid>{UUID}</uuid><devices>"
            f"<disk type='block' device='disk'><source dev='{disk}'/>"
            "<target dev='vda' bus='virtio'/></disk></devices></domain>").encode()


@pytest.fixture
def config(tmp_path, monkeypatch) -> str:
    path = tmp_path / "bpfcg.conf"
    path.write_text(f"[acl]\nlibvirt_version = 9.0.0\nqemu_conf = {tmp_path}/no-qemu.conf\n"
                    f"[hook]\nstate_dir = {tmp_path}/state\n"
                    f"[host]\nqemu_run_dir = {tmp_path}/qemu-run\n")
    monkeypatch.setenv("LIBVIRT_BPFCG_CONFIG", str(path))
    return str(path)


@pytest.fixture
def server(tmp_path) -> Iterator[str]:
    """A HookServer on a scratch socket, serving from a thread of this process."""
    path = str(tmp_path / "run" / "hook.sock")
    listener = hookserver.bind_listener(path)
    served = hookserver.HookServer(listener)
    thread = threading.Thread(target=served.serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        served.stop()
        thread.join(timeout=5)
        listener.close()


def in_process(argv: List[str], xml: bytes, config: str) -> tuple:
    """What the hook answers when it handles the event itself (syslog off)."""
    stderr = io.StringIO()
    bpfcg_log.setup(stream=stderr, use_syslog=False)
    code = hook.handle(argv, io.BytesIO(xml), config)
    return code, stderr.getvalue()


# --- the wire format ----------------------------------------------------------------------


def test_items_round_trip_and_malformed_input_is_refused():
    items = [b"", b"<domain/>", b"vm", b"prepare", "n\u00e9".encode()]
    assert hookclient.decode_items(hookclient.encode_items(items)) == items
    data = hookclient.encode_items(items)
    for bad in (data[:3], data[:-1], data + b"x",
                (hookclient.MAX_ITEMS + 1).to_bytes(4, "big")):
        with pytest.raises(ProtocolError):
            hookclient.decode_items(bad)
    status, text = hookclient.decode_reply(hookclient.encode_reply(3, "a line\n"))
    assert (status, text) == (3, "a line\n")
    with pytest.raises(ProtocolError):
        hookclient.decode_reply(b"HTTP/1.1 200 OK\r\n")


def test_request_carries_argv_xml_and_the_config_file(config):
    argv = ["/etc/libvirt/hooks/qemu", "vm\nname", "prepare", "begin", "-"]
    data = hookclient.encode_request(argv, b"<domain/>", os.fsencode(config))
    assert hookserver.parse_request(data) == (["hook-server", *argv[1:]], b"<domain/>", config)


# --- served = in-process ------------------------------------------------------------------


@pytest.mark.parametrize("disk, code", [("/dev/null", 0), ("/dev/no-such-disk", 1)])
def test_served_event_answers_like_the_in_process_hook(server, config, tmp_path, disk, code):
    argv = ["qemu", "vm", "prepare", "begin", "-"]
    served = call_server(argv, domain(disk), path=server)
    assert served is not None
    assert served == in_process(argv, domain(disk), config)
    assert served[0] == code
    plan = tmp_path / "state" / "domains" / f"{UUID}.json"
    if code:
        assert "/dev/no-such-disk" in served[1] and served[1].count("\n") == 1
        assert served[1].startswith("libvirt-bpfcg: domain vm: refusing to start")
    else:
        assert plan.is_file() and stat.S_IMODE(plan.stat().st_mode) == 0o600
        assert call_server(["qemu", "vm", "release", "end", "-"], domain(disk),
                           path=server) == (0, "")
        assert not plan.exists()


def test_hostile_documents_get_the_same_answer_served_and_in_process(server, config,
                                                                      tmp_path_factory):
    """The fixed hostile documents of the fuzzers (test_fuzz_hook): every event through the
    server answers byte for byte what the in-process hook answers."""
    from stress import xmlgen

    paths = xmlgen.make_hostile_nodes(str(tmp_path_factory.mktemp("hostile")))
    count = 0
    for case, make in xmlgen.hostile_documents(paths):
        document = make()
        for op, subop in (("prepare", "begin"), ("migrate", "begin"), ("release", "end")):
            argv = ["qemu", "hostile\nname", op, subop, "-"]
            # hooks/qemu reads at most MAX_ITEM_BYTES of stdin: one byte past the limit
            # is all the hook needs to refuse a document as too large.
            served = call_server(argv, document[:hookclient.MAX_ITEM_BYTES], path=server)
            assert served == in_process(argv, document, config), (case, op)
            assert served[1].count("\n") <= 1, (case, op, served[1])
            count += 1
    assert count > 50


def test_ignored_events_and_garbage_argv_are_answered_0(server, config):
    assert call_server(["qemu", "vm", "stopped", "end", "-"], b"", path=server) == (0, "")
    assert call_server(["qemu"], b"", path=server) == (0, "")


def test_no_server_means_none_without_a_word(tmp_path, capfd):
    assert call_server(["qemu", "vm", "prepare", "begin", "-"], b"",
                       path=str(tmp_path / "nothing.sock")) is None
    assert capfd.readouterr().err == ""


def test_server_that_hangs_up_without_replying_leaves_the_event_to_the_hook(tmp_path, capfd):
    """The admin hears of it (syslog by default), libvirt does not (stderr stays empty)."""
    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    reports: List[str] = []
    assert call_server(["qemu", "vm", "prepare", "begin", "-"], b"<domain/>", path=path,
                       report=reports.append) is None
    thread.join()
    listener.close()
    assert capfd.readouterr().err == ""
    assert len(reports) == 1 and reports[0].startswith(f"hook server at {path} did not answer")
    assert reports[0].endswith("handling the event here")


def test_server_that_never_answers_times_out_and_leaves_the_event_to_the_hook(tmp_path):
    path = str(tmp_path / "hung.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)  # accepts into the backlog, never answers: a hung server
        reports: List[str] = []
        started = time.monotonic()
        assert call_server(["qemu", "vm", "started", "begin", "-"], b"<domain/>", path=path,
                           timeout=0.3, report=reports.append) is None
        assert time.monotonic() - started < 5
    assert len(reports) == 1 and "timed out" in reports[0]


def _in_child(action) -> int:
    """Run ``action`` in a forked child; its return value is the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = action()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_peers_that_are_not_root_or_see_other_namespaces_are_not_served(server, config):
    """Both get NOT_SERVED (call_server: None) and would handle the event themselves."""
    def as_nobody() -> int:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        return 0 if call_server(["q", "vm", "stopped", "end", "-"], b"", path=server) is None \
            else 1

    def in_own_mount_namespace() -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            return 2
        return 0 if call_server(["q", "vm", "stopped", "end", "-"], b"", path=server) is None \
            else 1

    os.chmod(os.path.dirname(server), 0o755)  # let "nobody" reach the socket at all...
    os.chmod(server, 0o666)  # ...so that the server's own check is what refuses it
    assert _in_child(as_nobody) == 0
    assert _in_child(in_own_mount_namespace) == 0
    # The same request from here is served.
    assert call_server(["q", "vm", "stopped", "end", "-"], b"", path=server) == (0, "")


def test_a_root_peer_in_our_namespaces_has_no_problem():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert hookserver.peer_problem(left) is None


# --- the listening socket -------------------------------------------------------------------


def test_bind_listener_modes_and_what_it_refuses(tmp_path):
    path = str(tmp_path / "run" / "hook.sock")
    listener = hookserver.bind_listener(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        with pytest.raises(OperationError, match="another hook server is listening"):
            hookserver.bind_listener(path)
    finally:
        listener.close()
    # Closed: a dead socket file is replaced.
    hookserver.bind_listener(path).close()
    # An existing directory keeps its mode (think --socket /tmp/hook.sock).
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    hookserver.bind_listener(str(shared / "hook.sock")).close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    plain = tmp_path / "run" / "plain"
    plain.write_text("")
    with pytest.raises(OperationError, match="is not a socket"):
        hookserver.bind_listener(str(plain))


def cli_server(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "libvirt_bpfcg", "--debug", "hook-server",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, **kwargs)


def wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 15) -> None:
    started = time.monotonic()
    while not hookserver.answering(path):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - started < timeout
        time.sleep(0.02)


def test_cli_server_serves_then_sigterm_exits_0_and_removes_its_socket(tmp_path, config):
    path = str(tmp_path / "hook.sock")
    proc = cli_server("--socket", path)
    try:
        wait_for_socket(path, proc)
        argv = ["qemu", "vm", "prepare", "begin", "-"]
        assert call_server(argv, domain("/dev/no-such-disk"), path=path)[0] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=15)[0]
    assert proc.returncode == 0, out
    assert not os.path.exists(path)
    assert re.search(r"hook server: vm prepare begin -> 1 in [\d.]+ ms", out), out
    assert "stopped after 1 request(s)" in out


def test_cli_server_exits_when_idle(tmp_path):
    path = str(tmp_path / "hook.sock")
    proc = cli_server("--socket", path, "--idle-exit", "0.5")
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "no request for 0.5 s, exiting" in out
    assert not os.path.exists(path)


def test_cli_server_takes_the_socket_systemd_passes(tmp_path, config):
    """Socket activation as systemd does it: the socket on fd 3, LISTEN_FDS=1 and
    LISTEN_PID naming the server's own pid (the child keeps its pid across exec)."""
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    fd = listener.fileno()

    def as_activated() -> None:  # runs in the child between fork and exec
        os.dup2(fd, 3)
        os.environ["LISTEN_FDS"] = "1"
        os.environ["LISTEN_PID"] = str(os.getpid())

    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; "
         "from libvirt_bpfcg.cli import main; sys.exit(main(['--debug', 'hook-server', "
         "'--socket', '/nonexistent/never-bound.sock', '--idle-exit', '1']))"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        close_fds=False, preexec_fn=as_activated)
    listener.close()  # the server holds it now, as systemd would alongside
    try:
        argv = ["qemu", "vm", "prepare", "begin", "-"]
        answer = call_server(argv, domain("/dev/no-such-disk"), path=path, timeout=30)
    finally:
        out = proc.communicate(timeout=30)[0]
    assert answer is not None and answer[0] == 1, out
    assert "listening on systemd's socket" in out
    assert proc.returncode == 0, out
    assert os.path.exists(path)  # systemd's socket: the server never removes it


def test_hooks_qemu_goes_to_the_server_at_the_fixed_socket_stdout_stays_empty(tmp_path, config):
    """The installed path end to end, outside libvirt: hooks/qemu with libvirt's bare
    environment, a server on /run/libvirt-bpfcg/hook.sock. Run in a private mount namespace
    with a tmpfs on /run, so the host's /run is not touched."""
    document = tmp_path / "domain.xml"
    document.write_bytes(domain("/dev/no-such-disk"))
    script = f"""
set -e
mount -t tmpfs -o mode=0755 bpfcg-hooktest /run
mkdir -m 0700 /run/libvirt-bpfcg
{sys.executable} -m libvirt_bpfcg --debug hook-server 2>{tmp_path}/server.log &
server=$!
for i in $(seq 200); do [ -S /run/libvirt-bpfcg/hook.sock ] && break; sleep 0.05; done
set +e
env -i LC_ALL=C PATH=/usr/bin:/bin LIBVIRT_BPFCG_CONFIG={config} {PY_HOOK} vm prepare begin - \
    <{document} >{tmp_path}/out 2>{tmp_path}/err
echo $? >{tmp_path}/rc
kill $server
wait $server
"""
    subprocess.run(["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script],
                   check=True, cwd=ROOT, timeout=60)
    assert (tmp_path / "rc").read_text().strip() == "1"
    assert (tmp_path / "out").read_bytes() == b""
    err = (tmp_path / "err").read_text()
    assert err.startswith("libvirt-bpfcg: domain vm: refusing to start") and err.count("\n") == 1
    assert re.search(r"hook server: vm prepare begin -> 1 in ", (tmp_path / "server.log")
                     .read_text()), "the server answered, not the hook itself"


# --- the gate in qemu.d -------------------------------------------------------------------


def gate_events() -> set:
    with open(GATE) as handle:
        line = next(ln for ln in handle if '"prepare begin"' in ln)
    return {tuple(event.split()) for event in re.findall(r'"([a-z]+ [a-z]+)"', line)}


def test_gate_hook_and_op_table_agree_on_the_events_handled():
    with open(PY_HOOK) as handle:
        handled = re.search(r"^HANDLED = (\{.*?\})$", handle.read(), re.S | re.M).group(1)
    assert gate_events() == eval(handled) == set(hook.OPS)  # noqa: S307 - our own literal


def gate_to(tmp_path, target: str) -> str:
    path = tmp_path / "50-libvirt-bpfcg"
    path.write_text(gate_script(target))
    path.chmod(0o755)
    return str(path)


def test_gate_passes_handled_events_on_and_answers_the_rest_itself(tmp_path):
    record = tmp_path / "calls"
    target = tmp_path / "hook"
    target.write_text(f'#!/bin/sh\necho "$@" >> {record}\ncat > /dev/null\nexit 7\n')
    target.chmod(0o755)
    gate = gate_to(tmp_path, str(target))
    for op, subop in sorted(hook.OPS):
        proc = subprocess.run([gate, "vm", op, subop, "-"], input=b"<domain/>",
                              capture_output=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 7, (op, subop)
    for op, subop in [("start", "begin"), ("stopped", "end"), ("prepare", "end"),
                      ("release", "begin"), ("attach", "begin")]:
        proc = subprocess.run([gate, "vm", op, subop, "-"], input=b"<domain/>",
                              capture_output=True)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert sorted(record.read_text().splitlines()) == sorted(
        f"vm {op} {subop} -" for op, subop in hook.OPS)


def test_gate_without_its_hook_lets_guests_start(tmp_path):
    """The package was removed, the conffile kept: every event exits 0, silently."""
    gate = gate_to(tmp_path, str(tmp_path / "removed"))
    proc = subprocess.run([gate, "vm", "prepare", "begin", "-"], input=b"<domain/>",
                          capture_output=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
