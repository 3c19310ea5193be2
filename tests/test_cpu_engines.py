"""The compiled-block engine agrees with the reference closures, instruction for instruction.

Random straight-line programs of ALU, load and store instructions (hand-encoded, so no
toolchain is needed) run once on the decode-once closures and once with every block
compiled before its first run; registers and memory must end up identical.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_cpu_harness import Machine, use_engine

from vmcore.cpu.decode import _OP32_NAMES, _OP_NAMES

DATA = 0x8000_8000  # x30 points here; x31 points at the exit register
M64 = (1 << 64) - 1


def r_type(f7: int, f3: int, opc: int, rd: int, rs1: int, rs2: int) -> int:
    return (f7 << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | opc


def i_type(imm: int, rs1: int, f3: int, rd: int, opc: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | opc


def s_type(imm: int, rs2: int, rs1: int, f3: int) -> int:
    imm &= 0xFFF
    return ((imm >> 5) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | ((imm & 31) << 7) | 0x23


dest = st.integers(0, 29)  # never the two pointer registers
src = st.integers(0, 31)
imm12 = st.integers(-2048, 2047)
offset = st.integers(0, 1500)

REG_OPS = [(k, 0x33) for k in _OP_NAMES] + [(k, 0x3B) for k in _OP32_NAMES]
r_ops = st.builds(lambda k, rd, a, b: r_type(k[0][0], k[0][1], k[1], rd, a, b),
                  st.sampled_from(REG_OPS), dest, src, src)
i_ops = st.one_of(
    st.builds(lambda f3, rd, a, imm: i_type(imm, a, f3, rd, 0x13),
              st.sampled_from([0, 2, 3, 4, 6, 7]), dest, src, imm12),
    # srli / srai
    st.builds(lambda kind, rd, a, sh: i_type(kind | sh, a, 5, rd, 0x13),
              st.sampled_from([0, 0x400]), dest, src, st.integers(0, 63)),
    st.builds(lambda rd, a, sh: i_type(sh, a, 1, rd, 0x13), dest, src, st.integers(0, 63)),
    st.builds(lambda rd, a, imm: i_type(imm, a, 0, rd, 0x1B), dest, src, imm12),
    st.builds(lambda f3, kind, rd, a, sh: i_type(kind | sh, a, f3, rd, 0x1B),
              st.sampled_from([1, 5]), st.sampled_from([0, 0x400]), dest, src, st.integers(0, 31))
    .filter(lambda w: not ((w >> 12) & 7 == 1 and w >> 30)),
    st.builds(lambda rd, v, opc: (v << 12) | (rd << 7) | opc, dest, st.integers(0, 0xFFFFF),
              st.sampled_from([0x37, 0x17])),
)
mem_ops = st.one_of(
    st.builds(lambda f3, rd, off: i_type(off, 30, f3, rd, 0x03), st.integers(0, 6), dest, offset),
    st.builds(lambda f3, b, off: s_type(off, b, 30, f3), st.integers(0, 3), src, offset),
)
programs = st.lists(st.one_of(r_ops, i_ops, mem_ops), min_size=1, max_size=40)
EXIT = s_type(0, 0, 31, 2)  # sw x0, 0(x31)


def run_on(engine: int, words: list[int], regs: list[int]) -> Machine:
    use_engine(engine)
    image = b"".join(w.to_bytes(4, "little") for w in [*words, EXIT])
    m = Machine(image)
    m.hart.x[1:30] = regs
    m.hart.x[30] = DATA
    m.hart.x[31] = 0x10_0000
    m.ram.write(DATA, bytes((i * 37) & 255 for i in range(2048)))
    m.run()
    return m


@settings(max_examples=60, deadline=None)
@given(programs, st.lists(st.integers(0, M64), min_size=29, max_size=29))
def test_compiled_blocks_match_the_reference_closures(words: list[int], regs: list[int]) -> None:
    ref = run_on(0, words, regs)
    fast = run_on(1, words, regs)
    assert fast.hart.x[:32] == ref.hart.x[:32]
    assert fast.ram.read(DATA, 2048) == ref.ram.read(DATA, 2048)
    assert fast.hart.instret == ref.hart.instret
