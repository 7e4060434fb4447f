"""What our hook costs a guest start, on a real libvirtd (the test lab).

* start+destroy cycles of one guest with our hook installed vs with no hook, alternating
  cycle by cycle so machine noise hits both alike (libvirt mode, with one metadata extra:
  the full path — plan at prepare, overlay install at started, release);
* the hook's own wall time for an op it ignores (``stopped end``) vs ``python3 -S -c pass``,
  both as fresh processes.

Targets (issue 4): start+destroy ≤ 1.15× without the hook; the no-op op within 1.5× of a
bare interpreter. Last line: ``hook_start ratio=R`` (with hook ÷ without, medians).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from labharness import Lab  # noqa: E402

HOOK = os.path.join(ROOT, "hooks", "qemu")
CYCLES = int(os.environ.get("HOOK_START_CYCLES", "15"))
# As installed from the distro package: the system interpreter, the package on its path
# (PYTHONPATH stands in for dist-packages, which this checkout is not installed into).
HOOK_LAUNCHER = f'#!/bin/sh\nPYTHONPATH={ROOT} exec /usr/bin/python3 -S {HOOK} "$@"\n'
NS = "https://libvirt-bpfcg.org/xmlns/extras/1"


def cycle(lab: Lab, name: str) -> float:
    start = time.perf_counter()
    lab.virsh("start", name)
    lab.virsh("destroy", name)
    return time.perf_counter() - start


def process_time(argv: list, runs: int = 30) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> int:
    noop = process_time(["/usr/bin/python3", "-S", HOOK, "vm", "stopped", "end", "-"])
    bare = process_time(["/usr/bin/python3", "-S", "-c", "pass"])
    print(f"no-op op: hook {noop * 1e3:.1f} ms, python3 -S -c pass {bare * 1e3:.1f} ms "
          f"(ratio {noop / bare:.2f}, target <= 1.5)")
    with Lab() as lab:
        with open(os.path.join(lab.lab_dir, "etc", "libvirt-bpfcg.conf"), "w") as handle:
            handle.write("[hook]\nstate_dir = /run/libvirt/bpfcg\n")
        disk, extra = lab.new_loop("bench-disk"), lab.new_loop("bench-extra")
        metadata = (f"<bpfcg:extras xmlns:bpfcg='{NS}'><bpfcg:device path='{extra}'/>"
                    "</bpfcg:extras>")
        lab.define(lab.guest_xml("bench", [disk], metadata_xml=metadata))
        cycle(lab, "bench")  # warm caches
        with_hook, without = [], []
        for _ in range(CYCLES):
            lab.install_hook(HOOK_LAUNCHER)
            with_hook.append(cycle(lab, "bench"))
            lab.remove_hook()
            without.append(cycle(lab, "bench"))
        lab.undefine("bench")
    a, b = statistics.median(with_hook), statistics.median(without)
    print(f"start+destroy: with hook {a:.3f} s, without {b:.3f} s (median of {CYCLES})")
    print(f"hook_start ratio={a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
