"""Cost of one open() of an allowed device from inside a filtered cgroup.

Configurations, each with N = 10 / 1,000 / 10,000 map entries (or rules):
* none     — no program on the cgroup (the floor);
* libvirt  — a byte-identical clone of libvirt's program over a libvirt-format map;
* ours     — our program in libvirt mode: libvirt's map first, our overlay second, denials
             recorded (what a guest with extras runs);
* linear   — a systemd/runc-style program with one compare block per rule (the allowed
             device's rule last; where the verifier refuses N rules, the row says so).

The device is /dev/null, found in the first map as libvirt would have it. A small C program
(built here) joins the cgroup and times open+close; rounds alternate between the
configurations and the median per configuration is reported, so machine noise hits all alike.
Target (issue 2): ours ÷ libvirt ≤ 1.05 and flat in N. Last line ``open_cost ratio=R`` is the
largest ours ÷ libvirt over the N measured.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List

import _scratch

from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.bpf import sys as bpf
from libvirt_bpfcg.devfilter import DeviceFilter
from libvirt_bpfcg.rules import Rule
from libvirt_bpfcg.state import StateDirs

SIZES = [10, 1000, 10000]
ROUNDS = int(os.environ.get("OPEN_COST_ROUNDS", "7"))
ITERATIONS = int(os.environ.get("OPEN_COST_N", "100000"))
NULL = Rule.parse("c 1:3 rw")
HERE = os.path.dirname(os.path.abspath(__file__))


def build_helper(workdir: str) -> str:
    exe = os.path.join(workdir, "openbench")
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "openbench.c")], check=True)
    return exe


def filler(n: int) -> List[Rule]:
    return [Rule("c", 400 + i // 50000, i % 50000, "rw") for i in range(n - 1)]


def libvirt_cgroup(n: int, fds: List[int]) -> str:
    cg = _scratch.new_cgroup()
    size = 64
    while size < n:
        size *= 2
    map_fd = devprog.create_libvirt_map(size)
    fds.append(map_fd)  # libvirtd keeps its map fd; so do we until the end
    for rule in [NULL] + filler(n):
        bpf.map_update(map_fd, bpf.key_bytes(rule.key), bpf.value_bytes(rule.value))
    prog_fd = devprog.load_libvirt_program(map_fd)
    bpf.attach_to_cgroup(cg, prog_fd)
    return cg


def linear_cgroup(n: int) -> str | None:
    cg = _scratch.new_cgroup()
    try:
        prog_fd = devprog.load_linear_program(filler(n) + [NULL])
    except bpf.BpfError:
        return None
    bpf.attach_to_cgroup(cg, prog_fd)
    return cg


def measure(exe: str, cg: str) -> float:
    out = subprocess.run([exe, cg, "/dev/null", str(ITERATIONS)], check=True,
                         capture_output=True, text=True).stdout
    return float(out)


def main() -> None:
    bpf.raise_memlock()
    workdir = tempfile.mkdtemp(prefix="bpfcg-open-cost-")
    exe = build_helper(workdir)
    dirs = StateDirs(state_dir=os.path.join(workdir, "state"), bpffs=os.path.join(workdir, "bpffs"))
    bpf.ensure_bpffs(dirs.bpffs)
    fds: List[int] = []
    try:
        ratios = []
        print(f"{'N':>6} {'none':>9} {'libvirt':>9} {'ours':>9} {'linear':>9}  ours/libvirt")
        for n in SIZES:
            configs: Dict[str, str | None] = {"none": _scratch.new_cgroup(),
                                              "libvirt": libvirt_cgroup(n, fds)}
            ours = libvirt_cgroup(n, fds)
            DeviceFilter(ours, dirs).grant([Rule.parse("c 10:200 rw")])  # an extra
            configs["ours"] = ours
            configs["linear"] = linear_cgroup(n)
            samples: Dict[str, List[float]] = {k: [] for k in configs}
            for _ in range(ROUNDS):
                for name, cg in configs.items():
                    if cg is not None:
                        samples[name].append(measure(exe, cg))
            med = {k: statistics.median(v) if v else float("nan") for k, v in samples.items()}
            ratio = med["ours"] / med["libvirt"]
            ratios.append(ratio)
            linear = "refused" if configs["linear"] is None else f"{med['linear']:.0f}ns"
            print(f"{n:>6} {med['none']:>7.0f}ns {med['libvirt']:>7.0f}ns {med['ours']:>7.0f}ns "
                  f"{linear:>9}  {ratio:.3f}")
        print(f"open_cost ratio={max(ratios):.3f}")
    finally:
        for fd in fds:
            bpf.close(fd)
        subprocess.run(["umount", "-n", dirs.bpffs], check=False)
        subprocess.run(["rm", "-rf", workdir], check=False)


if __name__ == "__main__":
    sys.exit(main())
