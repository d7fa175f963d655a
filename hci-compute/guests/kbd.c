/*
 * kbd: exercises the i8042: controller self-test (0xaa -> 0x55), reads the
 * command byte, prints `kbd ready`, then waits for Ctrl-Alt-Del from the
 * host (what a graceful shutdown request sends), prints `ctrl-alt-del` and
 * resets, like a Linux guest rebooting.
 */
#include "guest.h"

static u8 kbd_read(void) {
    while (!(inb(0x64) & 1)) {
    }
    return inb(0x60);
}

void guest_main(const struct hvm_start_info *si) {
    (void)si;
    outb(0x64, 0xaa);
    u8 selftest = kbd_read();
    outb(0x64, 0x20);
    u8 ctr = kbd_read();
    puts("kbd self-test ");
    put_hex(selftest);
    puts(" ctr ");
    put_hex(ctr);
    puts("\nkbd ready\n");
    while (!kbd_ctrl_alt_del()) {
        for (volatile u64 i = 0; i < 100000; i++) __asm__ volatile("pause");
    }
    puts("ctrl-alt-del\n");
}
