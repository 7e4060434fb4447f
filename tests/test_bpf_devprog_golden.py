"""Golden disassembly of every device program variant (no kernel needed).

The files in tests/golden/ were generated once and read by eye. After an intended change to a
program, regenerate them with

    BPFCG_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_bpf_devprog_golden.py

and review the diff like code. Map fds are shown as map[N] by first reference, so the text does
not depend on the fd numbers used here.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List

import pytest

from libvirt_bpfcg.bpf import devprog
from libvirt_bpfcg.bpf.asm import PSEUDO_MAP_FD, decode, disassemble
from libvirt_bpfcg.rules import Rule

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
UPDATE = os.environ.get("BPFCG_UPDATE_GOLDEN") == "1"

# Arbitrary fd numbers: only their order of first reference shows in the text.
BASE_FD, OVERLAY_FD, DENIAL_FD = 31, 17, 44

LINEAR_RULES = [
    Rule.parse("c 1:3 rw"),
    Rule.parse("c 136:* rw"),
    Rule.parse("b 7:2 r"),
    Rule.parse("a *:9 m"),
    Rule.parse("c 10:200 rwm"),
]

VARIANTS: Dict[str, Callable[[], bytes]] = {
    "device_1map": lambda: devprog.build_device_program([BASE_FD]),
    "device_2maps": lambda: devprog.build_device_program([BASE_FD, OVERLAY_FD]),
    "device_2maps_denials": lambda: devprog.build_device_program(
        [BASE_FD, OVERLAY_FD], DENIAL_FD),
    "libvirt_clone": lambda: devprog.build_libvirt_program(BASE_FD),
    "linear_small": lambda: devprog.build_linear_program(LINEAR_RULES),
}


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.txt")


def read_golden(name: str) -> List[str]:
    with open(golden_path(name), encoding="utf-8") as handle:
        return handle.read().splitlines()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_golden_disassembly(name):
    lines = disassemble(VARIANTS[name](), numbered=True)
    if UPDATE:
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(golden_path(name), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    assert lines == read_golden(name)


def map_fd_loads(data: bytes) -> List[int]:
    return [insn.imm for insn in decode(data) if insn.is_wide and insn.src == PSEUDO_MAP_FD]


def first_reference_order(data: bytes) -> List[int]:
    order: List[int] = []
    for fd in map_fd_loads(data):
        if fd not in order:
            order.append(fd)
    return order


def test_maps_are_first_referenced_in_the_given_order():
    # libvirt re-detects map_ids[0] as its map: the base map must be referenced first.
    data = devprog.build_device_program([OVERLAY_FD, BASE_FD], DENIAL_FD)
    assert first_reference_order(data) == [OVERLAY_FD, BASE_FD, DENIAL_FD]
    assert first_reference_order(devprog.build_device_program([BASE_FD])) == [BASE_FD]


def test_each_map_is_looked_up_with_four_keys():
    loads = map_fd_loads(devprog.build_device_program([BASE_FD, OVERLAY_FD]))
    assert loads == [BASE_FD] * 4 + [OVERLAY_FD] * 4


def test_device_program_needs_a_map():
    with pytest.raises(ValueError):
        devprog.build_device_program([])


def test_libvirt_clone_matches_libvirt_source_layout():
    """Slot positions and jump offsets as printed in vircgroupv2devices.c's comments."""
    data = devprog.build_libvirt_program(BASE_FD)
    assert len(data) // 8 == 69
    slots, slot = {}, 0
    for insn in decode(data):
        slots[slot] = insn
        slot += insn.slots
    map_slots = [s for s, i in slots.items() if i.is_wide and i.src == PSEUDO_MAP_FD]
    const_slots = [s for s, i in slots.items() if i.is_wide and i.src == 0]
    assert map_slots == [8, 26, 43, 57]
    assert const_slots == [20, 37]
    jumps = [(s, i.off) for s, i in slots.items() if i.is_jump]
    assert jumps == [(12, 5), (17, 50), (30, 5), (35, 32), (47, 5), (52, 15), (61, 5), (66, 1)]


def test_linear_program_has_one_block_per_rule():
    data = devprog.build_linear_program(LINEAR_RULES)
    exits = [line for line in disassemble(data) if line == "exit"]
    assert len(exits) == len(LINEAR_RULES) + 1
    assert map_fd_loads(data) == []


def test_linear_program_stops_after_a_rule_that_matches_everything():
    # The verifier refuses unreachable instructions, so nothing may follow "a *:* rwm".
    data = devprog.build_linear_program(rules_of("c 1:3 rw", "a *:* rwm", "c 1:5 rw"))
    text = disassemble(data)
    assert text[-2:] == ["r0 = 1", "exit"]
    assert text.count("exit") == 2


def rules_of(*texts: str) -> List[Rule]:
    return [Rule.parse(text) for text in texts]
