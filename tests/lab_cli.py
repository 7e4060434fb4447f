"""Running our CLI inside the lab's namespace, as an admin on that host would: one-shot
(``cli``) or as a background service (``WatchProcess``, always stopped in a finally)."""

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


def install_hook(lab, body: str = "") -> None:
    """Our hook in the lab's qemu.d/, run by this checkout's interpreter (libvirtd passes
    only PATH and LC_ALL), with the lab's config file naming our state dir."""
    with open(os.path.join(lab.lab_dir, "etc", "libvirt-bpfcg.conf"), "w") as handle:
        handle.write(f"[hook]\nstate_dir = {STATE_DIR}\n")
    launcher = body or f'exec {sys.executable} -S {HOOK} "$@"'
    lab.install_hook(f"#!/bin/sh\n{launcher}\n")


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


class WatchProcess:
    """``libvirt-bpfcg watch`` running in the lab; its log is kept in the lab dir."""

    def __init__(self, lab, *extra: str, debug: bool = False) -> None:
        self.log_path = os.path.join(lab.lab_dir, "log", f"watch-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        argv = cli_argv(*(["--debug"] if debug else []), "watch", "-c", lab.uri,
                        "--state-dir", STATE_DIR, *extra)
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

    def __enter__(self) -> WatchProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate, timeout: float, interval: float = 0.01) -> float:
    """Seconds until ``predicate()`` is true; AssertionError after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"not true within {timeout} s"
        time.sleep(interval)
    return time.monotonic() - started
