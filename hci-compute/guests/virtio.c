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

int virtio_negotiate(u64 base, u64 features) {
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
    return 0;
}

int virtio_setup_queue(struct virtq *q, u64 base, u32 index, struct vring_desc *desc, struct vring_avail *avail,
                       struct vring_used *used) {
    mmio_write32(base + VMMIO_QUEUE_SEL, index);
    if (mmio_read32(base + VMMIO_QUEUE_NUM_MAX) < QSIZE) return -3;
    mmio_write32(base + VMMIO_QUEUE_NUM, QSIZE);
    u64 d = (u64)desc, a = (u64)avail, u = (u64)used;
    mmio_write32(base + VMMIO_QUEUE_DESC_LOW, (u32)d);
    mmio_write32(base + VMMIO_QUEUE_DESC_HIGH, (u32)(d >> 32));
    mmio_write32(base + VMMIO_QUEUE_AVAIL_LOW, (u32)a);
    mmio_write32(base + VMMIO_QUEUE_AVAIL_HIGH, (u32)(a >> 32));
    mmio_write32(base + VMMIO_QUEUE_USED_LOW, (u32)u);
    mmio_write32(base + VMMIO_QUEUE_USED_HIGH, (u32)(u >> 32));
    mmio_write32(base + VMMIO_QUEUE_READY, 1);
    q->base = base;
    q->index = index;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->last_used = 0;
    /* We poll the used ring: ask the device not to interrupt (VRING_AVAIL_F_NO_INTERRUPT). */
    q->avail->flags = 1;
    return 0;
}

void virtio_driver_ok(u64 base) {
    mmio_write32(base + VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
                                          VIRTIO_STATUS_DRIVER_OK);
}

int virtio_init(struct virtq *q, u64 base, u64 features) {
    int err = virtio_negotiate(base, features);
    if (err) return err;
    err = virtio_setup_queue(q, base, 0, desc_table, &avail_ring, &used_ring);
    if (err) return err;
    virtio_driver_ok(base);
    return 0;
}

void virtq_notify(struct virtq *q) { mmio_write32(q->base + VMMIO_QUEUE_NOTIFY, q->index); }

u32 virtq_submit_and_wait(struct virtq *q) {
    volatile struct vring_avail *av = q->avail;
    volatile struct vring_used *us = q->used;
    av->ring[av->idx % QSIZE] = 0;
    barrier();
    av->idx = av->idx + 1;
    barrier();
    virtq_notify(q);
    while (us->idx == q->last_used) {
        __asm__ volatile("pause");
    }
    barrier();
    u32 len = us->ring[q->last_used % QSIZE].len;
    q->last_used++;
    return len;
}
