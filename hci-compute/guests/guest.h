/* Freestanding helpers for hci test guests (CPL3, IOPL=3, no interrupts). */
#ifndef HCI_GUEST_H
#define HCI_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

/* The PVH start_info the VMM passes in %ebx. */
struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
/* MMIO through a register-held address: a 32-bit displacement above 2 GiB would sign-extend. */
static inline u32 mmio_read32(u64 addr) {
    u32 v;
    __asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory");
    return v;
}
static inline void mmio_write32(u64 addr, u32 v) { __asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(addr) : "memory"); }
static inline u8 mmio_read8(u64 addr) {
    u8 v;
    __asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(addr) : "memory");
    return v;
}
static inline void barrier(void) { __asm__ volatile("mfence" : : : "memory"); }

void putc(char c);
void puts(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);
void guest_reset(void) __attribute__((noreturn));
/* Polls the i8042 keyboard: 1 once Ctrl-Alt-Del was pressed. */
int kbd_ctrl_alt_del(void);
/* Start of the value of `key=` on the kernel command line, or 0. */
const char *cmdline_str(const struct hvm_start_info *si, const char *key);
/* Value of `key=` on the kernel command line, or `dflt`. */
u64 cmdline_u64(const struct hvm_start_info *si, const char *key, u64 dflt);
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);

#endif
