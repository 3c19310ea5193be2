/*
 * Helpers for the self-checking ISA programs. Each program numbers its checks;
 * the first wrong result prints `FAIL <name> test=<n>` and fails the run with
 * code 1, and a clean run prints `PASS <name>`: a failure names the exact check.
 *
 * In assembly the current check number lives in s11 (TESTNUM) and a failed
 * check jumps to the program's `fail` label.
 */
#ifndef FERRY_ISA_H
#define FERRY_ISA_H

#ifdef __ASSEMBLER__

#define TESTNUM s11

/* rd = insn(v1, v2) must equal expect. Uses a0-a2 and t6. */
#define TEST_RR(n, insn, expect, v1, v2) \
    li TESTNUM, n; li a1, v1; li a2, v2; insn a0, a1, a2; li t6, expect; bne a0, t6, fail

/* rd = insn(v1, imm) must equal expect. */
#define TEST_RI(n, insn, expect, v1, imm) \
    li TESTNUM, n; li a1, v1; insn a0, a1, imm; li t6, expect; bne a0, t6, fail

/* A register already computed must equal expect. */
#define CHECK(n, reg, expect) \
    li TESTNUM, n; li t6, expect; bne reg, t6, fail

/* The tail every assembly program ends with: report and stop. */
#define ISA_EPILOGUE(name_str)          \
    pass:                               \
        call isa_pass;                  \
    fail:                               \
        mv a0, TESTNUM;                 \
        call isa_fail;                  \
    .section .rodata;                   \
    .globl isa_name;                    \
    isa_name: .asciz name_str;          \
    .text

#else

#include "guest.h"
#include "isa_modes.h"

/* Every program defines its name: `const char isa_name[] = "zicsr";`. */
extern const char isa_name[];

/* The check a C program is at, for reports of unexpected traps. */
extern volatile unsigned long isa_current;

__attribute__((noreturn)) void isa_pass(void);
__attribute__((noreturn)) void isa_fail(unsigned long test);

/* Check number n: `cond` must hold. */
#define EXPECT(n, cond)                  \
    do {                                 \
        isa_current = (n);               \
        if (!(cond))                     \
            isa_fail(n);                 \
    } while (0)

/*
 * The last trap taken while one was expected. The default handler records it
 * and resumes after the trapping instruction, so a test can run an instruction
 * that must trap and then look at what the trap reported.
 */
struct trap_record {
    uint64_t cause;
    uint64_t epc;
    uint64_t tval;
    uint64_t status;    /* mstatus (or sstatus) as the handler found it */
    uint64_t count;
};
extern volatile struct trap_record last_trap;
extern volatile int trap_expected;

/* The same for traps delegated to S-mode (stvec = s_trap_entry). */
extern volatile struct trap_record s_last_trap;
extern volatile int s_trap_expected;
extern int (*isa_s_trap_hook)(struct trap_frame *frame);

/*
 * Runs `insn` (a string of assembly) expecting exactly one trap, recorded in
 * `rec`, at that instruction; `at` gets the instruction's address.
 */
#define RUN_TRAPPING(rec, expected_flag, at, insn)                                          \
    do {                                                                                    \
        uint64_t before_ = (rec).count;                                                     \
        (expected_flag) = 1;                                                                \
        __asm__ volatile("lla %0, 1f\n1: " insn : "=&r"(at)::"memory");                     \
        if ((rec).count != before_ + 1)                                                     \
            isa_fail(isa_current);                                                          \
    } while (0)

/* A program's own trap logic; returns nonzero when it handled the trap. */
extern int (*isa_trap_hook)(struct trap_frame *frame);

/* Length of the instruction at `pc`: 2 if compressed, else 4. */
static inline uint64_t insn_length(uint64_t pc)
{
    return (*(volatile uint16_t *)(uintptr_t)pc & 3) == 3 ? 4 : 2;
}

#endif
#endif
