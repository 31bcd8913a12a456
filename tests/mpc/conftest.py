"""Compile (or load from numba's cache) the MPC kernels once per session, before any party thread needs them: a cold
compile inside a test would count against the parties' channel timeouts."""

import pytest

from aloe.mpc import kernels


@pytest.fixture(scope="session", autouse=True)
def _compiled_kernels():
    kernels.warm_up()
