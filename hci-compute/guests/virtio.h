/* Minimal polling virtio-mmio (version 2) driver for hci test guests. */
#ifndef HCI_VIRTIO_H
#define HCI_VIRTIO_H
#include "guest.h"

#define VIRTIO_MMIO_MAGIC 0x74726976
#define VMMIO_MAGIC 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_AVAIL_LOW 0x090
#define VMMIO_QUEUE_AVAIL_HIGH 0x094
#define VMMIO_QUEUE_USED_LOW 0x0a0
#define VMMIO_QUEUE_USED_HIGH 0x0a4
#define VMMIO_CONFIG 0x100

#define VIRTIO_STATUS_ACK 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

#define QSIZE 8

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[QSIZE];
    u16 used_event;
};
struct vring_used_elem {
    u32 id;
    u32 len;
};
struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[QSIZE];
    u16 avail_event;
};

struct virtq {
    u64 base; /* MMIO base of the device */
    u32 index; /* queue number (for notifications) */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    u16 last_used;
};

/* Finds the first virtio-mmio device of `device_id`; 0 if none. */
u64 virtio_find(u32 device_id);
/* Resets, negotiates `features` (VERSION_1 is always added) and sets up queue 0. 0 on success. */
int virtio_init(struct virtq *q, u64 base, u64 features);
/* The steps of virtio_init, for devices with several queues: reset and negotiate
 * (status ends at FEATURES_OK), set up queue `index` on the given rings, go live. */
int virtio_negotiate(u64 base, u64 features);
int virtio_setup_queue(struct virtq *q, u64 base, u32 index, struct vring_desc *desc, struct vring_avail *avail,
                       struct vring_used *used);
void virtio_driver_ok(u64 base);
/* Notifies the device that queue `q` has new buffers. */
void virtq_notify(struct virtq *q);
/* Publishes a chain starting at descriptor 0, notifies, and polls for completion. Returns used len. */
u32 virtq_submit_and_wait(struct virtq *q);

#endif
