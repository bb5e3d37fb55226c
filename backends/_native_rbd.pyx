# cython: language_level=3, cdivision=True
"""The rbd target in C: each request becomes one librbd aio call straight into the
request's buffer; finished calls come back to the queue thread through its ring.

The image handle is shared by every queue of a device (librbd serializes writers of
one image per handle, caches per handle and takes the exclusive lock per handle:
several handles would each hold a cache a FLUSH on one queue does not reach, and
trade the lock back and forth). Completions are routed per queue instead: each
request's completion carries its queue's state; librbd's callback (in a librbd
thread) pushes it on that queue's lock-free list and, when the list was empty,
writes the queue's eventfd. A read SQE on that eventfd sits on the queue's ring; its
CQE makes the queue thread take the whole list, commit each request and re-arm the
read. Per I/O that is one completion object, one atomic push, and at most one
eventfd write and one CQE per batch of completions.
"""
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from libc.errno cimport (EACCES, EAGAIN, EBUSY, EINVAL, EIO, ENOENT, EPERM, ESHUTDOWN, ETIMEDOUT,
                         EOPNOTSUPP, EROFS)
from posix.unistd cimport close as c_close

from pyublk_fast._core.liburing cimport *
from pyublk_fast._core.queue cimport NativeTarget, Queue
from pyublk_fast._core.uapi cimport *

import errno as _errno
import logging
import os

log = logging.getLogger("pyublk_fast.backends.rbd")


cdef extern from "<rados/librados.h>" nogil:
    ctypedef void *rados_t
    ctypedef void *rados_ioctx_t
    int rados_create(rados_t *cluster, const char *id)
    int rados_conf_read_file(rados_t cluster, const char *path)
    int rados_conf_parse_env(rados_t cluster, const char *var)
    int rados_conf_set(rados_t cluster, const char *option, const char *value)
    int rados_conf_get(rados_t cluster, const char *option, char *buf, size_t len)
    int rados_connect(rados_t cluster)
    void rados_shutdown(rados_t cluster)
    int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx)
    void rados_ioctx_destroy(rados_ioctx_t io)
    uint64_t rados_get_instance_id(rados_t cluster)
    int rados_notify2(rados_ioctx_t io, const char *o, const char *buf, int buf_len,
                      uint64_t timeout_ms, char **reply_buffer, size_t *reply_buffer_len)
    struct notify_ack_t:
        uint64_t notifier_id
    struct notify_timeout_t:
        uint64_t notifier_id
    int rados_decode_notify_response(char *reply_buffer, size_t reply_buffer_len,
                                     notify_ack_t **acks, size_t *nr_acks,
                                     notify_timeout_t **timeouts, size_t *nr_timeouts)
    void rados_free_notify_response(notify_ack_t *acks, size_t nr_acks,
                                    notify_timeout_t *timeouts)
    void rados_buffer_free(char *buf)
    enum:
        LIBRADOS_OP_FLAG_FADVISE_FUA


cdef extern from "<rbd/librbd.h>" nogil:
    ctypedef void *rbd_image_t
    ctypedef void *rbd_completion_t
    ctypedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg)
    int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name)
    int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                           const char *snap_name)
    int rbd_close(rbd_image_t image)
    int rbd_get_size(rbd_image_t image, uint64_t *size)
    int rbd_resize(rbd_image_t image, uint64_t size)
    int rbd_get_features(rbd_image_t image, uint64_t *features)
    int rbd_get_id(rbd_image_t image, char *id, size_t id_len)
    ctypedef enum rbd_lock_mode_t:
        RBD_LOCK_MODE_EXCLUSIVE
    int rbd_lock_acquire(rbd_image_t image, rbd_lock_mode_t lock_mode)
    int rbd_lock_break(rbd_image_t image, rbd_lock_mode_t lock_mode, const char *lock_owner)
    ssize_t rbd_list_lockers(rbd_image_t image, int *exclusive, char *tag, size_t *tag_len,
                             char *clients, size_t *clients_len, char *cookies,
                             size_t *cookies_len, char *addrs, size_t *addrs_len)
    enum:
        RBD_FEATURE_EXCLUSIVE_LOCK
    ssize_t rbd_read(rbd_image_t image, uint64_t ofs, size_t len, char *buf)
    ssize_t rbd_write(rbd_image_t image, uint64_t ofs, size_t len, const char *buf)
    int rbd_flush(rbd_image_t image)
    int rbd_discard(rbd_image_t image, uint64_t ofs, uint64_t len)
    int rbd_write_zeroes(rbd_image_t image, uint64_t ofs, size_t len, int zero_flags, int op_flags)
    int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c)
    ssize_t rbd_aio_get_return_value(rbd_completion_t c)
    void rbd_aio_release(rbd_completion_t c)
    int rbd_aio_read(rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c)
    int rbd_aio_write2(rbd_image_t image, uint64_t off, size_t len, const char *buf,
                       rbd_completion_t c, int op_flags)
    int rbd_aio_flush(rbd_image_t image, rbd_completion_t c)
    int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c)
    int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                             int zero_flags, int op_flags)


cdef extern from "<errno.h>" nogil:
    enum:
        ECANCELED


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned initval, int flags)
    enum:
        EFD_CLOEXEC


cdef extern from *:
    """
    #include <unistd.h>
    /* One request slot (one per tag) and one queue's completion list. librbd's
       callback runs in a librbd thread: it only touches these two structs. */
    struct pyu_rbd_q;
    struct pyu_rbd_req {
        struct pyu_rbd_req *next;
        void *c;                      /* the rbd completion in flight */
        struct pyu_rbd_q *q;
        int tag;
    };
    struct pyu_rbd_q {
        struct pyu_rbd_req *done;     /* finished, not yet taken by the queue thread */
        int efd;
        int depth;
        int inflight;                 /* queue thread only */
        uint64_t efd_buf;             /* the ring's eventfd read lands here */
        struct pyu_rbd_req *reqs;     /* [depth] */
    };
    static void pyu_rbd_complete(void *c, void *arg) {
        struct pyu_rbd_req *r = (struct pyu_rbd_req *)arg;
        struct pyu_rbd_q *q = r->q;
        struct pyu_rbd_req *head = __atomic_load_n(&q->done, __ATOMIC_RELAXED);
        uint64_t one = 1;
        (void)c;
        do {
            r->next = head;
        } while (!__atomic_compare_exchange_n(&q->done, &head, r, 1, __ATOMIC_RELEASE,
                                              __ATOMIC_RELAXED));
        /* only the push onto an empty list wakes the queue: it takes the whole list
           after its read completes, so later pushes ride on that wake-up */
        if (head == NULL && write(q->efd, &one, sizeof one) < 0) {
            /* an eventfd write fails only on overflow (2^64 - 1 pending): impossible */
        }
    }
    static struct pyu_rbd_req *pyu_rbd_take(struct pyu_rbd_q *q) {
        return __atomic_exchange_n(&q->done, NULL, __ATOMIC_ACQUIRE);
    }
    """
    struct pyu_rbd_q
    struct pyu_rbd_req:
        pyu_rbd_req *next
        void *c
        pyu_rbd_q *q
        int tag
    struct pyu_rbd_q:
        pyu_rbd_req *done
        int efd
        int depth
        int inflight
        uint64_t efd_buf
        pyu_rbd_req *reqs
    void pyu_rbd_complete(void *c, void *arg) noexcept nogil
    pyu_rbd_req *pyu_rbd_take(pyu_rbd_q *q) noexcept nogil


cdef int32_t C_RESUBMITTED = -0x7fffffff
cdef uint32_t EFD_TGT = 0xffffffffU       # tgt_data of the eventfd read (not a request's)
cdef enum:
    MAX_QUEUES = 4096                      # the driver's limit on hardware queues


class RbdError(OSError):
    """librbd/librados refused: errno plus a one-line message naming what failed."""


cdef str conf_value(rados_t cluster, const char *key):
    cdef char buf[4096]
    if rados_conf_get(cluster, key, buf, sizeof(buf)) < 0:
        return "?"
    return buf.decode(errors="replace")


cdef int check(int ret, str what) except -1:
    if ret < 0:
        raise RbdError(-ret, f"{what}: {os.strerror(-ret)}")
    return 0


cdef class RbdImage(NativeTarget):
    """An open RBD image (its own cluster connection) and the target serving it.

    Built by backends.rbd.RbdBackend; the connection and image open run here, in the
    calling thread, with the GIL released (they can take up to the connect timeout).
    """
    cdef rados_t cluster
    cdef rados_ioctx_t ioctx
    cdef rbd_image_t image
    cdef readonly bint read_only
    cdef readonly uint64_t size
    cdef readonly bint cache             # librbd's writeback cache is on: FLUSH matters
    cdef readonly bint stuck             # a queue stopped with librbd I/O in flight
    cdef pyu_rbd_q **qs                  # [MAX_QUEUES], per queue, made by setup()

    def __init__(self, str pool, str name, str snap=None, *, str conf=None, str client_id=None,
                 dict options=None):
        """Connect (conf file, then CEPH_ARGS, then options) and open pool/name[@snap]."""
        cdef bytes b_id = (client_id or "admin").encode()
        cdef bytes b_pool = pool.encode(), b_name = name.encode()
        cdef bytes b_snap = snap.encode() if snap else None
        cdef const char *c_snap = NULL
        cdef const char *c_name = b_name
        cdef int ret
        self.qs = <pyu_rbd_q **>calloc(MAX_QUEUES, sizeof(pyu_rbd_q *))
        if self.qs == NULL:
            raise MemoryError()
        check(rados_create(&self.cluster, b_id), f"client {client_id or 'admin'}")
        if conf is not None:
            check(rados_conf_read_file(self.cluster, conf.encode()), f"reading {conf}")
        else:
            # the default places ($CEPH_CONF, /etc/ceph/ceph.conf, ...); none is fine
            # when the options name the monitors
            rados_conf_read_file(self.cluster, NULL)
        rados_conf_parse_env(self.cluster, NULL)
        for key, value in (options or {}).items():
            text = f"{value:g}" if isinstance(value, float) else str(value)
            check(rados_conf_set(self.cluster, key.encode(), text.encode()),
                  f"ceph option {key}={value}")
        with nogil:
            ret = rados_connect(self.cluster)
        if ret < 0:
            who = f"client.{client_id or 'admin'}"
            keyring = conf_value(self.cluster, b"keyring")
            rados_shutdown(self.cluster)
            self.cluster = NULL
            if ret == -ETIMEDOUT:
                raise RbdError(ETIMEDOUT, "cannot reach the Ceph cluster (no monitor answered "
                               "within the connect timeout)")
            if ret == -ENOENT:
                raise RbdError(ENOENT, f"no key for {who}: no keyring found at {keyring}")
            if ret == -EACCES or ret == -EPERM:
                raise RbdError(-ret, f"the monitors refused {who}: wrong key or unknown "
                               f"client (keyring {keyring})")
            raise RbdError(-ret, f"connecting to the Ceph cluster as {who}: {os.strerror(-ret)}")
        ret = rados_ioctx_create(self.cluster, b_pool, &self.ioctx)
        if ret == -ENOENT:
            raise RbdError(-ret, f"pool {pool!r} does not exist")
        check(ret, f"pool {pool}")
        if snap:
            c_snap = b_snap
        self.read_only = snap is not None
        with nogil:
            if c_snap != NULL:
                ret = rbd_open_read_only(self.ioctx, c_name, &self.image, c_snap)
            else:
                ret = rbd_open(self.ioctx, c_name, &self.image, NULL)
        if ret == -ENOENT:
            what = f"image {pool}/{name}" + (f" or its snapshot {snap!r}" if snap else "")
            raise RbdError(-ret, f"{what} does not exist")
        if ret == -EPERM or ret == -EACCES:
            raise RbdError(-ret, f"client.{client_id or 'admin'} may not open {pool}/{name} "
                           "(its capabilities do not cover this pool)")
        check(ret, f"opening image {pool}/{name}" + (f"@{snap}" if snap else ""))
        check(rbd_get_size(self.image, &self.size), f"size of {pool}/{name}")
        self.cache = conf_value(self.cluster, b"rbd_cache") == "true"

    @property
    def client_name(self):
        """This connection's name in the cluster (client.GID), as lock listings show it."""
        return f"client.{rados_get_instance_id(self.cluster)}" if self.cluster != NULL else None

    # -- the exclusive lock (--exclusive) ------------------------------------------------

    def acquire_exclusive(self, str what, double probe_timeout):
        """Take the image's exclusive lock and keep it: librbd then refuses other clients'
        requests for it instead of handing it over. A holder that answers a notification
        within probe_timeout seconds is a live server: RbdError EBUSY naming it. One that
        does not (killed, hung, cut off) is blocklisted, then its lock broken; a half-dead
        holder that wakes up later cannot write any more. Returns the holder broken, or None.

        The holder is asked first: librbd's own acquisition waits for a silent holder's
        watch on the image to expire (30 s after a kill -9) before it breaks the lock."""
        cdef uint64_t features
        cdef const char *c_addr
        cdef int ret
        self.opened()
        check(rbd_get_features(self.image, &features), f"features of {what}")
        if not features & RBD_FEATURE_EXCLUSIVE_LOCK:
            raise RbdError(EINVAL, f"image {what} lacks the exclusive-lock feature --exclusive "
                           f"needs (rbd feature enable {what} exclusive-lock)")
        broken = None
        client, addr = self.lock_owner(what)
        if client is not None and not self.answers(client, what, probe_timeout):
            broken = f"{client} at {addr}"
            b_addr = addr.encode()
            c_addr = b_addr
            # rbd_blocklist_on_break_lock (set by the backend): librbd blocklists the
            # holder and waits for the OSDs to know it before it removes the lock
            with nogil:
                ret = rbd_lock_break(self.image, RBD_LOCK_MODE_EXCLUSIVE, c_addr)
            if ret == -EACCES or ret == -EPERM:
                raise RbdError(-ret, f"{self.client_name} may not blocklist {broken}, the dead "
                               f"holder of {what}'s lock (its mon capabilities need "
                               "'profile rbd')")
            if ret != -ENOENT:               # ENOENT: the lock went away meanwhile
                check(ret, f"breaking {broken}'s lock of {what}")
        with nogil:
            ret = rbd_lock_acquire(self.image, RBD_LOCK_MODE_EXCLUSIVE)
        if ret == -EROFS or ret == -EBUSY or ret == -EAGAIN:
            client, addr = self.lock_owner(what)     # live (it answered), or new meanwhile
            raise RbdError(EBUSY, f"image {what} is locked by {client} at {addr}: another "
                           "server holds it (--exclusive)")
        check(ret, f"taking the exclusive lock of {what}")
        return broken

    cdef tuple lock_owner(self, str what):
        """(client.GID, address) of the exclusive lock's holder, or (None, None)."""
        cdef char tag[256]
        cdef char clients[1024]
        cdef char cookies[1024]
        cdef char addrs[1024]
        cdef size_t tag_len = sizeof(tag), clients_len = sizeof(clients)
        cdef size_t cookies_len = sizeof(cookies), addrs_len = sizeof(addrs)
        cdef int exclusive = 0
        cdef ssize_t n
        with nogil:
            n = rbd_list_lockers(self.image, &exclusive, tag, &tag_len, clients, &clients_len,
                                 cookies, &cookies_len, addrs, &addrs_len)
        check(<int>n if n < 0 else 0, f"lockers of {what}")
        if n == 0:
            return None, None
        # one holder: the first of each NUL-separated list
        return (clients[:clients_len].split(b"\0")[0].decode(),
                addrs[:addrs_len].split(b"\0")[0].decode())

    cdef bint answers(self, str client, str what, double timeout) except -1:
        """Whether client (client.GID), watching the image's header as every librbd
        client does, acknowledges a notification within timeout seconds. The notification
        is empty: librbd takes it for a header update (a refresh), harmless to a live one."""
        cdef char image_id[128]
        cdef bytes oid
        cdef const char *c_oid
        cdef char *reply = NULL
        cdef size_t reply_len = 0, n_acks = 0, n_timeouts = 0
        cdef notify_ack_t *acks = NULL
        cdef notify_timeout_t *timeouts = NULL
        cdef uint64_t gid = int(client.partition(".")[2])
        cdef uint64_t timeout_ms = <uint64_t>(timeout * 1000)
        cdef int ret
        cdef size_t i
        cdef bint alive = False
        check(rbd_get_id(self.image, image_id, sizeof(image_id)), f"id of {what}")
        oid = b"rbd_header." + image_id
        c_oid = oid
        with nogil:
            ret = rados_notify2(self.ioctx, c_oid, NULL, 0, timeout_ms, &reply, &reply_len)
        if ret < 0 and ret != -ETIMEDOUT:
            if reply != NULL:
                rados_buffer_free(reply)
            # no answer either way: do not take a possibly live owner's lock
            check(ret, f"asking {client}, the holder of {what}'s lock, whether it is alive")
        if reply == NULL:
            return False
        ret = rados_decode_notify_response(reply, reply_len, &acks, &n_acks, &timeouts,
                                           &n_timeouts)
        rados_buffer_free(reply)
        check(ret, f"the answers of {what}'s watchers")
        for i in range(n_acks):
            if acks[i].notifier_id == gid:
                alive = True
        rados_free_notify_response(acks, n_acks, timeouts)
        return alive

    def close(self):
        """Close the image and the connection (after the device stopped). If a queue
        stopped with librbd I/O still in flight (an OSD that never answered), librbd may
        still write into memory it holds: everything is kept for the process's life."""
        if self.stuck:
            log.warning("rbd: librbd I/O still in flight at close; keeping the image open")
            return
        self.release()

    cdef void release(self) noexcept:
        cdef int i
        with nogil:
            if self.image != NULL:
                rbd_close(self.image)
            if self.ioctx != NULL:
                rados_ioctx_destroy(self.ioctx)
            if self.cluster != NULL:
                rados_shutdown(self.cluster)
        self.image = self.ioctx = self.cluster = NULL
        # rbd_close waited for every aio and its callback: nothing refers to these now
        if self.qs != NULL:
            for i in range(MAX_QUEUES):
                if self.qs[i] != NULL:
                    c_close(self.qs[i].efd)
                    free(self.qs[i].reqs)
                    free(self.qs[i])
            free(self.qs)
            self.qs = NULL

    def __dealloc__(self):
        # a stuck image is referenced from _STUCK and never gets here
        self.release()

    # -- blocking calls, for the Python path (--python) ---------------------------------

    cdef int opened(self) except -1:
        if self.image == NULL:
            raise RbdError(EIO, "rbd: the image is closed")
        return 0

    def pread_into(self, uint64_t offset, unsigned char[::1] buf not None):
        cdef ssize_t ret
        self.opened()
        with nogil:
            ret = rbd_read(self.image, offset, buf.shape[0], <char *>&buf[0])
        check(<int>ret if ret < 0 else 0, "rbd read")

    def pwrite(self, uint64_t offset, const unsigned char[::1] data not None):
        cdef ssize_t ret
        self.opened()
        with nogil:
            ret = rbd_write(self.image, offset, data.shape[0], <const char *>&data[0])
        check(<int>ret if ret < 0 else 0, "rbd write")

    def resize(self, uint64_t size):
        """Grow the image to size bytes (librbd's resize). The data path needs nothing
        more: requests past the old end arrive only after the driver has the new size."""
        cdef int ret
        self.opened()
        if self.read_only:
            raise RbdError(EROFS, "a snapshot is read-only: it cannot be resized")
        with nogil:
            ret = rbd_resize(self.image, size)
        check(ret, f"resizing the image to {size} bytes")
        self.size = size

    def flush(self):
        cdef int ret
        self.opened()
        with nogil:
            ret = rbd_flush(self.image)
        check(ret, "rbd flush")

    def discard(self, uint64_t offset, uint64_t length):
        cdef int ret
        self.opened()
        with nogil:
            ret = rbd_discard(self.image, offset, length)
        check(ret, "rbd discard")

    def write_zeroes(self, uint64_t offset, uint64_t length):
        cdef int ret
        self.opened()
        with nogil:
            ret = rbd_write_zeroes(self.image, offset, length, 0, 0)
        check(ret, "rbd write zeroes")

    # -- the target --------------------------------------------------------------------

    cdef int setup(self, Queue q) except -1:
        cdef pyu_rbd_q *s
        cdef int tag
        if self.image == NULL:
            raise ValueError("rbd: the image is closed")
        if q.q_id >= MAX_QUEUES:
            raise ValueError(f"rbd: queue {q.q_id} out of range")
        if q.threads > 1:       # its completion routing is per queue, not per thread
            raise ValueError("rbd: each queue is served from one thread: use more queues "
                             "rather than threads_per_queue")
        s = self.qs[q.q_id]
        if s != NULL and s.depth < q.depth:
            raise ValueError(f"rbd: queue {q.q_id} served again with a larger depth")
        if s == NULL:
            s = <pyu_rbd_q *>calloc(1, sizeof(pyu_rbd_q))
            if s == NULL:
                raise MemoryError()
            s.reqs = <pyu_rbd_req *>calloc(q.depth, sizeof(pyu_rbd_req))
            s.efd = eventfd(0, EFD_CLOEXEC)
            if s.reqs == NULL or s.efd < 0:
                free(s.reqs)
                free(s)
                raise OSError(_errno.ENOMEM, "rbd: cannot set up a queue's completion list")
            s.depth = q.depth
            for tag in range(q.depth):
                s.reqs[tag].q = s
                s.reqs[tag].tag = tag
            self.qs[q.q_id] = s
        self.arm(q, s)
        return 0

    cdef void arm(self, Queue q, pyu_rbd_q *s) noexcept nogil:
        cdef io_uring_sqe *sqe = q.get_sqe()
        io_uring_prep_read(sqe, s.efd, &s.efd_buf, sizeof(uint64_t), 0)
        sqe.user_data = q.target_ud(0, EFD_TGT)

    cdef int queue_io(self, Queue q, int tag, const ublksrv_io_desc *iod) noexcept nogil:
        cdef unsigned op = iod.op_flags & 0xff
        cdef uint64_t off = iod.start_sector << SECTOR_SHIFT
        cdef size_t n = <size_t>iod.nr_sectors << SECTOR_SHIFT
        cdef pyu_rbd_q *s = self.qs[q.q_id]
        cdef pyu_rbd_req *r = &s.reqs[tag]
        cdef rbd_completion_t c
        cdef int ret
        if self.read_only and op != UBLK_IO_OP_READ and op != UBLK_IO_OP_FLUSH:
            q.commit(tag, -EROFS)
            return 0
        if (op != UBLK_IO_OP_READ and op != UBLK_IO_OP_WRITE and op != UBLK_IO_OP_FLUSH
                and op != UBLK_IO_OP_DISCARD and op != UBLK_IO_OP_WRITE_ZEROES):
            q.commit(tag, -EOPNOTSUPP)
            return 0
        ret = rbd_aio_create_completion(r, <rbd_callback_t>pyu_rbd_complete, &c)
        if ret < 0:
            q.commit(tag, ret)
            return 0
        r.c = c
        if op == UBLK_IO_OP_READ:
            ret = rbd_aio_read(self.image, off, n, <char *>q.tag_buf(tag), c)
        elif op == UBLK_IO_OP_WRITE:
            # FUA: librbd's cache (on with --cache) writes this one through to the OSDs
            # before it completes; without the cache every write does anyway
            ret = rbd_aio_write2(self.image, off, n, <const char *>q.tag_buf(tag), c,
                                 LIBRADOS_OP_FLAG_FADVISE_FUA if iod.op_flags & UBLK_IO_F_FUA
                                 else 0)
        elif op == UBLK_IO_OP_FLUSH:
            ret = rbd_aio_flush(self.image, c)
        elif op == UBLK_IO_OP_DISCARD:
            ret = rbd_aio_discard(self.image, off, n, c)
        else:
            ret = rbd_aio_write_zeroes(self.image, off, n, c, 0, 0)
        if ret < 0:
            # refused before it started: librbd calls no callback for it
            rbd_aio_release(c)
            q.commit(tag, ret)
            return 0
        s.inflight += 1
        return 0

    cdef int32_t io_done(self, Queue q, int tag, uint32_t tgt_data, int32_t res) noexcept nogil:
        cdef pyu_rbd_q *s = self.qs[q.q_id]
        if tgt_data != EFD_TGT:
            return res
        if res == -ECANCELED:
            return C_RESUBMITTED      # the ring is going away
        self.reap(q, s, True)
        self.arm(q, s)
        return C_RESUBMITTED

    cdef int reap(self, Queue q, pyu_rbd_q *s, bint commit) noexcept nogil:
        """Take the queue's finished completions; commit their requests (unless the
        queue stopped serving). Returns how many."""
        cdef pyu_rbd_req *r = pyu_rbd_take(s)
        cdef pyu_rbd_req *nxt
        cdef int64_t ret
        cdef int32_t res
        cdef const ublksrv_io_desc *iod
        cdef int n = 0
        while r != NULL:
            nxt = r.next
            ret = rbd_aio_get_return_value(r.c)
            rbd_aio_release(r.c)
            r.c = NULL
            s.inflight -= 1
            n += 1
            if commit:
                iod = q.iods + r.tag
                if ret < 0:
                    # an OSD op timeout (osd_op_timeout), a lost cluster, or this
                    # client blocklisted (ESHUTDOWN: another server broke its lock): the
                    # application sees an I/O error, the log names the request
                    res = -EIO if ret == -ETIMEDOUT or ret == -ESHUTDOWN else <int32_t>ret
                elif (iod.op_flags & 0xff) == UBLK_IO_OP_READ or (iod.op_flags & 0xff) == UBLK_IO_OP_WRITE:
                    res = <int32_t>(iod.nr_sectors << SECTOR_SHIFT)
                else:
                    res = 0
                q.commit(r.tag, res)
            r = nxt
        return n

    cdef int shutdown(self, Queue q) except -1:
        """The queue stopped serving: wait (bounded) for librbd to finish what it was
        given, so no callback runs into a freed buffer; what does not finish in time
        (an OSD gone for good) leaves the image and its buffers held for good."""
        cdef pyu_rbd_q *s = self.qs[q.q_id] if self.qs != NULL else NULL
        cdef int64_t waited = 0
        if s == NULL:
            return 0
        with nogil:
            self.reap(q, s, False)
            while s.inflight > 0 and waited < SHUTDOWN_WAIT_US:
                usleep(1000)          # polling the list: librbd's threads fill it
                waited += 1000
                self.reap(q, s, False)
        if s.inflight > 0:
            log.warning("rbd: queue %d stopped with %d librbd requests still in flight; "
                        "keeping their buffers", q.q_id, s.inflight)
            self.stuck = True
            _STUCK.append((self, q._keep))
        return 0


cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned usec)

cdef int64_t SHUTDOWN_WAIT_US = 5000000
#: images (and queue buffers) librbd may still write into: never freed
_STUCK = []
