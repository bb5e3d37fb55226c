"""The transport contract: what `Device` needs from a ublk driver, and nothing more.

A transport is a control plane (the commands of ``/dev/ublk-control``), a server
side (one `QueueEndpoint` per queue: the descriptor array and the `Channel` that
carries the queue's commands) and a user side (the block device). Two implement it:
`KernelTransport` (a real kernel) and `SimTransport` (the in-process simulated
driver). A third one plugs in by subclassing `Transport` and providing a Channel
(see docs/architecture.md). The same contract tests run on both
(tests/conformance/test_transport_contract.py on the host, tests/kernel/ in the VM).

Errors are OSErrors with the kernel's errnos; a feature the driver lacks is
refused with EOPNOTSUPP and a message naming what brings it.
"""
from __future__ import annotations

import abc
import dataclasses
import errno
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .. import uapi
from ..errors import os_error


class RequestLimits(NamedTuple):
    """The request limits SET_PARAMS' DMA_ALIGN and SEGMENT parts carry, in the driver's
    terms. A part whose fields are all None is not sent; a SEGMENT field left None while
    another is set takes the value the queue has without the part (SEGMENT_DEFAULTS)."""

    #: DMA_ALIGN: a mask, buffers aligned to dma_alignment + 1 bytes (0 means the block
    #: layer's default 511)
    dma_alignment: int | None = None
    #: SEGMENT: no segment crosses a multiple of seg_boundary_mask + 1 bytes
    seg_boundary_mask: int | None = None
    #: SEGMENT: bytes of one segment at most
    max_segment_size: int | None = None
    #: SEGMENT: segments of one request at most (0 means the block layer's default 128)
    max_segments: int | None = None

    @property
    def types(self) -> int:
        """The UBLK_PARAM_TYPE_* bits of the parts it sends."""
        return (uapi.UBLK_PARAM_TYPE_DMA_ALIGN if self.dma_alignment is not None else 0) | \
            (uapi.UBLK_PARAM_TYPE_SEGMENT if self.segment() is not None else 0)

    def segment(self) -> tuple[int, int, int] | None:
        """(seg_boundary_mask, max_segment_size, max_segments) of the SEGMENT part, or None."""
        fields = (self.seg_boundary_mask, self.max_segment_size, self.max_segments)
        if all(f is None for f in fields):
            return None
        return tuple(SEGMENT_DEFAULTS[i] if f is None else f    # type: ignore[return-value]
                     for i, f in enumerate(fields))

    def encode(self, params: np.ndarray) -> None:
        """Write the parts into a uapi.PARAMS_DTYPE record and add their type bits."""
        if self.dma_alignment is not None:
            params["dma"]["alignment"] = self.dma_alignment
        seg = self.segment()
        if seg is not None:
            for name, value in zip(("seg_boundary_mask", "max_segment_size", "max_segments"), seg):
                params["seg"][name] = value
        params["types"] |= self.types


#: What the block queue of a ublk device has without a SEGMENT part: (seg_boundary_mask,
#: max_segment_size, max_segments), the block layer's boundary and the driver's sizes.
SEGMENT_DEFAULTS = (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFF)
#: Its DMA alignment mask without a DMA_ALIGN part (the driver's).
DMA_ALIGNMENT_DEFAULT = 3
#: The limits Transport.queue_limits reports, named as in /sys/block/ublkbN/queue/.
QUEUE_LIMITS = ("dma_alignment", "max_segments", "max_segment_size")


@dataclass(frozen=True)
class DevInfo:
    """A device as its driver reports it (GET_DEV_INFO plus the basic parameters)."""

    dev_id: int
    nr_hw_queues: int
    queue_depth: int
    state: int                        #: uapi.UBLK_S_DEV_* (DEAD, LIVE, QUIESCED, FAIL_IO)
    max_io_buf_bytes: int
    flags: int                        #: the UBLK_F_* bits the device was granted
    size: int                         #: bytes (0 before SET_PARAMS)
    logical_block_size: int
    attrs: int                        #: UBLK_ATTR_* of the basic parameters
    started: bool                     #: the block device exists
    server_alive: bool                #: a server process (or, simulated, a server) holds it
    pid: int = 0                      #: the serving process (kernel; 0 on the simulator)
    owner_uid: int = 0
    owner_gid: int = 0
    block_path: str = ""              #: /dev/ublkbN (kernel), "sim:ublkbN" (simulated: use open())
    inflight: int | None = None       #: requests the driver holds (simulator only)

    @property
    def state_name(self) -> str:
        try:
            return uapi.DevState(self.state).name
        except ValueError:
            return str(self.state)

    @property
    def features(self) -> list[str]:
        """Names of the granted UBLK_F_* flags."""
        return uapi.feature_names(self.flags)

    def as_dict(self) -> dict[str, Any]:
        """Every field and derived name, for JSON output."""
        out = dataclasses.asdict(self)
        out.update(state_name=self.state_name, features=self.features)
        return out


@dataclass(frozen=True)
class QueueEndpoint:
    """What one queue's server needs: the driver's descriptor array for the queue and
    the Channel (a Cython object of ``pyublk_fast._core``) its commands go through."""

    q_id: int
    iods: Any                          #: numpy uint8 view of depth * 24 bytes (read-only)
    channel: Any                       #: a pyublk_fast._core.queue.Channel


class Transport(abc.ABC):
    """A ublk driver as `Device` uses it. Methods mirror the control commands."""

    #: "kernel" or "sim": used in messages.
    name: str = ""

    # -- lifecycle of the transport itself
    @abc.abstractmethod
    def close(self) -> None:
        """Release everything this transport holds (devices stay unless deleted)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control plane
    @abc.abstractmethod
    def features(self) -> int:
        """UBLK_F_* bits the driver supports (GET_FEATURES)."""

    @abc.abstractmethod
    def add_dev(self, dev_id: int, nr_queues: int, depth: int, max_io_bytes: int,
                flags: int) -> tuple[int, int]:
        """ADD_DEV (dev_id -1: the driver picks); returns (dev_id, granted flags).

        nr_queues beyond the CPU count is cut to it by the kernel, which the simulator
        models; read the real count back from dev_info()."""

    @abc.abstractmethod
    def set_params(self, dev_id: int, size: int, block_size: int, attrs: int = 0,
                   max_sectors: int = 0, discard: bool = True,
                   limits: RequestLimits | None = None) -> None:
        """SET_PARAMS: basic part, plus the discard part (DISCARD/WRITE_ZEROES) if discard
        and the parts of limits. A refused SET_PARAMS leaves the device without parameters
        (START_DEV then fails with EINVAL), as the kernel does."""

    @abc.abstractmethod
    def start_dev(self, dev_id: int, timeout: float = 10.0) -> None:
        """START_DEV, once every tag of every queue has a FETCH outstanding."""

    @abc.abstractmethod
    def stop_dev(self, dev_id: int) -> None:
        """STOP_DEV: the block device goes away, the queues' commands are aborted."""

    @abc.abstractmethod
    def try_stop_dev(self, dev_id: int) -> None:
        """TRY_STOP_DEV (UBLK_F_SAFE_STOP_DEV, Linux 7.0+): STOP_DEV unless the block device
        is open (a mount holds it open too): then EBUSY, and the device serves on. A device
        without a block device (not started, or stopped) is ENODEV."""

    @abc.abstractmethod
    def del_dev(self, dev_id: int, timeout: float = 10.0) -> None:
        """Release the server side, then DEL_DEV."""

    @abc.abstractmethod
    def release(self, dev_id: int) -> None:
        """Close the server side (/dev/ublkcN): what the driver sees when a server dies."""

    @abc.abstractmethod
    def start_user_recovery(self, dev_id: int) -> None:
        """START_USER_RECOVERY (device added with a recovery mode, its server gone)."""

    @abc.abstractmethod
    def end_user_recovery(self, dev_id: int, timeout: float = 10.0) -> None:
        """END_USER_RECOVERY, once every tag has a FETCH again."""

    @abc.abstractmethod
    def quiesce_dev(self, dev_id: int) -> None:
        """QUIESCE_DEV (UBLK_F_QUIESCE, Linux 6.16+): new I/O waits, the queues' fetches
        are aborted so the server can exit; recover onto a new server afterwards."""

    @abc.abstractmethod
    def update_size(self, dev_id: int, sectors: int) -> None:
        """UPDATE_SIZE (UBLK_F_UPDATE_SIZE, Linux 6.16+): the block device's capacity becomes
        ``sectors`` at once, in any state, whatever flags the device was added with (the
        kernel neither checks them nor refuses a smaller size: keeping the data behind it is
        the caller's business); ENODEV without a block device (not started, or stopped)."""

    def reg_buf(self, dev_id: int, addr: int, length: int, read_only: bool = False) -> int:
        """REG_BUF (UBLK_F_SHMEM_ZC, Linux 7.1+): register ``length`` bytes of memory at
        ``addr`` in this process, shared with the device's users (a memfd or hugetlbfs
        mapping); returns its index. A request whose data lies wholly in it arrives
        flagged UBLK_IO_F_SHMEM_ZC, its descriptor's addr = index << 32 | offset, and the
        driver copies nothing. ``read_only`` pins without write access (a write-sealed
        memfd): the server then only serves writes from it."""
        raise os_error(errno.EOPNOTSUPP, "REG_BUF", f"the {self.name} transport has no "
                       "shared-memory zero copy")

    def unreg_buf(self, dev_id: int, index: int) -> None:
        """UNREG_BUF: forget buffer ``index``; once it returns, no request points into it."""
        raise os_error(errno.EOPNOTSUPP, "UNREG_BUF", f"the {self.name} transport has no "
                       "shared-memory zero copy")

    @abc.abstractmethod
    def dev_info(self, dev_id: int) -> DevInfo:
        """GET_DEV_INFO plus the basic parameters."""

    @abc.abstractmethod
    def list_devs(self) -> list[int]:
        """Ids of the devices the driver has."""

    # -- server side
    @abc.abstractmethod
    def queue_endpoint(self, dev_id: int, q_id: int) -> QueueEndpoint:
        """The endpoint of queue q_id; call it in the thread that will serve the queue."""

    # -- user side
    @abc.abstractmethod
    def block_path(self, dev_id: int) -> str:
        """The block device's name (a path on a kernel)."""

    @abc.abstractmethod
    def queue_limits(self, dev_id: int) -> dict[str, int]:
        """The started device's block queue limits, as /sys/block/ublkbN/queue/ has them:
        dma_alignment (a mask), max_segments, max_segment_size."""

    @abc.abstractmethod
    def open(self, dev_id: int):
        """The block device, opened: pread/pwrite/flush/discard/write_zeroes/close."""
