/* Small inline helpers that Debian 12's liburing 2.3 lacks or hides in macros.
 * Everything here is header-only, nogil-safe C used by the Cython hot paths. */
#ifndef PYUBLK_COMPAT_H
#define PYUBLK_COMPAT_H

#include <string.h>
#include <stdint.h>
#include <liburing.h>

/* Acquire-load of the kernel's CQ tail (liburing's io_uring_smp_load_acquire is a macro). */
static inline unsigned pyu_cq_tail(const struct io_uring *ring)
{
    return __atomic_load_n(ring->cq.ktail, __ATOMIC_ACQUIRE);
}

/* The i-th CQE after head, honouring CQE32 rings (io_uring_cqe_index is a macro). */
static inline struct io_uring_cqe *pyu_cqe_at(const struct io_uring *ring, unsigned pos)
{
    unsigned shift = (ring->flags & IORING_SETUP_CQE32) ? 1 : 0;
    return &ring->cq.cqes[(pos & ring->cq.ring_mask) << shift];
}

/* Size of one SQE in bytes for this ring. */
static inline unsigned pyu_sqe_size(const struct io_uring *ring)
{
    return (ring->flags & IORING_SETUP_SQE128) ? 128u : 64u;
}

/* Whether the kernel holds overflowed CQEs that need an io_uring_enter(GETEVENTS). */
static inline int pyu_cq_overflowed(const struct io_uring *ring)
{
    return (__atomic_load_n(ring->sq.kflags, __ATOMIC_RELAXED) & IORING_SQ_CQ_OVERFLOW) != 0;
}

/* Whether the kernel holds completions for us that only run when we enter it:
 * CQ overflow, or (COOP_TASKRUN with TASKRUN_FLAG) queued task work such as a
 * finished disk read, which a poll of the CQ tail alone would never see. */
static inline int pyu_must_enter(const struct io_uring *ring)
{
    return (__atomic_load_n(ring->sq.kflags, __ATOMIC_RELAXED)
            & (IORING_SQ_CQ_OVERFLOW | IORING_SQ_TASKRUN)) != 0;
}

/* IORING_OP_URING_CMD preparation (liburing 2.3 has no helper): the whole SQE is
 * cleared, then opcode, fd and cmd_op are set and the payload copied into the
 * command area (16 bytes on a 64-byte SQE, 80 bytes on an SQE128 ring). */
static inline void pyu_prep_uring_cmd(struct io_uring_sqe *sqe, unsigned sqe_size, int fd,
                                      uint32_t cmd_op, const void *cmd, unsigned cmd_len,
                                      uint64_t user_data)
{
    memset(sqe, 0, sqe_size);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = fd;
    sqe->cmd_op = cmd_op;
    sqe->user_data = user_data;
    if (cmd_len)
        memcpy(sqe->cmd, cmd, cmd_len);
}

/* Pointer to the command area of an SQE (for writing a payload in place). */
static inline void *pyu_sqe_cmd(struct io_uring_sqe *sqe)
{
    return (void *)sqe->cmd;
}

/* Not in liburing 2.3's headers: a multishot uring_cmd (uring_cmd_flags; FETCH_IO_CMDS needs it) and
 * MSG_RING passing its CQE flags in the SQE's file_index (msg_ring_flags, 6.3+). */
#define PYU_URING_CMD_MULTISHOT (1U << 1)
#define PYU_MSG_RING_FLAGS_PASS (1U << 1)

/* Acquire-load of a provided buffer ring's tail: what a consumer of the ring (the
 * simulated driver, in the kernel's place) may take up to. */
static inline uint16_t pyu_buf_ring_tail(const struct io_uring_buf_ring *br)
{
    return __atomic_load_n(&br->tail, __ATOMIC_ACQUIRE);
}

#include <time.h>
#include <sched.h>

/* Monotonic clock in ns (vDSO, ~20 ns). */
static inline int64_t pyu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void pyu_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Submit, then poll the CQ before sleeping in io_uring_enter, adaptively: the poll
 * budget (*budget, ns) doubles up to max_ns while completions arrive within it. When
 * one does not, the thread sleeps; a completion that still came within max_ns of the
 * start sets the budget to twice that wait (a poll that long would have caught it), a
 * later one halves it. Hand-offs between two busy threads then cost ~1 us instead of a
 * wake-up, and an idle thread sleeps. The poll yields the CPU every few us, so a
 * polling thread never holds up one that shares its CPU. */
static inline void pyu_submit_and_wait_adaptive(struct io_uring *ring, int64_t max_ns, int64_t *budget)
{
    if (max_ns <= 0 || io_uring_cq_ready(ring)) {
        io_uring_submit_and_wait(ring, io_uring_cq_ready(ring) ? 0 : 1);
        return;
    }
    io_uring_submit(ring);
    int64_t start = pyu_now_ns();
    int64_t b = *budget;
    if (b > 0) {
        unsigned head = *ring->cq.khead;
        for (unsigned i = 1; pyu_cq_tail(ring) == head; i++) {
            if (pyu_must_enter(ring)) {             /* task work or overflow: run it now */
                io_uring_get_events(ring);
                break;
            }
            pyu_cpu_relax();
            if ((i & 63) == 0) {
                if (pyu_now_ns() - start > b)
                    goto sleep;
                /* let whatever else is runnable on this CPU go first: the peer we wait
                 * for, or the kworker finishing our direct write, would otherwise wait
                 * for the scheduler to preempt us */
                sched_yield();
            }
        }
        *budget = b * 2 < max_ns ? b * 2 : max_ns;
        return;
    }
sleep:
    io_uring_submit_and_wait(ring, 1);
    int64_t waited = pyu_now_ns() - start;
    if (waited < max_ns)
        *budget = 2 * waited < max_ns ? 2 * waited : max_ns;
    else
        *budget = b / 2;
}

/* floor(log2(v)) for v >= 1 (0 for 0): the latency histogram's bucket */
static inline int pyu_log2(uint64_t v)
{
    return 63 - __builtin_clzll(v | 1);
}

#endif
