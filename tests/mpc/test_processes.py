"""The three-process path: real OS processes over TCP on loopback, including faults."""

import json
import os
import time

import pytest
import torch

from aloe import AloeError
from aloe.cli import main
from aloe.mpc.party import run_processes


def test_cli_bench_runs_three_processes(capsys):
    assert main(["mpc", "bench", "--op", "relu", "--shape", "6x7", "--reps", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parties"] == "processes" and out["op"] == "relu"
    assert out["rounds"] == 5
    assert out["max_abs_error"] < 1e-3
    assert 1000 < out["online_bits_per_element"] < 1300  # small tensors pay message frames too
    assert out["offline_bits_per_element"] > 800


def test_cli_rejects_bad_shape(capsys):
    assert main(["mpc", "bench", "--op", "matmul", "--shape", "3x4,5x6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aloe: error:")


def _dies(party):
    if party.role == "R":
        os._exit(3)
    if party.role == "L":
        party.exchange([(torch.zeros(2, dtype=torch.int64), 0)])
    return None


def _stalls(party):
    if party.role == "R":
        time.sleep(60)
    if party.role == "L":
        party.exchange([(torch.zeros(2, dtype=torch.int64), 0)])
    return None


def test_a_dead_party_stops_the_others_with_a_clear_error():
    t0 = time.monotonic()
    with pytest.raises(AloeError, match="R: party R died|closed the connection"):
        run_processes(_dies, timeout=5.0)
    assert time.monotonic() - t0 < 60


def test_a_stalled_party_times_out():
    t0 = time.monotonic()
    with pytest.raises(AloeError, match="no message from party R within 2 s"):
        run_processes(_stalls, timeout=2.0)
    assert time.monotonic() - t0 < 60
