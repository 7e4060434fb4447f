"""Hostile input through the hook entry point, ``hook.run(argv, stdin)`` (issue 7, part 3).

In this process, with a configuration whose state_dir, qemu_run_dir (empty: no guest is
ever found, so nothing is installed anywhere) and bpffs point into a temporary directory:
hostile domain XML (stress/xmlgen.py) and hostile argv (domain names with ``../``,
newlines, control characters; every op, unknown ops, short argv). For every call:

* the exit code is 0 or 1, and ``run`` never raises;
* nothing reaches stdout — neither ``sys.stdout`` nor file descriptor 1;
* stderr holds no traceback and no "internal error" (an exception we did not expect);
* nothing is written outside the state directory: a Python audit hook sees every open for
  writing, mkdir, rename, remove, chmod, symlink, link and process spawn while the hook
  runs; afterwards the state directory holds only ``domains/<uuid>.json`` files, and the
  working directory is still empty.

Syslog is switched off for the run (``log.setup`` is wrapped): 100,000 hostile calls do not
belong in the machine's journal. Everything else is the hook as libvirt runs it.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections import Counter
from typing import List, Tuple

import pytest
from engine_helpers import record, scaled
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from libvirt_bpfcg import hook
from libvirt_bpfcg import log as bpfcg_log
from stress import xmlgen

TEMPLATES = xmlgen.load_templates()
FUZZ_SETTINGS = settings(
    max_examples=scaled(1000, 50_000), deadline=None, database=None,
    phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
OPS = [("prepare", "begin")] * 4 + [("migrate", "begin"), ("restore", "begin"),
                                    ("started", "begin"), ("reconnect", "begin"),
                                    ("release", "end"), ("start", "begin"),
                                    ("stopped", "end"), ("bogus", "op")]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
STATE_FILE = re.compile(r"domains/[0-9a-f-]{36}\.json")


class WriteWatch:
    """A Python audit hook recording every write-like operation outside ``allowed``.

    Audit hooks cannot be removed, so one instance serves the whole session and is only
    armed while the hook under test runs.
    """

    _instance: WriteWatch | None = None

    def __init__(self) -> None:
        self.allowed = ""
        self.armed = False
        self.violations: List[Tuple[str, tuple]] = []
        sys.addaudithook(self)

    @classmethod
    def get(cls) -> WriteWatch:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __call__(self, event: str, args: tuple) -> None:
        if not self.armed:
            return
        if event == "open":
            path, mode, flags = args
            writes = (flags or 0) & WRITE_FLAGS or (mode and any(c in mode for c in "wax+"))
            if writes and not isinstance(path, int):
                self._check(event, args, path)
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown",
                       "os.truncate", "os.utime"):
            self._check(event, args, args[0])
        elif event in ("os.rename", "os.link", "os.symlink"):
            self._check(event, args, args[1])
            if event == "os.rename":
                self._check(event, args, args[0])
        elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                       "os.fork", "socket.connect"):
            self.violations.append((event, args))

    def _check(self, event: str, args: tuple, path: object) -> None:
        if isinstance(path, int):
            return
        real = os.path.realpath(os.fsdecode(path))  # type: ignore[arg-type]
        if real != self.allowed and not real.startswith(self.allowed + os.sep):
            self.violations.append((event, args))


@pytest.fixture
def hook_env(tmp_path, monkeypatch):
    """Config + state dir in tmp, an empty cwd, syslog off, the write watch aimed."""
    state = tmp_path / "state"
    (tmp_path / "qemu-run").mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    config = tmp_path / "bpfcg.conf"
    config.write_text(f"[acl]\nlibvirt_version = 9.0.0\nqemu_conf = {tmp_path}/no-qemu.conf\n"
                      f"[hook]\nstate_dir = {state}\n"
                      f"[host]\nqemu_run_dir = {tmp_path}/qemu-run\n"
                      f"bpffs = {tmp_path}/no-bpffs\n")
    monkeypatch.setenv("LIBVIRT_BPFCG_CONFIG", str(config))
    monkeypatch.chdir(cwd)
    real_setup = bpfcg_log.setup
    monkeypatch.setattr(bpfcg_log, "setup",
                        lambda verbose=False, stream=None, use_syslog=True:
                        real_setup(verbose, stream, use_syslog=False))
    watch = WriteWatch.get()
    watch.allowed = os.path.realpath(str(state))
    watch.violations = []
    yield {"state": str(state), "cwd": str(cwd), "watch": watch}


def call_hook(argv: List[str], document: bytes, watch: WriteWatch, capfd) -> Tuple[int, str]:
    stderr = io.StringIO()
    stdout_before = sys.stdout
    watch.armed = True
    try:
        code = hook.run(argv, io.BytesIO(document), stderr)
    finally:
        watch.armed = False
    out, err = capfd.readouterr()
    assert sys.stdout is stdout_before, "sys.stdout not restored"
    assert out == "", f"stdout: {out[:200]!r}"
    text = stderr.getvalue() + err
    assert code in (0, 1), code
    # "internal error:" right after our prefix is the hook's catch-all for exceptions we did
    # not expect (libxml2's own messages may say "internal error" too: those are fine).
    assert "Traceback" not in text and "libvirt-bpfcg: internal error:" not in text, \
        text[-2000:]
    assert not watch.violations, watch.violations[:3]
    assert not text or text.startswith("libvirt-bpfcg: "), text[:200]
    return code, text


def continuation_lines(text: str) -> int:
    """Lines that do not start a message: a message broken by a newline from the input.

    Known and reported (see test_refusal_with_a_newline_in_a_path_is_one_line): counted, not
    failed, until the hook escapes what it quotes from the XML.
    """
    lines = text.rstrip("\n").split("\n") if text else []
    return sum(1 for line in lines if not line.startswith("libvirt-bpfcg: "))


def check_state_dir(state: str, cwd: str) -> int:
    """Only domains/<uuid>.json below the state dir; the working directory untouched."""
    files = []
    for dirpath, _dirs, names in os.walk(state):
        files += [os.path.relpath(os.path.join(dirpath, n), state) for n in names]
    bad = [f for f in files if not STATE_FILE.fullmatch(f)]
    assert not bad, bad[:5]
    assert os.listdir(cwd) == []
    return len(files)


def hook_argv(name: str, op: Tuple[str, str], shape: int) -> List[str]:
    argv = ["/etc/libvirt/hooks/qemu", name, op[0], op[1], "-"]
    return argv[:shape] if shape < 5 else argv


def test_fuzzed_hook_calls(hook_env, capfd):
    watch = hook_env["watch"]
    outcomes: Counter = Counter()
    started = time.monotonic()
    gen = xmlgen.Generator(TEMPLATES, [hook_env["state"] + "/../../etc/passwd",
                                       "/dev/mem", "/dev/null"])
    names = st.one_of(st.sampled_from(("guest", "../../etc/passwd", "a/b", ".", "..",
                                       "x\ny", "x\x01y", "-")), gen.values)
    calls = st.tuples(gen.documents, names, st.sampled_from(OPS),
                      st.sampled_from((5, 5, 5, 5, 4, 3, 1)))

    @FUZZ_SETTINGS
    @given(calls)
    def one(call) -> None:
        document, name, op, shape = call
        # argv cannot carry NUL bytes, and libvirt refuses domain names with a newline
        # (virDomainDefParseXML): such names never reach the hook.
        name = name.replace("\x00", "").replace("\n", "")
        code, text = call_hook(hook_argv(name, op, shape), document, watch, capfd)
        outcomes[f"{op[0]} exit {code}"] += 1
        assert continuation_lines(text) == 0, f"message split over lines: {text!r}"

    one()
    files = check_state_dir(hook_env["state"], hook_env["cwd"])
    total = sum(count for key, count in outcomes.items() if " exit " in key)
    record("fuzz: hook.run with hostile XML and argv", total,
           "exit 0/1 only, stdout empty, no traceback, no write outside the state dir",
           time.monotonic() - started, plans_saved=files, **dict(outcomes))
    assert outcomes["prepare exit 0"] > 0 and outcomes["prepare exit 1"] > 0, outcomes


def test_fixed_hostile_documents_through_the_hook(hook_env, capfd, tmp_path_factory):
    paths = xmlgen.make_hostile_nodes(str(tmp_path_factory.mktemp("hostile")))
    watch = hook_env["watch"]
    started = time.monotonic()
    count = 0
    for case, make in xmlgen.hostile_documents(paths):
        document = make()
        for op in (("prepare", "begin"), ("migrate", "begin"), ("started", "begin"),
                   ("release", "end")):
            try:
                code, text = call_hook(hook_argv("hostile", op, 5), document, watch, capfd)
            except AssertionError as exc:
                raise AssertionError(f"{case} {op}: {exc}") from exc
            count += 1
            forbidden_node = any(k in case for k in ("-mem", "-kmem", "-port"))
            if (op == ("prepare", "begin") and forbidden_node
                    and not case.startswith("hostdev-misc")):
                assert code == 1 and "forbidden" in text, (case, text)
    check_state_dir(hook_env["state"], hook_env["cwd"])
    record("fuzz: fixed hostile documents through hook.run", count,
           "clean one-line refusals; /dev/mem's numbers refused at prepare",
           time.monotonic() - started)


def test_write_watch_sees_writes(tmp_path):
    """The detector itself: writes outside the allowed directory are caught."""
    watch = WriteWatch.get()
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    watch.allowed, watch.violations, watch.armed = str(allowed), [], True
    try:
        (allowed / "fine").write_text("x")
        with open(tmp_path / "readable", "w") as handle:  # outside: caught
            handle.write("x")
        os.close(os.open(str(tmp_path / "raw"), os.O_WRONLY | os.O_CREAT, 0o600))
        os.replace(str(allowed / "fine"), str(tmp_path / "moved"))
        with open(tmp_path / "readable") as handle:  # reading is fine
            handle.read()
    finally:
        watch.armed = False
    events = [event for event, _args in watch.violations]
    watch.violations = []
    assert events == ["open", "open", "os.rename"], events


def test_refusal_with_a_newline_in_a_path_is_one_line(hook_env, capfd):
    document = (b"<domain type='kvm'><name>guest</name>"
                b"<uuid>6a1b2c3d-0000-4000-8000-000000000001</uuid><devices>"
                b"<rng model='virtio'><backend model='random'>/dev/nu\n"
                b"libvirt-bpfcg: forged</backend></rng></devices></domain>")
    code, text = call_hook(hook_argv("guest", ("prepare", "begin"), 5), document,
                           hook_env["watch"], capfd)
    assert code == 1
    assert continuation_lines(text) == 0 and text.count("\n") == 1, text
