/*
 * dirty: keeps writing guest memory, for snapshot and migration work.
 *
 * Writes one u64 into every 4 KiB page of [16 MiB, 16 MiB + mib= MiB)
 * (default 16 MiB of area), page after page, round and round; each write
 * stores the running counter, which also lives at the symbol
 * `dirty_counter` (its address is printed at start). Every `every=` page
 * writes (default 1,000,000) it prints the counter, so the host sees it
 * advance, stop while paused, and continue — with no gap or repeat — after
 * a resume, a restore or a migration. The guest needs at least 16 + mib MiB
 * of memory.
 *
 * Rate control for migration benchmarks: `rate=` MiB/s of page writes
 * (paced by the TSC; `tsc_khz=` gives its frequency, default 2,000,000);
 * `rate=0` writes nothing after the fill (an idle guest). `fill=1` first
 * writes every page of the area once at full speed and prints `filled`.
 * Without `rate=`, it writes as fast as it can.
 *
 * Disk I/O across a migration: with `disks=N` (1 or 2) and `diskevery=M`,
 * every M page writes it writes block number `seq` (1, 2, …; 4 KiB at
 * sector seq*8, every u64 of it equal to seq) to each of the first N
 * virtio-blk devices, waits for completion, and every 64 blocks flushes
 * them and prints `disk SEQ`. A failed request prints `disk FAIL …` and
 * stops the disk writes. The host checks that blocks 1..SEQ all hold their
 * number afterwards.
 */
#include "virtio.h"

#define AREA_START (16UL << 20)
#define PAGE 4096UL

volatile u64 dirty_counter;

#define MAXDISKS 2
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_F_FLUSH (1UL << 9)

struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

static struct vring_desc disk_desc[MAXDISKS][QSIZE] __attribute__((aligned(4096)));
static struct vring_avail disk_avail[MAXDISKS] __attribute__((aligned(4096)));
static struct vring_used disk_used[MAXDISKS] __attribute__((aligned(4096)));
static struct virtq disk_q[MAXDISKS];
static u64 disk_blocks[MAXDISKS];
static u64 disk_buf[512] __attribute__((aligned(4096)));
static struct blk_req disk_req;
static volatile u8 disk_status;

/* The n-th virtio-blk device in hci's layout; 0 if none. */
static u64 find_blk(u32 n) {
    for (int i = 0; i < 16; i++) {
        u64 base = 0xd0000000UL + (u64)i * 0x1000;
        if (mmio_read32(base + VMMIO_MAGIC) == VIRTIO_MMIO_MAGIC && mmio_read32(base + VMMIO_DEVICE_ID) == 2 &&
            n-- == 0)
            return base;
    }
    return 0;
}

static u8 disk_request(struct virtq *q, u32 type, u64 sector, u32 len) {
    disk_req.type = type;
    disk_req.reserved = 0;
    disk_req.sector = sector;
    disk_status = 0xff;
    q->desc[0] = (struct vring_desc){(u64)&disk_req, sizeof(disk_req), VRING_DESC_F_NEXT, 1};
    u16 next = 1;
    if (len) {
        q->desc[1] = (struct vring_desc){(u64)disk_buf, len, VRING_DESC_F_NEXT, 2};
        next = 2;
    }
    q->desc[next] = (struct vring_desc){(u64)&disk_status, 1, VRING_DESC_F_WRITE, 0};
    virtq_submit_and_wait(q);
    return disk_status;
}

/* Sets up the first n virtio-blk devices; returns how many work. */
static u64 disks_init(u64 n) {
    if (n > MAXDISKS) n = MAXDISKS;
    for (u64 d = 0; d < n; d++) {
        u64 base = find_blk((u32)d);
        if (!base || virtio_negotiate(base, VIRTIO_BLK_F_FLUSH) ||
            virtio_setup_queue(&disk_q[d], base, 0, disk_desc[d], &disk_avail[d], &disk_used[d])) {
            puts("disk FAIL init ");
            put_dec(d);
            puts("\n");
            return d;
        }
        virtio_driver_ok(base);
        disk_blocks[d] = ((u64)mmio_read32(base + VMMIO_CONFIG) | ((u64)mmio_read32(base + VMMIO_CONFIG + 4) << 32)) / 8;
    }
    return n;
}

/* Writes block `seq` to every disk (and flushes every 64); 0 when it stops. */
static int disks_write(u64 ndisks, u64 seq) {
    for (int i = 0; i < 512; i++) disk_buf[i] = seq;
    for (u64 d = 0; d < ndisks; d++) {
        if (seq >= disk_blocks[d]) {
            puts("disk full\n");
            return 0;
        }
        u8 s = disk_request(&disk_q[d], VIRTIO_BLK_T_OUT, seq * 8, 4096);
        if (!s && seq % 64 == 0) s = disk_request(&disk_q[d], VIRTIO_BLK_T_FLUSH, 0, 0);
        if (s) {
            puts("disk FAIL status ");
            put_dec(s);
            puts(" disk ");
            put_dec(d);
            puts(" block ");
            put_dec(seq);
            puts("\n");
            return 0;
        }
    }
    if (seq % 64 == 0) {
        puts("disk ");
        put_dec(seq);
        puts("\n");
    }
    return 1;
}

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

void guest_main(const struct hvm_start_info *si) {
    u64 mib = cmdline_u64(si, "mib", 16);
    u64 every = cmdline_u64(si, "every", 1000000);
    if (!mib) mib = 1;
    if (!every) every = 1;
    u64 pages = (mib << 20) / PAGE;
    u64 rate = cmdline_u64(si, "rate", ~0UL);
    u64 tsc_khz = cmdline_u64(si, "tsc_khz", 2000000);
    if (!tsc_khz) tsc_khz = 1;
    if (cmdline_u64(si, "fill", 0)) {
        for (u64 p = 0; p < pages; p++)
            *(volatile u64 *)(AREA_START + p * PAGE) = ~p;
        puts("filled\n");
    }
    puts("dirty counter at ");
    put_hex((u64)&dirty_counter);
    puts(" area ");
    put_dec(mib);
    puts(" MiB\n");
    u64 ndisks = cmdline_u64(si, "disks", 0);
    u64 diskevery = cmdline_u64(si, "diskevery", 0);
    if (ndisks && diskevery) ndisks = disks_init(ndisks);
    else ndisks = 0;
    u64 seq = 0;
    u64 page = 0;
    u64 t0 = rdtsc();
    /* Pages per TSC tick * 2^30 (rate MiB/s = rate*256 pages/s). */
    u64 per_mtick = rate == ~0UL ? 0 : (rate * 256 * (1UL << 30)) / (tsc_khz * 1000);
    if (rate == 0) {
        puts("idle\n");
        for (;;) __asm__ volatile("pause");
    }
    for (;;) {
        if (per_mtick) {
            /* Pace: no more than rate MiB/s since t0. */
            while ((dirty_counter + 1) > (((rdtsc() - t0) >> 15) * per_mtick >> 15))
                __asm__ volatile("pause");
        }
        u64 n = dirty_counter + 1;
        *(volatile u64 *)(AREA_START + page * PAGE) = n;
        dirty_counter = n;
        if (++page == pages) page = 0;
        if (ndisks && n % diskevery == 0 && !disks_write(ndisks, ++seq)) ndisks = 0;
        if (n % every == 0) {
            puts("count ");
            put_dec(n);
            puts("\n");
        }
    }
}
