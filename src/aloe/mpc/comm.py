"""Channels between parties: message framing, validation, byte and round accounting, timeouts.

Transport: TLS 1.3 with mutual certificate authentication over TCP (:mod:`aloe.mpc.tls`, the default), or, on
loopback only and only when asked for, :mod:`multiprocessing.connection` (length-prefixed framing, HMAC challenge
authentication with a shared key); in-process queues for unit tests. All carry the same encoded messages, so
validation and accounting are identical (the byte counts are the messages', without TLS record overhead).

A message is a list of tensors, each tagged with its modulus ``m``: ``m = 0`` is a raw int64 ring element, a power of
two ``m = 2^k`` is packed at ``k`` bits per element, any other ``m`` is packed as base-``m`` digits,
``floor(64 / log2 m)`` per 64-bit word (p = 67: 10 per word, 6.4 bits each). The receiver states what it expects
(shapes and moduli); a message with a wrong magic, sequence number, count, shape, modulus, length or an out-of-range
digit is rejected with :class:`MalformedMessage`.

Rounds are counted as the depth of the message-dependency chain: a message leaves with depth ``d + 1`` where ``d`` is
its sender's depth, and receiving it raises the receiver's depth to at least that. Two parties that send to each
other at once therefore spend one round together.

Faults (TCP channels of a run, :class:`Guard`): besides messages a channel carries control frames that never reach
the protocol: a heartbeat when the channel has been idle for :func:`heartbeat_interval`, the end-of-run message, and
an abort with the reason. A channel that closes without the end-of-run message (the other party was killed or
crashed), an abort, a record that fails TLS authentication, or silence longer than the timeout (no message, no
heartbeat, no bytes: a host down, a hung process or a network partition) fails the run on this party: every wait and
send on its other channels stops at once with that error, and the party then sends its own abort on the channels
still open, so the failure reaches every party within one step.
"""

from __future__ import annotations

import functools
import math
import queue
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from aloe import AloeError
from aloe.mpc import kernels

MAGIC = b"ALMP"
_HEAD = struct.Struct("!4sIIH")  # magic, sequence number, depth, number of tensors
_TENSOR = struct.Struct("!QBQ")  # modulus, ndim, payload bytes
_DIM = struct.Struct("!I")
LENGTH_PREFIX_BYTES = 4  # what multiprocessing.connection adds to every message
# how many received bytes a connection holds before its reader stops taking more from the socket (the sender then
# blocks): the dealer never waits for L or R and would otherwise run ahead by a whole epoch of corrections
MAX_QUEUED_BYTES = 1 << 30
CONTROL = b"ALCT"  # the first bytes of a control frame (a message starts with MAGIC)
_HEARTBEAT, _BYE, _ABORT = b"H", b"B", b"A"
_OWN, _RELAYED = b"o", b"r"  # an abort for this party's own error, or one passing on another channel's failure
MAX_HEARTBEAT_INTERVAL = 5.0
DRAIN_QUIET_SECONDS = 0.5
ABORT_SEND_SECONDS = 5.0  # how long a failing party tries to deliver its abort on each channel (behind what it sent)


class ChannelError(AloeError):
    """Base class of the communication errors."""


class PartyTimeout(ChannelError):
    """A party did not send (or accept) a message within the timeout."""


class PartyDisconnected(ChannelError):
    """A party closed its connection or died."""


class MalformedMessage(ChannelError):
    """A message did not match what the protocol expects."""


class TamperedMessage(ChannelError):
    """A TLS record on a channel failed authentication (modified, replayed, reordered or dropped in transit)."""


class PartyAborted(ChannelError):
    """Another party stopped the run and sent the reason."""


def heartbeat_interval(timeout: float) -> float:
    """How long a guarded channel may stay idle before it sends a heartbeat: a quarter of the timeout, at most
    :data:`MAX_HEARTBEAT_INTERVAL` seconds."""
    return min(timeout / 4.0, MAX_HEARTBEAT_INTERVAL)


def one_line(text: str, limit: int = 800) -> str:
    return " ".join(str(text).split())[:limit]


class Guard:
    """The channels one party's run needs (to the other computing party and to the dealer). The first failure on any
    of them is kept, and every wait on the others wakes with it: the party stops at its next channel operation instead
    of waiting out its timeout."""

    def __init__(self) -> None:
        self.error: ChannelError | None = None
        self.links: list[ConnectionEndpoint] = []
        self._lock = threading.Lock()

    def add(self, ep: ConnectionEndpoint) -> None:
        self.links.append(ep)
        ep.guard = self
        ep.start_watch()

    def fail(self, exc: ChannelError) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = exc
        for ep in self.links:
            ep.inbox.put(_WAKE)

    def check(self) -> None:
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------- packing


def word_bits(m: int) -> int:
    """Base-``m`` digits are packed into 32-bit words for ``m < 2^16`` (decoded exactly with float64 arithmetic,
    much faster than 64-bit integer division; p = 67 still packs 5 per 32 bits = 6.4 bits each), else 64-bit."""
    return 32 if m < 1 << 16 else 64


def digits_per_word(m: int) -> int:
    """How many base-``m`` digits fit in one packing word (``m`` not a power of two)."""
    bits = word_bits(m)
    d = int(bits / math.log2(m))
    while m ** (d + 1) <= 1 << bits:
        d += 1
    while m**d > 1 << bits:
        d -= 1
    return d


def _is_pow2(m: int) -> bool:
    return m > 1 and m & (m - 1) == 0


@functools.lru_cache(maxsize=64)
def _digit_plan(m: int, d: int) -> tuple[int, int, int]:
    """How the decoder divides words of ``d`` base-``m`` digits by ``m`` (:func:`kernels.unpack_plan`)."""
    return kernels.unpack_plan(m, d)


def packed_nbytes(n: int, m: int) -> int:
    if m == 0:
        return 8 * n
    if _is_pow2(m):
        return (n * (m.bit_length() - 1) + 7) // 8
    return word_bits(m) // 8 * ((n + digits_per_word(m) - 1) // digits_per_word(m))


def pack(t: torch.Tensor, m: int) -> bytes:
    if m == 0:
        return t.to(torch.int64).contiguous().numpy().tobytes()
    if m == 2:
        return np.packbits(t.reshape(-1).to(torch.uint8).numpy() & 1, bitorder="little").tobytes()
    if word_bits(m) == 32 and not _is_pow2(m):
        # digits in [0, m) < 2^16, Horner's rule below m^d <= 2^32: exact, one compiled pass
        return kernels.pack_digits(t.reshape(-1).numpy(), m, digits_per_word(m)).tobytes()
    v = t.reshape(-1).to(torch.int64).numpy().view(np.uint64)
    if _is_pow2(m):
        k = m.bit_length() - 1
        if k == 1:
            return np.packbits(v.astype(np.uint8) & 1, bitorder="little").tobytes()
        bits = np.unpackbits(v.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :k]
        return np.packbits(bits.reshape(-1), bitorder="little").tobytes()
    d = digits_per_word(m)
    pad = (-v.size) % d
    if pad:
        v = np.concatenate([v, np.zeros(pad, dtype=np.uint64)])
    v = v.reshape(-1, d)
    word = np.zeros(v.shape[0], dtype=np.uint64)
    mm = np.uint64(m)
    for j in range(d - 1, -1, -1):
        word = word * mm + v[:, j]
    return word.tobytes()


def unpack(buf: memoryview, n: int, m: int, shape: tuple[int, ...]) -> torch.Tensor:
    if m == 0:
        arr = np.frombuffer(buf, dtype=np.int64, count=n).copy()
        return torch.from_numpy(arr).reshape(shape)
    if _is_pow2(m):
        k = m.bit_length() - 1
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: n * k]
        if k == 1:
            return torch.from_numpy(bits.copy()).reshape(shape)  # uint8 0/1
        else:
            bits = bits.reshape(n, k)
            full = np.zeros((n, 64), dtype=np.uint8)
            full[:, :k] = bits
            out = np.packbits(full, axis=1, bitorder="little").reshape(-1).view(np.uint64).astype(np.int64)
        return torch.from_numpy(out).reshape(shape)
    d = digits_per_word(m)
    if word_bits(m) == 32:
        small = np.int16 if m < 1 << 15 else np.int64
        out = np.empty(n, dtype=small)
        if not kernels.unpack_digits(np.frombuffer(buf, dtype=np.uint32), n, m, d, out, *_digit_plan(m, d)):
            raise MalformedMessage(f"packed word out of range for modulus {m}, or non-zero padding")
        return torch.from_numpy(out).reshape(shape)
    words = np.frombuffer(buf, dtype=np.uint64).copy()
    mm = np.uint64(m)
    digits = np.empty((words.size, d), dtype=np.uint64)
    for j in range(d):
        digits[:, j] = words % mm
        words //= mm
    if words.any():
        raise MalformedMessage(f"packed word out of range for modulus {m}")
    flat = digits.reshape(-1)
    if flat[n:].any():
        raise MalformedMessage("non-zero padding in a packed message")
    small = np.int16 if m < 1 << 15 else np.int64
    return torch.from_numpy(flat[:n].astype(small, copy=False)).reshape(shape)


def encode_message(seq: int, depth: int, items: list[tuple[torch.Tensor, int]]) -> bytes:
    heads = [_HEAD.pack(MAGIC, seq, depth, len(items))]
    payloads = []
    for t, m in items:
        body = pack(t, m)
        heads.append(_TENSOR.pack(m, t.dim(), len(body)))
        heads.extend(_DIM.pack(s) for s in t.shape)
        payloads.append(body)
    return b"".join(heads + payloads)


def decode_message(
    data: bytes, seq: int, expect: list[tuple[tuple[int, ...], int]]
) -> tuple[int, list[torch.Tensor]]:
    """Check ``data`` against the expected (shape, modulus) list; return (depth, tensors)."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise MalformedMessage(f"message of {len(view)} bytes is shorter than a header")
    magic, got_seq, depth, count = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise MalformedMessage("bad magic number")
    if got_seq != seq:
        raise MalformedMessage(f"out-of-order message: sequence {got_seq}, expected {seq}")
    if count != len(expect):
        raise MalformedMessage(f"message holds {count} tensors, expected {len(expect)}")
    off = _HEAD.size
    metas = []
    for shape, m in expect:
        if len(view) < off + _TENSOR.size:
            raise MalformedMessage("truncated tensor header")
        got_m, ndim, nbytes = _TENSOR.unpack_from(view, off)
        off += _TENSOR.size
        if len(view) < off + ndim * _DIM.size:
            raise MalformedMessage("truncated shape")
        got_shape = tuple(_DIM.unpack_from(view, off + i * _DIM.size)[0] for i in range(ndim))
        off += ndim * _DIM.size
        if got_m != m or got_shape != tuple(shape):
            raise MalformedMessage(f"got a tensor {got_shape} mod {got_m}, expected {tuple(shape)} mod {m}")
        n = math.prod(shape)
        if nbytes != packed_nbytes(n, m):
            raise MalformedMessage(f"payload of {nbytes} bytes, expected {packed_nbytes(n, m)}")
        metas.append((shape, m, n, nbytes))
    total = off + sum(meta[3] for meta in metas)
    if len(view) != total:
        raise MalformedMessage(f"message is {len(view)} bytes, expected {total} (truncated or padded)")
    out = []
    for shape, m, n, nbytes in metas:
        out.append(unpack(view[off : off + nbytes], n, m, tuple(shape)))
        off += nbytes
    return depth, out


# ---------------------------------------------------------------- accounting


@dataclass
class Counter:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0

    def copy(self) -> Counter:
        return Counter(self.bytes_sent, self.bytes_received, self.messages_sent)


@dataclass
class Stats:
    """Traffic of one party: ``online`` is the L<->R channel, ``offline`` the dealer's channels."""

    online: Counter = field(default_factory=Counter)
    offline: Counter = field(default_factory=Counter)
    depth: int = 0

    def snapshot(self) -> dict:
        return {
            "online_bytes_sent": self.online.bytes_sent,
            "online_bytes_received": self.online.bytes_received,
            "online_messages_sent": self.online.messages_sent,
            "offline_bytes_sent": self.offline.bytes_sent,
            "offline_bytes_received": self.offline.bytes_received,
            "depth": self.depth,
        }


# ---------------------------------------------------------------- endpoints


_CLOSED = object()
_WAKE = object()  # wakes a wait after another channel of the same party failed


class Endpoint:
    """One end of a bidirectional channel to one other party, carrying encoded messages in order."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name  # the other party's role, for messages
        self.timeout = timeout
        self.send_seq = 0
        self.recv_seq = 0
        self._pending: list[bytes] = []  # messages read ahead by :meth:`recv_out_of_band`
        self._skip: set[int] = set()  # sequence numbers already consumed out of band

    def _send_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    def _recv_bytes(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def send_bye(self) -> None:
        """Tell the other party this one finished its program (TCP channels of a guarded run)."""

    def wait_bye(self) -> None:
        """Wait until the other party finished too (TCP channels of a guarded run)."""

    def abort(self, error: BaseException, deadline: float | None = None) -> None:
        """Tell the other party, if the channel still works, that this one stops, and why."""

    def drain(self, deadline: float) -> None:
        """After :meth:`abort`: wait (until ``deadline``) for the other party to close its side."""

    def send(self, depth: int, items: list[tuple[torch.Tensor, int]]) -> int:
        data = encode_message(self.send_seq, depth, items)
        self.send_seq += 1
        self._send_bytes(data)
        return len(data) + LENGTH_PREFIX_BYTES

    def recv(self, expect: list[tuple[tuple[int, ...], int]]) -> tuple[int, list[torch.Tensor], int]:
        while self.recv_seq in self._skip:
            self._skip.discard(self.recv_seq)
            self.recv_seq += 1
        data = self._pending.pop(0) if self._pending else self._recv_bytes()
        depth, out = decode_message(data, self.recv_seq, expect)
        self.recv_seq += 1
        return depth, out, len(data) + LENGTH_PREFIX_BYTES

    def recv_out_of_band(self, expect: list[tuple[tuple[int, ...], int]]) -> tuple[list[torch.Tensor], int]:
        """Receive the next message matching ``expect`` while keeping the messages before it, in order, for
        :meth:`recv` (used for a barrier token that follows data the protocol has not consumed yet)."""
        while True:
            seq = self.recv_seq + len(self._pending) + len(self._skip)
            data = self._recv_bytes()
            try:
                _, out = decode_message(data, seq, expect)
            except MalformedMessage:
                self._pending.append(data)
                continue
            self._skip.add(seq)
            return out, len(data) + LENGTH_PREFIX_BYTES


class QueueEndpoint(Endpoint):
    """In-process endpoint (unit tests): a pair of queues."""

    def __init__(self, name: str, timeout: float, inbox: queue.Queue, outbox: queue.Queue) -> None:
        super().__init__(name, timeout)
        self.inbox, self.outbox = inbox, outbox

    @staticmethod
    def pair(a: str, b: str, timeout: float) -> tuple[QueueEndpoint, QueueEndpoint]:
        """Endpoints held by ``a`` (talking to ``b``) and by ``b`` (talking to ``a``)."""
        q1: queue.Queue = queue.Queue()
        q2: queue.Queue = queue.Queue()
        return QueueEndpoint(b, timeout, q1, q2), QueueEndpoint(a, timeout, q2, q1)

    def _send_bytes(self, data: bytes) -> None:
        self.outbox.put(data)

    def _recv_bytes(self) -> bytes:
        try:
            item = self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise PartyTimeout(f"no message from party {self.name} within {self.timeout:g} s") from None
        if item is _CLOSED:
            self.inbox.put(_CLOSED)
            raise PartyDisconnected(f"party {self.name} closed the connection")
        return item

    def close(self) -> None:
        self.outbox.put(_CLOSED)


class ConnectionEndpoint(Endpoint):
    """A :class:`multiprocessing.connection.Connection` (or a :class:`~aloe.mpc.tls.TLSConnection`) over TCP. A reader
    thread drains the socket into a queue (so simultaneous large sends cannot deadlock) and the receive waits on that
    queue with the timeout; sends time out through ``SO_SNDTIMEO`` when the other party stops reading. The queue holds
    at most ``max_queued`` bytes (plus one message, however large): beyond that the reader waits until the program
    takes a message, the socket fills, and a sender that runs ahead (the dealer) blocks until the receiver catches up.

    Once added to a :class:`Guard` the channel also sends heartbeats when idle, watches for silence, and reports a
    close without the end-of-run message, an abort or a tampered record to the guard."""

    def __init__(self, name: str, timeout: float, conn, sock: socket.socket,
                 max_queued: int = MAX_QUEUED_BYTES) -> None:
        super().__init__(name, timeout)
        self.max_queued = max_queued
        self._queued = 0
        self._room = threading.Condition()
        self.conn = conn
        self._sock = sock  # a dup of the connection's socket, kept to set options and shut it down
        self._send_timeout(timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # large messages should not block on a busy reader
            self._sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
        self.guard: Guard | None = None
        self._send_lock = threading.Lock()  # whole frames: the program's messages and the heartbeats
        self._last_sent = self._last_seen = time.monotonic()
        self._paused = False  # the reader waits for room: silence is then ours, not the other party's
        self._bye = threading.Event()
        self._broken = False  # a send failed part-way: nothing more may go out on this channel
        self._bye_sent = False
        self._failed = False
        self._closing = False
        self._stopped = False  # an abort arrived: the reader is done
        self.inbox: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read_loop, name=f"recv-{name}", daemon=True)
        self._reader.start()

    def _send_timeout(self, seconds: float) -> None:
        sec = int(seconds)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec,
                                                                                 int((seconds - sec) * 1e6)))

    def _fail(self, exc: ChannelError) -> None:
        """This channel failed: its error goes to its own waits and the guard, and the socket is shut down, which
        also wakes a send blocked on it (nothing more can be delivered on a dead, silent or aborted channel)."""
        if self._failed:
            return
        self._failed = True
        self.inbox.put(exc)
        if self.guard is not None:
            self._broken = True
            self.guard.fail(exc)
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _read_loop(self) -> None:
        try:
            while True:
                with self._room:
                    while self._queued > self.max_queued:
                        self._paused = True
                        self._room.wait()
                    if self._paused:
                        self._paused = False
                        self._last_seen = time.monotonic()
                data = self.conn.recv_bytes()
                self._last_seen = time.monotonic()
                if data[:4] == CONTROL:
                    if self._control(data):
                        return
                    continue
                with self._room:
                    self._queued += len(data)
                self.inbox.put(data)
        except ssl.SSLError as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            self._fail(TamperedMessage(f"channel from party {self.name}: a record failed TLS authentication, "
                                       f"modified or replayed in transit: {reason}"))
        except (EOFError, OSError) as exc:
            if self._bye.is_set() or self._closing or self.guard is None:
                how = "finished and closed" if self._bye.is_set() else "closed"
                self.inbox.put(PartyDisconnected(f"party {self.name} {how} the connection "
                                                 f"({one_line(str(exc) or type(exc).__name__)})"))
            else:
                self._fail(PartyDisconnected(
                    f"party {self.name} closed the connection mid-run without the end-of-run message (the process "
                    "was killed, crashed or restarted)"))

    def _control(self, data: bytes) -> bool:
        """Handle a control frame; True when the reader is done (an abort)."""
        kind = data[4:5]
        if kind == _BYE:
            self._bye.set()
        elif kind == _ABORT:
            text = one_line(data[6:].decode(errors="replace"))
            if data[5:6] == _RELAYED:
                err = PartyAborted(f"{text} (reported by party {self.name})")
            else:
                err = PartyAborted(f"party {self.name} stopped the run: {text}")
            self._stopped = True
            self._fail(err)
            return True
        return False

    # ------------------------------------------------------------ heartbeats and silence
    def start_watch(self) -> None:
        threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True).start()

    def _watch(self) -> None:
        every = heartbeat_interval(self.timeout)
        while True:
            time.sleep(every / 2)
            if self._closing or self._stopped or self._broken or (self.guard and self.guard.error):
                return
            now = time.monotonic()
            # heartbeats until this side's end-of-run message is out; silence is watched until the other side's
            if not self._bye_sent and now - self._last_sent >= every and self._send_lock.acquire(blocking=False):
                try:
                    self.conn.send_bytes(CONTROL + _HEARTBEAT)
                    self._last_sent = now
                except (OSError, ValueError):
                    self._broken = True
                finally:
                    self._send_lock.release()
            seen = max(self._last_seen, getattr(self.conn, "last_recv", 0.0))
            if not self._paused and not self._bye.is_set() and time.monotonic() - seen > self.timeout:
                self._fail(PartyTimeout(
                    f"no message or heartbeat from party {self.name} for {self.timeout:g} s (its host is down, the "
                    "process hangs, or the network is partitioned)"))
                return

    # ------------------------------------------------------------ messages
    def _send_bytes(self, data: bytes) -> None:
        if self.guard is not None:
            self.guard.check()
        with self._send_lock:
            if self._broken:
                raise PartyTimeout(f"party {self.name} stopped reading for {self.timeout:g} s")
            try:
                self.conn.send_bytes(data)
            except BlockingIOError:
                self._broken = True
                err = PartyTimeout(f"party {self.name} stopped reading for {self.timeout:g} s")
                if self.guard is not None:
                    self._fail(err)
                raise err from None
            except OSError as exc:
                self._broken = True
                if self.guard is not None:
                    self._reader.join(1.0)  # the reader names the cause (a close without the end-of-run message)
                    self.guard.check()
                raise PartyDisconnected(f"party {self.name} closed the connection ({exc})") from None
            self._last_sent = time.monotonic()

    def _recv_bytes(self) -> bytes:
        if self.guard is not None:
            self.guard.check()
        try:
            item = self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            err = PartyTimeout(f"no message from party {self.name} within {self.timeout:g} s")
            if self.guard is not None:
                self._fail(err)
            raise err from None
        if item is _WAKE:
            self.guard.check()
            raise PartyDisconnected(f"channel from party {self.name} woken without a failure")
        if isinstance(item, ChannelError):
            self.inbox.put(item)
            raise item
        with self._room:
            self._queued -= len(item)
            self._room.notify()
        return item

    # ------------------------------------------------------------ end of run
    def send_bye(self) -> None:
        if self.guard is None:
            return
        self.guard.check()
        with self._send_lock:
            try:
                self.conn.send_bytes(CONTROL + _BYE)
                self._bye_sent = True
            except OSError:
                self._broken = True
                self._reader.join(1.0)
                self.guard.check()
                raise PartyDisconnected(f"party {self.name} closed the connection before the end of the run") \
                    from None

    def wait_bye(self) -> None:
        """Wait (as long as the other party shows signs of life) until it has finished too."""
        if self.guard is None:
            return
        while not self._bye.wait(0.1):
            self.guard.check()
            if not self._reader.is_alive() and not self._bye.is_set():
                self.guard.check()
                raise PartyDisconnected(f"party {self.name} closed the connection before the end of the run")

    def abort(self, error: BaseException, deadline: float | None = None) -> None:
        """Send the abort (waiting at most until ``deadline`` for room behind what was sent before), then end this
        side of the stream: closing with the other party's bytes unread would reset the connection and drop the
        abort still in the socket's buffer."""
        if self.guard is None or self._broken or self._closing or self._stopped:
            return
        if deadline is None:
            deadline = time.monotonic() + ABORT_SEND_SECONDS
        if isinstance(error, ChannelError):
            kind, text = _RELAYED, str(error)
        else:
            kind = _OWN
            text = str(error) if isinstance(error, AloeError) else f"{type(error).__name__}: {error}"
        if not self._send_lock.acquire(timeout=max(0.05, deadline - time.monotonic())):
            return
        try:
            self._send_timeout(max(0.05, deadline - time.monotonic()))
            self.conn.send_bytes(CONTROL + _ABORT + kind + one_line(text).encode())
            self._sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass
        finally:
            self._broken = True
            self._send_lock.release()

    def drain(self, deadline: float) -> None:
        """After an abort: keep reading while the other party still sends, until it closes (or sends its own abort),
        at most until ``deadline``, so the abort reaches it before the connection closes. A channel that failed, whose
        other side has finished (it sends nothing more) or that stays quiet for :data:`DRAIN_QUIET_SECONDS` has
        nothing to drain."""
        if self.guard is None or self._failed or self._bye.is_set():
            return
        start = time.monotonic()
        while self._reader.is_alive() and time.monotonic() < deadline:
            self._reader.join(0.05)
            seen = max(self._last_seen, getattr(self.conn, "last_recv", 0.0), start)
            if time.monotonic() - seen > DRAIN_QUIET_SECONDS:
                return

    def close(self) -> None:
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self.conn.close()
