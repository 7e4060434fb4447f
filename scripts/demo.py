"""The README's demo: a real libvirtd + QEMU guest with our hook, start to restart.

1. brings up a private libvirtd 9.0 (the test lab: its own mount namespace and cgroup, the
   host untouched), installs our hook into its hooks/qemu.d/ as the packages do (the gate,
   then hooks/qemu) and runs the hook server there;
2. starts a guest whose <metadata> asks for one extra device (a loop device);
3. prints ``libvirt-bpfcg status`` for the guest;
4. opens an allowed device and a denied one from inside the guest's cgroup;
5. restarts libvirtd and shows the filter found again (same program, same rules);
6. does the same for a libvirtd that cannot use BPF (own mode: we build the whole filter),
   with no hook server: the hook does the same work itself;
7. cleans up everything it created.
"""

from __future__ import annotations

import errno
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from lab_cli import STATE_DIR, HookServerProcess, install_hook  # noqa: E402
from labharness import Lab  # noqa: E402

from libvirt_bpfcg import detect as det  # noqa: E402

NS = "https://libvirt-bpfcg.org/xmlns/extras/1"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def status(lab: Lab, name: str) -> None:
    proc = lab.ns_run([sys.executable, "-m", "libvirt_bpfcg", "status", "--domain", name,
                       "--state-dir", STATE_DIR], check=False)
    print(proc.stdout.rstrip() or proc.stderr.rstrip())


def try_open(lab: Lab, name: str, path: str, why: str) -> None:
    err = lab.in_guest_cgroup_open(name, [(path, os.O_RDONLY)])[0]
    result = "opened" if err == 0 else os.strerror(err) if err != errno.EPERM else \
        "EPERM (denied by the filter)"
    print(f"  open({path}) from the guest cgroup: {result}   [{why}]")


def scenario(lab: Lab, title: str, extra: bool) -> None:
    disk, spare = lab.new_loop(f"{title}-disk"), lab.new_loop(f"{title}-spare")
    extra_dev = lab.new_loop(f"{title}-extra") if extra else ""
    metadata = (f"<bpfcg:extras xmlns:bpfcg='{NS}'><bpfcg:device path='{extra_dev}' "
                "access='rw'/></bpfcg:extras>") if extra else ""
    name = f"demo-{title}"
    lab.define(lab.guest_xml(name, [disk], metadata_xml=metadata))
    say(f"virsh start {name}")
    lab.start(name)
    status(lab, name)
    say("opens from inside the guest cgroup")
    try_open(lab, name, disk, "the guest's disk")
    if extra:
        try_open(lab, name, extra_dev, "extra device from <metadata>")
    try_open(lab, name, spare, "a loop device the guest does not declare")
    before = det.detect(lab.guest_cgroup_host(name)).attached
    say("restart libvirtd (the guest keeps running; the reconnect hook re-checks)")
    lab.restart_libvirtd()
    after = det.detect(lab.guest_cgroup_host(name)).attached
    print(f"  program before: id {before.id} {before.name or '(libvirt)'}; after: id "
          f"{after.id} {after.name or '(libvirt)'}")
    status(lab, name)
    try_open(lab, name, spare, "still denied")
    lab.destroy(name)
    lab.undefine(name)


def main() -> int:
    say("libvirtd with its own BPF filter: libvirt mode, we add the extras")
    with Lab() as lab:
        install_hook(lab)
        with HookServerProcess(lab) as server:
            scenario(lab, "libvirt", extra=True)
            print(f"  the hook server handled {server.served()} of the hook's events "
                  "(prepare, started, reconnect, release)")
    say("libvirtd that cannot use bpf(2): own mode, we build the whole filter (no hook "
        "server: the hook does the work itself)")
    lab = Lab().up(libvirtd_preload_nobpf=True)
    try:
        install_hook(lab)
        scenario(lab, "own", extra=False)
    finally:
        lab.down()
    say("done: both labs are gone (namespaces, cgroups, loop devices, files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
