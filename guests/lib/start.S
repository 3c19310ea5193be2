/*
 * M-mode entry for bare-metal guests. The boot ROM (QEMU's or Ferry's) jumps
 * here with a0 = hartid and a1 = devicetree address; we keep both for main.
 * Built with -DSMODE for S-mode payloads entered by SBI firmware, which use
 * the supervisor trap registers instead.
 */
/* Names the object in the symbol table; otherwise the linker records a random temporary name. */
    .file "start.S"

#ifdef SMODE
#define XTVEC stvec
#define TRAP_RETURN sret
#else
#define XTVEC mtvec
#define TRAP_RETURN mret
#endif

    .section .text.start, "ax"
    .globl _start
_start:
    /* Other harts (none on our boards today) park instead of sharing the stack. */
    bnez    a0, park
    .option push
    .option norelax
    la      gp, __global_pointer$
    .option pop
    la      sp, __stack_top
    la      t0, trap_entry
    csrw    XTVEC, t0
    mv      s0, a0
    mv      s1, a1
    /* bss must read as zero even if the loader did not clear it. */
    la      t0, __bss_start
    la      t1, __bss_end
1:  bgeu    t0, t1, 2f
    sd      zero, 0(t0)
    addi    t0, t0, 8
    j       1b
2:  mv      a0, s0
    mv      a1, s1
    call    main
    /* main's return value is the exit status: 0 passes, anything else fails with it. */
    beqz    a0, 3f
    call    finish_fail
3:  call    finish_pass
park:
    wfi
    j       park

/*
 * Trap entry: saves every register on the current stack, so a handler in C
 * can inspect and change the interrupted context through struct trap_frame.
 */
    .section .text.trap, "ax"
    .balign 4
    .globl trap_entry
trap_entry:
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
    call    trap_handler
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
    TRAP_RETURN
