/*
 * dirtier: the live-migration workload. It keeps a working set of pages with
 * known contents, rewrites pages at a set rate of guest time, and checks its
 * own memory every 100 ms, so a migration that loses or corrupts a page is
 * caught by the guest itself and ends the run with fail code 3.
 *
 * Boot arguments: wss=MiB (16), rate=pages per ms (0; `max`: as fast as the
 * machine can, the worst case for pre-copy migration), hot=fraction of the
 * working set that is written (1.0), time=seconds (0 = forever), ticks=N (0 =
 * forever), corrupt=P (a self-test: damages page P's header behind the
 * checker's back before tick 1, to show that the check catches it).
 *
 * Every 100 ms it prints `tick N sum=0x...`, the sum of every page's header
 * word read from memory: constant when rate=0, new every tick otherwise.
 *
 * With rate=0 it is an idle guest: between ticks it waits for the timer with
 * wfi, as an idle kernel does, instead of polling the clock, so its host is
 * free to do other work (a migration's transfer, say). It takes no interrupt:
 * wfi wakes on a pending enabled interrupt even while mstatus.MIE is clear.
 *
 * Page contents are a pure function of (page, version), so expected values
 * never depend on reading memory back:
 *   word 0         H(p, v)             the header, rewritten on every dirtying
 *   word r(v)      R(p, v) for v > 0   the rotating word, r(v) = 1 + (v-1) % 256
 *   other words i  F(p, i)             the fill: seed(p) + i * step, seed odd
 */
#include "guest.h"

#define PAGE_SIZE      4096UL
#define WORDS          (PAGE_SIZE / 8)
#define TICK           (MTIME_HZ / 10)
#define MS             (MTIME_HZ / 1000)
#define MS_PER_TICK    100
#define VERIFY_WINDOW  4       /* whole pages checked per tick */
#define FILL_STEP      0x9e3779b97f4a7c15ULL
#define EXIT_CORRUPT   3
#define EXIT_BAD_ARGS  2

static uint64_t pages;
static uint64_t hot_pages;
static uint64_t *ws;           /* the working set, page aligned */
static uint32_t *version;      /* per page: how many times it was dirtied */
static uint64_t *page_sum;     /* per page: expected sum of all its words */
static uint64_t header_sum;    /* expected sum of all header words */

/*
 * Cheap on purpose: a slow machine spends most of this guest's time here. The
 * header is a bijection of (page, version) (odd multiply, xorshift), so a
 * stale copy of a page never carries its current header.
 */
static uint64_t fill_seed(uint64_t p)
{
    uint64_t x = (p + 1) * 0x9e3779b97f4a7c15ULL;
    return (x ^ (x >> 29)) | 1;
}
static uint64_t fill_word(uint64_t seed, uint64_t i) { return seed + i * FILL_STEP; }
static uint64_t header(uint64_t p, uint64_t v)
{
    uint64_t x = ((p << 32) ^ v ^ 0xfe44fe44ULL) * 0xbf58476d1ce4e5b9ULL;
    return x ^ (x >> 29);
}
static uint64_t rotating(uint64_t h) { return h * 0xd6e8feb86659fd93ULL + 1; }
/* Versions v > 0 put their rotating word at 1..256; consecutive versions never share one. */
static uint64_t rot_index(uint64_t v) { return 1 + ((v - 1) & 255); }

static void fill(void)
{
    for (uint64_t p = 0; p < pages; p++) {
        uint64_t *w = ws + p * WORDS;
        uint64_t seed = fill_seed(p);
        uint64_t h = header(p, 0);
        w[0] = h;
        /* Unrolled because this is most of the start-up cost on a slow machine. */
        uint64_t a = fill_word(seed, 1);
        for (uint64_t i = 1; i < WORDS - 7; i += 8) {
            w[i] = a;
            w[i + 1] = a + FILL_STEP;
            w[i + 2] = a + 2 * FILL_STEP;
            w[i + 3] = a + 3 * FILL_STEP;
            w[i + 4] = a + 4 * FILL_STEP;
            w[i + 5] = a + 5 * FILL_STEP;
            w[i + 6] = a + 6 * FILL_STEP;
            w[i + 7] = a + 7 * FILL_STEP;
            a += 8 * FILL_STEP;
        }
        for (uint64_t i = WORDS - 7; i < WORDS; i++)
            w[i] = fill_word(seed, i);
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

/* The k-th write goes to a page of the hot set picked by multiplicative hashing. */
static void dirty_nth(uint64_t k)
{
    uint64_t h = (k * 0x9e3779b97f4a7c15ULL) >> 32;
    dirty((h * hot_pages) >> 32);
}

__attribute__((noreturn)) static void corrupt(uint64_t p, const char *what, uint64_t want,
                                              uint64_t got)
{
    kprintf("dirtier: CORRUPT page %lu (%s: expected 0x%016lx, found 0x%016lx, version %u)\n", p,
            what, want, got, version[p]);
    finish_fail(EXIT_CORRUPT);
}

/* The per-tick checksum: one load per page, so it stays cheap on a slow machine. */
static uint64_t memory_header_sum(void)
{
    uint64_t s = 0;
    const uint64_t *w = ws;
    const uint64_t *end = ws + pages * WORDS;
    for (; w < end; w += WORDS)
        s += *w;
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
    kprintf("dirtier: CORRUPT page ? (header sum: expected 0x%016lx, found 0x%016lx)\n",
            header_sum, got);
    finish_fail(EXIT_CORRUPT);
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

static void print_fraction(uint64_t millionths)
{
    kprintf("%lu.", millionths / 1000000);
    uint64_t frac = millionths % 1000000;
    /* Digits up to the last non-zero one, but at least one: "1.0", "0.25". */
    uint64_t scale = 100000;
    do {
        putc_raw((char)('0' + frac / scale));
        frac %= scale;
        scale /= 10;
    } while (frac && scale);
}

int main(unsigned long hartid, const void *fdt)
{
    (void)hartid;
    const char *args = fdt_bootargs(fdt);
    uint64_t wss = arg_u64(args, "wss", 16);
    int flat_out = arg_equals(args, "rate", "max");
    uint64_t rate = flat_out ? 0 : arg_u64(args, "rate", 0);
    uint64_t hot = arg_fixed6(args, "hot", 1000000);
    uint64_t seconds = arg_u64(args, "time", 0);
    uint64_t limit = arg_u64(args, "ticks", 0);
    uint64_t corrupt_page = arg_u64(args, "corrupt", UINT64_MAX);
    if (seconds && (!limit || seconds * 10 < limit))
        limit = seconds * 10;

    if (wss == 0 || hot == 0 || hot > 1000000) {
        kprintf("dirtier: need wss >= 1 and 0 < hot <= 1 (got wss=%lu)\n", wss);
        return EXIT_BAD_ARGS;
    }
    pages = wss * (1024 * 1024 / PAGE_SIZE);
    hot_pages = (pages * hot + 999999) / 1000000;

    uint64_t ram_base = RAM_BASE;
    uint64_t ram_size = 128UL << 20;
    if (fdt_memory(fdt, &ram_base, &ram_size) != 0)
        kprintf("dirtier: no /memory in the devicetree, assuming 128 MiB\n");
    uint64_t meta = ((uint64_t)(uintptr_t)_end + 7) & ~7UL;
    uint64_t ws_start = (meta + pages * 12 + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    uint64_t ram_end = ram_base + ram_size;
    if (ws_start + pages * PAGE_SIZE > ram_end) {
        uint64_t room = ram_end > ws_start ? (ram_end - ws_start) >> 20 : 0;
        kprintf("dirtier: wss=%luMiB does not fit in RAM (%lu MiB free after the image)\n", wss,
                room);
        return EXIT_BAD_ARGS;
    }
    page_sum = (uint64_t *)(uintptr_t)meta;
    version = (uint32_t *)(uintptr_t)(meta + pages * 8);
    ws = (uint64_t *)(uintptr_t)ws_start;

    if (flat_out)
        kprintf("dirtier: wss=%luMiB pages=%lu rate=max hot=", wss, pages);
    else
        kprintf("dirtier: wss=%luMiB pages=%lu rate=%lu/ms hot=", wss, pages, rate);
    print_fraction(hot);
    kprintf("\n");
    fill();

    int idle = !flat_out && rate == 0;
    if (idle)
        CSR_SET(mie, MIE_MTIE);

    uint64_t tick = 0;
    uint64_t writes = 0;        /* writes accounted for so far: the next one is number `writes` */
    uint64_t skipped = 0;       /* writes given up because the machine could not keep up */
    uint64_t verify_next = 0;
    uint64_t tick_start = mtime_now();
    for (;;) {
        uint64_t now = mtime_now();
        if (now - tick_start >= TICK) {
            if (!flat_out) {
                /*
                 * Each tick ends with exactly rate x 100 writes per tick so
                 * far, so a machine that keeps up prints the same sums as any
                 * other. More than a whole tick behind, the machine cannot
                 * write that fast: drop the backlog rather than delay the tick.
                 */
                uint64_t quota = rate * MS_PER_TICK * (tick + 1);
                if (quota - writes > rate * MS_PER_TICK) {
                    skipped += quota - writes;
                    writes = quota;
                }
                for (; writes < quota; writes++)
                    dirty_nth(writes);
            }
            if (tick == 1 && corrupt_page < pages)
                ws[corrupt_page * WORDS] ^= 1;
            uint64_t sum = memory_header_sum();
            check_headers(sum);
            for (int i = 0; i < VERIFY_WINDOW; i++) {
                check_whole_page(verify_next);
                verify_next = verify_next + 1 == pages ? 0 : verify_next + 1;
            }
            kprintf("tick %lu sum=0x%016lx\n", tick, sum);
            tick++;
            if (limit && tick == limit) {
                kprintf("dirtier: done after %lu ticks, %lu writes, %lu skipped\n", tick, writes,
                        skipped);
                return 0;
            }
            tick_start += TICK;
            /* Paused or migrated for longer than a tick: carry on from now. */
            if (now - tick_start >= TICK)
                tick_start = now;
            continue;
        }
        if (idle) {
            MMIO64(CLINT_MTIMECMP) = tick_start + TICK;
            if (mtime_now() - tick_start < TICK)
                __asm__ volatile("wfi");
            continue;
        }
        if (flat_out) {
            for (uint64_t end = writes + 64; writes < end; writes++)
                dirty_nth(writes);
            continue;
        }
        uint64_t target = rate * (MS_PER_TICK * tick + (now - tick_start) / MS);
        /* Small batches, so the tick deadline is noticed on time. */
        uint64_t batch_end = target - writes > 64 ? writes + 64 : target;
        for (; writes < batch_end; writes++)
            dirty_nth(writes);
    }
}
