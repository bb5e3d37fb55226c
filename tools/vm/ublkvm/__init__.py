"""Helpers of the real-kernel test lane (``tools/vm/ublk_vm.py``).

One module per job: ``config`` (settings from the environment), ``apt`` (private
apt for Debian sid/trixie), ``kernel`` (fetch + extract + depmod), ``initramfs``
(cpio writer, module closure, guest /init), ``console`` (warning detection, tail),
``allowlist`` (known upstream kernel reports), ``qemu`` (boot a guest, stream its
console, clean up).  Python stdlib only.
"""

EXIT_TIMEOUT = 124
"""The guest did not finish within the timeout (hang)."""
EXIT_GUEST_FAILURE = 125
"""The guest ended without reporting CMD's status (panic, oops, boot failure)."""
EXIT_LANE_UNAVAILABLE = 126
"""The runner could not prepare or start the guest (no kernel, no qemu...)."""
EXIT_KERNEL_WARNING = 123
"""CMD passed but the kernel warned, and ``--fail-on-warning`` was given."""
EXIT_INTERRUPTED = 130
"""The runner got SIGINT/SIGTERM/SIGHUP."""


class LaneError(Exception):
    """The lane cannot be set up; the message says what failed and what to do."""
