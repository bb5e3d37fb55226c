"""The transport contract on the real kernel (the simulated driver runs the same checks in
tests/conformance/test_transport_contract.py)."""
import pytest

from kernel_fixtures import kt  # noqa: F401  (fixture)
from transport_contract import CHECKS


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_contract(kt, tmp_path, check):  # noqa: F811
    CHECKS[check](kt, str(tmp_path))
