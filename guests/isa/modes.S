/*
 * Running code in S- or U-mode from an M-mode test, and the S-mode trap entry.
 *
 * enter_mode(mode, fn, arg) calls fn(arg) in `mode` and returns fn's result in
 * M-mode: fn returns into lower_exit, which hands the result back with an
 * ecall; the M-mode trap handler knows that ecall by its address (registers
 * could hold anything a test left there) and calls resume_m,
 * which restores the registers enter_mode saved, as longjmp would.
 */
    .file "modes.S"
#include "isa_modes.h"

    .text
    .globl enter_mode
enter_mode:
    la      t0, m_context
    sd      ra, 0(t0)
    sd      sp, 8(t0)
    sd      s0, 16(t0)
    sd      s1, 24(t0)
    sd      s2, 32(t0)
    sd      s3, 40(t0)
    sd      s4, 48(t0)
    sd      s5, 56(t0)
    sd      s6, 64(t0)
    sd      s7, 72(t0)
    sd      s8, 80(t0)
    sd      s9, 88(t0)
    sd      s10, 96(t0)
    sd      s11, 104(t0)
    /* One PMP region over everything: with PMP present and no region, S and U can touch nothing. */
    li      t1, -1
    csrw    pmpaddr0, t1
    li      t1, 0x1f
    csrw    pmpcfg0, t1
    li      t1, 3 << 11
    csrc    mstatus, t1
    slli    t2, a0, 11
    csrs    mstatus, t2
    csrw    mepc, a1
    mv      a0, a2
    la      ra, lower_exit
    mret

    .globl lower_exit
lower_exit:
    li      a7, EXIT_MAGIC
    .globl lower_exit_ecall
lower_exit_ecall:
    ecall
1:  j       1b

    .globl resume_m
resume_m:
    la      t0, m_context
    ld      ra, 0(t0)
    ld      sp, 8(t0)
    ld      s0, 16(t0)
    ld      s1, 24(t0)
    ld      s2, 32(t0)
    ld      s3, 40(t0)
    ld      s4, 48(t0)
    ld      s5, 56(t0)
    ld      s6, 64(t0)
    ld      s7, 72(t0)
    ld      s8, 80(t0)
    ld      s9, 88(t0)
    ld      s10, 96(t0)
    ld      s11, 104(t0)
    ret

/* Same frame layout as the M-mode entry in start.S, returning with sret. */
    .balign 4
    .globl s_trap_entry
s_trap_entry:
    addi    sp, sp, -256
    sd      x1, 8(sp)
    sd      x3, 24(sp)
    sd      x4, 32(sp)
    sd      x5, 40(sp)
    sd      x6, 48(sp)
    sd      x7, 56(sp)
    sd      x8, 64(sp)
    sd      x9, 72(sp)
    sd      x10, 80(sp)
    sd      x11, 88(sp)
    sd      x12, 96(sp)
    sd      x13, 104(sp)
    sd      x14, 112(sp)
    sd      x15, 120(sp)
    sd      x16, 128(sp)
    sd      x17, 136(sp)
    sd      x18, 144(sp)
    sd      x19, 152(sp)
    sd      x20, 160(sp)
    sd      x21, 168(sp)
    sd      x22, 176(sp)
    sd      x23, 184(sp)
    sd      x24, 192(sp)
    sd      x25, 200(sp)
    sd      x26, 208(sp)
    sd      x27, 216(sp)
    sd      x28, 224(sp)
    sd      x29, 232(sp)
    sd      x30, 240(sp)
    sd      x31, 248(sp)
    addi    t0, sp, 256
    sd      t0, 16(sp)
    mv      a0, sp
    call    s_trap_handler
    ld      x1, 8(sp)
    ld      x3, 24(sp)
    ld      x4, 32(sp)
    ld      x5, 40(sp)
    ld      x6, 48(sp)
    ld      x7, 56(sp)
    ld      x8, 64(sp)
    ld      x9, 72(sp)
    ld      x10, 80(sp)
    ld      x11, 88(sp)
    ld      x12, 96(sp)
    ld      x13, 104(sp)
    ld      x14, 112(sp)
    ld      x15, 120(sp)
    ld      x16, 128(sp)
    ld      x17, 136(sp)
    ld      x18, 144(sp)
    ld      x19, 152(sp)
    ld      x20, 160(sp)
    ld      x21, 168(sp)
    ld      x22, 176(sp)
    ld      x23, 184(sp)
    ld      x24, 192(sp)
    ld      x25, 200(sp)
    ld      x26, 208(sp)
    ld      x27, 216(sp)
    ld      x28, 224(sp)
    ld      x29, 232(sp)
    ld      x30, 240(sp)
    ld      x31, 248(sp)
    addi    sp, sp, 256
    sret

    .bss
    .balign 8
m_context:
    .space  14 * 8
