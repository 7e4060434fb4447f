"""The lab's namespace holder, run as a script (stdlib only):

    unshare -m --propagation private -- PYTHON holder.py --lab LAB_DIR [--cgroup HOST_CGROUP_DIR]
        [--preload SO]

It (1) optionally joins the lab's own cgroup and unshares a cgroup namespace rooted there, so
this lab's libvirt builds its /machine tree inside a subtree no other lab shares; (2) sets up
the private mounts: a pure cgroup2 at /sys/fs/cgroup (never nsdelegate: cgroup2 options are
superblock-global and would change the host's mount too, lab pitfall P3) and the LAB_DIR
sub-directories over libvirt's paths, all with mount -n so /run/mount/utab stays untouched
(P4); (3) stays alive as a PR_SET_CHILD_SUBREAPER that reaps at once (PID 1 here reaps orphans
only every 1-2 s and libvirt waits for QEMU's pid to vanish, P5); (4) spawns libvirtd on
SIGUSR1 with a clean environment (P7) and its pid file inside the lab (P10).

SIGTERM/SIGINT: stop libvirtd (SIGKILL after 30 s), then exit. Running guests survive.
Files: LAB_DIR/ns-ready once the mounts are in place, LAB_DIR/libvirtd.pid for each spawn.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWCGROUP = 0x02000000
LIBVIRTD = "/usr/sbin/libvirtd"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# LAB_DIR sub-directory or file -> the path it replaces inside the namespace
BIND_MOUNTS = (
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("run", "/run/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    # our own default state dir and the hook server's socket, as in a container of its own
    ("bpfcg-run", "/run/libvirt-bpfcg"),
    # copies with a libvirt-qemu user: the QEMU driver resolves its compiled-in default user
    # before reading qemu.conf (P1); only this namespace sees them
    ("passwd", "/etc/passwd"),
    ("group", "/etc/group"),
)
HANDLED = {signal.SIGCHLD, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}

libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


def enter_own_cgroup_namespace(cgroup_dir: str) -> None:
    """Join the lab's cgroup, then unshare a cgroup namespace: its root is that cgroup, so the
    cgroup2 mounted below shows only the lab's subtree, as /."""
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    if libc.unshare(CLONE_NEWCGROUP) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWCGROUP): {os.strerror(err)}")


def set_up_mounts(lab: str, own_cgroup_namespace: bool) -> None:
    # the hybrid tree (tmpfs + v1 controllers + unified) goes; libvirt then sees only cgroup2
    # and picks its v2 backend, whose device filter is the BPF program we study (P2)
    subprocess.run(["umount", "-n", "-R", "/sys/fs/cgroup"], check=False)
    sh("mount", "-n", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup")
    if own_cgroup_namespace:
        # libvirt takes a cgroup2 mount whose root lists no controllers in cgroup.controllers
        # for "systemd's process-tracking-only v2" and ignores it. Our namespace root is a
        # child cgroup with no controllers delegated, so show libvirt the hierarchy root's
        # list instead (LAB_DIR/cgroup.controllers, written by the lab), in here only.
        sh("mount", "-n", "--bind", os.path.join(lab, "cgroup.controllers"),
           "/sys/fs/cgroup/cgroup.controllers")
    for source, target in BIND_MOUNTS:
        sh("mount", "-n", "--bind", os.path.join(lab, source), target)


def spawn_libvirtd(lab: str, preload: str | None) -> int:
    env: Dict[str, str] = {"LC_ALL": "C", "PATH": CLEAN_PATH}
    if preload:
        env["LD_PRELOAD"] = preload
    log = os.path.join(lab, "log", "libvirtd.stdout")
    pid = os.posix_spawn(
        LIBVIRTD, [LIBVIRTD, "--pid-file", "/run/libvirt/libvirtd-lab.pid"], env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsigmask=set(), setsigdef=HANDLED,
    )
    write_atomically(os.path.join(lab, "libvirtd.pid"), f"{pid}\n")
    return pid


def write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.rename(tmp, path)


class Reaper:
    """Reaps every child (libvirtd, and the QEMUs libvirt double-forks, which land here)."""

    def __init__(self) -> None:
        self.libvirtd: int | None = None

    def reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.libvirtd:
                self.libvirtd = None

    def reap_remaining(self, timeout: float) -> None:
        """QEMUs killed just before we were told to exit are still our children: a killed
        multi-threaded process shows Z before its last thread is gone and cannot be reaped
        yet. Wait for them, or PID 1 inherits them (and reaps only every 1-2 s, P5)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # no children left
            if pid == 0:
                signal.sigtimedwait({signal.SIGCHLD}, 0.05)

    def wait_if_exiting(self) -> None:
        """A libvirtd that was just told to stop may not be a zombie yet when the next start
        request arrives; wait for it instead of taking it for a running one."""
        if self.libvirtd is None:
            return
        try:
            with open(f"/proc/{self.libvirtd}/cmdline", "rb") as handle:
                exiting = handle.read() == b""  # memory released: it is in exit
        except OSError:
            exiting = True
        if exiting:
            os.waitpid(self.libvirtd, 0)
            self.libvirtd = None

    def stop_libvirtd(self) -> None:
        if self.libvirtd is None:
            return
        os.kill(self.libvirtd, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self.libvirtd is not None and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.1)
            self.reap()
        if self.libvirtd is not None:
            os.kill(self.libvirtd, signal.SIGKILL)
            os.waitpid(self.libvirtd, 0)
            self.libvirtd = None


def serve(lab: str, preload: str | None) -> int:
    reaper = Reaper()
    while True:
        info = signal.sigtimedwait(HANDLED, 1.0)
        reaper.reap()
        if info is None or info.si_signo in (signal.SIGCHLD, signal.SIGHUP):
            continue
        if info.si_signo == signal.SIGUSR1:
            reaper.wait_if_exiting()
            if reaper.libvirtd is None:
                reaper.libvirtd = spawn_libvirtd(lab, preload)
            continue
        reaper.stop_libvirtd()  # SIGTERM / SIGINT
        reaper.reap_remaining(3.0)
        return 0


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", required=True)
    parser.add_argument("--cgroup", default="")
    parser.add_argument("--preload", default="")
    args = parser.parse_args(argv)
    # block first: a SIGUSR1/SIGTERM that arrives during setup waits instead of killing us
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("prctl(PR_SET_CHILD_SUBREAPER) failed", file=sys.stderr)
        return 1
    try:
        if args.cgroup:
            enter_own_cgroup_namespace(args.cgroup)
        set_up_mounts(args.lab, bool(args.cgroup))
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"namespace setup failed: {exc}", file=sys.stderr)
        return 1
    with open(os.path.join(args.lab, "ns-ready"), "w"):
        pass
    return serve(args.lab, args.preload or None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
