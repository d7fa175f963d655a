/*
 * chaos: a hostile driver. Scribbles pseudo-random values (seeded by `seed=`)
 * over the registers and config space of the first virtio device of type
 * `device=` (default 2, virtio-blk), points its queues 0 and 1 at
 * rings full of garbage (descriptors aim at a scratch buffer or wild
 * addresses, never at the guest's own code), notifies, resets, and repeats
 * `iters=` times. Then prints "chaos survived" and resets: the VMM must still
 * be serving the guest.
 */
#include "virtio.h"

#define SCRATCH (64 * 1024)

static u8 rings[3][4096] __attribute__((aligned(4096)));
static u8 scratch[SCRATCH] __attribute__((aligned(4096)));
static u64 state;

static u64 rnd(void) {
    state = state * 6364136223846793005UL + 1442695040888963407UL;
    return state >> 11;
}

static void garbage_rings(void) {
    struct vring_desc *d = (struct vring_desc *)rings[0];
    for (int i = 0; i < 256; i++) {
        u64 r = rnd();
        d[i].addr = (r & 1) ? (u64)scratch + (r >> 8) % SCRATCH : rnd() | (1UL << 40);
        d[i].len = (u32)rnd();
        d[i].flags = (u16)rnd();
        d[i].next = (u16)rnd();
    }
    u64 *p = (u64 *)rings[1];
    for (int i = 0; i < 512; i++) p[i] = rnd();
    p = (u64 *)rings[2];
    for (int i = 0; i < 512; i++) p[i] = rnd();
}

static u64 ring_addr(void) {
    u64 r = rnd();
    return (r % 4) == 3 ? rnd() : (u64)rings[r % 3];
}

static void set_queue(u64 base) {
    mmio_write32(base + VMMIO_STATUS, 0);
    mmio_write32(base + VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);
    mmio_write32(base + VMMIO_DRIVER_FEATURES_SEL, (u32)(rnd() % 3));
    mmio_write32(base + VMMIO_DRIVER_FEATURES, (u32)rnd());
    mmio_write32(base + VMMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(base + VMMIO_DRIVER_FEATURES, 1);
    mmio_write32(base + VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    /* Queues 0 and 1 (devices with one queue ignore the second), now and then a wild index. */
    for (u32 q = 0; q < 2; q++) {
        mmio_write32(base + VMMIO_QUEUE_SEL, rnd() % 4 == 0 ? (u32)rnd() : q);
        mmio_write32(base + VMMIO_QUEUE_NUM, (u32)(rnd() % 2 ? 1u << (rnd() % 10) : rnd()));
        u64 a = ring_addr(), b = ring_addr(), c = ring_addr();
        mmio_write32(base + VMMIO_QUEUE_DESC_LOW, (u32)a);
        mmio_write32(base + VMMIO_QUEUE_DESC_HIGH, (u32)(a >> 32));
        mmio_write32(base + VMMIO_QUEUE_AVAIL_LOW, (u32)b);
        mmio_write32(base + VMMIO_QUEUE_AVAIL_HIGH, (u32)(b >> 32));
        mmio_write32(base + VMMIO_QUEUE_USED_LOW, (u32)c);
        mmio_write32(base + VMMIO_QUEUE_USED_HIGH, (u32)(c >> 32));
        mmio_write32(base + VMMIO_QUEUE_READY, 1);
    }
    mmio_write32(base + VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
                                          VIRTIO_STATUS_DRIVER_OK);
}

void guest_main(const struct hvm_start_info *si) {
    state = cmdline_u64(si, "seed", 1);
    u64 iters = cmdline_u64(si, "iters", 20000);
    u64 base = virtio_find((u32)cmdline_u64(si, "device", 2));
    if (!base) {
        puts("chaos: no virtio device\n");
        return;
    }
    for (u64 i = 0; i < iters; i++) {
        u64 r = rnd();
        switch (r % 10) {
        case 0:
            garbage_rings();
            break;
        case 1:
            set_queue(base);
            break;
        case 2:
        case 3:
            mmio_write32(base + VMMIO_QUEUE_NOTIFY, (u32)(rnd() % 4 ? 0 : rnd()));
            break;
        case 4:
            mmio_write32(base + VMMIO_STATUS, (u32)rnd());
            break;
        case 5:
            (void)mmio_read32(base + ((rnd() % 0x140) & ~3UL));
            (void)mmio_read8(base + 0x100 + rnd() % 0x80);
            break;
        default:
            mmio_write32(base + ((rnd() % 0x140) & ~3UL), (u32)rnd());
            break;
        }
    }
    mmio_write32(base + VMMIO_STATUS, 0);
    puts("chaos survived\n");
}
