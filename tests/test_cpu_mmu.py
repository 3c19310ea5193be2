"""Sv39 translation: walks, hardware A/D updates, each fault cause, MPRV/SUM/MXR, sfence.vma.

Every program builds the same small page table in M-mode: RAM identity-mapped as one
gigapage for S-mode, and single 4 KiB test pages at 0x4000_0000 + n*0x1000 with
different permissions. Faults go to an M-mode handler that exits with mcause, leaving
mtval in a1.
"""

from __future__ import annotations

import struct

import pytest
from test_cpu_harness import ENGINE_IDS, ENGINES, Machine, assemble, needs_as, use_engine

V, R, W, X, U, A, D = 1, 2, 4, 8, 16, 64, 128
VA = 0x4000_0000

# test page n: (label of its physical page, PTE flags)
PAGES = {
    0: ("page0", V | R | W),            # A/D clear: the walker sets them
    1: ("page1", V | R | A | D),        # read-only
    2: ("page2", V | X | A),            # execute-only
    3: ("page3", V | R | W | U | A | D),  # user page
    4: ("page0", 0),                    # invalid
    5: ("page5", V | R | W | X | A | D),  # executable page for fetch tests
}


@pytest.fixture(autouse=True, params=ENGINES, ids=ENGINE_IDS)
def engine(request: pytest.FixtureRequest) -> int:
    """Every test here runs on the reference closures and on compiled blocks."""
    return use_engine(request.param)


def program(body: str, mode: str = "S") -> str:
    setup = ["la t0, m_handler", "csrw mtvec, t0"]
    # RAM, and the low gigabyte (devices, including the exit register), identity-mapped
    setup += ["li t0, (0x80000 << 10) | 0xCF", "la t1, pt_root", "sd t0, 16(t1)",
              "li t0, 0xCF", "sd t0, 0(t1)"]
    setup += ["la t0, pt_l1", "srli t0, t0, 12", "slli t0, t0, 10", "ori t0, t0, 1",
              "la t1, pt_root", "sd t0, 8(t1)"]
    setup += ["la t0, pt_l0", "srli t0, t0, 12", "slli t0, t0, 10", "ori t0, t0, 1",
              "la t1, pt_l1", "sd t0, 0(t1)"]
    for n, (label, flags) in PAGES.items():
        setup += [f"la t0, {label}", "srli t0, t0, 12", "slli t0, t0, 10",
                  f"ori t0, t0, {flags}", "la t1, pt_l0", f"sd t0, {8 * n}(t1)"]
    setup += ["la t0, pt_root", "srli t0, t0, 12", "li t1, 8 << 60", "or t0, t0, t1",
              "csrw satp, t0", "sfence.vma"]
    if mode in ("S", "U"):
        mpp = 1 if mode == "S" else 0
        setup += ["li t0, 3 << 11", "csrc mstatus, t0", f"li t0, {mpp} << 11",
                  "csrs mstatus, t0", "la t0, body", "csrw mepc, t0", "mret"]
    return "\n".join(setup) + f"""
    body:
    {body}
    li a0, 0x55
    EXIT a0
    .align 2
    m_handler:
    csrr a0, mcause
    csrr a1, mtval
    csrr a2, mepc
    EXIT a0
    .data
    .align 12
    pt_root: .fill 4096, 1, 0
    pt_l1: .fill 4096, 1, 0
    pt_l0: .fill 4096, 1, 0
    page0: .dword 0x1111
    .align 12
    page1: .dword 0x2222
    .align 12
    page2: .dword 0x3333
    .align 12
    page3: .dword 0x4444
    .align 12
    page5:
    li a0, 0x66
    EXIT a0
    .align 12
    """


def run(body: str, mode: str = "S", log: bool = False) -> Machine:
    m = Machine(assemble(program(body, mode)))
    if log:
        m.ram.dirty_log.enable()
    m.run()
    return m


def pte(m: Machine, n: int) -> int:
    return int(struct.unpack("<Q", m.ram.read(LABELS["pt_l0"](m) + 8 * n, 8))[0])


def _data_start(m: Machine) -> int:
    # pt_root is the first 4 KiB-aligned page of .data; the hart's satp points at it.
    return (m.hart.satp & ((1 << 44) - 1)) << 12


LABELS = {
    "pt_root": _data_start,
    "pt_l1": lambda m: _data_start(m) + 0x1000,
    "pt_l0": lambda m: _data_start(m) + 0x2000,
    "page0": lambda m: _data_start(m) + 0x3000,
}


@needs_as
def test_walk_sets_accessed_then_dirty_and_logs_the_page_table_write() -> None:
    m = run(f"li t0, {VA}\nld s2, 0(t0)\nli a0, 1\nEXIT a0", log=True)
    assert (m.reg("a0"), m.reg("s2")) == (1, 0x1111)
    assert pte(m, 0) & (A | D) == A
    pages = set(m.ram.dirty_log.fetch_and_reset().tolist())
    assert (LABELS["pt_l0"](m) - m.ram.base) >> 12 in pages

    # Load first (A only), then store: the store must still set D.
    m = run(f"li t0, {VA}\nld s3, 0(t0)\nli t1, 7\nsd t1, 8(t0)\nld s2, 8(t0)\nli a0, 1\n"
            "EXIT a0", log=True)
    assert (m.reg("a0"), m.reg("s2")) == (1, 7)
    assert pte(m, 0) & (A | D) == A | D
    pages = set(m.ram.dirty_log.fetch_and_reset().tolist())
    assert (LABELS["page0"](m) - m.ram.base) >> 12 in pages
    assert (LABELS["pt_l0"](m) - m.ram.base) >> 12 in pages


@needs_as
@pytest.mark.parametrize(("body", "cause", "page"), [
    ("li t0, {va1}\nsd t0, 0(t0)", 15, 1),               # store to read-only
    ("li t0, {va1}\nld t1, 0(t0)\nsd t1, 0(t0)", 15, 1),  # ...also after a cached load
    ("li t0, {va2}\nld t1, 0(t0)", 13, 2),               # load from execute-only
    ("li t0, {va4}\nld t1, 0(t0)", 13, 4),               # invalid PTE
    ("li t0, {va4}\nsd t1, 0(t0)", 15, 4),
    ("li t0, {va3}\nld t1, 0(t0)", 13, 3),               # S touching a U page without SUM
    ("li t0, {va0}\njr t0", 12, 0),                      # fetch from a non-executable page
])
def test_page_faults_report_cause_and_address(body: str, cause: int, page: int) -> None:
    vas = {f"va{n}": VA + n * 0x1000 for n in PAGES}
    m = run(body.format(**vas))
    assert m.reg("a0") == cause
    assert m.reg("a1") == VA + page * 0x1000


@needs_as
def test_non_canonical_address_faults() -> None:
    m = run("li t0, 0x0000008000000000\nld t1, 0(t0)")
    assert m.reg("a0") == 13
    assert m.reg("a1") == 0x0000008000000000


@needs_as
def test_fetch_from_executable_page_and_user_page_rules() -> None:
    assert run(f"li t0, {VA + 0x5000}\njr t0").reg("a0") == 0x66
    # S-mode may never execute a U page, even with SUM.
    m = run(f"li t0, 1 << 18\ncsrs sstatus, t0\nli t0, {VA + 0x3000}\njr t0")
    assert m.reg("a0") == 12


@needs_as
def test_sum_and_mxr() -> None:
    m = run(f"li t0, 1 << 18\ncsrs sstatus, t0\nli t0, {VA + 0x3000}\nld s2, 0(t0)\n"
            "li a0, 1\nEXIT a0")
    assert (m.reg("a0"), m.reg("s2")) == (1, 0x4444)
    m = run(f"li t0, 1 << 19\ncsrs sstatus, t0\nli t0, {VA + 0x2000}\nld s2, 0(t0)\n"
            "li a0, 1\nEXIT a0")
    assert (m.reg("a0"), m.reg("s2")) == (1, 0x3333)


@needs_as
def test_user_mode_needs_u_bit() -> None:
    m = run(f"li t0, {VA + 0x3000}\nld s2, 0(t0)\nli t0, {VA + 0x1000}\nld s3, 0(t0)",
            mode="U")
    # the body itself is in a non-U page, so U-mode faults fetching it
    assert m.reg("a0") == 12


@needs_as
def test_mprv_translates_m_mode_loads_with_mpp() -> None:
    m = run(f"""
    li t0, 3 << 11
    csrc mstatus, t0
    li t0, (1 << 11) | (1 << 17)
    csrs mstatus, t0          # MPRV with MPP = S
    li t0, {VA}
    ld s2, 0(t0)
    li t0, 1 << 17
    csrc mstatus, t0
    li a0, 1
    EXIT a0
    """, mode="M")
    assert (m.reg("a0"), m.reg("s2")) == (1, 0x1111)


@needs_as
def test_sfence_vma_picks_up_a_changed_mapping() -> None:
    m = run(f"""
    li t0, {VA}
    ld s2, 0(t0)
    la t1, pt_l0
    la t2, page3
    srli t2, t2, 12
    slli t2, t2, 10
    ori t2, t2, {V | R | W | A | D}
    sd t2, 0(t1)
    sfence.vma t0, zero
    ld s3, 0(t0)
    li a0, 1
    EXIT a0
    """)
    assert (m.reg("s2"), m.reg("s3")) == (0x1111, 0x4444)


@needs_as
def test_remapped_code_page_is_decoded_afresh() -> None:
    # Decoded blocks are cached by virtual pc: running the same virtual address after
    # the page behind it changed (and sfence.vma) must run the new page's code.
    m = run(f"""
    li s4, {VA + 0x5000}
    la t0, code_a
    la t1, page5
    li t2, 0x1000
    1: lw t3, 0(t0)           # copy code_a into page5
    sw t3, 0(t1)
    addi t0, t0, 4
    addi t1, t1, 4
    addi t2, t2, -4
    bnez t2, 1b
    fence.i
    jalr s4
    mv s2, a0
    la t1, pt_l0
    la t2, page6
    srli t2, t2, 12
    slli t2, t2, 10
    ori t2, t2, {V | R | W | X | A | D}
    sd t2, 40(t1)             # VA + 0x5000 now maps page6
    sfence.vma
    jalr s4
    mv s3, a0
    li a0, 1
    EXIT a0
    .align 12
    code_a:
    li a0, 0xa
    ret
    .align 12
    page6:
    li a0, 0xb
    ret
    .align 12
    """)
    assert (m.reg("a0"), m.reg("s2"), m.reg("s3")) == (1, 0xA, 0xB)


@needs_as
@pytest.mark.parametrize(("body", "cause"), [
    ("li t0, 0x200\nld t1, 0(t0)", 5),
    ("li t0, 0x200\nsd t1, 0(t0)", 7),
    ("li t0, 0x200\njr t0", 1),
])
def test_access_faults_outside_ram_and_devices(body: str, cause: int) -> None:
    m = run(body, mode="M")
    assert m.reg("a0") == cause
    assert m.reg("a1") == 0x200
