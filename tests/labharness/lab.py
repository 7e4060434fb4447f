"""A real libvirtd 9.0 + QEMU lab for tests, after the tested recipe in the shared lab README
(pitfalls P1-P17 are cited by number).

    with Lab().up() as lab:
        disk = lab.new_loop("d0")
        lab.define(lab.guest_xml("g1", [disk]))
        lab.start("g1")
        print(lab.guest_cgroup_host("g1"))

libvirtd runs in a private mount namespace whose /sys/fs/cgroup is a pure cgroup2 mount, so
libvirt uses its cgroup v2 backend and its BPF device filter, with LAB_DIR sub-directories
bind-mounted over /etc/libvirt, /var/lib/libvirt, /run/libvirt, /var/log/libvirt and
/var/cache/libvirt. Host mounts, /etc and /run are not modified. Clients on the host connect
through lab.uri.

Cgroup isolation (default): the holder joins a cgroup of its own,
<host cgroup2>/bpfcg-lab-XXXX, and unshares a cgroup namespace rooted there before mounting
cgroup2. Inside, libvirt sees the usual /machine/qemu-N-NAME.libvirt-qemu; on the host that
directory is <host cgroup2>/bpfcg-lab-XXXX/machine/qemu-N-NAME.libvirt-qemu. Two labs (two
fixtures, or two test runs at once) therefore never share a cgroup - domain ids restart at 1
in each libvirtd, so on a shared /machine their guests' cgroups would collide - and down()
removes exactly its own subtree. isolate_cgroup=False gives the recipe's layout (/machine at
the hierarchy root); use it only when no other lab runs.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Sequence, Tuple

from . import bpfstate, config
from .host import (
    LabError,
    cgroup2_super_options,
    cgroup_tree_pids,
    detect_virt_type,
    ensure_packages,
    global_lock,
    host_cgroup2_mount,
    kill_wait,
    loop_backing_file,
    loops_backed_under,
    mounts_of_type,
    pid_cmdline,
    pid_matches,
    pid_start_time,
    process_cgroup_path,
    read_int,
    remove_cgroup_tree,
    run,
    tcg_probe_ok,
)

HERE = os.path.dirname(os.path.abspath(__file__))
HOLDER_SCRIPT = os.path.join(HERE, "holder.py")
NOBPF_SOURCE = os.path.join(HERE, "nobpf.c")
LIBVIRTD = "/usr/sbin/libvirtd"
LAB_PREFIX = "bpfcg-lab-"
DEFAULT_BASE = "/tmp"
# host directories the namespace binds over; the host must have them as (empty) mount points
MOUNTPOINTS = ("/etc/libvirt", "/var/lib/libvirt", "/run/libvirt", "/var/log/libvirt",
               "/var/cache/libvirt", "/run/libvirt-bpfcg")
# left inside a mount-point directory a lab created, so whichever lab is last removes it
MOUNTPOINT_MARKER = ".bpfcg-lab-mountpoint"
VIRSH_ENV = dict(os.environ, LC_ALL="C")
CAPS_CACHE_DIR = ("cache", "qemu", "capabilities")
# QEMU capabilities probed by a lab of this process: file name -> XML (see
# Lab._seed_capabilities_cache); kept in memory so nothing is left on disk
_CAPS_CACHE: Dict[str, str] = {}


class Lab:
    """One private libvirtd with its namespace, files, loop devices and cgroups."""

    def __init__(self, base_dir: str = DEFAULT_BASE, isolate_cgroup: bool = True) -> None:
        self.base_dir = base_dir
        self.isolate_cgroup = isolate_cgroup
        self.lab_dir: str | None = None
        self.virt_type: str = ""
        self.preload_nobpf = False
        self.timings: Dict[str, List[float]] = {}
        self._holder: subprocess.Popen | None = None
        self._owner_pid = os.getpid()

    # --- context manager ------------------------------------------------------------------

    def __enter__(self) -> Lab:
        if not self.lab_dir:
            self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- paths ----------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        if not self.lab_dir:
            raise LabError("the lab is not up")
        return os.path.join(self.lab_dir, *parts)

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self._path('run', 'libvirt-sock')}"

    @property
    def qemu_run_dir_host(self) -> str:
        """Host path of the namespace's /run/libvirt/qemu (NAME.pid, NAME.xml)."""
        return self._path("run", "qemu")

    @property
    def hooks_dir_host(self) -> str:
        """Host path of the namespace's /etc/libvirt/hooks."""
        return self._path("etc", "hooks")

    @property
    def log_dir_host(self) -> str:
        """Host path of the namespace's /var/log/libvirt (libvirtd.log, qemu/NAME.log)."""
        return self._path("log")

    @property
    def cgroup_root_host(self) -> str:
        """Host directory of what the lab sees as /sys/fs/cgroup."""
        if not self.isolate_cgroup:
            return host_cgroup2_mount()
        path = self._read_state("cgroup")
        if not path:
            raise LabError("the lab has no cgroup yet")
        return path

    def _read_state(self, name: str) -> str:
        try:
            with open(self._path(name)) as handle:
                return handle.read().strip()
        except OSError:
            return ""

    def _append_state(self, name: str, line: str) -> None:
        with open(self._path(name), "a") as handle:
            handle.write(line + "\n")

    def _timed(self, key: str, started: float) -> float:
        elapsed = time.monotonic() - started
        self.timings.setdefault(key, []).append(elapsed)
        return elapsed

    # --- up -------------------------------------------------------------------------------

    def up(
        self,
        qemu_conf_extra: str = "",
        libvirtd_preload_nobpf: bool = False,
        namespaces: str | None = None,
    ) -> Lab:
        """Install missing packages, write the configuration, start the namespace holder and
        libvirtd. On failure everything done so far is undone and LabError says why."""
        if self.lab_dir:
            raise LabError(f"lab already up in {self.lab_dir}")
        started = time.monotonic()
        self._check_host()
        sweep_stale_labs(self.base_dir)
        self.lab_dir = tempfile.mkdtemp(prefix=LAB_PREFIX, dir=self.base_dir)
        os.chmod(self.lab_dir, 0o755)  # QEMU and the hooks read and write below it
        _register(self)
        self.preload_nobpf = libvirtd_preload_nobpf
        try:
            self._append_state("owner", f"{os.getpid()} {pid_start_time(os.getpid())}")
            self._write_files(qemu_conf_extra, namespaces)
            self._seed_capabilities_cache()
            preload = self._build_nobpf_shim() if libvirtd_preload_nobpf else ""
            self._start_holder(preload)
            self.start_libvirtd()
            self._check_no_networks()
        except BaseException as exc:
            detail = self._failure_detail()
            with contextlib.suppress(Exception):
                self.down()
            if isinstance(exc, LabError):
                if "\n--- log/" in str(exc):
                    detail = ""  # start_libvirtd has added it already
                raise LabError(f"lab did not come up: {exc}{detail}") from exc
            raise
        self._timed("up", started)
        return self

    def _check_host(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, mounts, loop devices, cgroups)")
        ensure_packages()
        self.virt_type = detect_virt_type()
        if self.virt_type == "qemu" and not tcg_probe_ok():
            raise LabError("QEMU can run neither with KVM (-cpu qemu64) nor with TCG")
        host_cgroup2_mount()  # raises if the host has no cgroup2

    def _write_files(self, qemu_conf_extra: str, namespaces: str | None) -> None:
        for sub in ("etc/hooks/qemu.d", "lib", "run", "log", "cache", "images", "xml"):
            os.makedirs(self._path(sub), exist_ok=True)
        os.makedirs(self._path("bpfcg-run"), mode=0o700, exist_ok=True)
        write_file(self._path("etc", "libvirtd.conf"), config.LIBVIRTD_CONF)
        write_file(self._path("etc", "qemu.conf"), config.qemu_conf(qemu_conf_extra, namespaces))
        write_file(self._path("etc", "hooks", "qemu"), config.NOOP_HOOK, mode=0o755)
        with open("/etc/passwd") as passwd, open("/etc/group") as group:
            new_passwd, new_group = config.with_libvirt_qemu_user(passwd.read(), group.read())
        write_file(self._path("passwd"), new_passwd)
        write_file(self._path("group"), new_group)

    def _seed_capabilities_cache(self) -> None:
        """Start with the QEMU capabilities an earlier lab of this process probed: the first
        libvirtd start then skips the probe (about 1.5 s). libvirt checks each cached file
        against the QEMU binary, itself and the host, and re-probes if anything changed."""
        directory = self._path(*CAPS_CACHE_DIR)
        os.makedirs(directory, exist_ok=True)
        for other in list(_LIVE.values()):  # labs still up, e.g. the other session fixture
            if other is not self and other.lab_dir:
                with contextlib.suppress(OSError):
                    other._keep_capabilities_cache()
        for name, content in _CAPS_CACHE.items():
            write_file(os.path.join(directory, name), content, mode=0o600)

    def _keep_capabilities_cache(self) -> None:
        for path in glob.glob(os.path.join(self._path(*CAPS_CACHE_DIR), "*.xml")):
            with open(path) as handle:
                _CAPS_CACHE[os.path.basename(path)] = handle.read()

    def _build_nobpf_shim(self) -> str:
        shim = self._path("nobpf.so")
        run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", shim, NOBPF_SOURCE, "-ldl"])
        return shim

    def _start_holder(self, preload: str) -> None:
        started = time.monotonic()
        with global_lock(self.base_dir):
            self._create_mountpoints()
            cgroup_dir = self._create_lab_cgroup()
            cmd = ["unshare", "-m", "--propagation", "private", "--",
                   sys.executable, HOLDER_SCRIPT, "--lab", self._path(),
                   "--cgroup", cgroup_dir, "--preload", preload]
            with open(self._path("log", "holder.out"), "w") as out:
                # own session: a terminal's Ctrl-C goes to pytest, which tears down in order
                self._holder = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True,
                )
            write_file(self._path("holder.pid"), f"{self._holder.pid}\n")
            self._wait_namespace_ready()
        self._check_namespace_mounts()
        self._timed("holder", started)

    def _create_mountpoints(self) -> None:
        for mountpoint in MOUNTPOINTS:
            if not os.path.isdir(mountpoint):
                os.makedirs(mountpoint)
                write_file(os.path.join(mountpoint, MOUNTPOINT_MARKER), "libvirt-bpfcg lab\n")

    def _create_lab_cgroup(self) -> str:
        if not self.isolate_cgroup:
            return ""
        root = host_cgroup2_mount()
        with open(os.path.join(root, "cgroup.controllers")) as handle:
            controllers = handle.read()
        if not controllers.strip():
            raise LabError(f"{root}/cgroup.controllers is empty: libvirt 9.0 would not use "
                           "this cgroup2 at all")
        write_file(self._path("cgroup.controllers"), controllers)
        path = os.path.join(root, os.path.basename(self._path()))
        os.mkdir(path)
        write_file(self._path("cgroup"), path + "\n")
        return path

    def _wait_namespace_ready(self) -> None:
        assert self._holder is not None
        deadline = time.monotonic() + 15
        while not os.path.exists(self._path("ns-ready")):
            if self._holder.poll() is not None:
                raise LabError(f"namespace holder exited ({self._holder.returncode}): "
                               f"{self._read_state('log/holder.out')}")
            if time.monotonic() > deadline:
                raise LabError("namespace holder not ready after 15 s")
            time.sleep(0.01)

    def _check_namespace_mounts(self) -> None:
        """Inside: exactly one mount at or below /sys/fs/cgroup, a cgroup2 without nsdelegate
        (P3), and every bind mount in place. Read from /proc/HOLDER/mountinfo."""
        holder = str(self.holder_pid)
        cgroup_mounts = mounts_of_type("cgroup2", holder)
        below = [f[4] for f in _mountinfo_fields(holder) if f[4].startswith("/sys/fs/cgroup")]
        expected = ["/sys/fs/cgroup"]
        if self.isolate_cgroup:
            expected.append("/sys/fs/cgroup/cgroup.controllers")
        if below != expected or len(cgroup_mounts) != 1:
            raise LabError(f"unexpected cgroup mounts in the lab namespace: {below}")
        if "nsdelegate" in cgroup_mounts[0]["super_options"]:
            raise LabError("cgroup2 is mounted with nsdelegate (P3): the host changed too")
        targets = {f[4] for f in _mountinfo_fields(holder)}
        missing = [m for m in MOUNTPOINTS + ("/etc/passwd", "/etc/group") if m not in targets]
        if missing:
            raise LabError(f"bind mounts missing in the lab namespace: {missing}")

    def _check_no_networks(self) -> None:
        # the minimal package set defines no network (libvirt-daemon-system would)
        names = self.virsh("net-list", "--all", "--name").stdout.split()
        if names:
            raise LabError(f"unexpected libvirt networks defined: {names}")

    def _failure_detail(self) -> str:
        """The end of the holder's and libvirtd's output and libvirtd's last errors (its log
        is mostly debug lines, P15 lists the harmless errors)."""
        if not self.lab_dir:
            return ""
        parts = []
        for name in ("log/holder.out", "log/libvirtd.stdout"):
            text = self._read_state(name)
            if text:
                parts.append(f"--- {name} (tail)\n" + "\n".join(text.splitlines()[-10:]))
        errors = [line for line in self._read_state("log/libvirtd.log").splitlines()
                  if " error : " in line]
        if errors:
            parts.append("--- log/libvirtd.log (last errors)\n" + "\n".join(errors[-10:]))
        return ("\n" + "\n".join(parts)) if parts else ""

    # --- processes ------------------------------------------------------------------------

    @property
    def holder_pid(self) -> int | None:
        return read_int(self._path("holder.pid"))

    @property
    def libvirtd_pid(self) -> int | None:
        return read_int(self._path("libvirtd.pid"))

    def holder_alive(self) -> bool:
        return pid_matches(self.holder_pid, f"holder.py --lab {self._path()}")

    def libvirtd_alive(self) -> bool:
        return self._is_ours(self.libvirtd_pid, LIBVIRTD)

    def _is_ours(self, pid: int | None, needle: str) -> bool:
        """pid runs `needle` and belongs to this lab: in its cgroup subtree (isolated), or
        started after the lab (not isolated, where only one lab may run)."""
        if not pid or not pid_matches(pid, needle):
            return False
        if self.isolate_cgroup:
            own = "/" + os.path.basename(self._path())
            try:
                path = process_cgroup_path(pid)
            except LabError:
                return False
            return path == own or path.startswith(own + "/")
        owner = self._read_state("owner").split()
        owner_start = int(owner[1]) if len(owner) == 2 else 0
        return (pid_start_time(pid) or 0) >= owner_start

    def ns_run(
        self, cmd: Sequence[str], check: bool = True, input: str | None = None,  # noqa: A002
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """Run cmd inside the lab's mount namespace (and, isolated, in the lab's cgroup and
        cgroup namespace, like libvirtd's own children). The cwd there is /, so pass
        absolute paths (P16)."""
        if not self.holder_alive():
            raise LabError("namespace holder not running")
        argv = list(cmd)
        if not os.path.isabs(argv[0]):
            argv[0] = shutil.which(argv[0]) or argv[0]
        enter = ["nsenter", "-t", str(self.holder_pid), "-m"]
        if self.isolate_cgroup:
            procs = os.path.join(self.cgroup_root_host, "cgroup.procs")
            enter = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *enter, "-C"]
        return run([*enter, "--", *argv], check=check, input=input, timeout=timeout)

    # --- libvirtd -------------------------------------------------------------------------

    def start_libvirtd(self) -> None:
        """Have the holder spawn libvirtd; return once it answers and every running domain
        has reconnected (so the reconnect hooks have run, P11)."""
        started = time.monotonic()
        if not self.holder_alive():
            raise LabError("namespace holder not running")
        if self.libvirtd_alive():
            raise LabError(f"libvirtd already running (pid {self.libvirtd_pid})")
        previous = self.libvirtd_pid
        for sock in ("libvirt-sock", "libvirt-sock-ro", "libvirt-admin-sock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path("run", sock))
        os.kill(self.holder_pid or 0, signal.SIGUSR1)
        try:
            self._wait_libvirtd_answers(previous)
        except LabError as exc:
            # Seen once in ~20 full runs right after a stop with a client still connected:
            # the new libvirtd exited at once, leaving nothing in its log. One more start
            # tells a flake from a real failure (which fails again, with its log).
            if "exited during startup" not in str(exc):
                raise
            self._append_state("log/restarts", f"retry after: {exc}".splitlines()[0])
            time.sleep(0.5)
            if not self.libvirtd_alive():  # alive: the check raced it; just wait again
                previous = self.libvirtd_pid
                os.kill(self.holder_pid or 0, signal.SIGUSR1)
            self._wait_libvirtd_answers(previous)
        self._reconnect_barrier()
        self._timed("libvirtd_start", started)

    def _wait_libvirtd_answers(self, previous: int | None) -> None:
        # the first start probes QEMU's capabilities (about 1.3 s with the subreaper, P5)
        deadline = time.monotonic() + 60
        sock = self._path("run", "libvirt-sock")
        while time.monotonic() < deadline:
            pid = self.libvirtd_pid
            if pid and pid != previous:
                if not self.libvirtd_alive():
                    raise LabError(f"libvirtd exited during startup{self._failure_detail()}")
                if _socket_accepts(sock) and self.virsh("version", check=False).returncode == 0:
                    return
            time.sleep(0.02)
        raise LabError(
            f"libvirtd did not answer within 60 s (pid {self.libvirtd_pid}, before "
            f"{previous}, alive {self.libvirtd_alive()}, holder alive {self.holder_alive()})"
            f"{self._failure_detail()}")

    def _reconnect_barrier(self) -> None:
        """libvirtd answers before its per-domain reconnect threads finish. A job-taking
        query per running domain waits for each reconnect job (P11)."""
        for name in self.virsh("list", "--name").stdout.split():
            listing = self.virsh("domblklist", name, check=False).stdout.split()
            if listing:
                self.virsh("domblkstat", name, listing[0], check=False)

    def stop_libvirtd(self) -> None:
        """SIGTERM libvirtd (SIGKILL after 30 s). Running guests keep running."""
        started = time.monotonic()
        pid = self.libvirtd_pid
        if self.libvirtd_alive() and not kill_wait(pid, LIBVIRTD, 30):
            raise LabError(f"libvirtd {pid} does not exit")
        self._timed("libvirtd_stop", started)

    def restart_libvirtd(self) -> None:
        self.stop_libvirtd()
        self.start_libvirtd()

    def libvirtd_log(self) -> str:
        return self._read_state("log/libvirtd.log")

    def virsh(self, *args: str, check: bool = True, timeout: float = 60
              ) -> subprocess.CompletedProcess:
        """virsh -q -c <lab uri> ARGS, on the host; check=True raises LabError on failure."""
        return run(["virsh", "-q", "-c", self.uri, *args], check=check, timeout=timeout,
                   env=VIRSH_ENV)

    # --- disks and guests -----------------------------------------------------------------

    def new_loop(self, name: str, size_mb: int = 32) -> str:
        """A loop device over a new sparse file LAB_DIR/images/NAME.img; detached at down()."""
        image = self._path("images", config.check_guest_name(name) + ".img")
        if os.path.exists(image):
            raise LabError(f"loop image {name} exists already")
        with open(image, "wb") as handle:
            handle.truncate(size_mb * 1024 * 1024)
        device = run(["losetup", "--show", "-f", image]).stdout.strip()
        self._append_state("loops", f"{device} {image}")
        return device

    def free_loop(self, device: str) -> None:
        """Detach one of our loop devices now and delete its image."""
        image = dict(self._loops()).get(device)
        if image is None:
            raise LabError(f"{device} is not a loop device of this lab")
        if loop_backing_file(device) == image:
            run(["losetup", "-d", device])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
        remaining = [f"{d} {i}" for d, i in self._loops() if d != device]
        write_file(self._path("loops"), "".join(line + "\n" for line in remaining))

    def _loops(self) -> List[Tuple[str, str]]:
        pairs = []
        for line in self._read_state("loops").splitlines():
            device, _, image = line.partition(" ")
            if image:
                pairs.append((device, image))
        return pairs

    def guest_xml(
        self,
        name: str,
        disks: Sequence[str],
        extra_devices_xml: str = "",
        metadata_xml: str = "",
        virt_type: str | None = None,
    ) -> str:
        return config.guest_xml(name, virt_type or self.virt_type, disks, extra_devices_xml,
                                metadata_xml)

    def define(self, xml: str) -> str:
        """virsh define; returns the domain name."""
        name = ET.fromstring(xml).findtext("name") or ""
        path = self._path("xml", config.check_guest_name(name) + ".xml")
        write_file(path, xml)
        self.virsh("define", path)
        return name

    def start(self, name: str) -> int:
        """virsh start; returns QEMU's pid. With the nobpf shim, checks that libvirt really
        attached no device filter."""
        started = time.monotonic()
        self.virsh("start", name)
        self._timed("start", started)
        pid = self.qemu_pid(name)
        self._append_state("qemu.pids", str(pid))
        if self.preload_nobpf:
            # libvirt's own filter is unnamed; ours (bpfcg_dev, from a hook) is expected
            progs = [p for p in bpfstate.device_programs(self.guest_cgroup_host(name))
                     if p.name != "bpfcg_dev"]
            if progs:
                raise LabError(f"nobpf shim ineffective: {name} has device programs {progs}")
        return pid

    def destroy(self, name: str, check: bool = True) -> None:
        started = time.monotonic()
        self.virsh("destroy", name, check=check)
        self._timed("destroy", started)

    def undefine(self, name: str, check: bool = True) -> None:
        self.virsh("undefine", name, "--managed-save", check=check)

    def qemu_pid(self, name: str) -> int:
        """QEMU's pid from LAB_DIR/run/qemu/NAME.pid (= /run/libvirt/qemu inside)."""
        pid = read_int(os.path.join(self.qemu_run_dir_host, f"{name}.pid"))
        if not pid or not pid_matches(pid, "qemu-system"):
            raise LabError(f"guest {name} has no running QEMU")
        return pid

    def guest_cgroup_host(self, name: str) -> str:
        """The guest's cgroup directory as the host sees it: QEMU's own 0:: path (never a
        name scan: ids are reused and stale directories linger, P12/P13) joined to the host's
        cgroup2 mount point."""
        rel = process_cgroup_path(self.qemu_pid(name))
        path = os.path.join(host_cgroup2_mount(), rel.lstrip("/"))
        if not os.path.isdir(path):
            raise LabError(f"guest {name}: cgroup {path} does not exist")
        return path

    def in_guest_cgroup_open(self, name: str, paths_with_flags: Sequence[Tuple[str, int]]
                             ) -> List[int]:
        """Fork a child on the host, move it into the guest's cgroup, open each (path, flags);
        returns each errno (0 = opened)."""
        # imported here: kernel_fixtures lives in tests/ (on sys.path under pytest only)
        from kernel_fixtures import open_in_cgroup

        return open_in_cgroup(self.guest_cgroup_host(name), paths_with_flags)

    # --- hooks ----------------------------------------------------------------------------

    def install_hook(self, path_or_script_text: str, name: str = "50-libvirt-bpfcg") -> str:
        """Install an executable into hooks/qemu.d/NAME (a script text starting with '#!' or
        a file to copy). libvirt re-reads qemu.d on every call, so no reload is needed. A
        hook run by libvirt gets only LC_ALL and PATH (P7): give scripts absolute shebangs."""
        if path_or_script_text.startswith("#!"):
            text = path_or_script_text
        elif os.path.isfile(path_or_script_text):
            with open(path_or_script_text) as handle:
                text = handle.read()
        else:
            raise LabError(f"install_hook: {path_or_script_text[:60]!r} is neither a '#!' "
                           "script nor a file")
        target = os.path.join(self.hooks_dir_host, "qemu.d", config.check_guest_name(name))
        write_file(target, text, mode=0o755)  # atomic: libvirt never runs a half-written hook
        return target

    def remove_hook(self, name: str = "50-libvirt-bpfcg") -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.hooks_dir_host, "qemu.d", name))

    # --- down -----------------------------------------------------------------------------

    def down(self) -> None:
        """Leave the machine as found: domains destroyed and undefined, libvirtd, QEMU and the
        holder stopped (recorded, checked pids only), the lab's cgroups removed, its loop
        devices detached, the mount-point directories it created removed (when no other lab
        still uses them), LAB_DIR deleted. Works after a partial up() and after libvirtd
        died. Raises LabError listing what it could not clean (after doing all it could)."""
        if not self.lab_dir:
            return
        started = time.monotonic()
        problems: List[str] = []
        with contextlib.suppress(OSError):
            self._keep_capabilities_cache()
        steps: List[Callable[[List[str]], None]] = [
            self._destroy_domains, self._stop_libvirtd_for_down, self._kill_leftover_qemus,
            self._stop_holder, self._remove_cgroups, self._detach_loops,
            self._remove_mountpoints,
        ]
        for step in steps:
            try:
                step(problems)
            except Exception as exc:  # noqa: BLE001 - keep cleaning, report at the end
                problems.append(f"{step.__name__}: {exc}")
        shutil.rmtree(self.lab_dir, ignore_errors=True)
        if os.path.exists(self.lab_dir):
            problems.append(f"{self.lab_dir} not removed")
        _unregister(self)
        self.lab_dir = None
        self._timed("down", started)
        if problems:
            raise LabError("lab down: " + "; ".join(problems))

    def _destroy_domains(self, problems: List[str]) -> None:
        if not self.libvirtd_alive():
            return
        listing = self.virsh("list", "--all", "--name", check=False, timeout=30)
        if listing.returncode != 0:
            return  # libvirtd is dying: its QEMUs are killed by pid next
        for name in listing.stdout.split():
            self.virsh("destroy", name, check=False, timeout=30)
            proc = self.virsh("undefine", name, "--managed-save", check=False, timeout=30)
            if proc.returncode != 0 and "not found" not in proc.stderr:
                problems.append(f"undefine {name}: {proc.stderr.strip()}")

    def _stop_libvirtd_for_down(self, problems: List[str]) -> None:
        pid = self.libvirtd_pid
        if self.libvirtd_alive() and not kill_wait(pid, LIBVIRTD, 30):
            problems.append(f"libvirtd {pid} survived SIGKILL")

    def _qemu_pids(self) -> List[int]:
        pids = [int(p) for p in self._read_state("qemu.pids").split()]
        for pidfile in glob.glob(os.path.join(self.qemu_run_dir_host, "*.pid")):
            pid = read_int(pidfile)
            if pid:
                pids.append(pid)
        return sorted(set(pids))

    def _kill_leftover_qemus(self, problems: List[str]) -> None:
        # guests that outlived libvirtd (it crashed, or it was stopped on purpose)
        for pid in self._qemu_pids():
            if self._is_ours(pid, "qemu-system") and not kill_wait(pid, "qemu-system", 10):
                problems.append(f"QEMU {pid} survived SIGKILL")

    def _stop_holder(self, problems: List[str]) -> None:
        needle = f"holder.py --lab {self._path()}"
        if not kill_wait(self.holder_pid, needle, 35):
            problems.append(f"holder {self.holder_pid} survived SIGKILL")
        if self._holder is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._holder.wait(timeout=5)  # reap our child
            self._holder = None

    def _remove_cgroups(self, problems: List[str]) -> None:
        if self.isolate_cgroup:
            self._remove_lab_cgroup(problems)
        else:
            self._remove_machine_cgroups(problems)

    def _remove_lab_cgroup(self, problems: List[str]) -> None:
        lab_cgroup = self._read_state("cgroup")
        if not lab_cgroup or not os.path.isdir(lab_cgroup):
            return
        leftovers = cgroup_tree_pids(lab_cgroup)
        if leftovers:
            # only this lab's processes can be in its subtree (holder descendants, probes)
            problems.append("killed leftover processes in the lab cgroup: " + ", ".join(
                f"{p} ({pid_cmdline(p)[:60]})" for p in leftovers))
            write_file(os.path.join(lab_cgroup, "cgroup.kill"), "1", atomic=False)
            _wait_until(lambda: not cgroup_tree_pids(lab_cgroup), 5)
        problems.extend(_retry_remove_cgroup_tree(lab_cgroup))

    def _remove_machine_cgroups(self, problems: List[str]) -> None:
        machine = os.path.join(host_cgroup2_mount(), "machine")
        for stale in glob.glob(os.path.join(machine, "*.libvirt-qemu*")):
            problems.extend(_retry_remove_cgroup_tree(stale))
        with contextlib.suppress(OSError):
            os.rmdir(machine)  # libvirt never removes it; fails harmlessly if still in use

    def _detach_loops(self, problems: List[str]) -> None:
        for device, image in self._loops():
            if loop_backing_file(device) == image:
                proc = run(["losetup", "-d", device], check=False)
                if proc.returncode != 0:
                    problems.append(f"losetup -d {device}: {proc.stderr.strip()}")
        # loops attached but never recorded (interrupted new_loop) are backed by our files too
        for device in loops_backed_under(self._path()):
            run(["losetup", "-d", device], check=False)
        still = loops_backed_under(self._path())
        if still:
            problems.append(f"loop devices still attached: {still}")

    def _remove_mountpoints(self, problems: List[str]) -> None:
        """Remove mount-point directories a lab created, unless another lab is still up:
        removing a directory that is a mount point in another namespace detaches that
        namespace's mount."""
        with global_lock(self.base_dir):
            if other_live_labs(self.base_dir, exclude=self._path()):
                return
            for mountpoint in MOUNTPOINTS:
                marker = os.path.join(mountpoint, MOUNTPOINT_MARKER)
                if not os.path.exists(marker):
                    continue  # not created by a lab: never ours to remove
                if os.listdir(mountpoint) != [MOUNTPOINT_MARKER]:
                    problems.append(f"{mountpoint} is not empty; left in place")
                    continue
                os.unlink(marker)
                os.rmdir(mountpoint)

    # --- adoption of labs whose owner died ------------------------------------------------

    @classmethod
    def adopt(cls, lab_dir: str) -> Lab:
        """A Lab object for an existing LAB_DIR (e.g. left by a killed test run), so that
        down() can clean it up."""
        lab = cls(base_dir=os.path.dirname(lab_dir),
                  isolate_cgroup=os.path.exists(os.path.join(lab_dir, "cgroup")))
        lab.lab_dir = lab_dir
        return lab


# --- module helpers -----------------------------------------------------------------------


def write_file(path: str, text: str, mode: int = 0o644, atomic: bool = True) -> None:
    if not atomic:
        with open(path, "w") as handle:
            handle.write(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.rename(tmp, path)


def _mountinfo_fields(pid: str) -> List[List[str]]:
    with open(f"/proc/{pid}/mountinfo") as handle:
        return [line.split() for line in handle]


def _socket_accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _retry_remove_cgroup_tree(directory: str) -> List[str]:
    """rmdir can briefly fail with EBUSY right after the last process exited."""
    failed: List[str] = []
    for _ in range(50):
        failed = remove_cgroup_tree(directory)
        if not failed:
            return []
        time.sleep(0.02)
    return failed


def _owner_alive(lab_dir: str) -> bool:
    try:
        with open(os.path.join(lab_dir, "owner")) as handle:
            pid, start = (int(x) for x in handle.read().split())
    except (OSError, ValueError):
        # no owner yet: a lab being created right now (or an empty dir): leave it alone
        # unless it is old
        try:
            return time.time() - os.stat(lab_dir).st_mtime < 300
        except OSError:
            return True
    return pid_start_time(pid) == start


def other_live_labs(base_dir: str, exclude: str) -> List[str]:
    """Lab directories (not `exclude`) whose holder runs or whose owner is alive."""
    live = []
    for lab_dir in glob.glob(os.path.join(base_dir, LAB_PREFIX + "*")):
        if lab_dir == exclude:
            continue
        holder = read_int(os.path.join(lab_dir, "holder.pid"))
        if pid_matches(holder, f"holder.py --lab {lab_dir}") or _owner_alive(lab_dir):
            live.append(lab_dir)
    return live


def sweep_stale_labs(base_dir: str = DEFAULT_BASE) -> List[str]:
    """down() every lab whose owning process is gone (a test run that was SIGKILLed).
    Returns the directories cleaned."""
    cleaned = []
    for lab_dir in glob.glob(os.path.join(base_dir, LAB_PREFIX + "*")):
        if not os.path.isdir(lab_dir) or _owner_alive(lab_dir):
            continue
        with contextlib.suppress(LabError):
            Lab.adopt(lab_dir).down()
        cleaned.append(lab_dir)
    return cleaned


# --- cleanup at exit and on fatal signals -------------------------------------------------

_LIVE: Dict[int, Lab] = {}
_PREVIOUS_HANDLERS: Dict[int, object] = {}
_FATAL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _register(lab: Lab) -> None:
    _LIVE[id(lab)] = lab
    if len(_LIVE) == 1 and not _PREVIOUS_HANDLERS:
        atexit.register(down_all_labs)
        if threading.current_thread() is threading.main_thread():
            for sig in _FATAL_SIGNALS:
                _PREVIOUS_HANDLERS[sig] = signal.signal(sig, _on_fatal_signal)


def _unregister(lab: Lab) -> None:
    _LIVE.pop(id(lab), None)


def down_all_labs() -> None:
    """Tear down every lab this process brought up (not in forked children)."""
    for lab in list(_LIVE.values()):
        if lab._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                lab.down()


def _on_fatal_signal(signum: int, frame: object) -> None:
    down_all_labs()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)  # type: ignore[arg-type]
    os.kill(os.getpid(), signum)


def host_leftovers(lab_dir: str, cgroup_dir: str = "") -> List[str]:
    """What a lab left on the host after down(): its directory, loop devices backed by its
    files, its cgroup, processes mentioning it. Empty means clean."""
    found = []
    if os.path.exists(lab_dir):
        found.append(f"{lab_dir} exists")
    found += [f"loop {d}" for d in loops_backed_under(lab_dir)]
    if cgroup_dir and os.path.exists(cgroup_dir):
        found.append(f"cgroup {cgroup_dir}")
    for entry in os.listdir("/proc"):
        if entry.isdigit() and lab_dir in pid_cmdline(int(entry)):
            found.append(f"process {entry}: {pid_cmdline(int(entry))[:80]}")
    if "nsdelegate" in cgroup2_super_options():
        found.append("cgroup2 mounted with nsdelegate")
    return found
