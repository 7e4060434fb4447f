"""What our hook costs a guest start, on a real libvirtd (the test lab).

* start+destroy cycles of one guest with no hook, with our hook served by the hook server
  (as the packages install it: libvirt-bpfcg-hook.socket) and with our hook handling every
  event in-process (no server listening), rotating cycle by cycle so machine noise hits all
  alike (libvirt mode, with one metadata extra: the full path — plan at prepare, overlay
  install at started, release);
* the hook's own wall time for an op it ignores (``stopped end``) vs ``python3 -S -c pass``,
  both as fresh processes.

Targets (issue 4): start+destroy ≤ 1.15× without the hook; the no-op op within 1.5× of a
bare interpreter. Last line: ``hook_start ratio=R``, the median over rounds of (served ÷ no
hook) — each round runs the three variants back to back, so slow drift of the shared machine
cancels out; the in-process ratio is printed above it, the median times too.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from lab_cli import HookServerProcess, install_hook  # noqa: E402
from labharness import Lab  # noqa: E402

HOOK = os.path.join(ROOT, "hooks", "qemu")
CYCLES = int(os.environ.get("HOOK_START_CYCLES", "25"))
GATE = os.path.join(ROOT, "hooks", "50-libvirt-bpfcg")
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
    gate = process_time([GATE, "vm", "stopped", "end", "-"])
    noop = process_time(["/usr/bin/python3", "-S", HOOK, "vm", "stopped", "end", "-"])
    bare = process_time(["/usr/bin/python3", "-S", "-c", "pass"])
    print(f"no-op op: gate {gate * 1e3:.1f} ms, Python hook alone {noop * 1e3:.1f} ms, "
          f"python3 -S -c pass {bare * 1e3:.1f} ms (ratios {gate / bare:.2f} and "
          f"{noop / bare:.2f}, target <= 1.5)")
    with Lab() as lab:
        disk, extra = lab.new_loop("bench-disk"), lab.new_loop("bench-extra")
        metadata = (f"<bpfcg:extras xmlns:bpfcg='{NS}'><bpfcg:device path='{extra}'/>"
                    "</bpfcg:extras>")
        lab.define(lab.guest_xml("bench", [disk], metadata_xml=metadata))
        cycle(lab, "bench")  # warm caches
        socket_path = os.path.join(lab.lab_dir, "bpfcg-run", "hook.sock")
        times: dict = {"none": [], "served": [], "in-process": []}
        with HookServerProcess(lab) as server:
            for _ in range(CYCLES):
                # As the packages install it: the gate, then hooks/qemu on its own
                # #!/usr/bin/python3 -S (it finds this checkout's package next to itself).
                install_hook(lab, direct=True)
                times["served"].append(cycle(lab, "bench"))
                os.rename(socket_path, socket_path + ".off")  # the hook finds no server
                times["in-process"].append(cycle(lab, "bench"))
                os.rename(socket_path + ".off", socket_path)
                lab.remove_hook()
                times["none"].append(cycle(lab, "bench"))
            served_requests = server.served()
        lab.undefine("bench")
    med = {key: statistics.median(values) for key, values in times.items()}
    print(f"start+destroy (median of {CYCLES}): no hook {med['none']:.3f} s, hook served "
          f"{med['served']:.3f} s, hook in-process {med['in-process']:.3f} s; the server "
          f"answered {served_requests} requests")
    if served_requests != 3 * CYCLES:  # prepare, started, release per cycle
        print(f"the server answered {served_requests} requests, not {3 * CYCLES}: the served "
              "numbers are not what they claim", file=sys.stderr)
        return 1
    def ratio(variant: str) -> float:
        return statistics.median(a / b for a, b in zip(times[variant], times["none"]))

    print(f"in-process ratio={ratio('in-process'):.3f}")
    print(f"hook_start ratio={ratio('served'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
