/*
 * rv64i: the base integer instructions, with the RV64 details that emulators
 * get wrong: W forms sign-extend 32-bit results, shift amounts are masked to 6
 * (or 5) bits, loads sign- or zero-extend by width, jalr clears bit 0.
 */
    .file "rv64i.S"
#include "isa.h"

    .text
    .globl main
main:
    addi    sp, sp, -16
    sd      ra, 8(sp)

    /* add / sub and their wrap-around */
    TEST_RR(1, add, 5, 2, 3)
    TEST_RR(2, add, 0, -1, 1)
    TEST_RR(3, add, 0x8000000000000000, 0x7fffffffffffffff, 1)
    TEST_RR(4, sub, -1, 2, 3)
    TEST_RR(5, sub, 0x7fffffffffffffff, 0x8000000000000000, 1)
    TEST_RI(6, addi, 0x7ff, 0, 0x7ff)
    TEST_RI(7, addi, -2048, 0, -2048)
    TEST_RI(8, addi, 0xffffffff, 0x100000000, -1)

    /* W forms: 32-bit result, sign-extended */
    TEST_RR(10, addw, 0xffffffff80000000, 0x7fffffff, 1)
    TEST_RR(11, addw, 0, 0xffffffff, 1)
    TEST_RR(12, addw, 3, 0x1234567800000001, 0x2)
    TEST_RR(13, subw, 0x7fffffff, 0xffffffff80000000, 1)
    TEST_RR(14, subw, -1, 0x100000000, 1)
    TEST_RI(15, addiw, 0xffffffff80000000, 0x7fffffff, 1)
    TEST_RI(16, addiw, -1, 0xffffffff00000000, -1)
    TEST_RI(17, addiw, 0x12345678, 0xabcdef0012345678, 0)   /* sext.w */

    /* comparisons */
    TEST_RR(20, slt, 1, -1, 0)
    TEST_RR(21, slt, 0, 0, -1)
    TEST_RR(22, sltu, 0, -1, 0)
    TEST_RR(23, sltu, 1, 0, -1)
    TEST_RR(24, slt, 0, 5, 5)
    TEST_RI(25, slti, 1, -5, -4)
    TEST_RI(26, slti, 0, 0x8000000000000000 - 1, 0)
    TEST_RI(27, sltiu, 1, 5, -1)            /* the immediate sign-extends, then compares unsigned */
    TEST_RI(28, sltiu, 0, -1, -1)
    TEST_RI(29, sltiu, 1, 0, 1)             /* seqz */

    /* logic */
    TEST_RR(30, and, 0x0f00, 0xff00, 0x0ff0)
    TEST_RR(31, or, 0xfff0, 0xff00, 0x0ff0)
    TEST_RR(32, xor, 0xf0f0, 0xff00, 0x0ff0)
    TEST_RI(33, andi, 0xffffffffffffff00, -1, -256)
    TEST_RI(34, ori, -1, 0, -1)
    TEST_RI(35, xori, 0xffffffffffff0f0f, 0xf0f0, -1)   /* not */

    /* 64-bit shifts: amount is the low 6 bits */
    TEST_RR(40, sll, 0x8000000000000000, 1, 63)
    TEST_RR(41, sll, 2, 1, 65)
    TEST_RR(42, srl, 1, 0x8000000000000000, 63)
    TEST_RR(43, sra, -1, 0x8000000000000000, 63)
    TEST_RR(44, sra, 0xc000000000000000, 0x8000000000000000, 0x41)
    TEST_RR(45, srl, 0x8000000000000000, 0x8000000000000000, 64)
    TEST_RI(46, slli, 0x100000000, 1, 32)
    TEST_RI(47, srli, 0x00000000ffffffff, -1, 32)
    TEST_RI(48, srai, 0xffffffff80000000, 0x8000000000000000, 32)
    TEST_RI(49, srai, 0x7fffffff, 0x7fffffffffffffff, 32)

    /* 32-bit shifts: amount is the low 5 bits, result sign-extended */
    TEST_RR(50, sllw, 0xffffffff80000000, 1, 31)
    TEST_RR(51, sllw, 2, 1, 33)
    TEST_RR(52, sllw, 0, 0x100000000, 0)    /* upper bits of the source are ignored */
    TEST_RR(53, srlw, 1, 0x80000000, 31)
    TEST_RR(54, srlw, 0xffffffff80000000, 0xffffffff80000000, 0)
    TEST_RR(55, srlw, 0x7fffffff, 0xffffffffffffffff, 1)
    TEST_RR(56, sraw, -1, 0x80000000, 31)
    TEST_RR(57, sraw, 0xfffffffff8000000, 0x0000000080000000, 4)
    TEST_RR(58, sraw, 0xffffffffc0000000, 0x0000000080000000, 33)   /* amount masked to 1 */
    TEST_RI(60, slliw, 0xffffffff80000000, 1, 31)
    TEST_RI(61, srliw, 0x00000000ffffffff >> 4, 0xffffffffffffffff, 4)
    TEST_RI(62, sraiw, 0xffffffffffffffff, 0x00000000ffffffff, 4)
    TEST_RI(63, sraiw, 0x00000000, 0x0000000100000000, 0)

    /* lui sign-extends bit 31; auipc adds to its own pc */
    li      TESTNUM, 70
    lui     a0, 0x80000
    li      t6, 0xffffffff80000000
    bne     a0, t6, fail
    li      TESTNUM, 71
    lui     a0, 0x7ffff
    li      t6, 0x7ffff000
    bne     a0, t6, fail
    li      TESTNUM, 72
1:  auipc   a0, 0
    la      t6, 1b
    bne     a0, t6, fail
    li      TESTNUM, 73
2:  auipc   a0, 1
    la      t6, 2b
    li      t5, 0x1000
    add     t6, t6, t5
    bne     a0, t6, fail

    /* loads extend by width and signedness */
    la      a3, data
    li      TESTNUM, 80
    lb      a0, 0(a3)
    li      t6, 0xffffffffffffff81
    bne     a0, t6, fail
    li      TESTNUM, 81
    lbu     a0, 0(a3)
    li      t6, 0x81
    bne     a0, t6, fail
    li      TESTNUM, 82
    lh      a0, 0(a3)
    li      t6, 0xffffffffffff8281
    bne     a0, t6, fail
    li      TESTNUM, 83
    lhu     a0, 0(a3)
    li      t6, 0x8281
    bne     a0, t6, fail
    li      TESTNUM, 84
    lw      a0, 0(a3)
    li      t6, 0xffffffff84838281
    bne     a0, t6, fail
    li      TESTNUM, 85
    lwu     a0, 0(a3)
    li      t6, 0x84838281
    bne     a0, t6, fail
    li      TESTNUM, 86
    ld      a0, 0(a3)
    li      t6, 0x8887868584838281
    bne     a0, t6, fail
    li      TESTNUM, 87
    lb      a0, 7(a3)
    li      t6, 0xffffffffffffff88
    bne     a0, t6, fail
    li      TESTNUM, 88
    lh      a0, 8(a3)               /* positive halfword stays positive */
    li      t6, 0x7f01
    bne     a0, t6, fail
    li      TESTNUM, 89
    lw      a0, -4(a3)              /* negative offset */
    li      t6, 0x11223344
    bne     a0, t6, fail

    /* stores write exactly their width */
    la      a3, scratch
    li      t0, -1
    sd      t0, 0(a3)
    li      t1, 0x1234567890abcdef
    li      TESTNUM, 90
    sb      t1, 0(a3)
    ld      a0, 0(a3)
    li      t6, 0xffffffffffffffef
    bne     a0, t6, fail
    li      TESTNUM, 91
    sh      t1, 2(a3)
    ld      a0, 0(a3)
    li      t6, 0xffffffffcdefffef
    bne     a0, t6, fail
    li      TESTNUM, 92
    sw      t1, 4(a3)
    ld      a0, 0(a3)
    li      t6, 0x90abcdefcdefffef
    bne     a0, t6, fail
    li      TESTNUM, 93
    sd      t1, 8(a3)
    ld      a0, 8(a3)
    bne     a0, t1, fail
    li      TESTNUM, 94
    ld      a0, 16(a3)              /* the neighbour is untouched */
    bnez    a0, fail

    /* branches: taken and not taken, signed against unsigned */
    li      a1, -1
    li      a2, 1
    li      TESTNUM, 100
    beq     a1, a2, fail
    li      TESTNUM, 101
    bne     a1, a1, fail
    li      TESTNUM, 102
    bge     a1, a2, fail            /* -1 < 1 signed */
    li      TESTNUM, 103
    bltu    a1, a2, fail            /* 0xff..ff > 1 unsigned */
    li      TESTNUM, 104
    blt     a2, a1, fail
    li      TESTNUM, 105
    bgeu    a2, a1, fail
    li      TESTNUM, 106
    blt     a1, a2, 3f
    j       fail
3:  li      TESTNUM, 107
    bgeu    a1, a2, 4f
    j       fail
4:  li      TESTNUM, 108
    bge     a1, a1, 5f              /* equal counts as greater-or-equal */
    j       fail
5:  li      TESTNUM, 109
    beq     a1, a1, 6f
    j       fail
6:
    /* jal links the next pc; jalr clears bit 0 of the target and can link into its own base */
    li      TESTNUM, 110
    jal     a0, 7f
8:  j       fail
7:  la      t6, 8b
    bne     a0, t6, fail
    li      TESTNUM, 111
    la      t0, 9f
    addi    t0, t0, 1               /* odd target: bit 0 is ignored */
    jalr    a0, 0(t0)
10: j       fail
9:  la      t6, 10b
    bne     a0, t6, fail
    li      TESTNUM, 112
    la      t0, 11f
    jalr    t0, 0(t0)               /* rd == rs1: the target uses the old value */
12: j       fail
11: la      t6, 12b
    bne     t0, t6, fail
    li      TESTNUM, 113
    la      t0, 13f - 8
    jalr    zero, 8(t0)             /* offset added to the base */
    j       fail
13:
    /* x0 stays zero */
    li      TESTNUM, 120
    li      t0, 5
    add     zero, t0, t0
    bnez    zero, fail
    li      TESTNUM, 121
    addi    x0, x0, 7
    mv      a0, x0
    bnez    a0, fail

    /* fence.i: code rewritten by stores runs in its new form (a decode cache must notice) */
    li      TESTNUM, 130
    la      t0, patch_site
    jalr    ra, 0(t0)
    CHECK(130, a0, 1)
    li      TESTNUM, 131
    la      t0, patch_site
    li      t1, 0x00200513          /* addi a0, zero, 2 */
    sw      t1, 0(t0)
    fence.i
    jalr    ra, 0(t0)
    CHECK(131, a0, 2)
    li      TESTNUM, 132
    la      t0, patch_site
    li      t1, 0x00300513          /* addi a0, zero, 3 */
    sw      t1, 0(t0)
    fence.i
    jalr    ra, 0(t0)
    CHECK(132, a0, 3)
    /* plain fences are no-ops to a single hart */
    fence
    fence   rw, rw
    fence   r, w

    ld      ra, 8(sp)
    addi    sp, sp, 16
    j       pass

    ISA_EPILOGUE("rv64i")

    .data
    .balign 8
    .word   0x11223344
data:
    .byte   0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88
    .byte   0x01, 0x7f, 0, 0, 0, 0, 0, 0
    .balign 8
scratch:
    .dword  0, 0, 0

    /* Code in writable memory, patched by the fence.i checks. */
    .balign 4
patch_site:
    .word   0x00100513              /* addi a0, zero, 1 */
    .word   0x00008067              /* ret */
