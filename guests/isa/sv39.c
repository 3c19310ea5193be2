/*
 * sv39: S-mode with Sv39 paging. Translation through three levels and a
 * gigapage, accessed/dirty bits set by the hardware (as QEMU 7.2 does), load,
 * store and fetch page faults with the faulting address in mtval, SUM and MXR,
 * sfence.vma after a remap, and satp writes of Sv48/Sv57 either taking effect
 * or being ignored as a whole, while Sv39 must work.
 */
#include "isa.h"

const char isa_name[] = "sv39";

#define PTE_V (1UL << 0)
#define PTE_R (1UL << 1)
#define PTE_W (1UL << 2)
#define PTE_X (1UL << 3)
#define PTE_U (1UL << 4)
#define PTE_A (1UL << 6)
#define PTE_D (1UL << 7)
#define PAGE 4096UL

#define CAUSE_FETCH_PAGE_FAULT 12
#define CAUSE_LOAD_PAGE_FAULT  13
#define CAUSE_STORE_PAGE_FAULT 15
#define SSTATUS_SUM (1UL << 18)
#define SSTATUS_MXR (1UL << 19)

#define SATP_SV39 (8UL << 60)

/* Virtual addresses in the second gigabyte, mapped page by page through L1 and L0 tables. */
#define VA_BASE  0x40000000UL
#define VA_RW    (VA_BASE + 0 * PAGE)  /* R W, A and D clear: the hardware sets them */
#define VA_ALIAS (VA_BASE + 1 * PAGE)  /* the same frame as VA_RW */
#define VA_RO    (VA_BASE + 2 * PAGE)  /* R only */
#define VA_NONE  (VA_BASE + 3 * PAGE)  /* not valid */
#define VA_XO    (VA_BASE + 4 * PAGE)  /* X only: readable with MXR */
#define VA_USER  (VA_BASE + 5 * PAGE)  /* U: S needs SUM to read, can never fetch */
#define VA_CODE  (VA_BASE + 6 * PAGE)  /* X: the code page */
#define VA_NOX   (VA_BASE + 7 * PAGE)  /* R W, no X: fetch faults */
#define VA_REMAP (VA_BASE + 8 * PAGE)  /* pointed at one frame, then another */
#define VA_WONLY (VA_BASE + 9 * PAGE)  /* W without R: a reserved encoding */
#define VA_STORE (VA_BASE + 10 * PAGE) /* R W, A and D clear: first touched by a store */
#define VA_UCODE (VA_BASE + 11 * PAGE) /* U X R: the code page again, for U-mode */
#define VA_MEGA  (VA_BASE + 0x200000)  /* a 2 MiB megapage onto the start of RAM */
#define VA_MISAL (VA_BASE + 0x400000)  /* a megapage whose frame is not 2 MiB aligned */

static uint64_t root[512] __attribute__((aligned(4096)));
static uint64_t level1[512] __attribute__((aligned(4096)));
static uint64_t level0[512] __attribute__((aligned(4096)));
static uint64_t frames[4][512] __attribute__((aligned(4096)));
extern char code_page[];
extern char code_page_load[];

static uint64_t pte(const void *frame, uint64_t flags)
{
    return (((uint64_t)(uintptr_t)frame >> 12) << 10) | flags | PTE_V;
}

static uint64_t *leaf(uint64_t va) { return &level0[(va >> 12) & 511]; }

static void build_tables(void)
{
    /* Gigapages: device space and RAM identity-mapped, so S-mode code and the UART just work. */
    root[0] = pte((void *)0, PTE_R | PTE_W | PTE_A | PTE_D);
    root[2] = pte((void *)RAM_BASE, PTE_R | PTE_W | PTE_X | PTE_A | PTE_D);
    root[1] = pte(level1, 0);
    level1[0] = pte(level0, 0);
    *leaf(VA_RW) = pte(frames[0], PTE_R | PTE_W);
    *leaf(VA_ALIAS) = pte(frames[0], PTE_R | PTE_W | PTE_A | PTE_D);
    *leaf(VA_RO) = pte(frames[1], PTE_R | PTE_A);
    *leaf(VA_NONE) = pte(frames[1], PTE_R | PTE_A) & ~PTE_V;
    *leaf(VA_XO) = pte(frames[2], PTE_X | PTE_A);
    *leaf(VA_USER) = pte(frames[2], PTE_R | PTE_W | PTE_U | PTE_A | PTE_D);
    *leaf(VA_CODE) = pte(code_page, PTE_X | PTE_R | PTE_A);
    *leaf(VA_NOX) = pte(code_page, PTE_R | PTE_W | PTE_A | PTE_D);
    *leaf(VA_REMAP) = pte(frames[1], PTE_R | PTE_A);
    *leaf(VA_WONLY) = pte(frames[3], PTE_W | PTE_A | PTE_D);
    *leaf(VA_STORE) = pte(frames[3], PTE_R | PTE_W);
    *leaf(VA_UCODE) = pte(code_page, PTE_X | PTE_R | PTE_U | PTE_A);
    level1[1] = pte((void *)RAM_BASE, PTE_R | PTE_A);
    level1[2] = pte((void *)(RAM_BASE + PAGE), PTE_R | PTE_A);
    frames[0][0] = 0x1111;
    frames[1][0] = 0x2222;
    frames[2][0] = 0x3333;
    frames[3][0] = 0x4444;
}

/* A fetch fault's mepc is the unmapped target: resume at the caller's return address instead. */
static int fetch_fault_hook(struct trap_frame *frame)
{
    uint64_t cause = CSR_READ(mcause);
    /*
     * U-mode code returning into lower_exit, which is not a user page: that
     * fault is how a U-mode call under paging ends.
     */
    if (cause == CAUSE_FETCH_PAGE_FAULT && CSR_READ(mtval) == (uint64_t)(uintptr_t)lower_exit)
        resume_m(frame->x[10]);
    if (cause != CAUSE_FETCH_PAGE_FAULT || !trap_expected)
        return 0;
    trap_expected = 0;
    last_trap.cause = cause;
    last_trap.epc = CSR_READ(mepc);
    last_trap.tval = CSR_READ(mtval);
    last_trap.count++;
    CSR_WRITE(mepc, frame->x[1]);
    frame->x[10] = 0;
    return 1;
}

static uint64_t load(uint64_t va) { return *(volatile uint64_t *)(uintptr_t)va; }
static void store(uint64_t va, uint64_t v) { *(volatile uint64_t *)(uintptr_t)va = v; }

/* A load or store that must fault with `cause` and the address in mtval. */
static void expect_fault(unsigned long n, uint64_t va, int is_store, uint64_t cause)
{
    uint64_t before = last_trap.count;
    isa_current = n;
    trap_expected = 1;
    if (is_store)
        store(va, 0xdead);
    else
        (void)load(va);
    trap_expected = 0;
    EXPECT(n, last_trap.count == before + 1);
    EXPECT(n, last_trap.cause == cause && last_trap.tval == va);
}

static uint64_t call_at(uint64_t va)
{
    uint64_t (*fn)(void) = (uint64_t (*)(void))(uintptr_t)va;
    return fn();
}

static uint64_t s_main(uint64_t unused)
{
    (void)unused;
    volatile uint64_t *pte_rw = leaf(VA_RW);

    /* translation, and the hardware setting A then D */
    EXPECT(1, (*pte_rw & (PTE_A | PTE_D)) == 0);
    EXPECT(2, load(VA_RW) == 0x1111);
    EXPECT(3, (*pte_rw & PTE_A) != 0);
    EXPECT(4, (*pte_rw & PTE_D) == 0);
    store(VA_RW, 0x5555);
    EXPECT(5, (*pte_rw & PTE_D) != 0);
    EXPECT(6, load(VA_ALIAS) == 0x5555);      /* two pages, one frame */
    EXPECT(7, frames[0][0] == 0x5555);        /* and the frame itself, identity-mapped */

    /* a store to an untouched page sets A and D together */
    volatile uint64_t *pte_store = leaf(VA_STORE);
    store(VA_STORE + 16, 0x99);
    EXPECT(8, (*pte_store & (PTE_A | PTE_D)) == (PTE_A | PTE_D));
    EXPECT(9, frames[3][2] == 0x99);

    /* permission and validity faults report the virtual address */
    expect_fault(10, VA_RO, 1, CAUSE_STORE_PAGE_FAULT);
    EXPECT(11, load(VA_RO) == 0x2222);
    expect_fault(12, VA_NONE, 0, CAUSE_LOAD_PAGE_FAULT);
    expect_fault(13, VA_NONE + 8, 1, CAUSE_STORE_PAGE_FAULT);
    expect_fault(14, 0x4000000000UL, 0, CAUSE_LOAD_PAGE_FAULT);   /* not canonical */
    expect_fault(15, VA_WONLY, 0, CAUSE_LOAD_PAGE_FAULT);
    expect_fault(16, VA_WONLY, 1, CAUSE_STORE_PAGE_FAULT);

    /* a megapage translates with the low 21 bits of the address; a misaligned one faults */
    EXPECT(17, load(VA_MEGA + 0x18) == *(volatile uint64_t *)(RAM_BASE + 0x18));
    expect_fault(18, VA_MISAL, 0, CAUSE_LOAD_PAGE_FAULT);

    /* MXR makes execute-only pages readable */
    expect_fault(20, VA_XO, 0, CAUSE_LOAD_PAGE_FAULT);
    CSR_SET(sstatus, SSTATUS_MXR);
    EXPECT(21, load(VA_XO) == 0x3333);
    CSR_CLEAR(sstatus, SSTATUS_MXR);

    /* SUM lets S-mode touch user pages; fetching from them never works */
    expect_fault(30, VA_USER, 0, CAUSE_LOAD_PAGE_FAULT);
    CSR_SET(sstatus, SSTATUS_SUM);
    EXPECT(31, load(VA_USER) == 0x3333);
    store(VA_USER + 8, 0x77);
    EXPECT(32, frames[2][1] == 0x77);
    isa_current = 33;
    trap_expected = 1;
    (void)call_at(VA_USER);
    EXPECT(34, last_trap.cause == CAUSE_FETCH_PAGE_FAULT && last_trap.tval == VA_USER);
    CSR_CLEAR(sstatus, SSTATUS_SUM);

    /* fetch: runs from an executable mapping, faults without X */
    EXPECT(40, call_at(VA_CODE) == 0x42);
    isa_current = 41;
    trap_expected = 1;
    EXPECT(42, call_at(VA_NOX) == 0);
    EXPECT(43, last_trap.cause == CAUSE_FETCH_PAGE_FAULT && last_trap.tval == VA_NOX);

    /* after a remap, sfence.vma makes the new mapping visible */
    EXPECT(50, load(VA_REMAP) == 0x2222);
    *leaf(VA_REMAP) = pte(frames[3], PTE_R | PTE_A);
    __asm__ volatile("sfence.vma %0, zero" ::"r"(VA_REMAP) : "memory");
    EXPECT(51, load(VA_REMAP) == 0x4444);
    *leaf(VA_REMAP) = pte(frames[1], PTE_R | PTE_A);
    __asm__ volatile("sfence.vma" ::: "memory");
    EXPECT(52, load(VA_REMAP) == 0x2222);
    /* an unmapped page faults once the translation is fenced away */
    *leaf(VA_REMAP) &= ~PTE_V;
    __asm__ volatile("sfence.vma %0, zero" ::"r"(VA_REMAP) : "memory");
    expect_fault(53, VA_REMAP, 0, CAUSE_LOAD_PAGE_FAULT);
    *leaf(VA_REMAP) |= PTE_V;
    __asm__ volatile("sfence.vma %0, zero" ::"r"(VA_REMAP) : "memory");
    EXPECT(54, load(VA_REMAP) == 0x2222);
    return 1;
}

/* An unsupported mode leaves satp as it was; a supported one must read back. */
static void check_satp_mode(unsigned long n, uint64_t mode)
{
    uint64_t sv39 = SATP_SV39 | ((uint64_t)(uintptr_t)root >> 12);
    CSR_WRITE(satp, sv39);
    uint64_t want = (mode << 60) | ((uint64_t)(uintptr_t)root >> 12);
    CSR_WRITE(satp, want);
    uint64_t got = CSR_READ(satp);
    EXPECT(n, got == want || got == sv39);
    CSR_WRITE(satp, 0);
}

int main(void)
{
    build_tables();
    isa_trap_hook = fetch_fault_hook;

    uint64_t satp = SATP_SV39 | ((uint64_t)(uintptr_t)root >> 12);
    CSR_WRITE(satp, satp);
    EXPECT(60, CSR_READ(satp) == satp);
    __asm__ volatile("sfence.vma" ::: "memory");
    EXPECT(61, enter_mode(MODE_S, s_main, 0) == 1);
    CSR_WRITE(satp, 0);

    /* U-mode runs from user pages, reads user pages, and faults on supervisor pages */
    CSR_WRITE(satp, satp);
    __asm__ volatile("sfence.vma" ::: "memory");
    uint64_t (*u_entry)(uint64_t) = (uint64_t (*)(uint64_t))(uintptr_t)VA_UCODE;
    uint64_t (*u_load)(uint64_t) =
        (uint64_t (*)(uint64_t))(uintptr_t)(VA_UCODE + (code_page_load - code_page));
    EXPECT(62, enter_mode(MODE_U, u_entry, 0) == 0x42);
    EXPECT(63, enter_mode(MODE_U, u_load, VA_USER) == 0x3333);
    isa_current = 64;
    trap_expected = 1;
    (void)enter_mode(MODE_U, u_load, VA_RO);
    EXPECT(64, last_trap.cause == CAUSE_LOAD_PAGE_FAULT && last_trap.tval == VA_RO);
    CSR_WRITE(satp, 0);

    /* MPRV: M-mode loads and stores translate as if in MPP's mode; fetches do not */
    CSR_WRITE(satp, satp);
    __asm__ volatile("sfence.vma" ::: "memory");
    CSR_CLEAR(mstatus, 3UL << 11);
    CSR_SET(mstatus, (1UL << 11) | (1UL << 17));
    uint64_t through_mprv = load(VA_ALIAS);
    CSR_CLEAR(mstatus, 1UL << 17);
    CSR_WRITE(satp, 0);
    EXPECT(65, through_mprv == 0x5555);

    check_satp_mode(70, 9);
    check_satp_mode(71, 10);
    isa_pass();
}
