import queue
import time

import numpy as np
import pytest
import torch

from aloe.mpc import comm
from aloe.mpc.dealer import PRG, new_key
from aloe.mpc.party import run_local
from aloe.mpc.ring import FixedPoint, OverflowRisk, check_encodable, overflow_risk, truncate_share, wrap_int

torch.set_num_threads(1)
BIG = 2**63


def rand64(*shape):
    return torch.randint(-BIG, BIG - 1, shape, dtype=torch.int64)


def test_int64_tensors_are_the_ring_z2_64_exactly():
    a, b = rand64(4, 5), rand64(5, 3)
    c = a @ b
    for i in range(4):
        for j in range(3):
            assert int(c[i, j]) == wrap_int(sum(int(a[i, k]) * int(b[k, j]) for k in range(5)))
    x, w = rand64(1, 1, 4, 4), rand64(2, 1, 2, 2)
    y = torch.nn.functional.conv2d(x, w)
    exact = wrap_int(sum(int(x[0, 0, a_, b_]) * int(w[1, 0, a_, b_]) for a_ in range(2) for b_ in range(2)))
    assert int(y[0, 1, 0, 0]) == exact
    s = a[0] + a[1]
    assert [int(v) for v in s] == [wrap_int(int(p) + int(q)) for p, q in zip(a[0], a[1], strict=True)]


def test_encoding_round_trip_and_range_checks():
    fp = FixedPoint(14)
    x = torch.tensor([0.0, -1.5, 3.14159, -1000.25, 2.0**30])
    assert (fp.decode(fp.encode(x)) - x).abs().max() <= 2**-15
    with pytest.raises(OverflowRisk):
        check_encodable(torch.tensor([2.0**40]), fp)
    with pytest.raises(OverflowRisk):
        fp.encode(torch.tensor([float("nan")]))
    rep = overflow_risk(torch.tensor([2.0**35]), fp)
    assert rep["at_risk"] and rep["headroom_bits"] < 0
    assert not overflow_risk(torch.tensor([100.0]), fp)["at_risk"]
    with pytest.raises(Exception, match="fractional bits"):
        FixedPoint(40)


def test_local_truncation_error_is_one_ulp_on_many_random_splits():
    fp = FixedPoint(14)
    x = torch.randn(20000, dtype=torch.float64) * 1000
    prod = fp.encode(x) * fp.scale  # 2f fractional bits
    r = rand64(20000)
    t = truncate_share(prod - r, 14, 0) + truncate_share(r, 14, 1)
    err = (t - fp.encode(x)).abs()
    # wrap failures happen with probability ~|x| 2^28 / 2^63 ~ 2^-25 per element: none expected here
    assert int(err.max()) <= 1


@pytest.mark.parametrize("m", [0, 2, 64, 67, 37, 3, 2**19, 1000003])
def test_pack_unpack_round_trip(m):
    shape = (7, 13)
    t = rand64(*shape) if m == 0 else torch.randint(0, m, shape)
    data = comm.encode_message(5, 9, [(t, m)])
    depth, (back,) = comm.decode_message(data, 5, [(shape, m)])
    assert depth == 9 and torch.equal(back.to(torch.int64), t)
    if m == 67:
        assert len(comm.pack(t, m)) == 4 * ((91 + 4) // 5)  # 5 values per 32-bit word: 6.4 bits each


def test_malformed_and_truncated_messages_are_rejected():
    t = torch.randint(0, 67, (5, 4))
    good = comm.encode_message(0, 1, [(t, 67)])
    spec = [((5, 4), 67)]
    comm.decode_message(good, 0, spec)
    bad_cases = {
        "truncated": good[:-3],
        "padded": good + b"\0",
        "magic": b"XXXX" + good[4:],
        "empty": b"",
    }
    for name, data in bad_cases.items():
        with pytest.raises(comm.MalformedMessage):
            comm.decode_message(data, 0, spec)
        assert name
    with pytest.raises(comm.MalformedMessage, match="out-of-order"):
        comm.decode_message(good, 1, spec)
    with pytest.raises(comm.MalformedMessage, match="expected"):
        comm.decode_message(good, 0, [((4, 5), 67)])
    with pytest.raises(comm.MalformedMessage):
        comm.decode_message(good, 0, [((5, 4), 0)])
    # a word whose digits exceed the modulus range
    head = good[: len(good) - len(comm.pack(t, 67))]
    words = np.full(4, np.iinfo(np.uint32).max, dtype=np.uint32).tobytes()
    with pytest.raises(comm.MalformedMessage, match="out of range"):
        comm.decode_message(head + words, 0, spec)


def test_prg_is_keyed_and_uniform():
    k = new_key()
    a, b = PRG(k), PRG(k)
    assert torch.equal(a.int64((100,)), b.int64((100,)))
    assert not torch.equal(PRG(new_key()).int64((100,)), PRG(new_key()).int64((100,)))
    v = a.below((67000,), 67)
    counts = torch.bincount(v.long(), minlength=67).double()
    assert v.min() >= 0 and v.max() < 67
    assert ((counts - 1000).abs() < 200).all()
    nz = a.nonzero_below((5000,), 67)
    assert nz.min() >= 1 and nz.max() <= 66
    bits = a.bits((10000,))
    assert 0.45 < bits.double().mean() < 0.55


def test_a_stalled_party_makes_the_others_time_out():
    def program(party):
        if party.role == "R":
            time.sleep(3.0)
            return None
        if party.role == "L":
            party.exchange([(torch.zeros(3, dtype=torch.int64), 0)])
        return None

    t0 = time.monotonic()
    with pytest.raises(comm.PartyTimeout, match="within 1 s"):
        run_local(program, timeout=1.0)
    assert time.monotonic() - t0 < 8


def test_a_failing_party_stops_the_others_with_its_error():
    def program(party):
        if party.role == "R":
            raise RuntimeError("R crashed")
        if party.role == "L":
            party.exchange([(torch.zeros(3, dtype=torch.int64), 0)])
        return None

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="R crashed"):
        run_local(program, timeout=20.0)
    assert time.monotonic() - t0 < 5


def test_queue_endpoint_reports_closed_peer():
    a, b = comm.QueueEndpoint.pair("L", "R", 1.0)
    b.close()
    with pytest.raises(comm.PartyDisconnected):
        a.recv([((1,), 0)])
    assert isinstance(a.inbox, queue.Queue)


@pytest.mark.parametrize("m", [2, 3, 66, 67, 131, 255, 256])
def test_small_mod_is_exact_on_its_whole_range(m):
    from aloe.mpc.dealer import small_mod

    v = torch.arange(-m * m, 2**16 - m * m, dtype=torch.int32)
    got = small_mod(v, m)
    assert torch.equal(got.to(torch.int64), torch.remainder(v.to(torch.int64), m))


@pytest.mark.parametrize("m", [3, 29, 37, 67, 131, 255, 1000, 32749, 65521])
def test_packed_words_are_base_m_digits_little_endian(m):
    """The wire format of the uint32 packing is ``sum_j v_j m^j`` per word of ``d`` digits (zero padded), whatever
    the implementation; checked against Python integers, with every digit value, 0 and m - 1 at every position."""
    d = comm.digits_per_word(m)
    t = torch.cat([torch.arange(m) % m, torch.full((d,), m - 1), torch.zeros(d), torch.randint(0, m, (101,))])
    t = t.to(torch.int16 if m < 1 << 15 else torch.int64)
    words = np.frombuffer(comm.pack(t, m), dtype=np.uint32)
    vals = [int(v) for v in t] + [0] * ((-t.numel()) % d)
    expect = [sum(vals[k * d + j] * m**j for j in range(d)) for k in range(len(vals) // d)]
    assert words.tolist() == expect
    back = comm.unpack(memoryview(comm.pack(t, m)), t.numel(), m, (t.numel(),))
    assert torch.equal(back.to(torch.int64), t.to(torch.int64))
    bad = np.array(expect[:1] + [m**d], dtype=np.uint64)
    if m**d < 2**32:  # a word at m^d encodes a digit past the last one: refused
        with pytest.raises(comm.MalformedMessage):
            comm.unpack(memoryview(bad.astype(np.uint32).tobytes()), 2 * d, m, (2 * d,))


def test_a_connection_holds_a_bounded_backlog_and_the_sender_waits():
    """A sender far ahead of its receiver (the dealer) is held back once the receiver holds ``max_queued`` bytes,
    then every message arrives, in order, as the receiver catches up."""
    import socket
    import threading
    from multiprocessing.connection import Connection

    with socket.create_server(("127.0.0.1", 0)) as server:
        sa = socket.create_connection(server.getsockname())
        sb, _ = server.accept()
    sender = comm.ConnectionEndpoint("R", 30.0, Connection(sa.dup().detach()), sa)
    receiver = comm.ConnectionEndpoint("D", 30.0, Connection(sb.dup().detach()), sb, max_queued=4 << 20)
    payload = [(torch.full((1 << 17,), i, dtype=torch.int64), 0) for i in range(80)]  # 80 messages of 1 MiB
    done = threading.Event()

    def send_all():
        for item in payload:
            sender.send(0, [item])
        done.set()

    t = threading.Thread(target=send_all, daemon=True)
    t.start()
    time.sleep(1.0)
    assert not done.is_set()  # held back: the receiver holds about 4 MiB, the sockets a little more
    assert receiver._queued <= (4 << 20) + (1 << 20) + 4096
    for i in range(80):
        _, (v,), _ = receiver.recv([((1 << 17,), 0)])
        assert int(v[0]) == i and int(v[-1]) == i
    t.join(10)
    assert done.is_set()
    sender.close()
    receiver.close()
