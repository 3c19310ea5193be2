/*
 * rv64a: load-reserved / store-conditional and the atomic memory operations.
 * Word forms return the old value sign-extended and touch only their 32 bits;
 * an SC without a matching reservation fails and leaves memory alone.
 */
    .file "rv64a.S"
#include "isa.h"

/* insn on a doubleword holding init, with operand src: returns ret, leaves after. */
#define TEST_AMO_D(n, insn, init, src, ret, after)                                  \
    li TESTNUM, n; la a3, amo_cell; li t0, init; sd t0, 0(a3); li a1, src;          \
    insn a0, a1, (a3); li t6, ret; bne a0, t6, fail;                                \
    ld a0, 0(a3); li t6, after; bne a0, t6, fail

/* The same on the low word of a doubleword whose high word must survive. */
#define TEST_AMO_W(n, insn, init, src, ret, after)                                  \
    li TESTNUM, n; la a3, amo_cell; li t0, (0x5a5a5a5a00000000 | (init)); sd t0, 0(a3); \
    li a1, src; insn a0, a1, (a3); li t6, ret; bne a0, t6, fail;                    \
    ld a0, 0(a3); li t6, (0x5a5a5a5a00000000 | (after)); bne a0, t6, fail

    .text
    .globl main
main:
    addi    sp, sp, -16
    sd      ra, 8(sp)
    la      a3, amo_cell

    /* LR/SC that succeeds */
    li      TESTNUM, 1
    li      t0, 100
    sd      t0, 0(a3)
    lr.d    a0, (a3)
    li      t6, 100
    bne     a0, t6, fail
    li      t1, 200
    sc.d    a1, t1, (a3)
    bnez    a1, fail                /* 0 means success */
    li      TESTNUM, 2
    ld      a0, 0(a3)
    li      t6, 200
    bne     a0, t6, fail

    /* a second SC has no reservation left: it fails and writes nothing */
    li      TESTNUM, 3
    li      t1, 300
    sc.d    a1, t1, (a3)
    beqz    a1, fail
    ld      a0, 0(a3)
    li      t6, 200
    bne     a0, t6, fail

    /* SC to another address than the reservation fails */
    li      TESTNUM, 4
    lr.d    a0, (a3)
    la      a4, other_cell
    sd      zero, 0(a4)
    li      t1, 7
    sc.d    a1, t1, (a4)
    beqz    a1, fail
    ld      a0, 0(a4)
    bnez    a0, fail
    sc.d    a1, t1, (a3)            /* clear whatever is left */

    /* lr.w sign-extends; sc.w writes only the low word */
    li      TESTNUM, 5
    li      t0, 0x1122334480000000
    sd      t0, 0(a3)
    lr.w    a0, (a3)
    li      t6, 0xffffffff80000000
    bne     a0, t6, fail
    li      TESTNUM, 6
    li      t1, 0x7fffffff
    sc.w    a1, t1, (a3)
    bnez    a1, fail
    ld      a0, 0(a3)
    li      t6, 0x112233447fffffff
    bne     a0, t6, fail

    /* LR/SC loop: an atomic increment */
    li      TESTNUM, 7
    sd      zero, 0(a3)
    li      t2, 10
1:  lr.d    t0, (a3)
    addi    t0, t0, 1
    sc.d    t1, t0, (a3)
    bnez    t1, 1b
    addi    t2, t2, -1
    bnez    t2, 1b
    ld      a0, 0(a3)
    li      t6, 10
    bne     a0, t6, fail

    /* doubleword AMOs: old value in rd, new value in memory */
    TEST_AMO_D(10, amoswap.d, 0x1111, 0x2222, 0x1111, 0x2222)
    TEST_AMO_D(11, amoadd.d, 0xffffffffffffffff, 2, 0xffffffffffffffff, 1)
    TEST_AMO_D(12, amoxor.d, 0xff00, 0x0ff0, 0xff00, 0xf0f0)
    TEST_AMO_D(13, amoand.d, 0xff00, 0x0ff0, 0xff00, 0x0f00)
    TEST_AMO_D(14, amoor.d, 0xff00, 0x0ff0, 0xff00, 0xfff0)
    TEST_AMO_D(15, amomin.d, -5, 3, -5, -5)
    TEST_AMO_D(16, amomax.d, -5, 3, -5, 3)
    TEST_AMO_D(17, amominu.d, -5, 3, -5, 3)
    TEST_AMO_D(18, amomaxu.d, -5, 3, -5, -5)
    TEST_AMO_D(19, amoswap.d.aqrl, 1, 2, 1, 2)

    /* word AMOs: sign-extended old value, 32-bit arithmetic, high word untouched */
    TEST_AMO_W(20, amoswap.w, 0x80000000, 0x12345678, 0xffffffff80000000, 0x12345678)
    TEST_AMO_W(21, amoadd.w, 0xffffffff, 2, 0xffffffffffffffff, 0x00000001)
    TEST_AMO_W(22, amoadd.w, 0x7fffffff, 1, 0x7fffffff, 0x80000000)
    TEST_AMO_W(23, amoxor.w, 0xf0f0f0f0, 0xffffffff, 0xfffffffff0f0f0f0, 0x0f0f0f0f)
    TEST_AMO_W(24, amoand.w, 0x8000ffff, 0xffff0000, 0xffffffff8000ffff, 0x80000000)
    TEST_AMO_W(25, amoor.w, 0x80000000, 0x1, 0xffffffff80000000, 0x80000001)
    TEST_AMO_W(26, amomin.w, 0x80000000, 1, 0xffffffff80000000, 0x80000000)
    TEST_AMO_W(27, amomax.w, 0x80000000, 1, 0xffffffff80000000, 0x00000001)
    TEST_AMO_W(28, amominu.w, 0x80000000, 1, 0xffffffff80000000, 0x00000001)
    TEST_AMO_W(29, amomaxu.w, 0x80000000, 1, 0xffffffff80000000, 0x80000000)
    /* only the operand's low word counts */
    TEST_AMO_W(30, amomin.w, 5, 0x1ffffffff, 5, 0xffffffff)

    /* rd = x0 still performs the operation */
    li      TESTNUM, 40
    li      t0, 5
    sd      t0, 0(a3)
    li      a1, 3
    amoadd.d x0, a1, (a3)
    ld      a0, 0(a3)
    li      t6, 8
    bne     a0, t6, fail

    ld      ra, 8(sp)
    addi    sp, sp, 16
    j       pass

    ISA_EPILOGUE("rv64a")

    .data
    .balign 64
amo_cell:
    .dword  0
    .balign 64
other_cell:
    .dword  0
