/* Polling virtio-mmio driver: device discovery, feature negotiation, one split queue. */
#include "virtio.h"

static struct vring_desc desc_table[QSIZE] __attribute__((aligned(4096)));
static struct vring_avail avail_ring __attribute__((aligned(4096)));
static struct vring_used used_ring __attribute__((aligned(4096)));

static u64 probe(u64 start, u64 step, int count, u32 device_id) {
    for (int i = 0; i < count; i++) {
        u64 base = start + (u64)i * step;
        if (mmio_read32(base + VMMIO_MAGIC) == VIRTIO_MMIO_MAGIC && mmio_read32(base + VMMIO_VERSION) == 2 &&
            mmio_read32(base + VMMIO_DEVICE_ID) == device_id)
            return base;
    }
    return 0;
}

u64 virtio_find(u32 device_id) {
    /* hci's layout first (4 KiB apart from 0xd0000000), then QEMU microvm's (0x200 apart). */
    u64 base = probe(0xd0000000UL, 0x1000, 16, device_id);
    if (!base) base = probe(0xfeb00000UL, 0x200, 32, device_id);
    return base;
}

int virtio_init(struct virtq *q, u64 base, u64 features) {
    features |= 1UL << 32; /* VIRTIO_F_VERSION_1 */
    mmio_write32(base + VMMIO_STATUS, 0);
    mmio_write32(base + VMMIO_STATUS, VIRTIO_STATUS_ACK);
    mmio_write32(base + VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);
    mmio_write32(base + VMMIO_DEVICE_FEATURES_SEL, 0);
    u64 offered = mmio_read32(base + VMMIO_DEVICE_FEATURES);
    mmio_write32(base + VMMIO_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)mmio_read32(base + VMMIO_DEVICE_FEATURES) << 32;
    if ((offered & features) != features) return -1;
    mmio_write32(base + VMMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(base + VMMIO_DRIVER_FEATURES, (u32)features);
    mmio_write32(base + VMMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(base + VMMIO_DRIVER_FEATURES, (u32)(features >> 32));
    u32 st = VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK;
    mmio_write32(base + VMMIO_STATUS, st);
    if (!(mmio_read32(base + VMMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) return -2;
    mmio_write32(base + VMMIO_QUEUE_SEL, 0);
    if (mmio_read32(base + VMMIO_QUEUE_NUM_MAX) < QSIZE) return -3;
    mmio_write32(base + VMMIO_QUEUE_NUM, QSIZE);
    u64 d = (u64)desc_table, a = (u64)&avail_ring, u = (u64)&used_ring;
    mmio_write32(base + VMMIO_QUEUE_DESC_LOW, (u32)d);
    mmio_write32(base + VMMIO_QUEUE_DESC_HIGH, (u32)(d >> 32));
    mmio_write32(base + VMMIO_QUEUE_AVAIL_LOW, (u32)a);
    mmio_write32(base + VMMIO_QUEUE_AVAIL_HIGH, (u32)(a >> 32));
    mmio_write32(base + VMMIO_QUEUE_USED_LOW, (u32)u);
    mmio_write32(base + VMMIO_QUEUE_USED_HIGH, (u32)(u >> 32));
    mmio_write32(base + VMMIO_QUEUE_READY, 1);
    mmio_write32(base + VMMIO_STATUS, st | VIRTIO_STATUS_DRIVER_OK);
    q->base = base;
    q->desc = desc_table;
    q->avail = &avail_ring;
    q->used = &used_ring;
    q->last_used = 0;
    /* We poll the used ring: ask the device not to interrupt (VRING_AVAIL_F_NO_INTERRUPT). */
    q->avail->flags = 1;
    return 0;
}

u32 virtq_submit_and_wait(struct virtq *q) {
    volatile struct vring_avail *av = q->avail;
    volatile struct vring_used *us = q->used;
    av->ring[av->idx % QSIZE] = 0;
    barrier();
    av->idx = av->idx + 1;
    barrier();
    mmio_write32(q->base + VMMIO_QUEUE_NOTIFY, 0);
    while (us->idx == q->last_used) {
        __asm__ volatile("pause");
    }
    barrier();
    u32 len = us->ring[q->last_used % QSIZE].len;
    q->last_used++;
    return len;
}
