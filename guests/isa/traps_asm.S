/*
 * A vectored trap table for the traps program: exceptions go to the common
 * entry at the base, the machine software interrupt to its own slot (base + 4 x 3),
 * which proves the hart computed the vector from the cause.
 */
    .file "traps_asm.S"

    .text
    .balign 256
    .globl vector_table
vector_table:
    .option push
    .option norvc
    j       trap_entry          /* 0: exceptions */
    j       trap_entry          /* 1 */
    j       trap_entry          /* 2 */
    j       vector_msi          /* 3: machine software interrupt */
    j       trap_entry          /* 4 */
    j       trap_entry          /* 5 */
    j       trap_entry          /* 6 */
    j       trap_entry          /* 7: machine timer */
    j       trap_entry          /* 8 */
    j       trap_entry          /* 9 */
    j       trap_entry          /* 10 */
    j       trap_entry          /* 11: machine external */
    .option pop

vector_msi:
    addi    sp, sp, -16
    sd      t0, 0(sp)
    sd      t1, 8(sp)
    li      t0, 0x2000000       /* CLINT msip: acknowledge */
    sw      zero, 0(t0)
    la      t0, vector_msi_hits
    ld      t1, 0(t0)
    addi    t1, t1, 1
    sd      t1, 0(t0)
    csrr    t1, mcause
    la      t0, vector_msi_cause
    sd      t1, 0(t0)
    ld      t0, 0(sp)
    ld      t1, 8(sp)
    addi    sp, sp, 16
    mret

    .bss
    .balign 8
    .globl vector_msi_hits, vector_msi_cause
vector_msi_hits:
    .dword  0
vector_msi_cause:
    .dword  0
