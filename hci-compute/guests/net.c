/*
 * net: a tiny host on the first virtio-net device, driven by polling.
 * Takes its IPv4 address from `ip=a.b.c.d` on the command line, prints
 * "net up mac xx:xx:xx:xx:xx:xx ip a.b.c.d", then answers ARP requests for
 * that address ("arp reply N") and ICMP echo requests to it ("icmp reply N")
 * forever. With `replies=N` it resets after the Nth echo reply.
 * Everything else is ignored.
 */
#include "virtio.h"

#define VIRTIO_NET_F_MAC (1UL << 5)
#define HDR 12 /* virtio_net_hdr with num_buffers (VERSION_1) */
#define BUF 2048
#define ETH_ARP 0x0806
#define ETH_IP 0x0800

static struct vring_desc rx_desc[QSIZE] __attribute__((aligned(4096)));
static struct vring_avail rx_avail __attribute__((aligned(4096)));
static struct vring_used rx_used __attribute__((aligned(4096)));
static struct vring_desc tx_desc[QSIZE] __attribute__((aligned(4096)));
static struct vring_avail tx_avail __attribute__((aligned(4096)));
static struct vring_used tx_used __attribute__((aligned(4096)));
static u8 rx_buf[QSIZE][BUF] __attribute__((aligned(4096)));
static u8 tx_buf[BUF] __attribute__((aligned(4096)));
static u8 mac[6];
static u8 ip[4];
static u64 arp_replies, icmp_replies;

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static void put_be16(u8 *p, u16 v) {
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}

/* The Internet checksum (RFC 1071) of `len` bytes. */
static u16 csum(const u8 *p, u32 len) {
    u32 sum = 0;
    for (; len > 1; p += 2, len -= 2) sum += be16(p);
    if (len) sum += (u32)p[0] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static int parse_ip(const char *s, u8 out[4]) {
    for (int i = 0; i < 4; i++) {
        u32 v = 0;
        int digits = 0;
        for (; *s >= '0' && *s <= '9' && digits < 4; s++, digits++) v = v * 10 + (u32)(*s - '0');
        if (!digits || v > 255) return -1;
        out[i] = (u8)v;
        if (i < 3 && *s++ != '.') return -1;
    }
    return 0;
}

static void put_mac(const u8 *m) {
    for (int i = 0; i < 6; i++) {
        if (i) putc(':');
        putc("0123456789abcdef"[m[i] >> 4]);
        putc("0123456789abcdef"[m[i] & 0xf]);
    }
}

static void rx_post(struct virtq *q, u16 id) {
    volatile struct vring_avail *av = q->avail;
    q->desc[id] = (struct vring_desc){(u64)rx_buf[id], BUF, VRING_DESC_F_WRITE, 0};
    av->ring[av->idx % QSIZE] = id;
    barrier();
    av->idx = av->idx + 1;
}

/* Sends the frame in tx_buf + HDR (header zeroed: no offloads). */
static void tx_send(struct virtq *q, u32 frame_len) {
    if (frame_len < 60) {
        memset(tx_buf + HDR + frame_len, 0, 60 - frame_len);
        frame_len = 60;
    }
    memset(tx_buf, 0, HDR);
    q->desc[0] = (struct vring_desc){(u64)tx_buf, HDR + frame_len, 0, 0};
    virtq_submit_and_wait(q);
}

static void handle_arp(struct virtq *tx, const u8 *f, u32 len) {
    if (len < 42 || be16(f + 14) != 1 || be16(f + 16) != ETH_IP || f[18] != 6 || f[19] != 4) return;
    if (be16(f + 20) != 1 || memcmp(f + 38, ip, 4)) return; /* not a request for us */
    u8 *o = tx_buf + HDR;
    memcpy(o, f + 22, 6); /* to the sender */
    memcpy(o + 6, mac, 6);
    put_be16(o + 12, ETH_ARP);
    put_be16(o + 14, 1);
    put_be16(o + 16, ETH_IP);
    o[18] = 6;
    o[19] = 4;
    put_be16(o + 20, 2); /* reply */
    memcpy(o + 22, mac, 6);
    memcpy(o + 28, ip, 4);
    memcpy(o + 32, f + 22, 10); /* sender MAC + IP become the target */
    tx_send(tx, 42);
    arp_replies++;
    puts("arp reply ");
    put_dec(arp_replies);
    puts("\n");
}

static void handle_ip(struct virtq *tx, const u8 *f, u32 len) {
    const u8 *iph = f + 14;
    if (len < 34 || (iph[0] >> 4) != 4) return;
    u32 ihl = (u32)(iph[0] & 0xf) * 4;
    u32 total = be16(iph + 2);
    if (ihl < 20 || total < ihl + 8 || total > len - 14 || 14 + total > BUF - HDR) return;
    if (iph[9] != 1 || memcmp(iph + 16, ip, 4) || csum(iph, ihl)) return; /* ICMP to us, intact */
    const u8 *icmp = iph + ihl;
    if (icmp[0] != 8 || icmp[1] != 0) return; /* echo request */
    u8 *o = tx_buf + HDR;
    memcpy(o, f, 14 + total);
    memcpy(o, f + 6, 6);
    memcpy(o + 6, mac, 6);
    u8 *oip = o + 14;
    memcpy(oip + 16, iph + 12, 4);
    memcpy(oip + 12, ip, 4);
    oip[8] = 64;
    put_be16(oip + 10, 0);
    put_be16(oip + 10, csum(oip, ihl));
    u8 *oicmp = oip + ihl;
    oicmp[0] = 0; /* echo reply */
    put_be16(oicmp + 2, 0);
    put_be16(oicmp + 2, csum(oicmp, total - ihl));
    tx_send(tx, 14 + total);
    icmp_replies++;
    puts("icmp reply ");
    put_dec(icmp_replies);
    puts("\n");
}

static void fail(const char *why, u64 v) {
    puts("net FAIL: ");
    puts(why);
    puts(" ");
    put_hex(v);
    puts("\n");
}

void guest_main(const struct hvm_start_info *si) {
    const char *ip_arg = cmdline_str(si, "ip");
    if (!ip_arg || parse_ip(ip_arg, ip)) return fail("no ip=a.b.c.d on the command line", 0);
    u64 stop_after = cmdline_u64(si, "replies", 0);
    u64 base = virtio_find(1);
    if (!base) return fail("no virtio-net device", 0);
    int err = virtio_negotiate(base, VIRTIO_NET_F_MAC);
    if (err) return fail("negotiate", (u64)(long)err);
    for (int i = 0; i < 6; i++) mac[i] = mmio_read8(base + VMMIO_CONFIG + (u64)i);
    struct virtq rxq, txq;
    err = virtio_setup_queue(&rxq, base, 0, rx_desc, &rx_avail, &rx_used);
    if (!err) err = virtio_setup_queue(&txq, base, 1, tx_desc, &tx_avail, &tx_used);
    if (err) return fail("queue setup", (u64)(long)err);
    virtio_driver_ok(base);
    for (u16 id = 0; id < QSIZE; id++) rx_post(&rxq, id);
    virtq_notify(&rxq);
    puts("net up mac ");
    put_mac(mac);
    puts(" ip ");
    for (int i = 0; i < 4; i++) {
        if (i) putc('.');
        put_dec(ip[i]);
    }
    puts("\n");

    volatile struct vring_used *used = rxq.used;
    for (;;) {
        while (used->idx == rxq.last_used) __asm__ volatile("pause");
        barrier();
        struct vring_used_elem e = used->ring[rxq.last_used % QSIZE];
        rxq.last_used++;
        if (e.id >= QSIZE) continue; /* not ours: the device misbehaved */
        if (e.len >= HDR + 14 && e.len <= BUF) {
            const u8 *f = rx_buf[e.id] + HDR;
            u32 len = e.len - HDR;
            u16 type = be16(f + 12);
            if (type == ETH_ARP) handle_arp(&txq, f, len);
            if (type == ETH_IP) handle_ip(&txq, f, len);
        }
        rx_post(&rxq, (u16)e.id);
        virtq_notify(&rxq);
        if (stop_after && icmp_replies >= stop_after) break;
    }
    puts("net done\n");
}
