/* Shared by modes.S and the C programs that switch privilege modes. */
#ifndef FERRY_ISA_MODES_H
#define FERRY_ISA_MODES_H

#define MODE_U 0
#define MODE_S 1
#define MODE_M 3

/* a7 of the ecall that ends a lower-mode call made by enter_mode, for trace readers. */
#define EXIT_MAGIC 0x45584954

#ifndef __ASSEMBLER__
#include <stdint.h>

struct trap_frame;
uint64_t enter_mode(uint64_t mode, uint64_t (*fn)(uint64_t), uint64_t arg);
__attribute__((noreturn)) void resume_m(uint64_t value);
extern char s_trap_entry[];
extern char lower_exit[];
extern char lower_exit_ecall[];
/* Ends the current lower-mode call with result `value`, from S- or U-mode code. */
__attribute__((noreturn)) void exit_to_m(uint64_t value);
void s_trap_handler(struct trap_frame *frame);
#endif

#endif
