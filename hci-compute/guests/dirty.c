/*
 * dirty: keeps writing guest memory, for snapshot and migration work.
 *
 * Writes one u64 into every 4 KiB page of [16 MiB, 16 MiB + mib= MiB)
 * (default 16 MiB of area), page after page, round and round; each write
 * stores the running counter, which also lives at the symbol
 * `dirty_counter` (its address is printed at start). Every `every=` page
 * writes (default 1,000,000) it prints the counter, so the host sees it
 * advance, stop while paused, and continue — with no gap or repeat — after
 * a resume, a restore or a migration. The guest needs at least 16 + mib MiB
 * of memory.
 *
 * Rate control for migration benchmarks: `rate=` MiB/s of page writes
 * (paced by the TSC; `tsc_khz=` gives its frequency, default 2,000,000);
 * `rate=0` writes nothing after the fill (an idle guest). `fill=1` first
 * writes every page of the area once at full speed and prints `filled`.
 * Without `rate=`, it writes as fast as it can.
 */
#include "guest.h"

#define AREA_START (16UL << 20)
#define PAGE 4096UL

volatile u64 dirty_counter;

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

void guest_main(const struct hvm_start_info *si) {
    u64 mib = cmdline_u64(si, "mib", 16);
    u64 every = cmdline_u64(si, "every", 1000000);
    if (!mib) mib = 1;
    if (!every) every = 1;
    u64 pages = (mib << 20) / PAGE;
    u64 rate = cmdline_u64(si, "rate", ~0UL);
    u64 tsc_khz = cmdline_u64(si, "tsc_khz", 2000000);
    if (!tsc_khz) tsc_khz = 1;
    if (cmdline_u64(si, "fill", 0)) {
        for (u64 p = 0; p < pages; p++)
            *(volatile u64 *)(AREA_START + p * PAGE) = ~p;
        puts("filled\n");
    }
    puts("dirty counter at ");
    put_hex((u64)&dirty_counter);
    puts(" area ");
    put_dec(mib);
    puts(" MiB\n");
    u64 page = 0;
    u64 t0 = rdtsc();
    /* Pages per TSC tick * 2^30 (rate MiB/s = rate*256 pages/s). */
    u64 per_mtick = rate == ~0UL ? 0 : (rate * 256 * (1UL << 30)) / (tsc_khz * 1000);
    if (rate == 0) {
        puts("idle\n");
        for (;;) __asm__ volatile("pause");
    }
    for (;;) {
        if (per_mtick) {
            /* Pace: no more than rate MiB/s since t0. */
            while ((dirty_counter + 1) > (((rdtsc() - t0) >> 15) * per_mtick >> 15))
                __asm__ volatile("pause");
        }
        u64 n = dirty_counter + 1;
        *(volatile u64 *)(AREA_START + page * PAGE) = n;
        dirty_counter = n;
        if (++page == pages) page = 0;
        if (n % every == 0) {
            puts("count ");
            put_dec(n);
            puts("\n");
        }
    }
}
