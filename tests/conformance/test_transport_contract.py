"""The transport contract on the simulated driver (the kernel runs the same checks in
tests/kernel/test_kernel_contract.py)."""
import pytest

from transport_contract import CHECKS


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_contract(sim, tmp_path, check):
    CHECKS[check](sim, str(tmp_path))
