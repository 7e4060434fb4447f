"""Running our CLI inside the lab's namespace, as an admin on that host would: one-shot
(``cli``) or as a background service (``WatchProcess``, ``HookServerProcess``, always
stopped in a finally)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import List, Sequence

STATE_DIR = "/run/libvirt/bpfcg"  # inside the lab: removed with it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = os.path.join(ROOT, "hooks", "qemu")
EXTRAS_NS = "https://libvirt-bpfcg.org/xmlns/extras/1"


GATE = os.path.join(ROOT, "hooks", "50-libvirt-bpfcg")
INSTALLED_HOOK = "/usr/libexec/libvirt-bpfcg/qemu-hook"  # where the gate looks for the hook


def gate_script(hook_path: str, gate_path: str = GATE) -> str:
    """The packaged gate (hooks/50-libvirt-bpfcg, or ``gate_path``: the one from a built
    package), pointed at ``hook_path`` instead of the installed Python hook: the only line
    the packages and the lab differ in."""
    with open(gate_path) as handle:
        text = handle.read()
    line = f"hook={INSTALLED_HOOK}\n"
    assert text.count(line) == 1, f"{gate_path} no longer sets {line.strip()}"
    return text.replace(line, f"hook={hook_path}\n")


def install_hook(lab, body: str = "", direct: bool = False) -> None:
    """Our hook in the lab's qemu.d/ as the packages install it: the gate, then the Python
    hook, run here through a launcher (this checkout's interpreter: libvirtd passes only PATH
    and LC_ALL), with the lab's config file naming our state dir. ``body``: the launcher's
    shell command instead of the plain hook. ``direct``: no launcher, the gate runs
    hooks/qemu itself (its #!/usr/bin/python3 -S and the system's lxml), as installed."""
    with open(os.path.join(lab.lab_dir, "etc", "libvirt-bpfcg.conf"), "w") as handle:
        handle.write(f"[hook]\nstate_dir = {STATE_DIR}\n")
    if direct:
        lab.install_hook(gate_script(HOOK))
        return
    launcher = os.path.join(lab.lab_dir, "bpfcg-hook")  # same path inside the namespace
    with open(launcher, "w") as handle:
        handle.write("#!/bin/sh\n" + (body or f'exec {sys.executable} -S {HOOK} "$@"') + "\n")
    os.chmod(launcher, 0o755)
    lab.install_hook(gate_script(launcher))


def extras_xml(*paths: str) -> str:
    """Our <metadata> extras for device paths (docs/metadata.md)."""
    devices = "".join(f"<bpfcg:device path='{p}' access='rw'/>" for p in paths)
    return f"<bpfcg:extras xmlns:bpfcg='{EXTRAS_NS}'>{devices}</bpfcg:extras>"


def ns_argv(lab, cmd: Sequence[str]) -> List[str]:
    """The wrapper Lab.ns_run uses: the lab's mount namespace, and (isolated labs) its cgroup
    and cgroup namespace."""
    enter = ["nsenter", "-t", str(lab.holder_pid), "-m"]
    if lab.isolate_cgroup:
        procs = os.path.join(lab.cgroup_root_host, "cgroup.procs")
        enter = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *enter, "-C"]
    return [*enter, "--", *cmd]


def cli_argv(*args: str) -> List[str]:
    return [sys.executable, "-m", "libvirt_bpfcg", *args]


def cli(lab, *args: str, expect: int = 0, input: str | None = None  # noqa: A002
        ) -> subprocess.CompletedProcess:
    """libvirt-bpfcg ARGS inside the lab; asserts the exit code."""
    proc = subprocess.run(ns_argv(lab, cli_argv(*args)), capture_output=True, text=True,
                          input=input, timeout=120, cwd=ROOT)
    assert proc.returncode == expect, (f"exit {proc.returncode} (expected {expect}) for "
                                       f"{args}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


class LabService:
    """``libvirt-bpfcg ARGS`` running in the lab as a service; its log is kept in the lab dir.
    Always stopped (SIGTERM) in a finally or a with block."""

    def __init__(self, lab, *args: str, debug: bool = False) -> None:
        self.log_path = os.path.join(lab.lab_dir, "log",
                                     f"{args[0]}-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        argv = cli_argv(*(["--debug"] if debug else []), *args)
        self.proc = subprocess.Popen(ns_argv(lab, argv), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.returncode: int | None = None

    def log(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()

    def wait_for(self, pattern: str, timeout: float = 10, count: int = 1) -> float:
        """Seconds until ``pattern`` (a regex) appears ``count`` times in the log."""
        started = time.monotonic()
        while len(re.findall(pattern, self.log())) < count:
            assert self.proc.poll() is None, f"watch exited {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() - started < timeout, \
                f"no {pattern!r} within {timeout} s:\n{self.log()}"
            time.sleep(0.02)
        return time.monotonic() - started

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        self.returncode = self.proc.returncode
        return self.returncode

    def __enter__(self) -> LabService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WatchProcess(LabService):
    """``libvirt-bpfcg watch`` on the lab's libvirtd, with the lab's state dir."""

    def __init__(self, lab, *extra: str, debug: bool = False) -> None:
        super().__init__(lab, "watch", "-c", lab.uri, "--state-dir", STATE_DIR, *extra,
                         debug=debug)


class HookServerProcess(LabService):
    """``libvirt-bpfcg hook-server`` in the lab, on the socket the lab's hooks look for
    (the lab mounts a /run/libvirt-bpfcg of its own); returns once it listens."""

    def __init__(self, lab, *extra: str) -> None:
        super().__init__(lab, "hook-server", *extra, debug=True)
        self.wait_for("listening on")

    def served(self) -> int:
        """Requests the server answered itself (its debug log has one line per request)."""
        return len(re.findall(r"hook server: .* -> \d+ in ", self.log()))


def wait_until(predicate, timeout: float, interval: float = 0.01) -> float:
    """Seconds until ``predicate()`` is true; AssertionError after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"not true within {timeout} s"
        time.sleep(interval)
    return time.monotonic() - started
