"""Faults on the TCP channels: a party that dies after the dealer has finished, a party that hangs (no heartbeat),
an abort that names its cause; every party fails the run with one line."""

import os
import re
import signal
import time

import pytest
import torch

from aloe import AloeError
from aloe.mpc.comm import heartbeat_interval
from aloe.mpc.party import run_processes

TIMEOUT = 3.0


def _r_dies_after_the_dealer_is_done(party):
    if party.role == "D":
        return "dealer done"
    party.exchange([(torch.zeros(2, dtype=torch.int64), 0)])
    if party.role == "R":
        time.sleep(0.5)
        os._exit(3)
    party.exchange([(torch.zeros(2, dtype=torch.int64), 0)])
    return None


def _r_hangs(party):
    if party.role == "R":
        os.kill(os.getpid(), signal.SIGSTOP)  # every thread stops: no messages, no heartbeats
    if party.role == "L":
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


def test_a_hung_party_stops_the_others_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(AloeError) as err:
        run_processes(_r_hangs, timeout=TIMEOUT)
    elapsed = time.monotonic() - t0
    errs = _errors(err.value)
    assert "no message from party R within 3 s" in errs["L"] or "no message or heartbeat from party R" in errs["L"]
    # the dealer had nothing more to send: it waited for the end of the run and saw R fall silent
    assert "party R for 3 s" in errs["D"] or "(reported by party L)" in errs["D"], errs
    assert elapsed < 30.0 + TIMEOUT + heartbeat_interval(TIMEOUT) + 15.0


def test_an_abort_names_the_failing_party_and_its_reason():
    with pytest.raises(AloeError) as err:
        run_processes(_l_fails, timeout=20.0)
    errs = _errors(err.value)
    assert errs["L"] == "L's own data is missing"
    assert errs["R"] == errs["D"] == "party L stopped the run: L's own data is missing"
