/*
 * rng: reads 32 bytes twice from the first virtio-rng device by polling and
 * prints "virtio-rng OK" if both reads were complete, differ, and are not all
 * zero; "virtio-rng FAIL: ..." otherwise.
 */
#include "virtio.h"

#define LEN 32

static u8 a[LEN], b[LEN], zero[LEN];

static u32 fill(struct virtq *q, u8 *buf) {
    q->desc[0] = (struct vring_desc){(u64)buf, LEN, VRING_DESC_F_WRITE, 0};
    return virtq_submit_and_wait(q);
}

static void fail(const char *why, u64 v) {
    puts("virtio-rng FAIL: ");
    puts(why);
    puts(" ");
    put_hex(v);
    puts("\n");
}

void guest_main(const struct hvm_start_info *si) {
    (void)si;
    u64 base = virtio_find(4);
    if (!base) return fail("no virtio-rng device", 0);
    struct virtq q;
    int err = virtio_init(&q, base, 0);
    if (err) return fail("init", (u64)(long)err);
    u32 n = fill(&q, a);
    if (n != LEN) return fail("first read length", n);
    n = fill(&q, b);
    if (n != LEN) return fail("second read length", n);
    if (!memcmp(a, b, LEN)) return fail("both reads returned the same bytes", 0);
    if (!memcmp(a, zero, LEN)) return fail("all zero", 0);
    puts("virtio-rng OK\n");
}
