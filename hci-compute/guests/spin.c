/*
 * spin: runs forever at CPL3, printing a '.' every `every=` iterations
 * (default 10^7), so the host sees progress stop while paused.
 */
#include "guest.h"

volatile u64 spin_counter;

void guest_main(const struct hvm_start_info *si) {
    u64 every = cmdline_u64(si, "every", 10000000);
    if (!every) every = 1;
    puts("spinning\n");
    for (;;) {
        for (u64 i = 0; i < every; i++) spin_counter++;
        putc('.');
    }
}
