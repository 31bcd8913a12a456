"""Faults on the TCP channels: a party that dies after the dealer has finished, an abort that names its cause; every
party fails the run. A party that falls silent (a partition) is tested in ``test_netns_faults.py``."""

import os
import re
import time

import pytest
import torch

from aloe import AloeError
from aloe.mpc.party import run_processes


def _r_dies_after_the_dealer_is_done(party):
    if party.role == "D":
        return "dealer done"
    party.exchange([(torch.zeros(2, dtype=torch.int64), 0)])
    if party.role == "R":
        time.sleep(0.5)
        os._exit(3)
    party.exchange([(torch.zeros(2, dtype=torch.int64), 0)])
    return None


def _l_fails(party):
    if party.role == "L":
        raise AloeError("L's own data is missing")
    if party.role == "R":
        party.exchange([(torch.zeros(2, dtype=torch.int64), 0)])
    return None


def _errors(exc: AloeError) -> dict:
    return dict(part.split(": ", 1) for part in re.split(r"; (?=[LRD]: )", str(exc)))


def test_a_party_dying_after_the_dealer_finished_fails_the_dealer_too():
    t0 = time.monotonic()
    with pytest.raises(AloeError) as err:
        run_processes(_r_dies_after_the_dealer_is_done, timeout=20.0)
    assert time.monotonic() - t0 < 20.0  # a closed connection is seen at once, not after the timeout
    errs = _errors(err.value)
    assert set(errs) == {"L", "R", "D"}, errs
    for role in ("L", "D"):
        assert errs[role].startswith("party R closed the connection mid-run without the end-of-run message"), errs


def test_an_abort_names_the_failing_party_and_its_reason():
    with pytest.raises(AloeError) as err:
        run_processes(_l_fails, timeout=20.0)
    errs = _errors(err.value)
    assert errs["L"] == "L's own data is missing"
    stopped = "party L stopped the run: L's own data is missing"
    # each of the others hears it from L, or first from the other one, which passes it on
    assert errs["R"] in (stopped, stopped + " (reported by party D)"), errs["R"]
    assert errs["D"] in (stopped, stopped + " (reported by party R)"), errs["D"]
    assert not (errs["R"] != stopped and errs["D"] != stopped), "neither heard it from L"
