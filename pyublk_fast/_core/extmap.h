/* The extent map's lock-free side (extmap.pyx has the Python one): a set-associative
 * table of (extent index -> fd, file offset) that queue threads read without the GIL
 * while Python changes it, and per-queue counts of the I/O in flight on each set.
 *
 * A reader counts its I/O in its own row before it looks the extent up; a remover
 * takes the entry out and marks its set draining before it reads the counts. With a
 * full fence between the two steps on each side, either the reader finds the entry
 * gone (or the set draining) or the remover sees the reader's count. Entries are
 * read under a sequence number (odd while an entry changes), so a reader never takes
 * the fd of one entry with the offset of another. Writers are serialized by the
 * caller (extmap.pyx's methods hold the GIL). */
#ifndef PYUBLK_EXTMAP_H
#define PYUBLK_EXTMAP_H

#include <stdint.h>

#define PYU_EM_WAYS 4
#define PYU_EM_WRITE 1u          /* entry flag: writes may go to it too */

typedef struct {
    uint64_t seq;                /* odd while the entry changes */
    uint64_t key;                /* extent index + 1; 0: empty */
    uint64_t off;                /* file offset of the extent's first byte */
    int32_t fd;
    uint32_t flags;
} pyu_em_entry;

typedef struct {
    uint64_t served;             /* requests this queue served from the map */
    uint64_t pad[7];             /* the counts start on a cache line of their own */
    uint16_t count[];            /* per set: I/O in flight (bounded by the queue's depth) */
} pyu_em_row;

typedef struct {
    pyu_em_entry *e;             /* nsets * PYU_EM_WAYS */
    uint32_t *drain;             /* per set: removers waiting for its I/O to end */
    uint64_t set_mask;
    uint32_t no_writes;          /* set: every write misses */
} pyu_em;

static inline uint64_t pyu_em_set(const pyu_em *m, uint64_t idx)
{
    return idx & m->set_mask;
}

/* Reader, on the queue thread owning row: count an I/O on extent idx, then look it
 * up. 1: mapped (*fd, *off of the extent's start), the count stays until
 * pyu_em_leave; 0: not mapped (or not for writing), the caller calls pyu_em_leave. */
static inline int pyu_em_enter(pyu_em *m, pyu_em_row *row, uint64_t idx, int write,
                               int32_t *fd, uint64_t *off)
{
    uint64_t s = pyu_em_set(m, idx);
    const pyu_em_entry *e = m->e + s * PYU_EM_WAYS;
    uint64_t seq, key = idx + 1, o;
    uint32_t flags;
    int32_t f;
    int w;
    __atomic_store_n(&row->count[s], (uint16_t)(row->count[s] + 1), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&m->drain[s], __ATOMIC_RELAXED))
        return 0;
    if (write && __atomic_load_n(&m->no_writes, __ATOMIC_RELAXED))
        return 0;
    for (w = 0; w < PYU_EM_WAYS; w++, e++) {
        seq = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
        if ((seq & 1) || __atomic_load_n(&e->key, __ATOMIC_RELAXED) != key)
            continue;
        o = __atomic_load_n(&e->off, __ATOMIC_RELAXED);
        f = __atomic_load_n(&e->fd, __ATOMIC_RELAXED);
        flags = __atomic_load_n(&e->flags, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&e->seq, __ATOMIC_RELAXED) != seq)
            return 0;            /* changing right now: the slow path decides */
        if (write && !(flags & PYU_EM_WRITE))
            return 0;
        *fd = f;
        *off = o;
        row->served++;
        return 1;
    }
    return 0;
}

/* Reader: the I/O counted by pyu_em_enter ended. Returns 1 when a remover waits on
 * its set (it must be told: extmap.pyx's drained()). */
static inline int pyu_em_leave(pyu_em *m, pyu_em_row *row, uint64_t idx)
{
    uint64_t s = pyu_em_set(m, idx);
    __atomic_store_n(&row->count[s], (uint16_t)(row->count[s] - 1), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&m->drain[s], __ATOMIC_RELAXED) != 0;
}

/* Writer: set entry e (key 0 empties it). */
static inline void pyu_em_put(pyu_em_entry *e, uint64_t key, int32_t fd, uint64_t off,
                              uint32_t flags)
{
    uint64_t seq = e->seq;
    __atomic_store_n(&e->seq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&e->key, key, __ATOMIC_RELAXED);
    __atomic_store_n(&e->off, off, __ATOMIC_RELAXED);
    __atomic_store_n(&e->fd, fd, __ATOMIC_RELAXED);
    __atomic_store_n(&e->flags, flags, __ATOMIC_RELAXED);
    __atomic_store_n(&e->seq, seq + 2, __ATOMIC_RELEASE);
}

/* Writer: mark idx's set draining (or no longer: delta -1); with the fence after it,
 * counts read next include every reader that may have found the old entry. */
static inline void pyu_em_drain(pyu_em *m, uint64_t idx, int delta)
{
    uint64_t s = pyu_em_set(m, idx);
    __atomic_store_n(&m->drain[s], m->drain[s] + delta, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static inline uint16_t pyu_em_count(const pyu_em *m, const pyu_em_row *row, uint64_t idx)
{
    return __atomic_load_n(&row->count[pyu_em_set(m, idx)], __ATOMIC_RELAXED);
}

#endif
