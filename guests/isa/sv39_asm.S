/* A page of code of its own, so the sv39 program can map it at another address and run it. */
    .file "sv39_asm.S"

    .text
    .balign 4096
    .globl code_page
code_page:
    li      a0, 0x42
    ret
    .globl code_page_load
code_page_load:
    ld      a0, 0(a0)
    ret
    .balign 4096
