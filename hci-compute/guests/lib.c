/* Serial output, reset and tiny libc for hci test guests. */
#include "guest.h"

#define COM1 0x3f8

void putc(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {
    }
    outb(COM1, (u8)c);
}

void puts(const char *s) {
    while (*s) putc(*s++);
}

void put_hex(u64 v) {
    puts("0x");
    for (int i = 60; i >= 0; i -= 4) putc("0123456789abcdef"[(v >> i) & 0xf]);
}

void put_dec(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

/* i8042 "pulse reset line": the VMM (and QEMU -no-reboot) ends the VM. */
void guest_reset(void) {
    outb(0x64, 0xfe);
    for (;;) {
    }
}

/* Reads what the i8042 holds without waiting; 1 once Ctrl, Alt and Delete
 * were pressed (scan-code set 2 as sent untranslated: 14 11 e0 71; set 1:
 * 1d 38 e0 53). */
int kbd_ctrl_alt_del(void) {
    static const u8 set2[4] = {0x14, 0x11, 0xe0, 0x71};
    static const u8 set1[4] = {0x1d, 0x38, 0xe0, 0x53};
    static int at2, at1;
    while (inb(0x64) & 1) {
        u8 b = inb(0x60);
        at2 = b == set2[at2] ? at2 + 1 : (b == set2[0]);
        at1 = b == set1[at1] ? at1 + 1 : (b == set1[0]);
        if (at2 == 4 || at1 == 4) {
            at2 = at1 = 0;
            return 1;
        }
    }
    return 0;
}

const char *cmdline_str(const struct hvm_start_info *si, const char *key) {
    if (!si || !si->cmdline_paddr) return 0;
    const char *start = (const char *)si->cmdline_paddr;
    for (const char *p = start; *p; p++) {
        const char *k = key;
        const char *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (!*k && *q == '=' && (p == start || p[-1] == ' ')) return q + 1;
    }
    return 0;
}

u64 cmdline_u64(const struct hvm_start_info *si, const char *key, u64 dflt) {
    const char *q = cmdline_str(si, key);
    if (!q) return dflt;
    u64 v = 0;
    for (; *q >= '0' && *q <= '9'; q++) v = v * 10 + (u64)(*q - '0');
    return v;
}

void *memset(void *d, int c, u64 n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, u64 n) {
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p < *q ? -1 : 1;
    return 0;
}
