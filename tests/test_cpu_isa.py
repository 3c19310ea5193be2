"""User-level instruction semantics of the hart: RV64I, M, A and C.

Each case is a snippet that leaves its answer in a0; the expected values come from the
ISA manual's definitions (two's complement, sign extension of W results, the division
special cases), written out as Python integers.
"""

from __future__ import annotations

import pytest
from test_cpu_harness import ENGINE_IDS, ENGINES, Machine, assemble, needs_as, run, use_engine

from vmcore.cpu import rvc

M64 = (1 << 64) - 1


@pytest.fixture(autouse=True, params=ENGINES, ids=ENGINE_IDS)
def engine(request: pytest.FixtureRequest) -> int:
    """Every test here runs on the reference closures and on compiled blocks."""
    return use_engine(request.param)


def u(v: int) -> int:
    return v & M64


CASES = [
    # RV64I arithmetic and W forms
    ("li t0, 0x7fffffff\naddiw a0, t0, 1", u(-(1 << 31))),
    ("li t0, 0x7fffffff\naddi a0, t0, 1", 0x80000000),
    ("li t0, -1\nli t1, 1\naddw a0, t0, t1", 0),
    ("li t0, 0x80000000\nli t1, 1\nsubw a0, t0, t1", 0x7FFFFFFF),
    ("li t0, -8\nsrai a0, t0, 1", u(-4)),
    ("li t0, -8\nsrli a0, t0, 60", 0xF),
    ("li t0, -8\nsraiw a0, t0, 1", u(-4)),
    ("li t0, 0x80000000\nsrliw a0, t0, 4", 0x08000000),
    ("li t0, 0xffffffff80000000\nsrliw a0, t0, 0", u(-(1 << 31))),
    ("li t0, 1\nslliw a0, t0, 31", u(-(1 << 31))),
    ("li t0, 1\nli t1, 63\nsll a0, t0, t1", 1 << 63),
    ("li t0, 1\nli t1, 64\nsll a0, t0, t1", 1),  # shift amount uses the low 6 bits
    ("li t0, 1\nli t1, 32\nsllw a0, t0, t1", 1),  # ...and 5 bits for W forms
    ("li t0, -1\nli t1, 1\nslt a0, t0, t1", 1),
    ("li t0, -1\nli t1, 1\nsltu a0, t0, t1", 0),
    ("li t0, -5\nslti a0, t0, -4", 1),
    ("li t0, 3\nsltiu a0, t0, -1", 1),  # the immediate is sign-extended, then unsigned
    ("lui a0, 0x80000", u(-(1 << 31))),
    ("li t0, 0x12345678\nxori a0, t0, -1", u(~0x12345678)),
    ("li t0, 0xf0\nandi a0, t0, 0x3c", 0x30),
    ("li t0, 0xf0\nori a0, t0, -0x800", u(-0x800) | 0xF0),
    ("li t0, 0x10000000\nli t1, 0x10000000\nsraw a0, t0, t1", 0x10000000),
    # M
    ("li t0, 7\nli t1, 0\ndiv a0, t0, t1", M64),
    ("li t0, 7\nli t1, 0\ndivu a0, t0, t1", M64),
    ("li t0, 7\nli t1, 0\nrem a0, t0, t1", 7),
    ("li t0, 7\nli t1, 0\nremu a0, t0, t1", 7),
    ("li t0, 0x8000000000000000\nli t1, -1\ndiv a0, t0, t1", 1 << 63),
    ("li t0, 0x8000000000000000\nli t1, -1\nrem a0, t0, t1", 0),
    ("li t0, -7\nli t1, 2\ndiv a0, t0, t1", u(-3)),
    ("li t0, -7\nli t1, 2\nrem a0, t0, t1", u(-1)),
    ("li t0, 7\nli t1, -2\nrem a0, t0, t1", 1),
    ("li t0, -0x80000000\nli t1, -1\ndivw a0, t0, t1", u(-(1 << 31))),
    ("li t0, -0x80000000\nli t1, -1\nremw a0, t0, t1", 0),
    ("li t0, 5\nli t1, 0\ndivw a0, t0, t1", M64),
    ("li t0, -5\nli t1, 0\nremw a0, t0, t1", u(-5)),
    ("li t0, 0xffffffff\nli t1, 0\ndivuw a0, t0, t1", M64),
    ("li t0, 0xffffffff\nli t1, 0\nremuw a0, t0, t1", M64),
    ("li t0, 0xffffffff\nli t1, 2\ndivuw a0, t0, t1", 0x7FFFFFFF),
    ("li t0, 0x80000000\nli t1, 0\nremuw a0, t0, t1", u(-(1 << 31))),
    ("li t0, -1\nli t1, -1\nmulh a0, t0, t1", 0),
    ("li t0, -1\nli t1, -1\nmulhu a0, t0, t1", M64 - 1),
    ("li t0, -1\nli t1, -1\nmulhsu a0, t0, t1", M64),
    ("li t0, 0x10000\nli t1, 0x10000\nmulw a0, t0, t1", 0),
    ("li t0, 0x7fffffff\nli t1, 2\nmulw a0, t0, t1", u(-2)),
    ("li t0, -3\nli t1, 5\nmul a0, t0, t1", u(-15)),
]


@needs_as
@pytest.mark.parametrize(("src", "expected"), CASES, ids=[c[0].split("\n")[-1] for c in CASES])
def test_alu(src: str, expected: int) -> None:
    m = run(src + "\nEXIT a0")
    assert m.reg("a0") == expected


@needs_as
def test_loads_sign_and_zero_extend() -> None:
    m = run("""
    la t0, data
    lb a0, 0(t0)
    lbu a1, 0(t0)
    lh a2, 0(t0)
    lhu a3, 0(t0)
    lw a4, 0(t0)
    lwu a5, 0(t0)
    ld a6, 0(t0)
    EXIT a0
    .data
    .align 3
    data: .dword 0x12345678f0f1f2f3
    """)
    assert m.reg("a0") == u(-13)
    assert m.reg("a1") == 0xF3
    assert m.reg("a2") == u(-0x0D0D)
    assert m.reg("a3") == 0xF2F3
    assert m.reg("a4") == u(0xF0F1F2F3 - (1 << 32))
    assert m.reg("a5") == 0xF0F1F2F3
    assert m.reg("a6") == 0x12345678F0F1F2F3


@needs_as
def test_misaligned_access_is_emulated_even_across_pages() -> None:
    m = run("""
    la t0, data
    li t1, 0x1122334455667788
    sd t1, 1(t0)
    ld a0, 1(t0)
    li t2, 0x4000
    add t3, t0, t2
    addi t3, t3, -3
    sd t1, 0(t3)
    ld a1, 0(t3)
    lw a2, 1(t3)
    EXIT a0
    .data
    .align 12
    data: .fill 0x6000, 1, 0
    """)
    assert m.reg("a0") == 0x1122334455667788
    assert m.reg("a1") == 0x1122334455667788
    assert m.reg("a2") == 0x44556677


@needs_as
def test_jumps_link_and_jalr_clears_bit0() -> None:
    m = run("""
    la t0, target
    addi t0, t0, 1
    jalr t0, 0(t0)          # rd == rs1: target read before the link is written
    after:
    li a0, 1
    EXIT a0
    target:
    la a1, after
    li a0, 2
    jal ra, 1f
    ret_here:
    1:
    la a2, ret_here
    EXIT a0
    """)
    assert m.reg("a0") == 2
    assert m.reg("t0") == m.reg("a1")
    assert m.reg("ra") == m.reg("a2")


@needs_as
def test_branches_signed_and_unsigned() -> None:
    m = run("""
    li a0, 0
    li t0, -1
    li t1, 1
    blt t0, t1, 1f
    ori a0, a0, 1
    1: bltu t0, t1, 2f
    ori a0, a0, 2
    2: bge t1, t0, 3f
    ori a0, a0, 4
    3: bgeu t1, t0, 4f
    ori a0, a0, 8
    4: beq t0, t0, 5f
    ori a0, a0, 16
    5: bne t0, t0, 6f
    ori a0, a0, 32
    6: EXIT a0
    """)
    assert m.reg("a0") == 2 | 8 | 32


@needs_as
def test_lr_sc_and_amos() -> None:
    m = run("""
    la t0, word
    lr.d t1, (t0)
    addi t1, t1, 5
    sc.d a0, t1, (t0)          # succeeds: 0
    sc.d a1, t1, (t0)          # no reservation: fails
    lr.w t2, (t0)
    addi t3, t0, 8
    sc.w a2, t2, (t3)          # different address: fails
    ld a3, 0(t0)               # 0x8000000000000005
    li t4, -2
    amoadd.w a4, t4, (t3)      # old value of the word at +8 (0xffffffff, sign-extended)
    lw a5, 8(t0)               # 0xffffffff + -2 = 0xfffffffd
    li t4, 3
    amomin.w a6, t4, (t3)      # min(-3, 3) = -3 stays
    amomaxu.w a7, t4, (t3)     # maxu(0xfffffffd, 3) stays
    amoswap.d s2, t4, (t0)
    ld s3, 0(t0)
    amominu.d s4, t4, (t0)
    li t4, -9
    amomax.d s5, t4, (t0)
    ld s6, 0(t0)
    amoor.d s7, t4, (t0)
    amoand.d s8, zero, (t0)
    amoxor.d s9, t4, (t0)
    ld s10, 0(t0)
    EXIT a0
    .data
    .align 3
    word: .dword 0x8000000000000000
          .dword 0xffffffff
    """)
    r = m.reg
    assert (r("a0"), r("a1"), r("a2")) == (0, 1, 1)
    assert r("a3") == 0x8000000000000005
    assert r("a4") == M64
    assert r("a5") == u(-3)
    assert r("a6") == u(-3)
    assert r("a7") == u(-3)
    assert r("s2") == 0x8000000000000005
    assert r("s3") == 3
    assert r("s4") == 3
    assert r("s5") == 3
    assert r("s6") == 3
    assert r("s7") == 3
    assert r("s8") == u(-9 | 3)
    assert r("s9") == 0
    assert r("s10") == u(-9)


@needs_as
def test_misaligned_amo_traps() -> None:
    m = run("""
    la t0, handler
    csrw mtvec, t0
    la t0, word
    li t1, 1
    amoadd.w a0, t1, 1(t0)
    li a0, 99
    EXIT a0
    .align 2
    handler:
    csrr a0, mcause
    csrr a1, mtval
    EXIT a0
    .data
    .align 3
    word: .dword 0
    """.replace("1(t0)", "(t2)").replace("li t1, 1", "li t1, 1\naddi t2, t0, 1"))
    assert m.reg("a0") == 6
    assert m.reg("a1") == m.reg("t2")


# Every compressed instruction expands to exactly what the assembler produces for the
# same instruction written out in full.
C_FORMS = [
    ("c.addi4spn s0, sp, 16", "addi s0, sp, 16"), ("c.lw a0, 4(s1)", "lw a0, 4(s1)"),
    ("c.ld a1, 8(a2)", "ld a1, 8(a2)"), ("c.sw a3, 64(a4)", "sw a3, 64(a4)"),
    ("c.sd a5, 248(s0)", "sd a5, 248(s0)"), ("c.nop", "addi zero, zero, 0"),
    ("c.addi a0, -32", "addi a0, a0, -32"), ("c.addiw a1, 31", "addiw a1, a1, 31"),
    ("c.li t0, -1", "addi t0, zero, -1"), ("c.addi16sp sp, -512", "addi sp, sp, -512"),
    ("c.addi16sp sp, 496", "addi sp, sp, 496"), ("c.lui t1, 0xfffe1", "lui t1, 0xfffe1"),
    ("c.lui t1, 0x1f", "lui t1, 0x1f"), ("c.srli s0, 63", "srli s0, s0, 63"),
    ("c.srai a0, 1", "srai a0, a0, 1"), ("c.andi a1, -1", "andi a1, a1, -1"),
    ("c.sub s1, a0", "sub s1, s1, a0"), ("c.xor a2, a3", "xor a2, a2, a3"),
    ("c.or a4, a5", "or a4, a4, a5"), ("c.and s0, s1", "and s0, s0, s1"),
    ("c.subw a0, a1", "subw a0, a0, a1"), ("c.addw a2, a3", "addw a2, a2, a3"),
    ("c.j .+2046", "jal zero, .+2046"), ("c.j .-2048", "jal zero, .-2048"),
    ("c.beqz s0, .+254", "beq s0, zero, .+254"), ("c.bnez a5, .-256", "bne a5, zero, .-256"),
    ("c.slli t0, 33", "slli t0, t0, 33"), ("c.lwsp ra, 252(sp)", "lw ra, 252(sp)"),
    ("c.ldsp t2, 504(sp)", "ld t2, 504(sp)"), ("c.jr ra", "jalr zero, 0(ra)"),
    ("c.mv a0, t6", "add a0, zero, t6"), ("c.ebreak", "ebreak"),
    ("c.jalr t0", "jalr ra, 0(t0)"), ("c.add s2, t5", "add s2, s2, t5"),
    ("c.swsp a0, 252(sp)", "sw a0, 252(sp)"), ("c.sdsp t6, 504(sp)", "sd t6, 504(sp)"),
]


@needs_as
def test_rvc_expansion_matches_assembler() -> None:
    # Each pair is assembled at the same address (one per 4-byte slot, padded with
    # c.nop), so pc-relative forms compare exactly too.
    comp = assemble("\n".join(f"{c}\nc.nop" for c, _ in C_FORMS), prelude=False)
    full = assemble(".option norvc\n" + "\n".join(f for _, f in C_FORMS), prelude=False)
    for i, (form, _) in enumerate(C_FORMS):
        h = int.from_bytes(comp[4 * i : 4 * i + 2], "little")
        w = int.from_bytes(full[4 * i : 4 * i + 4], "little")
        assert h & 3 != 3, form
        got = rvc.expand(h)
        assert got == w, f"{form}: {got:#010x} != {w:#010x}"


@pytest.mark.parametrize("h", [0x0000, 0x2000, 0x8000 | (1 << 12), 0x6101 | (2 << 7),
                               0x4002, 0x8002, 0x9C01 | (2 << 5) | (1 << 12)])
def test_reserved_compressed_encodings_are_illegal(h: int) -> None:
    # all-zero, c.fld, reserved c.addi16sp-like encodings, c.lwsp rd=0, c.jr x0, reserved ALU
    assert rvc.expand(h) == 0


@needs_as
def test_illegal_compressed_traps_with_its_bits() -> None:
    m = run("""
    la t0, handler
    csrw mtvec, t0
    .half 0x0000
    EXIT a0
    .align 2
    handler:
    csrr a0, mcause
    csrr a1, mtval
    EXIT a0
    """)
    assert m.reg("a0") == 2
    assert m.reg("a1") == 0


@needs_as
def test_self_modifying_code_after_fence_i() -> None:
    m = run("""
    li s0, 0
    la t0, patch
    lw t1, 0(t0)         # addi a0, a0, 1  -> will become addi a0, a0, 2
    loop:
    li a0, 0
    patch:
    .option push
    .option norvc
    addi a0, a0, 1
    .option pop
    add s0, s0, a0
    bnez s1, done
    li t2, 0x00250513    # addi a0, a0, 2
    sw t2, 0(t0)
    fence.i
    li s1, 1
    j loop
    done:
    EXIT s0
    """)
    assert m.exit.value == 3


@needs_as
def test_store_into_decoded_code_is_seen_without_fence_i() -> None:
    # `func` runs once (decoded and cached), is then overwritten by an ordinary store from
    # another page, and runs again: the new instruction must execute.
    m = run("""
    jal ra, func
    mv s2, a0
    la t0, func
    li t1, 0x00700513        # addi a0, zero, 7
    sw t1, 0(t0)
    jal ra, func
    mv s3, a0
    EXIT s3
    .align 12
    func:
    .option push
    .option norvc
    addi a0, zero, 1
    .option pop
    ret
    """)
    assert (m.reg("s2"), m.reg("s3")) == (1, 7)


@needs_as
def test_device_write_into_decoded_code_invalidates_it() -> None:
    m = Machine(assemble("""
    .option push
    .option norvc
    addi a0, zero, 1
    .option pop
    EXIT a0
    """))
    assert m.run() == 1
    m.ram.write(m.ram.base, (0x00900513).to_bytes(4, "little"))  # addi a0, zero, 9
    m.exit.value = None
    m.hart.pc = m.ram.base  # no reset: that would flush the decoded code anyway
    assert m.run() == 9


class ROM:
    """A read-only device holding code, like the board's boot ROM."""

    def __init__(self, code: bytes) -> None:
        self.code = code.ljust(0x100, b"\0")

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.code[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        raise AssertionError("ROM write")


@needs_as
def test_code_runs_from_an_mmio_rom() -> None:
    ram_code = assemble("li a0, 5\nadd a0, a0, a1\nEXIT a0")
    rom_code = assemble("li a1, 0x10\nli t0, 0x80000000\njr t0", base=0x1000)
    m = Machine(ram_code)
    m.bus.attach(0x1000, 0x100, ROM(rom_code), "rom")
    m.hart.reset(0x1000)
    m.run()
    assert m.exit.value == 0x15


def test_machine_construction_without_toolchain() -> None:
    # A hand-encoded program: addi a0, zero, 7 ; sw a0, 0(t6) with t6 preset.
    prog = (0x00700513).to_bytes(4, "little") + (0x00AFA023).to_bytes(4, "little")
    m = Machine(prog)
    m.hart.x[31] = 0x100000
    m.hart.run(10)
    assert m.exit.value == 7
