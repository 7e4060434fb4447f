"""The eBPF assembler and disassembler, without a kernel.

Expected bytes are written out by hand from include/uapi/linux/bpf.h (little-endian hosts:
dst_reg in the low nibble of byte 1).
"""

from __future__ import annotations

import sys

import pytest

from libvirt_bpfcg.bpf import asm
from libvirt_bpfcg.bpf.asm import (
    ADD,
    AND,
    DW,
    FP,
    JEQ,
    JGT,
    JNE,
    JSET,
    LSH,
    MOV,
    NEG,
    OR,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R10,
    SUB,
    AsmError,
    B,
    H,
    Program,
    W,
    decode,
    disassemble,
    encode,
)

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="byte vectors are LE")


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# --------------------------------------------------------------------------------------------
# labels


def jump_offsets(data: bytes):
    return [insn.off for insn in decode(data) if insn.is_jump]


def test_forward_label_resolves_to_slots_skipped():
    prog = Program().jmp_imm(JEQ, R1, 0, "out").mov64_imm(R0, 1).mov64_imm(R0, 2)
    prog.label("out").exit()
    assert jump_offsets(prog.assemble()) == [2]


def test_backward_label_is_negative():
    prog = Program().label("top").mov64_imm(R0, 0).alu64_imm(ADD, R0, 1)
    prog.jmp_imm(JNE, R0, 10, "top").exit()
    assert jump_offsets(prog.assemble()) == [-3]


def test_jump_to_next_instruction_is_zero():
    prog = Program().ja("next").label("next").exit()
    assert prog.assemble() == hexbytes("05 00 0000 00000000  95 00 0000 00000000")


def test_ld_imm64_counts_two_slots_for_labels():
    prog = Program().ja("end").ld_imm64(R1, 1).ld_map_fd(R2, 5).label("end").exit()
    assert jump_offsets(prog.assemble()) == [4]
    assert len(prog) == 6


def test_two_labels_on_one_instruction():
    prog = Program().jmp_imm(JEQ, R1, 0, "a").jmp_imm(JEQ, R1, 1, "b").mov64_imm(R0, 0)
    prog.label("a").label("b").exit()
    assert jump_offsets(prog.assemble()) == [2, 1]


def test_unknown_label_fails_at_assemble_time():
    prog = Program().jmp_imm(JEQ, R1, 0, "nowhere").exit()  # building is fine
    with pytest.raises(AsmError, match="unknown label 'nowhere'"):
        prog.assemble()


def test_duplicate_label_fails_at_assemble_time():
    prog = Program().label("x").mov64_imm(R0, 0).label("x").exit()
    with pytest.raises(AsmError, match="duplicate label 'x'"):
        prog.assemble()


def test_label_after_last_instruction_is_an_error():
    prog = Program().ja("end").exit().label("end")
    with pytest.raises(AsmError, match="not followed by an instruction"):
        prog.assemble()


def test_jump_too_far_is_an_error():
    prog = Program().ja("far")
    for _ in range(0x8000):
        prog.mov64_imm(R0, 0)
    prog.label("far").exit()
    with pytest.raises(AsmError, match="too far"):
        prog.assemble()


# --------------------------------------------------------------------------------------------
# encodings, one per instruction class and operand kind

ENCODINGS = [
    # ALU64 / ALU, immediate and register
    (lambda p: p.mov64_imm(R0, 1), "b7 00 0000 01000000"),
    (lambda p: p.mov64_imm(R1, -1), "b7 01 0000 ffffffff"),
    (lambda p: p.mov64_reg(R6, R1), "bf 16 0000 00000000"),
    (lambda p: p.mov32_imm(R4, -1), "b4 04 0000 ffffffff"),
    (lambda p: p.mov32_reg(R1, R2), "bc 21 0000 00000000"),
    (lambda p: p.alu64_imm(LSH, R2, 32), "67 02 0000 20000000"),
    (lambda p: p.alu64_imm(ADD, R2, -8), "07 02 0000 f8ffffff"),
    (lambda p: p.alu64_reg(OR, R2, R1), "4f 12 0000 00000000"),
    (lambda p: p.alu64_reg(AND, R1, R2), "5f 21 0000 00000000"),
    (lambda p: p.alu32_imm(AND, R1, 0xFFFF), "54 01 0000 ffff0000"),
    (lambda p: p.alu32_imm(SUB, R1, 0xFFFFFFFF), "14 01 0000 ffffffff"),
    (lambda p: p.alu32_reg(ADD, R1, R2), "0c 21 0000 00000000"),
    (lambda p: p.alu64_imm(NEG, R3, 0), "87 03 0000 00000000"),
    # loads from memory
    (lambda p: p.ldx(W, R2, R1, 4), "61 12 0400 00000000"),
    (lambda p: p.ldx(H, R2, R1, 2), "69 12 0200 00000000"),
    (lambda p: p.ldx(B, R2, R1, 1), "71 12 0100 00000000"),
    (lambda p: p.ldx(DW, R0, R10, -8), "79 a0 f8ff 00000000"),
    # stores of a register / an immediate
    (lambda p: p.stx(DW, FP, -8, R2), "7b 2a f8ff 00000000"),
    (lambda p: p.stx(W, R6, 16, R1), "63 16 1000 00000000"),
    (lambda p: p.stx(H, R6, 2, R1), "6b 16 0200 00000000"),
    (lambda p: p.stx(B, R6, 1, R1), "73 16 0100 00000000"),
    (lambda p: p.st(DW, FP, -32, -1), "7a 0a e0ff ffffffff"),
    (lambda p: p.st(W, FP, -4, 7), "62 0a fcff 07000000"),
    (lambda p: p.st(H, FP, -2, 7), "6a 0a feff 07000000"),
    (lambda p: p.st(B, FP, -1, 7), "72 0a ffff 07000000"),
    # atomics: BPF_STX | BPF_ATOMIC | size, imm = BPF_ADD (0)
    (lambda p: p.atomic_add64(R0, 0, R1), "db 10 0000 00000000"),
    (lambda p: p.atomic_add(W, R7, 8, R1), "c3 17 0800 00000000"),
    # 64-bit immediates and map fds (two slots)
    (lambda p: p.ld_imm64(R2, 0xFFFFFFFF), "18 02 0000 ffffffff  00 00 0000 00000000"),
    (lambda p: p.ld_imm64(R2, 0xFFFFFFFF00000000), "18 02 0000 00000000  00 00 0000 ffffffff"),
    (lambda p: p.ld_imm64(R1, -2), "18 01 0000 feffffff  00 00 0000 ffffffff"),
    (lambda p: p.ld_map_fd(R1, 7), "18 11 0000 07000000  00 00 0000 00000000"),
    # calls and exit
    (lambda p: p.call(1), "85 00 0000 01000000"),
    (lambda p: p.call(125), "85 00 0000 7d000000"),
    (lambda p: p.exit(), "95 00 0000 00000000"),
]



@pytest.mark.parametrize("build, expected", ENCODINGS)
def test_encoding(build, expected):
    assert build(Program()).assemble() == hexbytes(expected)


JUMPS = [
    (lambda p: p.jmp_imm(JEQ, R1, 0, "t"), "15 01 0100 00000000"),
    (lambda p: p.jmp_imm(JGT, R1, 0x80000000, "t"), "25 01 0100 00000080"),
    (lambda p: p.jmp_reg(JEQ, R1, R2, "t"), "1d 21 0100 00000000"),
    (lambda p: p.jmp_reg(JSET, R3, R6, "t"), "4d 63 0100 00000000"),
    (lambda p: p.jmp32_imm(JNE, R2, 1, "t"), "56 02 0100 01000000"),
    (lambda p: p.jmp32_reg(JNE, R2, R3, "t"), "5e 32 0100 00000000"),
    (lambda p: p.ja("t"), "05 00 0100 00000000"),
]


@pytest.mark.parametrize("build, expected", JUMPS)
def test_jump_encoding(build, expected):
    prog = build(Program()).mov64_imm(R0, 0).label("t").exit()
    data = prog.assemble()
    assert data[:8] == hexbytes(expected)


@pytest.mark.parametrize("bad", [
    lambda: Program().mov64_imm(11, 0),
    lambda: Program().mov64_reg(R0, -1),
    lambda: Program().mov64_imm(R0, 1 << 32),
    lambda: Program().mov64_imm(R0, -(1 << 31) - 1),
    lambda: Program().ldx(W, R0, R1, 0x8000),
    lambda: Program().ldx(3, R0, R1, 0),
    lambda: Program().ld_imm64(R0, 1 << 64),
    lambda: Program().ld_map_fd(R0, -1),
    lambda: Program().atomic_add(B, R0, 0, R1),
    lambda: Program().jmp_imm(JEQ, R0, 0, ""),
    lambda: Program().label(""),
])
def test_bad_operands_are_refused_when_built(bad):
    with pytest.raises(AsmError):
        bad()


def test_program_length_counts_slots():
    prog = Program().mov64_imm(R0, 0).ld_imm64(R1, 5).exit()
    assert len(prog) == 4
    assert len(prog.assemble()) == 32


# --------------------------------------------------------------------------------------------
# disassembly

TEXTS = [
    (lambda p: p.mov64_imm(R0, 1), "r0 = 1"),
    (lambda p: p.mov64_imm(R1, -1), "r1 = -1"),
    (lambda p: p.mov64_reg(R6, R1), "r6 = r1"),
    (lambda p: p.mov32_imm(R4, -1), "w4 = -1"),
    (lambda p: p.alu64_imm(LSH, R2, 32), "r2 <<= 32"),
    (lambda p: p.alu64_imm(ADD, R2, -8), "r2 += -8"),
    (lambda p: p.alu64_reg(OR, R2, R1), "r2 |= r1"),
    (lambda p: p.alu32_reg(MOV, R1, R2), "w1 = w2"),
    (lambda p: p.alu64_imm(NEG, R3, 0), "r3 = -r3"),
    (lambda p: p.ldx(W, R2, R1, 4), "r2 = *(u32 *)(r1 +4)"),
    (lambda p: p.ldx(DW, R0, R10, -8), "r0 = *(u64 *)(r10 -8)"),
    (lambda p: p.stx(DW, FP, -8, R2), "*(u64 *)(r10 -8) = r2"),
    (lambda p: p.st(W, FP, -4, 7), "*(u32 *)(r10 -4) = 7"),
    (lambda p: p.atomic_add64(R0, 0, R1), "lock *(u64 *)(r0 +0) += r1"),
    (lambda p: p.atomic_add(W, R0, 4, R1), "lock *(u32 *)(r0 +4) += w1"),
    (lambda p: p.ld_imm64(R2, 0xFFFFFFFF00000000), "r2 = 0xffffffff00000000 ll"),
    (lambda p: p.ld_map_fd(R1, 42), "r1 = map[0]"),
    (lambda p: p.call(1), "call bpf_map_lookup_elem#1"),
    (lambda p: p.call(125), "call bpf_ktime_get_boot_ns#125"),
    (lambda p: p.call(9999), "call helper#9999"),
    (lambda p: p.exit(), "exit"),
]


@pytest.mark.parametrize("build, expected", TEXTS)
def test_disassembly_text(build, expected):
    assert disassemble(build(Program()).assemble()) == [expected]


def test_disassembly_of_jumps():
    prog = Program().jmp_imm(JEQ, R0, 0, "t").jmp_reg(JEQ, R1, R2, "t")
    prog.jmp32_imm(JNE, R2, 0xFFFFFFFF, "t").ja("t").mov64_imm(R0, 0).label("t").exit()
    assert disassemble(prog.assemble()) == [
        "if r0 == 0x0 goto +4",
        "if r1 == r2 goto +3",
        "if w2 != 0xffffffff goto +2",
        "goto +1",
        "r0 = 0",
        "exit",
    ]


def test_numbered_disassembly_shows_slots_and_targets():
    prog = Program().ld_map_fd(R1, 3).jmp_imm(JEQ, R1, 0, "t").mov64_imm(R0, 0)
    prog.label("t").exit()
    assert disassemble(prog.assemble(), numbered=True) == [
        "   0: r1 = map[0]",
        "   2: if r1 == 0x0 goto +1 <4>",
        "   3: r0 = 0",
        "   4: exit",
    ]


def test_map_placeholders_numbered_by_first_appearance():
    def build(first: int, second: int) -> bytes:
        return (Program().ld_map_fd(R1, first).ld_map_fd(R2, second).ld_map_fd(R3, first)
                .exit().assemble())

    text = disassemble(build(9, 4))
    assert text == ["r1 = map[0]", "r2 = map[1]", "r3 = map[0]", "exit"]
    assert disassemble(build(3, 250)) == text  # independent of the fd numbers


def test_unknown_opcode_is_shown_not_fatal():
    data = hexbytes("ff 21 0100 05000000")
    assert disassemble(data) == ["(0xff) unknown dst=r1 src=r2 off=1 imm=5"]


def test_decode_refuses_partial_instruction():
    with pytest.raises(AsmError):
        decode(b"\x00" * 12)
    with pytest.raises(AsmError, match="second half"):
        decode(hexbytes("18 01 0000 00000000"))


def every_encoding_program() -> bytes:
    prog = Program()
    for build, _ in ENCODINGS:
        build(prog)
    for build, _ in JUMPS:
        build(prog)
    prog.label("t").exit()
    return prog.assemble()


def test_decode_encode_round_trip():
    data = every_encoding_program()
    insns = decode(data)
    assert encode(insns) == data
    assert len(disassemble(data)) == len(insns)


def test_disassembly_is_stable():
    data = every_encoding_program()
    assert disassemble(data) == disassemble(encode(decode(data)))
    assert not any("unknown" in line for line in disassemble(data))


def test_jump_decodes_with_raw_offset():
    prog = Program().jmp_imm(JEQ, R1, 0, "t").mov64_imm(R0, 0).label("t").exit()
    jump = decode(prog.assemble())[0]
    assert jump.off == 1 and jump.target is None and jump.is_jump
    assert not asm.Insn(asm.CLASS_JMP | asm.CALL).is_jump
