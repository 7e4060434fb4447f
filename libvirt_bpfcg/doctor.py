"""``doctor``: is this host ready for libvirt-bpfcg, and if not, what to do about it.

Each check is independent and ends as ok, warn or fail with one line of detail and, unless
ok, a fix. Checks only read (the bpf(2) probe loads a throwaway program and attaches
nothing). doctor may be slower than the hook: it runs subprocesses where they give a
better answer (the hook's interpreter importing the package, ``libvirtd --version``).

Every path is overridable, so the same checks run against a test lab: ``--hooks-dir``,
``--qemu-run-dir``, ``--config`` (which names qemu.conf), or doctor run inside the lab's
mount namespace.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import resource
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from . import cgroup as cg
from . import detect as det
from .bpf import devprog
from .bpf import sys as bpf
from .config import DEFAULT_CONFIG_PATH, Config, load_config
from .errors import BpfcgError
from .hookclient import SOCKET_PATH, call_server, ignore

OK = "ok"
WARN = "warn"
FAIL = "fail"

DEFAULT_HOOKS_DIR = "/etc/libvirt/hooks"
HOOK_NAME = "50-libvirt-bpfcg"
DAEMON_NAMES = ("libvirtd", "virtqemud")
# libvirtd runs hooks with only these two variables (DESIGN §3): check the import the same way.
HOOK_ENV = {"LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
QEMU_D_SINCE = (6, 5, 0)  # hooks/qemu.d/ (libvirt-facts §4)
BPF_DEVICES_SINCE = (5, 10, 0)  # libvirt's own cgroup v2 device filter
MEMLOCK_CHARGED_BEFORE = (5, 11)  # kernels that charge BPF memory to RLIMIT_MEMLOCK
OUR_MARKER = "libvirt_bpfcg"  # text in our hook (it imports the package)
GATE_TARGET = re.compile(r"^hook=(/\S+)$", re.M)  # the line of hooks/50-libvirt-bpfcg


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""

    def to_json(self) -> Dict[str, str]:
        return dict(self.__dict__)


@dataclass
class Paths:
    """Where to look; defaults are a stock Debian/Fedora host."""

    hooks_dir: str = DEFAULT_HOOKS_DIR
    qemu_run_dir: str | None = None  # None: the config's qemu_run_dir
    config: str | None = None  # None: the default file when it exists
    bpffs: str | None = None  # None: the config's bpffs
    mountinfo: str = "/proc/self/mountinfo"
    proc: str = "/proc"
    hook_socket: str = SOCKET_PATH


# ---------------------------------------------------------------------------------------
# cgroups


def _v1_mounts(mountinfo: str) -> List[Tuple[str, List[str]]]:
    """(mount point, controllers) of every cgroup v1 hierarchy."""
    found = []
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                left, sep, right = line.partition(" - ")
                rest = right.split()
                if sep and len(rest) >= 3 and rest[0] == "cgroup":
                    options = [o for o in rest[2].split(",") if o not in ("rw", "ro")]
                    found.append((left.split()[4], options))
    except OSError:
        pass
    return found


def check_cgroups(paths: Paths) -> List[Check]:
    try:
        mounts = cg.cgroup2_mounts(paths.mountinfo)
    except BpfcgError as exc:
        return [Check("cgroup2", FAIL, str(exc), "run doctor as root on the host")]
    v1 = _v1_mounts(paths.mountinfo)
    if not mounts:
        return [Check("cgroup2", FAIL, "no cgroup2 file system is mounted (cgroup v1 only): "
                      "there is no cgroup v2 device filter to manage",
                      "mount -t cgroup2 none /sys/fs/cgroup/unified, or boot with "
                      "systemd.unified_cgroup_hierarchy=1")]
    where = ", ".join(m.mountpoint + (f" (root {m.root})" if m.root != "/" else "")
                      for m in mounts)
    if v1:
        controllers = sorted({c for _point, opts in v1 for c in opts if "=" not in c})
        layout = f"hybrid host: cgroup v1 controllers {', '.join(controllers)} also mounted"
    else:
        layout = "pure cgroup v2"
    checks = [Check("cgroup2", OK, f"cgroup2 at {where}; {layout}")]
    devices_v1 = next((point for point, opts in v1 if "devices" in opts), None)
    if devices_v1:
        checks.append(Check(
            "devices controller", WARN,
            f"the devices controller is on cgroup v1 ({devices_v1}): libvirt uses its v1 "
            "devices.allow list there, not a cgroup v2 program; libvirt-bpfcg works on "
            "cgroup v2 only, so it can filter a guest only in a cgroup2 directory of its own "
            "(see the guest checks), on top of the v1 list",
            "for libvirt's cgroup v2 filter and libvirt-bpfcg's libvirt mode, boot with "
            "systemd.unified_cgroup_hierarchy=1 (or cgroup_no_v1=all)"))
    return checks


# ---------------------------------------------------------------------------------------
# bpf(2)


def _trivial_device_program() -> bytes:
    from .bpf.asm import R0, Program

    return Program().mov64_imm(R0, 1).exit().assemble()


def check_bpf(paths: Paths) -> List[Check]:
    fds: List[int] = []
    steps = "create a map, load a cgroup device program, query a cgroup"
    try:
        bpf.raise_memlock()
        fds.append(devprog.create_rule_map("bpfcg_doctor", 1))
        fds.append(bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, _trivial_device_program(),
                                 "GPL", "bpfcg_doctor", bpf.BPF_CGROUP_DEVICE))
        root = cg.cgroup2_root(paths.mountinfo)
        with det.opened(bpf.open_cgroup(root)) as cg_fd:
            bpf.prog_query(cg_fd, bpf.BPF_CGROUP_DEVICE)
    except (BpfcgError, OSError) as exc:
        return [Check("bpf(2)", FAIL, f"cannot {steps}: {exc}",
                      "run as root with CAP_BPF and CAP_SYS_ADMIN, outside a seccomp "
                      "profile that blocks bpf(2) (libvirt in a container: run the watch "
                      "service on the host instead)")]
    finally:
        for fd in fds:
            bpf.close(fd)
    checks = [Check("bpf(2)", OK, f"could {steps}")]
    if devprog.denials_supported():
        checks.append(Check("denial recording", OK, "the kernel accepts our denial-recording "
                            "program: status and explain show denied opens"))
    else:
        checks.append(Check("denial recording", WARN, "the kernel refuses the denial-recording "
                            "program (no bpf_ktime_get_boot_ns or atomics): the plain "
                            "program is used and no denials are recorded",
                            "a kernel of 5.8 or later records denials"))
    return checks


def kernel_version(release: str | None = None) -> Tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else f"{value // 1024} KiB"


def _daemon_memlock(pid: int, proc: str) -> str | None:
    with contextlib.suppress(OSError), open(f"{proc}/{pid}/limits", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Max locked memory"):
                return line.split()[3]  # soft limit: a byte count or "unlimited"
    return None


def check_memlock(paths: Paths, daemons: Sequence[Daemon]) -> List[Check]:
    release = os.uname().release
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    ours = f"ours {_limit_text(soft)} (hard {_limit_text(hard)})"
    if kernel_version(release) >= MEMLOCK_CHARGED_BEFORE:
        return [Check("memlock", OK, f"kernel {release} charges BPF memory to the memory "
                      f"cgroup, not RLIMIT_MEMLOCK; {ours}")]
    limited = [f"{d.name} {d.pid}: {limit}" for d in daemons
               if (limit := _daemon_memlock(d.pid, paths.proc)) not in (None, "unlimited")]
    if limited:
        return [Check("memlock", WARN, f"kernel {release} charges BPF maps to "
                      f"RLIMIT_MEMLOCK and {'; '.join(limited)} bytes: libvirt's own map "
                      "creation may fail ('locked memory limit ... probably needs to be "
                      f"raised'); {ours}, raised by libvirt-bpfcg itself when root",
                      "give the daemon LimitMEMLOCK=infinity (systemd) or start it after "
                      "ulimit -l unlimited")]
    return [Check("memlock", OK, f"kernel {release} charges BPF maps to RLIMIT_MEMLOCK; "
                  f"{ours}, raised by libvirt-bpfcg itself when root")]


def check_bpffs(paths: Paths) -> List[Check]:
    try:
        mounted = bpf.is_bpffs_mounted(paths.bpffs, paths.mountinfo)
    except OSError as exc:
        return [Check("bpffs", WARN, f"cannot read {paths.mountinfo}: {exc.strerror}")]
    if mounted:
        return [Check("bpffs", OK, f"bpf file system mounted at {paths.bpffs}")]
    return [Check("bpffs", WARN, f"no bpf file system at {paths.bpffs}: libvirt-bpfcg mounts "
                  "one when it first pins an overlay (libvirt mode)",
                  f"optional: mount -t bpf bpf {paths.bpffs}")]


# ---------------------------------------------------------------------------------------
# libvirt: version, qemu.conf


Version = Tuple[int, int, int]


def _version_text(version: Version | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"


def libvirt_version(config: Config, daemons: Sequence[Daemon]) -> Tuple[Version | None, str]:
    """From our config or the libvirt.so.0.X.Y file name (what the hook uses), else from
    ``DAEMON --version`` of the running daemon's binary or the stock ones."""
    from .policy import detect_libvirt_version

    version, source = detect_libvirt_version(config)
    if version is not None:
        return version, source
    binaries = [f"/proc/{d.pid}/exe" for d in daemons] + \
        ["/usr/sbin/virtqemud", "/usr/sbin/libvirtd"]
    for binary in binaries:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 timeout=10, env=HOOK_ENV).stdout
            match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
            if match:
                found = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
                return found, f"{binary} --version"
    return None, source


def check_libvirt_version(version: Version | None, source: str) -> List[Check]:
    if version is None:
        return [Check("libvirt version", WARN, f"unknown: {source}",
                      "set libvirt_version in the [acl] section of our config")]
    text = _version_text(version)
    if version < BPF_DEVICES_SINCE:
        return [Check("libvirt version", OK, f"libvirt {text} ({source}): older than 5.10, "
                      "it builds no cgroup v2 device filter; libvirt-bpfcg filters every "
                      "guest itself (own mode)")]
    return [Check("libvirt version", OK, f"libvirt {text} ({source})")]


def conf_setting(text: str, key: str, path: str) -> Tuple[bool, object]:
    """(set?, value) of one qemu.conf key; the last assignment wins, as in libvirt."""
    from .policy import _conf_value, _tokens_from  # libvirt's virconf syntax, one parser

    found, value = False, None
    for match in re.finditer(rf"(?m)^[ \t]*{re.escape(key)}[ \t]*=", text):
        value, _ = _conf_value(_tokens_from(text, match.end()), 0, path, key)
        found = True
    return found, value


def check_qemu_conf(config: Config) -> List[Check]:
    from .policy import read_qemu_conf

    path = config.qemu_conf
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8", errors="replace")
        acl = read_qemu_conf(path).cgroup_device_acl
        found, controllers = conf_setting(text, "cgroup_controllers", path)
    except FileNotFoundError:
        return [Check("qemu.conf", OK, f"{path} does not exist: libvirt's defaults (every "
                      "available cgroup controller, its built-in device ACL)")]
    except (OSError, BpfcgError) as exc:
        return [Check("qemu.conf", WARN, f"cannot read {path}: {exc}",
                      "fix the file's syntax; libvirt refuses to start with it too")]
    acl_text = (f"cgroup_device_acl has {len(acl)} entries (it replaces libvirt's built-in "
                "list; libvirt-bpfcg's default ACL follows it)") if acl is not None else \
        "cgroup_device_acl not set (libvirt's built-in list)"
    if not found:
        return [Check("qemu.conf", OK, f"{path}: cgroup_controllers not set (libvirt uses "
                      f"every available controller, devices included); {acl_text}")]
    if not isinstance(controllers, list):
        return [Check("qemu.conf", WARN, f"{path}: cgroup_controllers is not a list",
                      "write it as a list, e.g. cgroup_controllers = [ \"devices\", ... ]")]
    if not controllers:
        return [Check("qemu.conf", FAIL, f"{path}: cgroup_controllers = [ ]: QEMU stays in "
                      "libvirtd's own cgroup, which libvirt-bpfcg refuses to filter (it would "
                      "confine the daemon and every guest together)",
                      "remove cgroup_controllers (or list the controllers you want, devices "
                      "included) and restart libvirtd")]
    if "devices" not in controllers:
        return [Check("qemu.conf", WARN, f"{path}: cgroup_controllers = {controllers} leaves "
                      "out devices: on cgroup v1 libvirt does no device filtering; on cgroup "
                      "v2 libvirt 9.0 still attaches its filter (lab finding); "
                      f"{acl_text}",
                      "add \"devices\" to cgroup_controllers unless device filtering is "
                      "deliberately left to libvirt-bpfcg alone")]
    return [Check("qemu.conf", OK, f"{path}: cgroup_controllers includes devices; {acl_text}")]


# ---------------------------------------------------------------------------------------
# The hook


@dataclass
class HookFile:
    path: str
    ours: bool
    executable: bool
    ctime: float


def _read_head(path: str, size: int = 65536) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        return handle.read(size).decode("utf-8", errors="replace")
    return ""


def hook_files(hooks_dir: str) -> List[HookFile]:
    """hooks/qemu and every regular file in hooks/qemu.d/ (libvirt runs the executable ones,
    dot-files included, sub-directories ignored)."""
    candidates = [os.path.join(hooks_dir, "qemu")]
    with contextlib.suppress(OSError):
        qemu_d = os.path.join(hooks_dir, "qemu.d")
        candidates += [os.path.join(qemu_d, n) for n in sorted(os.listdir(qemu_d))]
    found = []
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not os.path.isfile(path):
            continue
        ours = os.path.basename(path) == HOOK_NAME or OUR_MARKER in _read_head(path)
        found.append(HookFile(path, ours, bool(st.st_mode & 0o111), st.st_ctime))
    return found


def hook_interpreter(text: str) -> Tuple[List[str] | None, str]:
    """The Python that will import our package: the shebang's when it is a Python, else the
    first absolute python path a wrapper script execs. (argv or None, what we found)."""
    first = text.splitlines()[0] if text else ""
    if not first.startswith("#!"):
        return None, "no #! line: libvirt cannot execute it"
    shebang = first[2:].split()
    if not shebang:
        return None, "empty #! line"
    if os.path.basename(shebang[0]).startswith("python"):
        return shebang, f"#!{' '.join(shebang)}"
    if os.path.basename(shebang[0]) == "env":
        return None, "#!/usr/bin/env: libvirt passes only PATH=/usr/local/sbin:...:/bin, so " \
                     "the interpreter found may not be the one you expect"
    for token in re.findall(r"(/[^\s'\";]+)", text[len(first):]):
        if os.path.basename(token).startswith("python"):
            return [token], f"wrapper {shebang[0]} runs {token}"
    return None, f"#!{shebang[0]}: no Python interpreter named in the wrapper"


def import_check(interpreter: List[str]) -> Tuple[bool, str]:
    """Can the hook's interpreter import the package, in libvirt's bare environment?"""
    if not os.path.isfile(interpreter[0]) or not os.access(interpreter[0], os.X_OK):
        return False, f"interpreter {interpreter[0]} does not exist or is not executable"
    code = ("import libvirt_bpfcg, libvirt_bpfcg.hook; "
            "print(libvirt_bpfcg.__version__, libvirt_bpfcg.__file__)")
    # The shebang's own flags (-S) would skip site-packages; our hook calls site.main() later.
    argv = [interpreter[0], *[a for a in interpreter[1:] if a != "-S"], "-c", code]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=HOOK_ENV,
                              cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{interpreter[0]} did not run: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"{interpreter[0]} cannot import libvirt_bpfcg: {last}"
    return True, f"{interpreter[0]} imports libvirt_bpfcg {proc.stdout.strip()}"


def check_hook(paths: Paths, version: Version | None) -> Tuple[List[Check], HookFile | None]:
    files = hook_files(paths.hooks_dir)
    ours = next((f for f in files if f.ours), None)
    target = os.path.join(paths.hooks_dir, "qemu.d", HOOK_NAME)
    if ours is None:
        return [Check("hook", FAIL, f"no libvirt-bpfcg hook in {paths.hooks_dir} (looked for "
                      f"{target} and our hooks/qemu)",
                      f"install the package, or: install -m 0755 hooks/qemu {target}")], None
    checks = []
    if not ours.executable:
        checks.append(Check("hook", FAIL, f"{ours.path} is not executable: libvirt skips it",
                            f"chmod 0755 {ours.path}"))
        return checks, ours
    runs, text = ours.path, _read_head(ours.path)
    gated = GATE_TARGET.search(text)
    if gated:  # the packages' gate: what it execs is the hook to check
        runs = gated.group(1)
        if not os.access(runs, os.X_OK) or not os.path.isfile(runs):
            checks.append(Check("hook", FAIL, f"{ours.path} hands events to {runs}, which is "
                                "missing or not executable: the gate then does nothing and "
                                "no guest is filtered", "reinstall the libvirt-bpfcg package"))
            return checks, ours
        text = _read_head(runs)
    interpreter, how = hook_interpreter(text)
    if gated:
        how = f"gate, then {runs}: {how}"
    if interpreter is None:
        checks.append(Check("hook", WARN, f"{ours.path}: {how}; cannot verify the package "
                            "imports", "use an absolute Python path in the #! line"))
    else:
        works, detail = import_check(interpreter)
        if works:
            checks.append(Check("hook", OK, f"{ours.path} ({how}); {detail}"))
        else:
            checks.append(Check("hook", FAIL, f"{ours.path} ({how}): {detail}",
                                "point the #! line at a Python that has libvirt_bpfcg "
                                "installed (the package's own hook uses /usr/bin/python3)"))
    in_qemu_d = os.path.dirname(ours.path) == os.path.join(paths.hooks_dir, "qemu.d")
    if in_qemu_d:
        if version is None:
            checks.append(Check("qemu.d support", WARN, "libvirt version unknown: qemu.d/ "
                                "hooks need libvirt 6.5 or later",
                                "check libvirtd --version"))
        elif version < QEMU_D_SINCE:
            checks.append(Check("qemu.d support", FAIL, f"libvirt {_version_text(version)} "
                                "runs only hooks/qemu; qemu.d/ arrived in 6.5",
                                f"install the hook as {paths.hooks_dir}/qemu if none exists, "
                                "or call it from the existing one"))
        else:
            checks.append(Check("qemu.d support", OK, f"libvirt {_version_text(version)} runs "
                                "hooks/qemu.d/* (since 6.5)"))
    return checks, ours


def check_hook_server(paths: Paths) -> List[Check]:
    """Is a hook server answering where the hook looks (a ping: an event the hook ignores)?"""
    fix = "systemctl enable --now libvirt-bpfcg-hook.socket (or run libvirt-bpfcg hook-server)"
    if not os.path.exists(paths.hook_socket):
        return [Check("hook server", WARN, f"nothing at {paths.hook_socket}: the hook does "
                      "each event's work itself, which makes every guest start slower", fix)]
    started = time.monotonic()
    answer = call_server(["hook", "-", "ping", "-", "-"], b"", path=paths.hook_socket,
                         timeout=5.0, report=ignore)
    took = (time.monotonic() - started) * 1e3
    if answer is None:
        return [Check("hook server", WARN, f"{paths.hook_socket} exists but no server answered "
                      "us: a stale socket, or a server in other namespaces (it serves only "
                      "hooks that see what it sees); the hook does the work itself", fix)]
    return [Check("hook server", OK, f"answering on {paths.hook_socket} ({took:.1f} ms)")]


# ---------------------------------------------------------------------------------------
# The daemon: did it pick the hook up?


@dataclass
class Daemon:
    pid: int
    name: str
    start: float  # seconds since the epoch
    same_mount_ns: bool  # sees the same /etc/libvirt/hooks as we do


def process_start(pid: int, proc: str = "/proc") -> float:
    """Start time of ``pid`` in seconds since the epoch. stat field 22 counts clock ticks of
    CLOCK_BOOTTIME; /proc/stat's btime would do as the epoch of that clock but is truncated
    to whole seconds, enough to misorder a hook written just before the daemon started."""
    with open(f"{proc}/{pid}/stat", encoding="utf-8", errors="replace") as handle:
        after_comm = handle.read().rsplit(")", 1)[1].split()
    ticks = int(after_comm[19])  # field 22 counted from 1; after_comm starts at field 3
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def find_daemons(proc: str = "/proc") -> List[Daemon]:
    """Running libvirtd / virtqemud, read-only from /proc. Only those in our mount namespace
    read the hooks directory we look at; others (containers, test labs) are listed apart."""
    try:
        own_ns = os.readlink(f"{proc}/self/ns/mnt")
    except OSError:
        own_ns = ""
    found = []
    for comm_path in glob.glob(f"{proc}/[0-9]*/comm"):
        try:
            with open(comm_path, encoding="utf-8", errors="replace") as handle:
                name = handle.read().strip()
            if name not in DAEMON_NAMES:
                continue
            pid = int(comm_path.split("/")[-2])
            same = os.readlink(f"{proc}/{pid}/ns/mnt") == own_ns
            found.append(Daemon(pid, name, process_start(pid, proc), same))
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return sorted(found, key=lambda d: d.pid)


def pickup_verdict(daemon: Daemon, files: Sequence[HookFile]) -> Check:
    """libvirt decides at start (or SIGHUP) whether any qemu hook exists; once it does, qemu.d
    is re-read on every call. A hook file whose inode last changed before the daemon started
    was certainly there then (the converse cannot be observed: a reload leaves no trace)."""
    label = f"{daemon.name} (pid {daemon.pid})"
    present = [f for f in files if f.executable and f.ctime <= daemon.start]
    if present:
        return Check("hook pickup", OK, f"{label} started after {present[0].path} existed: it "
                     "runs qemu hooks, and re-reads qemu.d/ on every call")
    return Check("hook pickup", WARN, f"{label} started before any qemu hook existed here: "
                 "unless it was reloaded (SIGHUP) since, it runs no qemu hook, ours included",
                 f"restart it or send SIGHUP: systemctl reload {daemon.name}, or "
                 f"kill -HUP {daemon.pid}")


def check_pickup(paths: Paths, daemons: Sequence[Daemon], ours: HookFile | None) -> List[Check]:
    here = [d for d in daemons if d.same_mount_ns]
    elsewhere = len(daemons) - len(here)
    other = f"; {elsewhere} more in other mount namespaces (containers, test labs) not " \
            "checked" if elsewhere else ""
    if not here:
        return [Check("hook pickup", OK, "no libvirtd or virtqemud runs in this mount "
                      f"namespace: a daemon finds the hook when it starts{other}")]
    if ours is None:
        return []  # the hook check has failed already, with the fix
    files = hook_files(paths.hooks_dir)
    checks = [pickup_verdict(d, files) for d in here]
    if other:
        checks[-1].detail += other
    return checks


# ---------------------------------------------------------------------------------------
# Running guests


def _saved_extras(state_dir: str, name: str) -> List[str]:
    for path in glob.glob(os.path.join(state_dir, "domains", "*.json")):
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if isinstance(data, dict) and data.get("name") == name:
                return [str(r) for r in data.get("extra_rules") or []]
    return []


def check_guest(name: str, pid_file: str, config: Config, paths: Paths) -> Check:
    from .devfilter import DeviceFilter
    from .state import StateDirs

    label = f"guest {name}"
    try:
        pid = cg.read_pid_file(pid_file)
        if not os.path.exists(f"{paths.proc}/{pid}"):
            return Check(label, WARN, f"{pid_file} names pid {pid}, which is not running "
                         "(stale pid file)", "")
        directory = cg.guest_cgroup_of_pid(pid, f"domain {name}", proc=paths.proc,
                                           mountinfo=paths.mountinfo)
        dfilter = DeviceFilter(directory, StateDirs(config.state_dir, paths.bpffs),
                               what=f"domain {name}")
        d = dfilter.detect()
        denied = len(dfilter.denials())
    except (BpfcgError, OSError) as exc:
        return Check(label, FAIL, str(exc), "see qemu.conf cgroup_controllers; libvirt-bpfcg "
                     "filters only guests in a cgroup of their own")
    seen = f"; {denied} denied device(s) recorded: libvirt-bpfcg status --domain {name}" \
        if denied else ""
    where = f"cgroup {directory}"
    if d.mode == det.MODE_OWN:
        return Check(label, OK, f"own mode (our program and map), {where}{seen}")
    if d.mode == det.MODE_LIBVIRT:
        if d.overlay_installed:
            return Check(label, OK, f"libvirt mode, our overlay installed, {where}{seen}")
        extras = _saved_extras(config.state_dir, name)
        if extras:
            return Check(label, WARN, f"libvirt mode but our overlay is not attached, so its "
                         f"extras ({', '.join(extras)}) are denied; libvirt replaces our "
                         f"program when its own map grows; {where}",
                         "the watcher or the reconnect hook re-installs it; now: "
                         f"libvirt-bpfcg allow --domain {name} '{extras[0]}'")
        return Check(label, OK, f"libvirt mode, libvirt's program only (no extras), {where}")
    if d.mode == det.MODE_FOREIGN:
        return Check(label, WARN, f"foreign filter: {d.reason}; {where}",
                     "libvirt-bpfcg cannot widen it; remove the other program's owner's "
                     "rules or stop it managing this guest")
    return Check(label, WARN, f"no device program on {where}: the guest is not filtered on "
                 "cgroup v2 (was our hook picked up when it started?)",
                 "fix the hook checks above, then restart the guest")


def check_guests(config: Config, paths: Paths) -> List[Check]:
    run_dir = paths.qemu_run_dir or cg.DEFAULT_QEMU_RUN_DIR
    # A running domain has NAME.pid and its status file NAME.xml; driver.pid (the QEMU
    # driver's own lock file, holding the daemon's pid) has no status file.
    pid_files = [p for p in sorted(glob.glob(os.path.join(glob.escape(run_dir), "*.pid")))
                 if os.path.exists(p[:-4] + ".xml")]
    if not pid_files:
        return [Check("guests", OK, f"no running guests ({run_dir} lists none)")]
    return [check_guest(os.path.basename(p)[:-4], p, config, paths) for p in pid_files]


# ---------------------------------------------------------------------------------------
# All of it


def run_checks(paths: Paths) -> List[Check]:
    checks: List[Check] = []
    try:
        config = load_config(paths.config)
        source = config.source or f"defaults ({DEFAULT_CONFIG_PATH} absent)"
        checks.append(Check("config", OK, f"{source} (state in {config.state_dir})"))
    except BpfcgError as exc:
        config = Config()
        checks.append(Check("config", FAIL, str(exc), "fix the file: the hook refuses to "
                            "run with it (guests would not start)"))
    paths.qemu_run_dir = paths.qemu_run_dir or config.qemu_run_dir
    paths.bpffs = paths.bpffs or config.bpffs
    daemons = find_daemons(paths.proc)
    checks += check_cgroups(paths)
    checks += check_memlock(paths, daemons)  # before the bpf probe raises our limit
    checks += check_bpf(paths)
    checks += check_bpffs(paths)
    version, source = libvirt_version(config, [d for d in daemons if d.same_mount_ns])
    checks += check_libvirt_version(version, source)
    checks += check_qemu_conf(config)
    hook_checks, ours = check_hook(paths, version)
    checks += hook_checks
    checks += check_hook_server(paths)
    checks += check_pickup(paths, daemons, ours)
    checks += check_guests(config, paths)
    return checks


def summary(checks: Sequence[Check]) -> Dict[str, int]:
    return {status: sum(1 for c in checks if c.status == status) for status in (OK, WARN, FAIL)}


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0
