/* C reference for the reaper benchmark: submit NOP batches of size B and reap them by
 * indexing the CQ by head & mask into flat arrays, as pyublk_fast's reap_cq does.
 *
 * usage: nop_reap ENTRIES BATCH OPS   -> prints "<ns_per_op> <checksum>"
 * Build: gcc -O2 -o nop_reap nop_reap.c -luring
 */
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static unsigned reap(struct io_uring *r, uint64_t *ud, int32_t *res, uint32_t *fl, unsigned maxn)
{
    unsigned head = *r->cq.khead;
    unsigned n = __atomic_load_n(r->cq.ktail, __ATOMIC_ACQUIRE) - head;
    if (n > maxn)
        n = maxn;
    for (unsigned i = 0; i < n; i++) {
        struct io_uring_cqe *cqe = &r->cq.cqes[(head + i) & r->cq.ring_mask];
        ud[i] = cqe->user_data;
        res[i] = cqe->res;
        fl[i] = cqe->flags;
    }
    if (n)
        io_uring_cq_advance(r, n);
    return n;
}

/* Runs `ops` NOPs in batches; returns the sum of reaped user_data (or ~0 on error). */
static uint64_t loop(struct io_uring *r, unsigned batch, uint64_t ops,
                     uint64_t *ud, int32_t *res, uint32_t *fl, unsigned cap)
{
    uint64_t sum = 0, next = 0;
    while (next < ops) {
        unsigned b = batch, got = 0;
        if (ops - next < b)
            b = (unsigned)(ops - next);
        for (unsigned i = 0; i < b; i++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(r);
            io_uring_prep_nop(sqe);
            sqe->user_data = next + i;
        }
        next += b;
        if (io_uring_submit_and_wait(r, b) < 0)
            return ~0ull;
        while (got < b) {
            unsigned n = reap(r, ud, res, fl, cap);
            if (!n && io_uring_submit_and_wait(r, 1) < 0)
                return ~0ull;
            for (unsigned i = 0; i < n; i++)
                sum += ud[i] + (uint64_t)res[i];
            got += n;
        }
    }
    return sum;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s ENTRIES BATCH OPS\n", argv[0]);
        return 2;
    }
    unsigned entries = (unsigned)atoi(argv[1]), batch = (unsigned)atoi(argv[2]);
    uint64_t ops = strtoull(argv[3], NULL, 10);
    struct io_uring ring;
    int ret = io_uring_queue_init(entries, &ring, 0);
    if (ret < 0 || batch == 0 || batch > ring.sq.ring_entries) {
        fprintf(stderr, "setup failed: %s\n", ret < 0 ? strerror(-ret) : "bad batch");
        return 1;
    }
    unsigned cap = ring.cq.ring_entries;
    uint64_t *ud = calloc(cap, sizeof(*ud));
    int32_t *res = calloc(cap, sizeof(*res));
    uint32_t *fl = calloc(cap, sizeof(*fl));
    loop(&ring, batch, ops / 10 + batch, ud, res, fl, cap); /* warm up */
    uint64_t t0 = now_ns();
    uint64_t sum = loop(&ring, batch, ops, ud, res, fl, cap);
    uint64_t t1 = now_ns();
    printf("%.3f %llu\n", (double)(t1 - t0) / (double)ops, (unsigned long long)sum);
    io_uring_queue_exit(&ring);
    return sum == ~0ull;
}
