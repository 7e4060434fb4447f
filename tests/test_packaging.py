"""The packages are part of the product: `make deb` and `make rpm` build them from this
checkout, lintian finds no error, both list everything they must install, and the .deb,
installed with its dependencies into a freshly debootstrapped Debian 12 root, runs there
the way libvirtd runs it. Last, the hook from the .deb filters a guest of the real lab.

Needs root and the Debian mirror of /etc/apt/sources.list* (apt and debootstrap). The
minbase root is cached per day as a tarball, and the .debs apt fetched into it are kept,
under /var/cache/libvirt-bpfcg-tests/; without the cache everything is fetched anew.
"""

from __future__ import annotations

import datetime
import errno
import glob
import gzip
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import pytest
from lab_cli import INSTALLED_HOOK, gate_script

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path("/var/cache/libvirt-bpfcg-tests")
CHROOT_PREFIX = "libvirt-bpfcg-chroot-"
CHROOT_PARENT = "/var/tmp"  # not pytest's tmp: its rotation must never meet a /proc mount
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
HOOK = "/etc/libvirt/hooks/qemu.d/50-libvirt-bpfcg"  # the gate (hooks/50-libvirt-bpfcg)
QEMU_HOOK = INSTALLED_HOOK  # the Python hook (hooks/qemu)
UNITS = ("libvirt-bpfcg-watch.service", "libvirt-bpfcg-hook.socket",
         "libvirt-bpfcg-hook.service")
CONF = "/etc/libvirt/libvirt-bpfcg.conf"
SENTINEL_HOOK = "#!/bin/sh\n# the admin's own hook: no package may replace it\nexit 0\n"

GUEST_XML = """<domain type='kvm' id='1'>
  <name>guest1</name>
  <uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""
GUEST_DISK = "/var/lib/libvirt/images/guest1.img"

TIMINGS: Dict[str, float] = {}


# --- helpers ------------------------------------------------------------------------------


def run(argv: Sequence[str], check: bool = True, **kwargs: object
        ) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    proc = subprocess.run(list(argv), **kwargs)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\n"
                             f"stdout:\n{str(proc.stdout)[-3000:]}\n"
                             f"stderr:\n{str(proc.stderr)[-3000:]}")
    return proc


def ensure_apt(*packages: str) -> None:
    """Install missing Debian packages (never skip: CI must run these tests)."""
    missing = [p for p in packages if "install ok installed" not in run(
        ["dpkg-query", "-W", "-f=${Status}", p], check=False).stdout]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def debian_mirror() -> str:
    """The bookworm mirror apt on this machine uses (deb822 .sources or one-line .list)."""
    files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    files += ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if ("deb" in fields.get("Types", "").split()
                        and "bookworm" in fields.get("Suites", "").split()
                        and fields.get("Enabled", "yes") != "no"):
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = line.split()
                words = [w for w in words if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1]
    raise AssertionError("no bookworm mirror in /etc/apt/sources.list*")


def mounts_under(path: str) -> List[str]:
    """Mount points at or below path, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path or point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_all(path: str) -> None:
    for point in mounts_under(path):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "-l", point], check=False)
    left = mounts_under(path)
    assert not left, f"still mounted: {left}"


def remove_chroot(base: str) -> None:
    unmount_all(base)
    # --one-file-system: even if something were still mounted below, never cross into it.
    run(["rm", "-rf", "--one-file-system", base])


def sweep_stale_chroots() -> None:
    """Chroots of test runs that were killed before their clean-up."""
    for base in glob.glob(os.path.join(CHROOT_PARENT, CHROOT_PREFIX + "*")):
        try:
            owner = int(Path(base, "owner").read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and os.path.exists(f"/proc/{owner}"):
            continue
        remove_chroot(base)


def timed(key: str, started: float) -> None:
    TIMINGS[key] = time.monotonic() - started


@pytest.fixture(scope="session")
def timings_report(request: pytest.FixtureRequest) -> Iterator[Dict[str, float]]:
    """Print how long each packaging step took, at the end of the session."""
    yield TIMINGS
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None or not TIMINGS:
        return
    with capture.global_and_fixture_disabled():  # shown even when every test passed
        reporter.write_line("")
        for key, seconds in TIMINGS.items():
            reporter.write_line(f"packaging timing: {key}: {seconds:.1f}s")


# --- the build ----------------------------------------------------------------------------


@dataclass
class Built:
    deb: str
    rpm: str


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory, timings_report: Dict[str, float]
             ) -> Built:
    """`make deb` and `make rpm` once per session, into a scratch dist/."""
    dist = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, DIST=str(dist))
    for kind in ("deb", "rpm"):
        started = time.monotonic()
        run(["make", "-C", str(ROOT), "--no-print-directory", kind], env=env)
        timed(f"make {kind}", started)
    debs = glob.glob(str(dist / "libvirt-bpfcg_*_all.deb"))
    rpms = glob.glob(str(dist / "libvirt-bpfcg-*.noarch.rpm"))
    assert len(debs) == 1 and len(rpms) == 1, os.listdir(dist)
    return Built(debs[0], rpms[0])


def source_modules() -> List[str]:
    """Every module of the package in this checkout, relative to site-packages."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "libvirt_bpfcg").rglob("*.py"))


def version() -> str:
    text = (ROOT / "libvirt_bpfcg" / "__init__.py").read_text()
    return re.search(r'^__version__ = "(.*)"$', text, re.M).group(1)  # type: ignore[union-attr]


def test_debian_mirror_is_found():
    assert re.match(r"https?://\S+$", debian_mirror())


def test_versions_agree():
    changelog = (ROOT / "packaging/debian/changelog").read_text().splitlines()[0]
    spec = (ROOT / "packaging/rpm/libvirt-bpfcg.spec").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert changelog.startswith(f"libvirt-bpfcg ({version()})")
    assert re.search(rf"^Version:\s+{re.escape(version())}$", spec, re.M)
    assert f'version = "{version()}"' in pyproject


@pytest.mark.packaging
def test_deb_is_lintian_clean_of_errors(packages):
    ensure_apt("lintian")
    started = time.monotonic()
    proc = run(["lintian", "--fail-on", "error", "--display-info", packages.deb], check=False)
    timed("lintian", started)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E: ")]
    assert errors == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def deb_listing(deb: str) -> Dict[str, str]:
    """path -> mode string, from `dpkg-deb -c`."""
    listing = {}
    for line in run(["dpkg-deb", "-c", deb]).stdout.splitlines():
        fields = line.split()
        listing[fields[5].lstrip(".")] = fields[0]
    return listing


@pytest.mark.packaging
def test_deb_lists_hook_package_unit_man_page_and_config(packages):
    listing = deb_listing(packages.deb)
    assert listing[HOOK] == listing[QEMU_HOOK] == "-rwxr-xr-x"
    assert listing[CONF] == "-rw-r--r--"
    for path in ("/usr/bin/libvirt-bpfcg", *(f"/lib/systemd/system/{u}" for u in UNITS),
                 "/usr/share/man/man8/libvirt-bpfcg.8.gz",
                 "/usr/share/bash-completion/completions/libvirt-bpfcg",
                 "/usr/libexec/libvirt-bpfcg/hook-advice"):
        assert path in listing, path
    packaged = {p for p in listing if p.startswith("/usr/lib/python3/dist-packages/")}
    for module in source_modules():
        assert f"/usr/lib/python3/dist-packages/{module}" in packaged, module
    assert "/etc/libvirt/hooks/qemu" not in listing
    assert not [p for p in listing if "/etc/systemd/" in p]  # enabling is postinst's job


@pytest.mark.packaging
def test_systemd_units_verify(tmp_path):
    """systemd's own checker on the three units (ExecStart pointed at a binary that exists
    here: the package is not installed on this host)."""
    ensure_apt("systemd")
    for unit in UNITS:
        text = (ROOT / "packaging/systemd" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/bin/libvirt-bpfcg", "/bin/true"))
    proc = run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / u) for u in UNITS)],
               check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), proc


@pytest.mark.packaging
def test_deb_control_conffiles_and_payload(packages, tmp_path):
    fields = run(["dpkg-deb", "-f", packages.deb, "Architecture", "Depends"]).stdout
    assert "Architecture: all" in fields
    depends = {d.strip().split()[0] for d in fields.split("Depends:")[1].split(",")}
    assert {"python3-lxml", "python3-libvirt"} <= depends
    conffiles = run(["dpkg-deb", "-I", packages.deb, "conffiles"]).stdout.split()
    assert set(conffiles) == {HOOK, CONF}
    run(["dpkg-deb", "-x", packages.deb, str(tmp_path)])
    assert (tmp_path / HOOK.lstrip("/")).read_bytes() == \
        (ROOT / "hooks/50-libvirt-bpfcg").read_bytes()
    assert (tmp_path / QEMU_HOOK.lstrip("/")).read_bytes() == (ROOT / "hooks/qemu").read_bytes()
    assert (tmp_path / CONF.lstrip("/")).read_bytes() == \
        (ROOT / "packaging/libvirt-bpfcg.conf").read_bytes()
    page = gzip.decompress((tmp_path / "usr/share/man/man8/libvirt-bpfcg.8.gz").read_bytes())
    for command in ("allow", "revoke", "status", "plan"):
        assert f'.SS "{command}"'.encode() in page


@pytest.mark.packaging
def test_rpm_lists_hook_package_unit_man_page_and_config(packages):
    listing = run(["rpm", "-qlp", packages.rpm]).stdout.split()
    for path in (HOOK, QEMU_HOOK, CONF, "/usr/bin/libvirt-bpfcg",
                 *(f"/usr/lib/systemd/system/{u}" for u in UNITS),
                 "/usr/lib/systemd/system-preset/80-libvirt-bpfcg.preset",
                 "/usr/share/bash-completion/completions/libvirt-bpfcg",
                 "/usr/libexec/libvirt-bpfcg/hook-advice"):
        assert path in listing, path
    assert [p for p in listing if re.fullmatch(r"/usr/share/man/man8/libvirt-bpfcg\.8(\.\w+)?", p)]
    sitelib = [p for p in listing if p.endswith("/site-packages/libvirt_bpfcg/__init__.py")]
    assert len(sitelib) == 1
    site = sitelib[0][: -len("libvirt_bpfcg/__init__.py")]
    for module in source_modules():
        assert site + module in listing, module
    assert "/etc/libvirt/hooks/qemu" not in listing


@pytest.mark.packaging
def test_rpm_metadata_config_files_and_scriptlets(packages):
    assert run(["rpm", "-qp", "--qf", "%{ARCH}", packages.rpm]).stdout == "noarch"
    configs = run(["rpm", "-qp", "--configfiles", packages.rpm]).stdout.split()
    assert set(configs) == {HOOK, CONF}
    requires = run(["rpm", "-qp", "--requires", packages.rpm]).stdout.splitlines()
    assert {"python3-lxml", "python3-libvirt"} <= {r.split()[0] for r in requires}
    modes = run(["rpm", "-qlvp", packages.rpm]).stdout
    for path in (HOOK, QEMU_HOOK):
        assert re.search(rf"^-rwxr-xr-x .* {re.escape(path)}$", modes, re.M), path
    assert "hook-advice" in run(["rpm", "-qp", "--scripts", packages.rpm]).stdout
    # Debian's rpmbuild has no %systemd_post: the spec applies presets where it exists, and
    # the preset enables the hook server's socket (never the watcher).
    spec = (ROOT / "packaging/rpm/libvirt-bpfcg.spec").read_text()
    assert re.search(r"^%systemd_post libvirt-bpfcg-hook\.socket", spec, re.M)
    preset = (ROOT / "packaging/systemd/80-libvirt-bpfcg.preset").read_text()
    assert [ln for ln in preset.splitlines() if ln and not ln.startswith("#")] == \
        ["enable libvirt-bpfcg-hook.socket"]


# --- the post-install advice (packaging/hook-advice) --------------------------------------


class FakeDaemon:
    """A process whose comm is 'virtqemud' (a copy of sleep), started now."""

    def __init__(self, directory: Path) -> None:
        binary = directory / "virtqemud"
        if not binary.exists():
            shutil.copy("/bin/sleep", binary)
        self.proc = subprocess.Popen([str(binary), "120"])
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def advice(hooks_dir: Path) -> str:
    return run(["sh", str(ROOT / "packaging/hook-advice")],
               env={"PATH": SYSTEM_PATH, "LIBVIRT_BPFCG_HOOKS_DIR": str(hooks_dir)}).stdout


def make_hooks_dir(base: Path, ours: bool = True) -> Path:
    hooks = base / "hooks"
    (hooks / "qemu.d").mkdir(parents=True)
    if ours:
        (hooks / "qemu.d/50-libvirt-bpfcg").write_text("#!/bin/sh\n")
        (hooks / "qemu.d/50-libvirt-bpfcg").chmod(0o755)
    return hooks


def add_hook(path: Path, executable: bool = True) -> None:
    path.write_text(SENTINEL_HOOK)
    path.chmod(0o755 if executable else 0o644)


def test_advice_when_the_running_daemon_saw_no_hook(tmp_path):
    hooks = make_hooks_dir(tmp_path)
    add_hook(hooks / "qemu.d/10-not-executable", executable=False)
    daemon = FakeDaemon(tmp_path)
    try:
        text = advice(hooks)
    finally:
        daemon.stop()
    assert f"virtqemud (pid {daemon.pid})" in text
    assert "systemctl reload" in text and "kill -HUP" in text


def test_no_advice_when_another_hook_predates_the_daemon(tmp_path):
    hooks = make_hooks_dir(tmp_path)
    add_hook(hooks / "qemu")
    time.sleep(2.2)  # start times are whole seconds (btime + ticks): stay clear of rounding
    daemon = FakeDaemon(tmp_path)
    try:
        text = advice(hooks)
    finally:
        daemon.stop()
    assert f"pid {daemon.pid})" not in text


def test_advice_when_the_other_hook_came_after_the_daemon(tmp_path):
    hooks = make_hooks_dir(tmp_path)
    daemon = FakeDaemon(tmp_path)
    try:
        time.sleep(2.2)
        add_hook(hooks / "qemu.d/90-later")
        text = advice(hooks)
    finally:
        daemon.stop()
    assert f"virtqemud (pid {daemon.pid})" in text


def test_no_advice_for_a_daemon_that_does_not_see_our_hook(tmp_path):
    hooks = make_hooks_dir(tmp_path, ours=False)
    daemon = FakeDaemon(tmp_path)
    try:
        text = advice(hooks)
    finally:
        daemon.stop()
    assert f"pid {daemon.pid})" not in text


# --- the .deb in a clean Debian 12 root ---------------------------------------------------


def make_minbase_root(root: Path) -> None:
    """debootstrap --variant=minbase, or today's cached copy of one."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"bookworm-minbase-{datetime.date.today():%Y%m%d}.tar"
    root.mkdir()
    started = time.monotonic()
    if tarball.exists():
        run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tarball)])
        timed("debootstrap root from today's cache (warm)", started)
        return
    ensure_apt("debootstrap", "debian-archive-keyring")
    run(["debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()],
        env={"PATH": SYSTEM_PATH, "LC_ALL": "C"})
    timed("debootstrap --variant=minbase (cold)", started)
    for old in CACHE_DIR.glob("bookworm-minbase-*"):
        writer = old.suffix.rpartition("-")[2]  # .partial-PID of a run still writing it
        if not (writer.isdigit() and os.path.exists(f"/proc/{writer}")):
            old.unlink()
    partial = tarball.with_suffix(f".partial-{os.getpid()}")  # two runs at once: no mix
    run(["tar", "-C", str(root), "--numeric-owner", "-cpf", str(partial), "."])
    partial.rename(tarball)


def in_root(root: Path, *argv: str, stdin: bytes | None = None,
            extra_env: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run argv in the chroot with exactly LC_ALL=C and PATH (what libvirtd passes a hook)."""
    return subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", "LC_ALL=C",
                           f"PATH={SYSTEM_PATH}", *extra_env, *argv],
                          input=stdin, capture_output=True)


def in_root_ok(root: Path, *argv: str, **kwargs: object) -> str:
    proc = in_root(root, *argv, **kwargs)  # type: ignore[arg-type]
    assert proc.returncode == 0, (argv, proc.stdout.decode()[-3000:],
                                  proc.stderr.decode()[-3000:])
    return proc.stdout.decode()


APT_ENV = ("DEBIAN_FRONTEND=noninteractive", "HOME=/root")


@dataclass
class DebianRoot:
    path: Path
    install_log: str
    daemon_pid: int  # the fake virtqemud that ran during the install


@pytest.fixture(scope="module")
def debian_root(packages: Built) -> Iterator[DebianRoot]:
    """A fresh bookworm minbase root with the .deb and its dependencies installed by apt;
    /proc mounted while the module's tests run, then unmounted, and the root deleted."""
    sweep_stale_chroots()
    base = tempfile.mkdtemp(prefix=CHROOT_PREFIX, dir=CHROOT_PARENT)
    Path(base, "owner").write_text(str(os.getpid()))
    root = Path(base, "root")
    try:
        make_minbase_root(root)
        # Like any package build chroot: maintainer scripts must never start daemons here.
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        # The admin's own hooks/qemu, switched off (not executable): it must survive the
        # install untouched, and it does not count as a hook libvirtd saw.
        (root / "etc/libvirt/hooks").mkdir(parents=True)
        add_hook(root / "etc/libvirt/hooks/qemu", executable=False)
        shutil.copy(packages.deb, root / "tmp")
        shutil.copy("/bin/sleep", root / "tmp/virtqemud")
        archives = CACHE_DIR / "apt-archives"
        archives.mkdir(parents=True, exist_ok=True)
        for deb in archives.glob("*.deb"):
            shutil.copy(deb, root / "var/cache/apt/archives")
        run(["mount", "-t", "proc", "proc", str(root / "proc")])
        started = time.monotonic()
        in_root_ok(root, "apt-get", "update", "-qq", extra_env=APT_ENV)
        # A "virtqemud" running in the root since before any hook existed: the postinst
        # must tell the admin to reload it.
        daemon = subprocess.Popen(["chroot", str(root), "/tmp/virtqemud", "600"])
        try:
            log = in_root_ok(root, "apt-get", "install", "-y", "--no-install-recommends",
                             f"/tmp/{os.path.basename(packages.deb)}", extra_env=APT_ENV)
        finally:
            daemon.kill()
            daemon.wait()
        timed("apt-get install .deb + dependencies in the root", started)
        # Cache what apt fetched; autoclean drops versions the mirror no longer has.
        in_root_ok(root, "apt-get", "autoclean", "-qq", extra_env=APT_ENV)
        used = {deb.name for deb in (root / "var/cache/apt/archives").glob("*.deb")}
        for name in used - {deb.name for deb in archives.glob("*.deb")}:
            shutil.copy(root / "var/cache/apt/archives" / name, archives)
        for deb in archives.glob("*.deb"):
            if deb.name not in used:
                deb.unlink()
        disk = root / GUEST_DISK.lstrip("/")
        disk.parent.mkdir(parents=True, exist_ok=True)
        with open(disk, "wb") as handle:
            handle.truncate(1 << 20)
        (root / "tmp/guest1.xml").write_text(GUEST_XML.format(disk=GUEST_DISK))
        (root / "tmp/nodisk.xml").write_text(GUEST_XML.format(disk="/var/lib/nowhere.img"))
        yield DebianRoot(root, log, daemon.pid)
    finally:
        remove_chroot(base)


@pytest.mark.packaging
def test_installed_hook_prepare_exits_0_with_empty_stdout(debian_root):
    proc = in_root(debian_root.path, HOOK, "guest1", "prepare", "begin", "-",
                   stdin=(debian_root.path / "tmp/guest1.xml").read_bytes())
    assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr.decode()


@pytest.mark.packaging
def test_installed_hook_refuses_a_guest_with_a_missing_disk(debian_root):
    # Proves the hook ran the packaged code (not an early exit): libvirt would abort.
    proc = in_root(debian_root.path, HOOK, "guest1", "prepare", "begin", "-",
                   stdin=(debian_root.path / "tmp/nodisk.xml").read_bytes())
    assert proc.returncode != 0
    assert proc.stdout == b""
    assert b"/var/lib/nowhere.img" in proc.stderr


@pytest.mark.packaging
def test_installed_hook_ignores_events_it_does_not_handle(debian_root):
    proc = in_root(debian_root.path, HOOK, "guest1", "stopped", "end", "-", stdin=b"")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


@pytest.mark.packaging
def test_installed_cli_help_and_plan(debian_root):
    assert "usage: libvirt-bpfcg" in in_root_ok(debian_root.path, "libvirt-bpfcg", "--help")
    out = in_root_ok(debian_root.path, "libvirt-bpfcg", "plan", "/tmp/guest1.xml")
    assert GUEST_DISK in out


@pytest.mark.packaging
def test_install_tells_the_admin_to_reload_a_daemon_that_saw_no_hook(debian_root):
    assert f"virtqemud (pid {debian_root.daemon_pid})" in debian_root.install_log
    assert "systemctl reload" in debian_root.install_log


@pytest.mark.packaging
def test_install_keeps_the_admins_qemu_hook_enables_the_socket_not_the_watcher(debian_root):
    root = debian_root.path
    admins = root / "etc/libvirt/hooks/qemu"
    assert (admins.read_text(), admins.stat().st_mode & 0o777) == (SENTINEL_HOOK, 0o644)
    for unit in UNITS:
        assert (root / "lib/systemd/system" / unit).is_file(), unit
    assert not list((root / "etc/systemd").rglob("libvirt-bpfcg-watch.service"))
    assert (root / "etc/systemd/system/sockets.target.wants/libvirt-bpfcg-hook.socket"
            ).is_symlink()
    conffiles = in_root_ok(root, "dpkg-query", "-W", "-f=${Conffiles}", "libvirt-bpfcg")
    assert HOOK in conffiles and CONF in conffiles
    assert (root / "usr/share/man/man8/libvirt-bpfcg.8.gz").is_file()
    assert (root / "usr/share/bash-completion/completions/libvirt-bpfcg").is_file()


@pytest.mark.packaging
def test_removed_but_not_purged_the_left_hook_lets_guests_start(debian_root):
    """Runs last in this module: it removes the package. dpkg keeps conffiles on remove, so
    the hook stays in qemu.d while the Python package is gone; like any such Debian
    script, it must then do nothing rather than abort every guest start."""
    root = debian_root.path
    in_root_ok(root, "apt-get", "remove", "-y", "libvirt-bpfcg", extra_env=APT_ENV)
    assert (root / HOOK.lstrip("/")).exists()
    assert not (root / QEMU_HOOK.lstrip("/")).exists()
    proc = in_root(root, HOOK, "guest1", "prepare", "begin", "-",
                   stdin=(root / "tmp/guest1.xml").read_bytes())
    assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr.decode()
    in_root_ok(root, "apt-get", "purge", "-y", "libvirt-bpfcg", extra_env=APT_ENV)
    assert not (root / HOOK.lstrip("/")).exists()
    assert not (root / CONF.lstrip("/")).exists()
    assert (root / "etc/libvirt/hooks/qemu").read_text() == SENTINEL_HOOK  # not ours


# --- the packaged hook in the real-libvirt lab --------------------------------------------


@pytest.mark.packaging
@pytest.mark.lab
def test_packaged_hook_filters_a_guest_in_the_lab(packages, lab_nobpf, lab_guest, tmp_path):
    """Own mode: libvirtd cannot use bpf(2), so only the packaged hook can filter the guest.
    The package is not installed on the host: the lab's qemu.d gets the .deb's gate, pointed
    at a wrapper that runs the .deb's hook with the unpacked dist-packages on PYTHONPATH
    (libvirtd itself passes a hook nothing but LC_ALL and PATH)."""
    from labharness import device_programs

    tree = tmp_path / "deb"
    run(["dpkg-deb", "-x", packages.deb, str(tree)])
    site = tree / "usr/lib/python3/dist-packages"
    # The host's python3 must not find the package anywhere else.
    assert run(["/usr/bin/python3", "-c", "import libvirt_bpfcg"], check=False,
               env={"PATH": SYSTEM_PATH}, cwd="/").returncode != 0
    wrapper = tmp_path / "qemu-hook"
    wrapper.write_text(f"#!/bin/sh\n# the hook from the .deb, its package from the unpacked "
                       f"tree\nPYTHONPATH={site} exec {tree / QEMU_HOOK.lstrip('/')} \"$@\"\n")
    wrapper.chmod(0o755)
    lab_nobpf.install_hook(gate_script(str(wrapper), str(tree / HOOK.lstrip("/"))))
    other = lab_nobpf.new_loop("pkg-other")
    guest = None
    try:
        guest = lab_guest(lab=lab_nobpf)
        progs = device_programs(guest.cgroup)
        assert len(progs) == 1, progs
        results = guest.open_in_cgroup([(guest.disks[0], os.O_RDWR), (other, os.O_RDONLY),
                                        ("/dev/null", os.O_RDWR)])
        assert results == [0, errno.EPERM, 0]
    finally:
        if guest is not None:  # stop it while the hook is there: its release hook cleans up
            lab_nobpf.destroy(guest.name, check=False)
        lab_nobpf.remove_hook()
        lab_nobpf.free_loop(other)

