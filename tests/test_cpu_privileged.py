"""Privileged architecture of the hart: CSRs, traps and delegation, interrupts, WFI, state.

OpenSBI and Linux probe the hart by trapping: an absent CSR or extension must raise an
illegal-instruction exception with the instruction bits in xtval, and probes of
unsupported satp modes must leave satp unchanged. These tests pin those answers.
"""

from __future__ import annotations

import msgpack
import pytest
from test_cpu_harness import ENGINE_IDS, ENGINES, Machine, assemble, needs_as, run, use_engine

from vmcore.cpu import MEIP, MSIP, MTIP, SEIP, STIP, Hart

M64 = (1 << 64) - 1

# A handler that exits with mcause, leaving mtval in a1 and mepc in a2.
M_HANDLER = """
    .align 2
    m_handler:
    csrr a0, mcause
    csrr a1, mtval
    csrr a2, mepc
    EXIT a0
"""
SETUP = "la t0, m_handler\ncsrw mtvec, t0\n"


@pytest.fixture(autouse=True, params=ENGINES, ids=ENGINE_IDS)
def engine(request: pytest.FixtureRequest) -> int:
    """Every test here runs on the reference closures and on compiled blocks."""
    return use_engine(request.param)


def trapping(body: str) -> Machine:
    return run(SETUP + body + "\nli a0, 0x55\nEXIT a0\n" + M_HANDLER)


@needs_as
def test_misa_and_id_csrs() -> None:
    m = run("""
    csrr a0, misa
    csrr a1, mhartid
    csrr a2, mvendorid
    csrr a3, mstatus
    csrr a4, mconfigptr
    EXIT a0
    """)
    assert m.reg("a0") == (2 << 62) | sum(1 << (ord(c) - 65) for c in "IMACSU")
    assert m.reg("a1") == 0
    assert m.reg("a2") == 0
    assert m.reg("a3") >> 32 & 0xF == 0b1010  # UXL = SXL = 64-bit
    assert m.reg("a3") >> 13 & 3 == 0  # FS: no floating point
    assert m.reg("a4") == 0


@needs_as
@pytest.mark.parametrize("insn", [
    "csrw mvendorid, t0",   # read-only CSR
    "csrr t1, 0x14d",       # stimecmp: no Sstc
    "csrr t1, fcsr",        # no F
    "csrr t1, 0xb03",       # mhpmcounter3: not implemented
    "csrr t1, 0x7a0",       # tselect: no debug triggers
    "csrw pmpcfg1, t0",     # odd pmpcfg does not exist on RV64
    ".word 0x002081d3",     # fadd.s f3, f1, f2: no F
    ".word 0x00002007",     # flw f0, 0(zero)
    ".word 0xffffffff",
])
def test_illegal_instructions_trap_with_their_bits(insn: str) -> None:
    m = run(SETUP + "li t0, 1\ninsn_at:\n" + insn + "\nli a0, 0x55\nEXIT a0\n" + M_HANDLER
            + "\n.globl insn_at")
    assert m.reg("a0") == 2
    word = int.from_bytes(m.ram.read(m.reg("a2"), 4), "little")
    assert m.reg("a1") == word
    assert m.reg("a2") != 0


@needs_as
def test_fs_stays_off_and_satp_ignores_sv48_sv57() -> None:
    m = run("""
    li t0, (3 << 13)
    csrs mstatus, t0
    csrr a0, mstatus
    li t0, (9 << 60) | 0x1234
    csrw satp, t0
    csrr a1, satp
    li t0, (10 << 60) | 0x1234
    csrw satp, t0
    csrr a2, satp
    li t0, (8 << 60) | 0x1234
    csrw satp, t0
    csrr a3, satp
    csrw satp, zero
    EXIT a0
    """)
    assert m.reg("a0") >> 13 & 3 == 0
    assert m.reg("a1") == 0
    assert m.reg("a2") == 0
    assert m.reg("a3") == (8 << 60) | 0x1234


@needs_as
def test_pmp_csrs_are_present_and_writable() -> None:
    m = run("""
    li t0, 0x1f1f
    csrw pmpcfg0, t0
    csrr a0, pmpcfg0
    li t0, -1
    csrw pmpaddr63, t0
    csrr a1, pmpaddr63
    csrr a2, pmpcfg14
    EXIT a0
    """)
    assert m.reg("a0") == 0x1F1F
    assert m.reg("a1") == (1 << 54) - 1
    assert m.reg("a2") == 0


@needs_as
def test_ecall_from_m_and_ebreak() -> None:
    assert trapping("ecall").reg("a0") == 11
    m = trapping("ebreak")
    assert m.reg("a0") == 3


ENTER_U = """
    li t0, (3 << 11)
    csrc mstatus, t0          # MPP = U
    la t0, user
    csrw mepc, t0
    mret
"""
ENTER_S = """
    li t0, (3 << 11)
    csrc mstatus, t0
    li t0, (1 << 11)
    csrs mstatus, t0          # MPP = S
    la t0, super
    csrw mepc, t0
    mret
"""


@needs_as
def test_ecall_from_u_delegated_to_s_then_sret_back() -> None:
    m = run(SETUP + """
    la t0, s_handler
    csrw stvec, t0
    li t0, (1 << 8)
    csrw medeleg, t0          # ecall from U goes to S
    """ + ENTER_U + """
    user:
    li s2, 1
    ecall
    li s3, 1                  # reached after sret
    ecall                     # second ecall: handler exits
    .align 2
    s_handler:
    csrr a0, scause
    csrr a1, sepc
    csrr a3, sstatus
    bnez s3, 2f
    addi a1, a1, 4
    csrw sepc, a1
    sret
    2: EXIT a0
    """ + M_HANDLER)
    assert m.reg("a0") == 8
    assert m.reg("s2") == 1 and m.reg("s3") == 1
    assert m.reg("a3") >> 8 & 1 == 0  # SPP = U
    assert m.hart.priv == 1


@needs_as
def test_counter_gating_in_user_mode() -> None:
    m = run(SETUP + "csrw mcounteren, zero\n" + ENTER_U + "user:\nrdcycle a5\nli a0, 0\nEXIT a0"
            + M_HANDLER)
    assert m.reg("a0") == 2
    m = run(SETUP + "li t0, 7\ncsrw mcounteren, t0\ncsrw scounteren, t0\n" + ENTER_U
            + "user:\nrdinstret a5\nrdtime a6\nli a0, 0\nEXIT a0" + M_HANDLER)
    assert m.reg("a0") == 0
    assert m.reg("a5") > 0


@needs_as
def test_instret_counts_retired_instructions() -> None:
    m = run("""
    csrr t0, minstret
    nop
    nop
    csrr t1, minstret
    sub a0, t1, t0
    EXIT a0
    """)
    assert m.reg("a0") == 3


@needs_as
def test_tsr_tvm_tw_trap_in_s_mode() -> None:
    for bit, insn in ((22, "sret"), (20, "csrr t1, satp"), (20, "sfence.vma"), (21, "wfi")):
        m = run(SETUP + f"li t0, (1 << {bit})\ncsrs mstatus, t0\n" + ENTER_S
                + f"super:\n{insn}\nli a0, 0\nEXIT a0" + M_HANDLER)
        assert m.reg("a0") == 2, insn


@needs_as
def test_vectored_mtvec_for_interrupts_direct_for_exceptions() -> None:
    src = """
    la t0, vec
    ori t0, t0, 1
    csrw mtvec, t0
    li t0, (1 << 3)
    csrs mie, t0              # MSIE
    csrs mstatus, 8           # MIE
    wait: j wait
    .align 8
    .option norvc
    vec:
    j exc                     # 0: exceptions
    .rept 2
    j bad
    .endr
    j msi                     # 3: machine software interrupt
    bad: li a0, 0xbad
    EXIT a0
    msi: csrr a0, mcause
    EXIT a0
    exc: li a0, 0xe
    EXIT a0
    """
    m = Machine(assemble(src))
    m.hart.run(50)
    assert m.exit.value is None
    m.hart.set_pending(MSIP, True)
    m.run()
    assert m.exit.value == 3  # stored with sw: the low 32 bits of mcause
    assert m.hart.mcause == (1 << 63) | 3


@needs_as
def test_interrupt_priority_order() -> None:
    src = SETUP + """
    li t0, -1
    csrw mie, t0
    csrs mstatus, 8
    spin: j spin
    """ + M_HANDLER
    order = []
    for lines in ([MEIP, MSIP, MTIP, SEIP, STIP], [MSIP, MTIP, SEIP], [MTIP, SEIP, STIP],
                  [SEIP, STIP], [STIP]):
        m = Machine(assemble(src))
        m.hart.run(30)
        for line in lines:
            m.hart.set_pending(line, True)
        m.run()
        order.append(m.hart.mcause & 0xFF)
    assert order == [11, 3, 7, 9, 5]


@needs_as
def test_delegated_interrupt_not_taken_in_m_mode_but_taken_in_s() -> None:
    src = SETUP + """
    la t0, s_handler
    csrw stvec, t0
    li t0, (1 << 5)
    csrw mideleg, t0          # STI to S
    csrw mie, t0
    csrs mstatus, 8
    li s2, 0
    1: addi s2, s2, 1
    li t1, 100
    blt s2, t1, 1b            # M-mode: delegated interrupt must not be taken here
    """ + ENTER_S + """
    super:
    csrsi sstatus, 2          # SIE
    spin: j spin
    .align 2
    s_handler:
    csrr a0, scause
    EXIT a0
    """ + M_HANDLER
    m = Machine(assemble(src))
    m.hart.set_pending(STIP, True)
    m.run()
    assert m.hart.scause == (1 << 63) | 5
    assert m.reg("s2") == 100


@needs_as
def test_wfi_stops_run_and_set_pending_resumes_after_it() -> None:
    src = SETUP + """
    li t0, (1 << 7)
    csrw mie, t0              # MTIE, but MIE off: wfi wakes, no trap
    li s2, 1
    wfi
    li s3, 2
    EXIT s3
    """ + M_HANDLER
    m = Machine(assemble(src))
    m.hart.run(1000)
    assert m.hart.waiting
    assert m.hart.run(1000) == 0
    m.hart.set_pending(MTIP, True)
    assert not m.hart.waiting
    m.run()
    assert m.exit.value == 2


@needs_as
def test_mip_seip_software_bit_and_external_line_are_separate() -> None:
    src = """
    li t0, (1 << 9)
    csrs mip, t0              # software SEIP
    csrr a0, mip
    EXIT a0
    """
    m = Machine(assemble(src))
    m.hart.set_pending(SEIP, True)
    m.run()
    assert m.reg("a0") & SEIP
    m.hart.set_pending(SEIP, False)
    assert m.hart.mip & SEIP  # still set by software
    m.hart.write_mip_software(0, SEIP)
    assert not m.hart.mip & SEIP


@needs_as
def test_save_restore_continues_identically() -> None:
    src = """
    li s2, 0
    li s3, 0x12345
    1: mul s3, s3, s3
    srli s3, s3, 7
    addi s2, s2, 1
    li t0, 5000
    blt s2, t0, 1b
    EXIT s3
    """
    image = assemble(src)
    ref = Machine(image)
    ref.run()
    a = Machine(image)
    a.hart.run(7777)
    state = msgpack.unpackb(msgpack.packb(a.hart.save()), strict_map_key=False)
    b = Machine(b"")
    b.ram.write(b.ram.base, a.ram.read(a.ram.base, a.ram.size))
    b.hart.restore(state)
    assert b.hart.pc == a.hart.pc and b.hart.instret == a.hart.instret
    b.run()
    assert b.exit.value == ref.exit.value
    assert b.hart.instret == ref.hart.instret


def test_restore_rejects_wrong_version() -> None:
    m = Machine(b"\x13\x00\x00\x00")
    state = m.hart.save()
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        m.hart.restore(state)


def test_hart_exports() -> None:
    assert Hart is not None
    assert (MSIP, MTIP, MEIP, SEIP, STIP) == (8, 128, 2048, 512, 32)


@needs_as
def test_trace_logs_traps_and_mmio() -> None:
    m = Machine(assemble(SETUP + "ecall\n" + M_HANDLER))
    lines: list[str] = []
    m.hart.trace = lines.append
    m.run()
    assert any(line.startswith("trap ecall from M") and "M->M" in line for line in lines)
    assert any(line.startswith("mmio write 0x100000") for line in lines)
