/*
 * /init for Ferry's minimal Linux guest: the first and only user process.
 *
 * It proves that userspace works (its pid, uname, a computation, atomics
 * shared between two processes), then runs the live-migration workload that
 * the bare-metal `dirtier` runs, but as a Linux process: a working set of
 * anonymous pages with known contents, rewritten every 100 ms, whose checksum
 * the process verifies itself. Then it powers the machine off.
 *
 * No libc: raw `ecall` system calls, so the image needs only the kernel, and
 * RV64IMAC code only (nothing for the kernel to save in an FPU context).
 *
 * Arguments, from the kernel command line after `--` (they reach argv):
 *   ticks=N   ticks to run, 0 = forever (default 5)
 *   wss=MiB   working set (default 1)
 *   rate=P    pages rewritten per tick (default 64)
 *
 * Every line it prints is a pure function of its arguments: how many pages
 * a tick rewrites does not depend on time, so QEMU and Ferry (and a VM before
 * and after a migration) print the same lines. Lines start with `init: ` or
 * `tick `, so they are easy to tell from the kernel's log.
 *
 * Page contents are a pure function of (page, version), so the expected
 * values never depend on reading memory back:
 *   word 0      H(p, v), rewritten on every dirtying
 *   word r(v)   R(H(p, v)) for v > 0, r(v) = 1 + (v - 1) % 256
 *   word i      F(p, i) otherwise
 * `tick N sum=0x...` is the sum of all header words read from memory.
 */
#include <stdint.h>

#define SYS_write 64
#define SYS_exit_group 94
#define SYS_clock_gettime 113
#define SYS_clock_nanosleep 115
#define SYS_sched_yield 124
#define SYS_reboot 142
#define SYS_uname 160
#define SYS_getpid 172
#define SYS_munmap 215
#define SYS_clone 220
#define SYS_mmap 222
#define SYS_wait4 260

#define CLOCK_MONOTONIC 1
#define TIMER_ABSTIME 1
#define PROT_READ 1
#define PROT_WRITE 2
#define MAP_SHARED 0x01
#define MAP_PRIVATE 0x02
#define MAP_ANONYMOUS 0x20
#define SIGCHLD 17
#define LINUX_REBOOT_MAGIC1 0xfee1deadUL
#define LINUX_REBOOT_MAGIC2 672274793UL
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedcUL

#define PAGE_SIZE 4096UL
#define WORDS (PAGE_SIZE / 8)
#define TICK_NS 100000000L
#define VERIFY_WINDOW 4 /* whole pages checked per tick */
#define FILL_STEP 0x9e3779b97f4a7c15ULL
#define EXIT_BAD_ARGS 2
#define EXIT_CORRUPT 3

struct timespec64 {
    int64_t tv_sec;
    int64_t tv_nsec;
};

struct utsname {
    char sysname[65];
    char nodename[65];
    char release[65];
    char version[65];
    char machine[65];
    char domainname[65];
};

static long syscall6(long n, long a0, long a1, long a2, long a3, long a4, long a5)
{
    register long r_a0 __asm__("a0") = a0;
    register long r_a1 __asm__("a1") = a1;
    register long r_a2 __asm__("a2") = a2;
    register long r_a3 __asm__("a3") = a3;
    register long r_a4 __asm__("a4") = a4;
    register long r_a5 __asm__("a5") = a5;
    register long r_a7 __asm__("a7") = n;
    __asm__ volatile("ecall"
                     : "+r"(r_a0)
                     : "r"(r_a1), "r"(r_a2), "r"(r_a3), "r"(r_a4), "r"(r_a5), "r"(r_a7)
                     : "memory");
    return r_a0;
}
#define syscall0(n) syscall6((n), 0, 0, 0, 0, 0, 0)
#define syscall1(n, a) syscall6((n), (long)(a), 0, 0, 0, 0, 0)
#define syscall2(n, a, b) syscall6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define syscall3(n, a, b, c) syscall6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define syscall4(n, a, b, c, d) syscall6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

/* ---- output: one write(2) per line, so a line is never split by another writer ---- */

static char line[256];
static unsigned line_len;

static void put_str(const char *s)
{
    while (*s && line_len < sizeof line - 1)
        line[line_len++] = *s++;
}

static void put_dec(uint64_t v)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && line_len < sizeof line - 1)
        line[line_len++] = digits[--n];
}

static void put_hex(uint64_t v, int width)
{
    put_str("0x");
    for (int shift = (width - 1) * 4; shift >= 0 && line_len < sizeof line - 1; shift -= 4)
        line[line_len++] = "0123456789abcdef"[(v >> shift) & 15];
}

static void end_line(void)
{
    line[line_len++] = '\n';
    syscall3(SYS_write, 1, line, line_len);
    line_len = 0;
}

static void say(const char *s)
{
    put_str(s);
    end_line();
}

__attribute__((noreturn)) static void exit_group(long code)
{
    for (;;)
        syscall1(SYS_exit_group, code);
}

/* ---- arguments ---- */

static int starts_with(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

/* Returns 0 and stores the value when `arg` is `name=<decimal>`, -1 when it is
 * `name=` with something else, 1 when it is another argument. */
static int parse_u64(const char *arg, const char *name, uint64_t *out)
{
    if (!starts_with(arg, name))
        return 1;
    const char *s = arg;
    while (*name++)
        s++;
    if (*s != '=')
        return 1;
    s++;
    uint64_t v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > (UINT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *out = v;
    return 0;
}

/* ---- proofs that userspace works ---- */

/* A sieve: integer arithmetic, byte stores and loads, a loop over a 30 KB array in .bss. */
static uint8_t composite[30000];

static void compute(void)
{
    uint64_t count = 0, sum = 0, product = 1;
    for (uint64_t i = 2; i < sizeof composite; i++) {
        if (composite[i])
            continue;
        count++;
        sum += i;
        product = product * i % 1000000007ULL;
        for (uint64_t j = i * i; j < sizeof composite; j += i)
            composite[j] = 1;
    }
    put_str("init: compute: ");
    put_dec(count);
    put_str(" primes below 30000, sum ");
    put_dec(sum);
    put_str(", product mod 1e9+7 ");
    put_dec(product);
    end_line();
}

/*
 * Two processes add to one counter in a shared page: amoadd from one, an
 * lr/sc compare-and-swap loop from the other, yielding now and then so the
 * scheduler interleaves them. Any lost update shows in the total.
 */
static void atomics(void)
{
    enum { ROUNDS = 2000 };
    long shared = syscall6(SYS_mmap, 0, PAGE_SIZE, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared < 0 && shared > -4096) {
        say("init: atomics: mmap(MAP_SHARED) failed");
        return;
    }
    volatile uint64_t *counter = (volatile uint64_t *)shared;
    long pid = syscall2(SYS_clone, SIGCHLD, 0);
    if (pid == 0) {
        for (int i = 0; i < ROUNDS; i++) {
            __atomic_fetch_add(counter, 3, __ATOMIC_SEQ_CST);
            if (i % 500 == 0)
                syscall0(SYS_sched_yield);
        }
        exit_group(0);
    }
    if (pid < 0) {
        put_str("init: atomics: clone failed, error ");
        put_dec((uint64_t)-pid);
        end_line();
        return;
    }
    for (int i = 0; i < ROUNDS; i++) {
        uint64_t old = *counter;
        while (!__atomic_compare_exchange_n(counter, &old, old + 5, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
            ;
        if (i % 500 == 250)
            syscall0(SYS_sched_yield);
    }
    int status = -1;
    long waited = syscall4(SYS_wait4, pid, &status, 0, 0);
    put_str("init: atomics: amoadd and lr/sc from 2 processes: ");
    put_dec(*counter);
    put_str(waited == pid && status == 0 ? " (child exited 0)" : " (child did not exit cleanly)");
    end_line();
    syscall2(SYS_munmap, shared, PAGE_SIZE);
}

static void identify(void)
{
    put_str("init: pid ");
    put_dec((uint64_t)syscall0(SYS_getpid));
    end_line();
    struct utsname u;
    if (syscall1(SYS_uname, &u) != 0) {
        say("init: uname failed");
        return;
    }
    put_str("init: uname: ");
    put_str(u.sysname);
    put_str(" ");
    put_str(u.nodename);
    put_str(" ");
    put_str(u.release);
    put_str(" ");
    put_str(u.version);
    put_str(" ");
    put_str(u.machine);
    end_line();
}

/* ---- the working set ---- */

static uint64_t pages;
static uint64_t *ws;          /* the working set, page aligned */
static uint32_t *version;     /* per page: how many times it was dirtied */
static uint64_t *page_sum;    /* per page: expected sum of all its words */
static uint64_t header_sum;   /* expected sum of all header words */

/* Cheap on purpose: a slow machine spends much of this guest's time here. The
 * header is a bijection of (page, version), so a stale copy of a page never
 * carries its current header. */
static uint64_t fill_seed(uint64_t p)
{
    uint64_t x = (p + 1) * 0x9e3779b97f4a7c15ULL;
    return (x ^ (x >> 29)) | 1;
}
static uint64_t fill_word(uint64_t seed, uint64_t i) { return seed + i * FILL_STEP; }
static uint64_t header(uint64_t p, uint64_t v)
{
    uint64_t x = ((p << 32) ^ v ^ 0x11a1f00dULL) * 0xbf58476d1ce4e5b9ULL;
    return x ^ (x >> 29);
}
static uint64_t rotating(uint64_t h) { return h * 0xd6e8feb86659fd93ULL + 1; }
/* Versions v > 0 put their rotating word at 1..256; consecutive versions never share one. */
static uint64_t rot_index(uint64_t v) { return 1 + ((v - 1) & 255); }

static void *map_anonymous(uint64_t bytes)
{
    long addr = syscall6(SYS_mmap, 0, (long)bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return addr < 0 && addr > -4096 ? 0 : (void *)addr;
}

static void fill(void)
{
    for (uint64_t p = 0; p < pages; p++) {
        uint64_t *w = ws + p * WORDS;
        uint64_t seed = fill_seed(p);
        uint64_t h = header(p, 0);
        w[0] = h;
        uint64_t a = fill_word(seed, 1);
        for (uint64_t i = 1; i < WORDS; i++) {
            w[i] = a;
            a += FILL_STEP;
        }
        /* Sum of seed + i*STEP for i = 1..511, in closed form. */
        page_sum[p] = h + (WORDS - 1) * seed + FILL_STEP * ((WORDS - 1) * WORDS / 2);
        version[p] = 0;
        header_sum += h;
    }
}

static void dirty(uint64_t p)
{
    uint64_t *w = ws + p * WORDS;
    uint64_t v = version[p];
    uint64_t nv = v + 1;
    uint64_t seed = fill_seed(p);
    uint64_t sum = page_sum[p];
    uint64_t old_h = header(p, v);
    uint64_t new_h = header(p, nv);
    if (v) {
        uint64_t r = rot_index(v);
        uint64_t f = fill_word(seed, r);
        w[r] = f;
        sum += f - rotating(old_h);
    }
    w[0] = new_h;
    sum += new_h - old_h;
    header_sum += new_h - old_h;
    uint64_t r = rot_index(nv);
    uint64_t rv = rotating(new_h);
    w[r] = rv;
    sum += rv - fill_word(seed, r);
    page_sum[p] = sum;
    version[p] = (uint32_t)nv;
}

/* The k-th write goes to a page picked by multiplicative hashing. */
static void dirty_nth(uint64_t k)
{
    uint64_t h = (k * 0x9e3779b97f4a7c15ULL) >> 32;
    dirty((h * pages) >> 32);
}

__attribute__((noreturn)) static void corrupt(uint64_t p, const char *what, uint64_t want,
                                              uint64_t got)
{
    put_str("init: CORRUPT page ");
    put_dec(p);
    put_str(" (");
    put_str(what);
    put_str(": expected ");
    put_hex(want, 16);
    put_str(", found ");
    put_hex(got, 16);
    put_str(", version ");
    put_dec(version[p]);
    put_str(")");
    end_line();
    exit_group(EXIT_CORRUPT);
}

/* The per-tick checksum: one load per page, so it stays cheap on a slow machine. */
static uint64_t memory_header_sum(void)
{
    uint64_t s = 0;
    for (uint64_t p = 0; p < pages; p++)
        s += ws[p * WORDS];
    return s;
}

static void check_headers(uint64_t got)
{
    if (got == header_sum)
        return;
    for (uint64_t p = 0; p < pages; p++) {
        uint64_t want = header(p, version[p]);
        if (ws[p * WORDS] != want)
            corrupt(p, "header", want, ws[p * WORDS]);
    }
    put_str("init: CORRUPT header sum: expected ");
    put_hex(header_sum, 16);
    put_str(", found ");
    put_hex(got, 16);
    end_line();
    exit_group(EXIT_CORRUPT);
}

static void check_whole_page(uint64_t p)
{
    const uint64_t *w = ws + p * WORDS;
    uint64_t s = 0;
    for (uint64_t i = 0; i < WORDS; i++)
        s += w[i];
    if (s != page_sum[p])
        corrupt(p, "page sum", page_sum[p], s);
}

static void timespec_add_ns(struct timespec64 *t, int64_t ns)
{
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec++;
    }
}

static int timespec_before(const struct timespec64 *a, const struct timespec64 *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* Returns the number of ticks run. */
static uint64_t workload(uint64_t ticks, uint64_t rate)
{
    fill();
    uint64_t writes = 0;
    uint64_t verify_next = 0;
    struct timespec64 deadline;
    syscall2(SYS_clock_gettime, CLOCK_MONOTONIC, &deadline);
    for (uint64_t tick = 0; !ticks || tick < ticks; tick++) {
        timespec_add_ns(&deadline, TICK_NS);
        /* A fixed number of writes per tick, not per unit of time: the sums
         * then depend on the arguments only, whatever the machine's speed. */
        for (uint64_t end = writes + rate; writes < end; writes++)
            dirty_nth(writes);
        uint64_t sum = memory_header_sum();
        check_headers(sum);
        for (int i = 0; i < VERIFY_WINDOW; i++) {
            check_whole_page(verify_next);
            verify_next = verify_next + 1 == pages ? 0 : verify_next + 1;
        }
        struct timespec64 now;
        syscall2(SYS_clock_gettime, CLOCK_MONOTONIC, &now);
        /* Paused or migrated for longer than a tick, or a slow machine: carry
         * on from now rather than print a burst of catch-up ticks. */
        if (timespec_before(&deadline, &now))
            deadline = now;
        while (syscall4(SYS_clock_nanosleep, CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, 0) != 0)
            ;
        put_str("tick ");
        put_dec(tick);
        put_str(" sum=");
        put_hex(sum, 16);
        end_line();
    }
    return ticks;
}

__attribute__((noreturn)) static void power_off(void)
{
    say("init: powering off");
    long err = syscall4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                        LINUX_REBOOT_CMD_POWER_OFF, 0);
    put_str("init: reboot(POWER_OFF) failed, error ");
    put_dec((uint64_t)-err);
    end_line();
    exit_group(1);
}

static int init_main(long argc, char **argv)
{
    identify();
    compute();
    atomics();

    uint64_t ticks = 5, wss = 1, rate = 64;
    put_str("init: args:");
    for (long i = 1; i < argc; i++) {
        put_str(" ");
        put_str(argv[i]);
    }
    end_line();
    for (long i = 1; i < argc; i++) {
        const char *a = argv[i];
        int r = parse_u64(a, "ticks", &ticks);
        if (r > 0)
            r = parse_u64(a, "wss", &wss);
        if (r > 0)
            r = parse_u64(a, "rate", &rate);
        if (r < 0) {
            put_str("init: bad argument ");
            put_str(a);
            put_str(" (expected a decimal number)");
            end_line();
            return EXIT_BAD_ARGS;
        }
        if (r > 0) {
            put_str("init: ignoring unknown argument ");
            put_str(a);
            end_line();
        }
    }
    if (wss == 0 || wss > 65536) {
        say("init: wss must be between 1 and 65536 MiB");
        return EXIT_BAD_ARGS;
    }
    pages = wss * (1024 * 1024 / PAGE_SIZE);
    ws = map_anonymous(pages * PAGE_SIZE);
    page_sum = map_anonymous(pages * 8);
    version = map_anonymous(pages * 4);
    if (!ws || !page_sum || !version) {
        put_str("init: wss=");
        put_dec(wss);
        put_str("MiB does not fit in memory");
        end_line();
        return EXIT_BAD_ARGS;
    }
    put_str("init: workload: wss=");
    put_dec(wss);
    put_str("MiB pages=");
    put_dec(pages);
    put_str(" rate=");
    put_dec(rate);
    put_str("/tick ticks=");
    put_dec(ticks);
    end_line();

    uint64_t ran = workload(ticks, rate);
    put_str("init: done after ");
    put_dec(ran);
    put_str(" ticks, ");
    put_dec(ran * rate);
    put_str(" writes");
    end_line();
    return 0;
}

/* Called by _start with the initial stack: argc, argv[], NULL, envp[], NULL, auxv. */
__attribute__((noreturn, used)) static void start_c(long *sp)
{
    int code = init_main(sp[0], (char **)(sp + 1));
    if (code == 0)
        power_off();
    /* Exiting makes the kernel panic with this code in its message: the
     * run must not look like a clean power-off. */
    exit_group(code);
}

__asm__(".section .text._start, \"ax\", @progbits\n"
        ".global _start\n"
        "_start:\n"
        ".option push\n"
        ".option norelax\n"
        "    la gp, __global_pointer$\n"
        ".option pop\n"
        "    mv a0, sp\n"
        "    andi sp, sp, -16\n"
        "    call start_c\n");
