# The wire between a server queue and the simulated driver: what the SQE command
# area carries on a real kernel, here in shared memory plus one MSG_RING word.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t, int64_t

# A queue has one slot per tag, then BATCH_SLOTS (queue.pxd) for its BATCH_IO commands:
# slot depth + k carries the queue's batch command k.
cdef struct SimCmd:
    uint32_t cmd_op          # UBLK_U_IO_* (ioctl-encoded)
    int32_t result           # COMMIT result
    uint64_t addr            # buffer address (copy path) or fixed-buffer index; batch: sqe->addr
                             # (the elements; FETCH_IO_CMDS: the queue's provided buffer ring)
    uint64_t user_data       # user_data of the server's command: the driver completes it with this
    int32_t ring_fd          # the server ring that "submitted" the command
    uint16_t nr_elem         # struct ublk_batch_io's nr_elem, flags, elem_bytes
    uint16_t flags
    uint8_t elem_bytes
    uint8_t multishot        # IORING_URING_CMD_MULTISHOT was set
    uint16_t br_entries      # FETCH_IO_CMDS: entries of the buffer ring at addr
    uint8_t skip_success     # IOSQE_CQE_SKIP_SUCCESS: complete only with -errno
    uint8_t pad[3]

cdef enum:
    # Message kinds in bits 60-63 of a MSG_RING user_data sent to the driver ring.
    SIM_MSG_SHIFT = 60
    SIM_MSG_SERVER = 1       # low bits: queue index << 16 | tag
    SIM_MSG_FRONT = 2        # low bits: request index
    SIM_MSG_CONTROL = 3      # wake-up: control requests are waiting
    SIM_MSG_OWN = 4          # the driver's own MSG_RING SQEs (only failures post CQEs)

cdef inline uint64_t sim_msg(uint64_t kind, uint64_t low) noexcept nogil:
    return (kind << SIM_MSG_SHIFT) | low
