/*
 * rv64c: the compressed encodings, written out as c.* instructions so the
 * assembler cannot pick the 32-bit form. Also 32-bit instructions at 2-byte
 * aligned addresses, and links of pc + 2 from c.jalr.
 */
    .file "rv64c.S"
#include "isa.h"

    .text
    .option rvc
    .globl main
main:
    addi    sp, sp, -64
    sd      ra, 56(sp)
    sd      s0, 48(sp)
    sd      s1, 40(sp)

    /* c.li / c.addi / c.addiw (sign-extending) / c.lui */
    li      TESTNUM, 1
    c.li    a0, -32
    CHECK(1, a0, -32)
    c.addi  a0, 31
    CHECK(2, a0, -1)
    li      a0, 0x7fffffff
    c.addiw a0, 1
    CHECK(3, a0, 0xffffffff80000000)
    c.li    a0, 0
    c.addiw a0, 0                           /* sext.w of 0 */
    CHECK(4, a0, 0)
    c.lui   a0, 0xfffff                     /* nzimm[17:12] = -1: sign-extended */
    CHECK(5, a0, 0xfffffffffffff000)
    c.lui   a0, 1
    CHECK(6, a0, 0x1000)

    /* shifts and immediate logic on x8-x15 */
    li      s0, 0x8000000000000000
    c.srai  s0, 63
    CHECK(10, s0, -1)
    c.srli  s0, 60
    CHECK(11, s0, 0xf)
    c.slli  s0, 60
    CHECK(12, s0, 0xf000000000000000)
    li      s0, 0xff
    c.andi  s0, -16
    CHECK(13, s0, 0xf0)

    /* register-register forms */
    li      s0, 10
    li      s1, 3
    c.sub   s0, s1
    CHECK(20, s0, 7)
    c.xor   s0, s1
    CHECK(21, s0, 4)
    c.or    s0, s1
    CHECK(22, s0, 7)
    c.and   s0, s1
    CHECK(23, s0, 3)
    li      s0, 0x7fffffff
    li      s1, 1
    c.addw  s0, s1
    CHECK(24, s0, 0xffffffff80000000)
    li      s0, 0x100000000
    c.subw  s0, s1
    CHECK(25, s0, -1)
    li      a1, 40
    c.mv    a0, a1
    CHECK(26, a0, 40)
    c.add   a0, a1
    CHECK(27, a0, 80)

    /* stack-pointer forms */
    mv      s1, sp
    c.addi16sp sp, -32
    addi    t0, s1, -32
    li      TESTNUM, 30
    bne     sp, t0, fail
    c.addi16sp sp, 32
    li      TESTNUM, 31
    bne     sp, s1, fail
    c.addi4spn s0, sp, 16
    addi    t0, sp, 16
    li      TESTNUM, 32
    bne     s0, t0, fail

    li      a1, 0x1122334455667788
    c.sdsp  a1, 0(sp)
    c.ldsp  a0, 0(sp)
    CHECK(33, a0, 0x1122334455667788)
    li      a1, 0x80000001
    c.swsp  a1, 8(sp)
    c.lwsp  a0, 8(sp)
    CHECK(34, a0, 0xffffffff80000001)

    /* register-based loads and stores (x8-x15) */
    la      s0, cdata
    li      s1, 0xfedcba9876543210
    c.sd    s1, 8(s0)
    c.ld    a5, 8(s0)
    li      TESTNUM, 40
    bne     a5, s1, fail
    c.lw    a5, 8(s0)
    CHECK(41, a5, 0x76543210)
    c.lw    a5, 12(s0)
    CHECK(42, a5, 0xfffffffffedcba98)
    li      s1, 0xabcd0000
    c.sw    s1, 0(s0)
    c.lw    a5, 0(s0)
    CHECK(43, a5, 0xffffffffabcd0000)

    /* branches and jumps */
    li      TESTNUM, 50
    c.li    s0, 0
    c.bnez  s0, fail_far
    c.beqz  s0, 1f
    c.j     fail_far
1:  li      TESTNUM, 51
    c.li    s0, 1
    c.beqz  s0, fail_far
    c.bnez  s0, 2f
    c.j     fail_far
2:  li      TESTNUM, 52
    la      t0, 3f
    c.jr    t0
    c.j     fail_far
3:  li      TESTNUM, 53
    la      t0, 4f
    c.jalr  t0                              /* links pc + 2 */
5:  c.j     fail_far
4:  la      t6, 5b
    bne     ra, t6, fail

    /* a 32-bit instruction that starts 2 bytes into a word */
    li      TESTNUM, 54
    .balign 4
    c.nop
    addi    a0, zero, 123
    CHECK(55, a0, 123)
    /* a jump target at an odd halfword */
    la      t0, 6f
    jr      t0
    c.j     fail_far
    .balign 4
    c.nop
6:  c.li    a0, 9
    CHECK(56, a0, 9)

    ld      ra, 56(sp)
    ld      s0, 48(sp)
    ld      s1, 40(sp)
    addi    sp, sp, 64
    j       pass

fail_far:
    j       fail

    ISA_EPILOGUE("rv64c")

    .data
    .balign 8
cdata:
    .dword  0, 0
