/*
 * blk: drives the first virtio-blk device by polling. Writes a 4 KiB pattern
 * at sector `sector=` (default 8), flushes, reads it back, compares, asks for
 * the device ID, and reports "virtio-blk OK" or "virtio-blk FAIL: ..." on COM1.
 * The pattern byte i is (i * 31 + 7) & 0xff, so the host can check the disk.
 * With `reads=N`, it then does N 4 KiB reads at queue depth 1 between the
 * lines "reads start" and "reads done" (a host harness times them: IOPS).
 * With `stay=1 writes=1` it keeps writing and checking blocks until reset.
 */
#include "virtio.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_F_FLUSH (1UL << 9)
#define LEN 4096

struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

static struct blk_req req;
static u8 wbuf[LEN] __attribute__((aligned(4096)));
static u8 rbuf[LEN] __attribute__((aligned(4096)));
static u8 id[21];
static volatile u8 status;

static u8 request(struct virtq *q, u32 type, u64 sector, void *buf, u32 len, int device_writes) {
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    status = 0xff;
    q->desc[0] = (struct vring_desc){(u64)&req, sizeof(req), VRING_DESC_F_NEXT, 1};
    u16 next = 1;
    if (len) {
        q->desc[1] = (struct vring_desc){(u64)buf, len, VRING_DESC_F_NEXT | (device_writes ? VRING_DESC_F_WRITE : 0), 2};
        next = 2;
    }
    q->desc[next] = (struct vring_desc){(u64)&status, 1, VRING_DESC_F_WRITE, 0};
    virtq_submit_and_wait(q);
    return status;
}

static void fail(const char *why, u64 v) {
    puts("virtio-blk FAIL: ");
    puts(why);
    puts(" ");
    put_hex(v);
    puts("\n");
}

void guest_main(const struct hvm_start_info *si) {
    u64 sector = cmdline_u64(si, "sector", 8);
    u64 base = virtio_find(2);
    if (!base) {
        fail("no virtio-blk device", 0);
        return;
    }
    struct virtq q;
    int err = virtio_init(&q, base, VIRTIO_BLK_F_FLUSH);
    if (err) {
        fail("init", (u64)(long)err);
        return;
    }
    u64 capacity = (u64)mmio_read32(base + VMMIO_CONFIG) | ((u64)mmio_read32(base + VMMIO_CONFIG + 4) << 32);
    puts("virtio-blk at ");
    put_hex(base);
    puts(" capacity ");
    put_dec(capacity);
    puts(" sectors\n");
    for (u32 i = 0; i < LEN; i++) wbuf[i] = (u8)(i * 31 + 7);
    u8 s = request(&q, VIRTIO_BLK_T_OUT, sector, wbuf, LEN, 0);
    if (s) return fail("write status", s);
    s = request(&q, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
    if (s) return fail("flush status", s);
    memset(rbuf, 0, LEN);
    s = request(&q, VIRTIO_BLK_T_IN, sector, rbuf, LEN, 1);
    if (s) return fail("read status", s);
    if (memcmp(wbuf, rbuf, LEN)) return fail("read back differs", 0);
    s = request(&q, VIRTIO_BLK_T_IN, capacity, rbuf, 512, 1);
    if (s != 1) return fail("read past the end gave status", s);
    s = request(&q, VIRTIO_BLK_T_GET_ID, 0, id, 20, 1);
    if (s) return fail("get-id status", s);
    puts("virtio-blk id ");
    puts((const char *)id);
    puts("\n");
    u64 reads = cmdline_u64(si, "reads", 0);
    if (reads && capacity >= 16) {
        u64 span = capacity / 8 - 1;
        puts("reads start\n");
        for (u64 i = 0; i < reads; i++) {
            s = request(&q, VIRTIO_BLK_T_IN, ((i * 7919) % span) * 8, rbuf, LEN, 1);
            if (s) return fail("benchmark read status", s);
        }
        puts("reads done\n");
    }
    puts("virtio-blk OK\n");
    /* stay=1: keep running (for demos and controller tests) instead of
     * resetting; prints a '.' now and then so progress is visible, and
     * resets when Ctrl-Alt-Del arrives (a graceful shutdown request). */
    if (cmdline_u64(si, "stay", 0)) {
        /* writes=1: meanwhile write, flush and read back a 4 KiB block
         * (pattern changing each time) over the first 64 blocks after
         * `sector`, reporting any failure as "virtio-blk FAIL: ..." and the
         * count of good rounds every 100 as "writes N". */
        u64 writes = cmdline_u64(si, "writes", 0);
        puts("staying up\n");
        for (u64 n = 1;; n++) {
            for (volatile u64 i = 0; i < 1000000; i++) __asm__ volatile("pause");
            if (writes) {
                u64 at = sector + 8 * (n % 64);
                for (u32 i = 0; i < LEN; i++) wbuf[i] = (u8)(i * 31 + 7 + n);
                s = request(&q, VIRTIO_BLK_T_OUT, at, wbuf, LEN, 0);
                if (!s) s = request(&q, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
                if (s) {
                    fail("churn write status", s);
                } else {
                    memset(rbuf, 0, LEN);
                    s = request(&q, VIRTIO_BLK_T_IN, at, rbuf, LEN, 1);
                    if (s) fail("churn read status", s);
                    else if (memcmp(wbuf, rbuf, LEN)) fail("churn read back differs", n);
                    else if (n % 100 == 0) {
                        puts("writes ");
                        put_dec(n);
                        puts("\n");
                    }
                }
            }
            if (kbd_ctrl_alt_del()) {
                puts("ctrl-alt-del: shutting down\n");
                return;
            }
            if (n % 200 == 0) putc('.');
        }
    }
}
