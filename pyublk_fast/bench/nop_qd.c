/* The ring's ceiling for the bench: io_uring NOPs kept QD in flight (like fio's iodepth)
 * for SECONDS, with per-NOP latency (submit round -> reap round) in a log-linear histogram.
 *
 * usage: nop_qd QD SECONDS
 * prints: {"ops": N, "seconds": S, "p50_ns": A, "p99_ns": B, "p999_ns": C}
 * Build: gcc -O2 -o nop_qd nop_qd.c -luring
 */
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SUB 16                       /* buckets per power of two */
#define NBUCKETS (64 * SUB)

static uint64_t hist[NBUCKETS];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static unsigned bucket(uint64_t ns)
{
    if (ns < SUB)
        return (unsigned)ns;
    unsigned msb = 63 - (unsigned)__builtin_clzll(ns);      /* >= 4 */
    unsigned sub = (unsigned)(ns >> (msb - 4)) & (SUB - 1);
    return (msb - 3) * SUB + sub;
}

static uint64_t bucket_lower(unsigned b)
{
    if (b < SUB)
        return b;
    unsigned msb = b / SUB + 3, sub = b % SUB;
    return ((uint64_t)(SUB + sub)) << (msb - 4);
}

static uint64_t percentile(uint64_t total, double p)
{
    uint64_t want = (uint64_t)((double)total * p / 100.0), cum = 0;
    for (unsigned b = 0; b < NBUCKETS; b++) {
        cum += hist[b];
        if (cum > want)
            return bucket_lower(b);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s QD SECONDS\n", argv[0]);
        return 2;
    }
    unsigned qd = (unsigned)atoi(argv[1]);
    double seconds = atof(argv[2]);
    struct io_uring ring;
    unsigned entries = 8;
    while (entries < qd)
        entries <<= 1;
    int ret = io_uring_queue_init(entries, &ring, 0);
    if (ret < 0 || qd == 0 || seconds <= 0) {
        fprintf(stderr, "setup failed: %s\n", ret < 0 ? strerror(-ret) : "bad QD or SECONDS");
        return 1;
    }
    uint64_t *stamp = calloc(qd, sizeof(*stamp));
    unsigned *free_slots = calloc(qd, sizeof(*free_slots)), nfree = qd;
    for (unsigned i = 0; i < qd; i++)
        free_slots[i] = i;
    uint64_t ops = 0, t0 = now_ns(), deadline = t0 + (uint64_t)(seconds * 1e9), t = t0;
    int stopping = 0;
    while (!stopping || nfree < qd) {
        if (!stopping) {
            while (nfree) {              /* refill: every free slot gets a NOP */
                unsigned slot = free_slots[--nfree];
                struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
                io_uring_prep_nop(sqe);
                sqe->user_data = slot;
                stamp[slot] = t;
            }
        }
        if (io_uring_submit_and_wait(&ring, 1) < 0) {
            fprintf(stderr, "io_uring_submit_and_wait failed\n");
            return 1;
        }
        t = now_ns();
        unsigned head, n = 0;
        struct io_uring_cqe *cqe;
        io_uring_for_each_cqe(&ring, head, cqe) {
            unsigned slot = (unsigned)cqe->user_data;
            hist[bucket(t - stamp[slot])]++;
            free_slots[nfree++] = slot;
            n++;
        }
        io_uring_cq_advance(&ring, n);
        ops += n;
        if (t >= deadline)
            stopping = 1;
    }
    double secs = (double)(t - t0) / 1e9;
    printf("{\"ops\": %llu, \"seconds\": %.6f, \"p50_ns\": %llu, \"p99_ns\": %llu, \"p999_ns\": %llu}\n",
           (unsigned long long)ops, secs, (unsigned long long)percentile(ops, 50),
           (unsigned long long)percentile(ops, 99), (unsigned long long)percentile(ops, 99.9));
    io_uring_queue_exit(&ring);
    return 0;
}
