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
 */
#include "guest.h"

#define AREA_START (16UL << 20)
#define PAGE 4096UL

volatile u64 dirty_counter;

void guest_main(const struct hvm_start_info *si) {
    u64 mib = cmdline_u64(si, "mib", 16);
    u64 every = cmdline_u64(si, "every", 1000000);
    if (!mib) mib = 1;
    if (!every) every = 1;
    u64 pages = (mib << 20) / PAGE;
    puts("dirty counter at ");
    put_hex((u64)&dirty_counter);
    puts(" area ");
    put_dec(mib);
    puts(" MiB\n");
    u64 page = 0;
    for (;;) {
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
