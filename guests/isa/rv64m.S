/*
 * rv64m: multiply and divide, including the cases the spec defines instead of
 * trapping: division by zero and signed overflow, in 64- and 32-bit forms.
 */
    .file "rv64m.S"
#include "isa.h"

#define MIN64 0x8000000000000000
#define MIN32 0xffffffff80000000

    .text
    .globl main
main:
    addi    sp, sp, -16
    sd      ra, 8(sp)

    TEST_RR(1, mul, 42, 6, 7)
    TEST_RR(2, mul, -42, -6, 7)
    TEST_RR(3, mul, 0xfffffffe00000001, 0xffffffff, 0xffffffff)
    TEST_RR(4, mul, 1, -1, -1)
    TEST_RR(5, mulh, 0, 6, 7)
    TEST_RR(6, mulh, -1, -6, 7)
    TEST_RR(7, mulh, 0x3fffffffffffffff, 0x7fffffffffffffff, 0x7fffffffffffffff)
    TEST_RR(8, mulh, 0x4000000000000000, MIN64, MIN64)
    TEST_RR(9, mulhu, 0xfffffffffffffffe, -1, -1)
    TEST_RR(10, mulhu, 0, 0xffffffff, 0xffffffff)
    TEST_RR(11, mulhsu, -1, -1, 1)               /* signed -1 times unsigned 1 */
    TEST_RR(12, mulhsu, 0xffffffffffffffff, -1, -1)
    TEST_RR(13, mulhsu, 0, 1, -1)
    TEST_RR(14, mulw, 0xffffffff80000000, 0x40000000, 2)
    TEST_RR(15, mulw, 1, 0x1ffffffff, 0x1ffffffff)   /* only the low 32 bits count */
    TEST_RR(16, mulw, -6, 0x100000003, -2)

    TEST_RR(20, div, 3, 20, 6)
    TEST_RR(21, div, -3, -20, 6)                 /* rounds towards zero */
    TEST_RR(22, div, -3, 20, -6)
    TEST_RR(23, divu, 0x2aaaaaaaaaaaaaaa, -1, 6)
    TEST_RR(24, rem, 2, 20, 6)
    TEST_RR(25, rem, -2, -20, 6)                 /* sign of the dividend */
    TEST_RR(26, rem, 2, 20, -6)
    TEST_RR(27, remu, 3, -1, 6)

    /* division by zero: quotient all ones, remainder the dividend */
    TEST_RR(30, div, -1, 20, 0)
    TEST_RR(31, divu, -1, 20, 0)
    TEST_RR(32, rem, 20, 20, 0)
    TEST_RR(33, remu, -20, -20, 0)
    TEST_RR(34, divw, -1, 20, 0)
    TEST_RR(35, divuw, -1, 20, 0)
    TEST_RR(36, remw, -20, 0xffffffec, 0)        /* remainder sign-extended from 32 bits */
    TEST_RR(37, remuw, 0xffffffff80000000, 0x80000000, 0)

    /* signed overflow: quotient is the dividend, remainder zero */
    TEST_RR(40, div, MIN64, MIN64, -1)
    TEST_RR(41, rem, 0, MIN64, -1)
    TEST_RR(42, divw, MIN32, 0x80000000, -1)
    TEST_RR(43, remw, 0, 0x80000000, -1)

    /* W forms read only the low 32 bits and sign-extend the result */
    TEST_RR(50, divw, -3, 0xffffffec, 6)
    TEST_RR(51, divw, 3, 0x500000014, 6)
    TEST_RR(52, divuw, 0x2aaaaaa8, 0xfffffff0, 6)
    TEST_RR(53, divuw, MIN32, 0xffffffff00000000 + 0x80000000, 1)
    TEST_RR(54, remw, -2, 0xffffffec, 6)
    TEST_RR(55, remuw, 5, 0xfffffff5, 6)
    TEST_RR(56, remuw, 0xffffffffffffffff, 0xffffffff, 0x100000000)  /* divisor's low word is 0 */

    ld      ra, 8(sp)
    addi    sp, sp, 16
    j       pass

    ISA_EPILOGUE("rv64m")
