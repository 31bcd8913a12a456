"""The three parties and how they are launched: two computing parties L and R and the dealer D (RS in the paper).

Every party runs the same program (a function ``program(party, *args)``); protocol code branches on
``party.role``. The dealer runs the offline half of each protocol (it draws the same PRF streams and sends correction
terms) and never receives data shares, so it runs ahead of L and R and its messages add no online rounds.

Two launchers: :func:`run_local` (three threads, in-process queues; unit tests) and :func:`run_processes` (three
OS processes talking over TCP on loopback with :mod:`multiprocessing.connection`). A party that fails closes its
connections, so the others stop with :class:`~aloe.mpc.comm.PartyDisconnected` instead of hanging; a party that
stalls makes the others raise :class:`~aloe.mpc.comm.PartyTimeout` after ``timeout`` seconds.

Over TCP (:func:`run_party`) a run ends for all three parties together: each party that finishes its program sends
the end-of-run message on its channels and waits for the others' before it returns, so a party that is killed,
stalls or is cut off at any point, even after the dealer has sent all its material, fails the run everywhere
(:class:`~aloe.mpc.comm.Guard`: at once on a closed connection or an abort, after ``timeout`` seconds of silence).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aloe import AloeError
from aloe.mpc.comm import (
    ABORT_SEND_SECONDS,
    ConnectionEndpoint,
    Endpoint,
    Guard,
    PartyDisconnected,
    PartyTimeout,
    QueueEndpoint,
    Stats,
)
from aloe.mpc.dealer import KEY_BYTES, PRG, epoch_key, new_key, small_mod
from aloe.mpc.ring import DEFAULT_FRAC_BITS, FixedPoint
from aloe.mpc.tls import CA_FILE, CERT_ROLE, PLAIN_PREAMBLE, Credentials, TLSConnection, is_loopback, write_bundle

ROLES = ("L", "R", "D")
DEFAULT_TIMEOUT = 60.0
# why a party finds nobody to connect to: L and R stop listening once all parties are connected, so a party restarted
# during a run finds no listener, and the others stop on its old process's death
REJOIN = ("a party cannot rejoin a run already under way: after a restart, start all three again, with resume = true "
          "to continue from the last checkpoint")


class Party:
    """One party's view: its role, its channels, its PRF streams and its traffic counters."""

    def __init__(self, role: str, fp: FixedPoint, peer: Endpoint | None, dealer: dict[str, Endpoint]) -> None:
        if role not in ROLES:
            raise AloeError(f"unknown party role {role!r}")
        self.role = role
        self.fp = fp
        self.peer = peer  # L <-> R
        self.dealer_links = dealer  # on L/R: {"D": ep}; on D: {"L": ep, "R": ep}
        self.stats = Stats()
        self.prg: dict[str, PRG] = {}
        self.keys: dict[str, bytes] = {}  # the PRF keys behind ``prg``: the dealer holds both, L and R their own
        self.owner_links: dict[str, Endpoint] = {}  # on L/R: channels from the data owners (``aloe mpc share``)

    # ------------------------------------------------------------ roles
    @property
    def is_dealer(self) -> bool:
        return self.role == "D"

    @property
    def index(self) -> int:
        """0 for L, 1 for R (the share index); -1 for the dealer."""
        return {"L": 0, "R": 1, "D": -1}[self.role]

    # ------------------------------------------------------------ set-up
    def setup_keys(self) -> None:
        """The dealer draws one key per computing party and sends it; each party seeds its PRF stream."""
        if self.is_dealer:
            for who in ("L", "R"):
                key = new_key()
                self.keys[who] = key
                self.prg[who] = PRG(key)
                self._dealer_send(who, [(torch.tensor(list(key), dtype=torch.int64), 256)])
        else:
            (key,) = self._dealer_recv([((KEY_BYTES,), 256)])
            self.keys[self.role] = bytes(key.tolist())
            self.prg[self.role] = PRG(self.keys[self.role])

    def rekey(self, epoch: int) -> None:
        """Draw from here on from the streams of ``epoch`` (:func:`~aloe.mpc.dealer.epoch_key` of each key)."""
        for who, key in self.keys.items():
            self.prg[who] = PRG(epoch_key(key, epoch))

    def _links(self) -> list[Endpoint]:
        return [ep for ep in [self.peer, *self.dealer_links.values()] if ep is not None]

    def finish(self) -> None:
        """The end of a run: tell the others this party finished, and wait until they have too (a party that fails
        meanwhile fails this one's run as well)."""
        for ep in self._links():
            ep.send_bye()
        for ep in self._links():
            ep.wait_bye()

    def close(self, error: BaseException | None = None) -> None:
        """Close the channels; after a failure first tell the others why (where a channel still works, waiting at
        most ``ABORT_SEND_SECONDS`` in all for the aborts to go out)."""
        links = self._links()
        if error is not None:
            deadline = time.monotonic() + ABORT_SEND_SECONDS
            for ep in links:
                try:
                    ep.abort(error, deadline)
                except Exception:  # noqa: BLE001 - closing after a failure must not mask it
                    pass
            for ep in links:
                ep.drain(deadline)
        for ep in links:
            try:
                ep.close()
            except Exception:  # noqa: BLE001 - closing after a failure must not mask it
                pass

    # ------------------------------------------------------------ online channel (L <-> R)
    def send_peer(self, items: list[tuple[torch.Tensor, int]]) -> None:
        n = self.peer.send(self.stats.depth + 1, items)
        self.stats.online.bytes_sent += n
        self.stats.online.messages_sent += 1

    def recv_peer(self, expect: list[tuple[tuple[int, ...], int]]) -> list[torch.Tensor]:
        depth, out, n = self.peer.recv(expect)
        self.stats.online.bytes_received += n
        self.stats.depth = max(self.stats.depth, depth)
        return out

    def exchange(self, items: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """Send ``items`` to the other computing party and receive its tensors of the same shapes (one round)."""
        self.send_peer(items)
        return self.recv_peer([(tuple(t.shape), m) for t, m in items])

    def sync(self) -> None:
        """A barrier between L and R (one round, two 8-byte payloads); the dealer does nothing. Afterwards both
        parties' round counters equal the larger of the two, so rounds after the barrier are counted from a common
        start."""
        if not self.is_dealer:
            mine = self.stats.depth
            (other,) = self.exchange([(torch.tensor([mine]), 0)])
            self.stats.depth = max(mine, int(other[0]))

    def dealer_sync(self) -> None:
        """A barrier of all three parties: L and R tell the dealer they are ready, the dealer answers both (used by
        benchmarks to start the dealer together with the computing parties; its bytes count as offline)."""
        token = [(torch.zeros(1, dtype=torch.int64), 2)]
        if self.is_dealer:
            for who in ("L", "R"):
                _, _, n = self.dealer_links[who].recv([((1,), 2)])
                self.stats.offline.bytes_received += n
            for who in ("L", "R"):
                self._dealer_send(who, token)
        else:
            n = self.dealer_links["D"].send(0, token)
            self.stats.offline.bytes_sent += n
            _, n = self.dealer_links["D"].recv_out_of_band([((1,), 2)])
            self.stats.offline.bytes_received += n

    # ------------------------------------------------------------ dealer channels (offline)
    def _dealer_send(self, to: str, items: list[tuple[torch.Tensor, int]]) -> None:
        n = self.dealer_links[to].send(0, items)
        self.stats.offline.bytes_sent += n
        self.stats.offline.messages_sent += 1

    def _dealer_recv(self, expect: list[tuple[tuple[int, ...], int]]) -> list[torch.Tensor]:
        _, out, n = self.dealer_links["D"].recv(expect)
        self.stats.offline.bytes_received += n
        return out

    def draw(self, owner: str, shape: tuple[int, ...], m: int = 0, *, nonzero: bool = False) -> torch.Tensor | None:
        """A value from ``owner``'s PRF stream: known to ``owner`` and the dealer, ``None`` for the other party.

        ``m = 0``: uniform in Z_2^64; ``m = 2``: bits; otherwise uniform in Z_m (or Z_m \\ {0} with ``nonzero``)."""
        if self.role != owner and not self.is_dealer:
            return None
        prg = self.prg[owner]
        shape = tuple(shape)
        if m == 0:
            return prg.int64(shape)
        if m == 2:
            return prg.bits(shape)
        return prg.nonzero_below(shape, m) if nonzero else prg.below(shape, m)

    def give(self, to: str, value: torch.Tensor | None, shape: tuple[int, ...], m: int = 0) -> torch.Tensor | None:
        """The dealer sends ``value`` (mod ``m``) to party ``to``; returns it on ``to``, ``None`` elsewhere."""
        if self.is_dealer:
            self._dealer_send(to, [(value, m)])
            return None
        if self.role != to:
            return None
        (out,) = self._dealer_recv([(tuple(shape), m)])
        return out

    def split(self, secret: torch.Tensor | None, shape: tuple[int, ...], m: int = 0, seeded: str = "L") -> Any:
        """Share a value the dealer computed: the ``seeded`` party draws its share from its stream, the dealer sends
        the other party the correction ``secret - share`` (mod ``m``; XOR for ``m = 2``). Returns the party's share,
        ``None`` on the dealer."""
        other = "R" if seeded == "L" else "L"
        shape = tuple(shape)
        if self.role == seeded:
            return self.draw(seeded, shape, m)
        if self.is_dealer:
            mine = self.draw(seeded, shape, m)
            if m == 0:
                corr = secret - mine
            elif m == 2:
                corr = secret ^ mine
            elif m < 1 << 14:
                corr = small_mod(secret.to(torch.int16) - mine.to(torch.int16), m)
            else:
                corr = (secret - mine) % m
            self._dealer_send(other, [(corr, m)])
            return None
        (corr,) = self._dealer_recv([(shape, m)])
        return corr


# ---------------------------------------------------------------- in-process launcher


def _run_party(party: Party, program: Callable, args: tuple, out: dict, lock: threading.Lock) -> None:
    try:
        party.setup_keys()
        result = program(party, *args)
        with lock:
            out[party.role] = ("ok", result, party.stats)
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher
        with lock:
            out[party.role] = ("error", exc, party.stats)
        party.close()


def run_local(
    program: Callable,
    *args: Any,
    frac_bits: int = DEFAULT_FRAC_BITS,
    timeout: float = DEFAULT_TIMEOUT,
    return_stats: bool = False,
) -> dict[str, Any]:
    """Run ``program(party, *args)`` as three threads (L, R, dealer) joined by in-process queues.

    Returns ``{role: result}`` (and ``{role: Stats}`` too with ``return_stats``); re-raises the root-cause error of a
    failing party (a non-channel error first)."""
    fp = FixedPoint(frac_bits)
    lr_l, lr_r = QueueEndpoint.pair("L", "R", timeout)
    dl_d, dl_l = QueueEndpoint.pair("D", "L", timeout)
    dr_d, dr_r = QueueEndpoint.pair("D", "R", timeout)
    parties = [
        Party("L", fp, lr_l, {"D": dl_l}),
        Party("R", fp, lr_r, {"D": dr_r}),
        Party("D", fp, None, {"L": dl_d, "R": dr_d}),
    ]
    out: dict = {}
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_run_party, args=(p, program, args, out, lock), daemon=True) for p in parties
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10 * timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise PartyTimeout("a party did not finish")
    errors = [v[1] for v in out.values() if v[0] == "error"]
    if errors:
        root = [e for e in errors if not isinstance(e, PartyDisconnected | PartyTimeout)]
        raise (root or errors)[0]
    results = {role: out[role][1] for role in ROLES}
    if return_stats:
        return results, {role: out[role][2] for role in ROLES}
    return results


# ---------------------------------------------------------------- multi-process launcher (TCP)


def _listen(host: str) -> socket.socket:
    srv = socket.create_server((host, 0))
    return srv


@dataclass(frozen=True)
class Security:
    """How a party's channels are protected: TLS with ``creds`` (the default everywhere), or, only with an explicit
    ``--insecure-loopback`` and only on loopback addresses, plain TCP authenticated by an HMAC challenge with
    ``authkey``."""

    creds: Credentials | None = None
    authkey: bytes | None = None

    @property
    def tls(self) -> bool:
        return self.creds is not None

    def __post_init__(self) -> None:
        if (self.creds is None) == (self.authkey is None):
            raise AloeError("a party needs either TLS credentials or (with --insecure-loopback) a shared key")

    def check_address(self, host: str, what: str) -> None:
        if not self.tls and not is_loopback(host):
            raise AloeError(f"--insecure-loopback allows plain channels on loopback addresses only, not {what} "
                            f"{host}")


def _timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel-level send/receive timeouts (0 = none); unlike ``settimeout`` they keep the socket blocking, which
    the raw reads and writes of the connections need."""
    sec = int(seconds)
    val = struct.pack("ll", sec, int((seconds - sec) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, val)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, val)


def _authenticate(sock: socket.socket, sec: Security, server: bool, timeout: float, peer: str) -> tuple:
    """Secure one accepted or connected socket; returns (connection, socket, role named by the peer's certificate
    or ``None`` on a plain channel). ``peer`` describes the other side for messages."""
    sock.settimeout(None)
    _timeouts(sock, timeout)
    try:
        if sec.tls:
            if server:
                first = sock.recv(len(PLAIN_PREAMBLE), socket.MSG_PEEK)
                if first[:1] != b"\x16":  # not a TLS handshake record
                    what = "a plain channel (--insecure-loopback)" if first[:4] == PLAIN_PREAMBLE[:4] else \
                        "something that is not TLS"
                    raise AloeError(f"{peer} opened {what}; this party accepts TLS only")
            conn = TLSConnection(sock, sec.creds.context(server), server)
            try:
                conn.handshake()
            except (ssl.SSLError, EOFError, ConnectionError) as exc:
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                if isinstance(exc, ssl.SSLCertVerificationError):
                    reason = f"certificate verify failed: {exc.verify_message}"
                hint = "" if server else " (does it run without TLS, or with another deployment's certificates?)"
                raise AloeError(f"TLS handshake with {peer} failed: {reason}{hint}") from None
            result = conn, sock, conn.peer_role()
        else:
            conn = mpc.Connection(os.dup(sock.fileno()))
            if server:
                first = conn._recv(len(PLAIN_PREAMBLE)).getvalue()
                if first != PLAIN_PREAMBLE:
                    what = "a TLS channel" if first[:1] == b"\x16" else "an unknown protocol"
                    raise AloeError(f"{peer} opened {what}; this party runs with --insecure-loopback (plain)")
                mpc.deliver_challenge(conn, sec.authkey)
                mpc.answer_challenge(conn, sec.authkey)
            else:
                conn._send(PLAIN_PREAMBLE)
                mpc.answer_challenge(conn, sec.authkey)
                mpc.deliver_challenge(conn, sec.authkey)
            result = conn, sock, None
    except (BlockingIOError, TimeoutError):
        sock.close()
        raise PartyTimeout(f"authentication with {peer} did not finish within {timeout:g} s") from None
    except mpc.AuthenticationError as exc:
        sock.close()
        raise AloeError(f"party authentication with {peer} failed: {exc}") from None
    except (EOFError, ConnectionError) as exc:
        sock.close()
        hint = "" if server else " (does it require TLS?)"
        raise AloeError(f"{peer} closed the connection during authentication{hint}: "
                        f"{exc or type(exc).__name__}") from None
    except BaseException:
        sock.close()
        raise
    _timeouts(sock, 0.0)
    return result


def _accept(srv: socket.socket, sec: Security, timeout: float) -> tuple:
    srv.settimeout(timeout)
    try:
        sock, addr = srv.accept()
    except TimeoutError:
        raise PartyTimeout(f"no party connected within {timeout:g} s (are the others running? {REJOIN})") from None
    return _authenticate(sock, sec, True, timeout, f"the party connecting from {addr[0]}")


def _connect(addr: tuple[str, int], sec: Security, timeout: float, expect: str) -> tuple:
    """Connect to party ``expect`` at ``addr`` (retrying until it listens) and check its certificate names it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(addr, timeout=timeout)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise PartyTimeout(f"could not connect to party {expect} at {addr[0]}:{addr[1]} within {timeout:g} s "
                                   f"(is it running? {REJOIN})") from None
            time.sleep(0.05)
    cs = _authenticate(sock, sec, False, timeout, f"party {expect} at {addr[0]}:{addr[1]}")
    if sec.tls and cs[2] != CERT_ROLE.get(expect, expect):
        cs[0].close()
        raise AloeError(f"the party at {addr[0]}:{addr[1]} presented a certificate for {cs[2]!r}, expected "
                        f"{CERT_ROLE.get(expect, expect)!r}; refused")
    return cs


def _hello(conn, role: str) -> None:
    conn.send_bytes(role.encode())


def _who(cs: tuple, allowed: set[str], timeout: float) -> str:
    conn, _, cert_role = cs
    if not conn.poll(timeout):
        raise PartyTimeout(f"a connected party did not say who it is within {timeout:g} s")
    who = conn.recv_bytes(64).decode(errors="replace")
    if who not in allowed:
        conn.close()
        raise AloeError(f"unexpected party {who!r} connected (expected one of {sorted(allowed)})")
    if cert_role is not None and cert_role != CERT_ROLE.get(who, who):
        conn.close()
        raise AloeError(f"a party claiming to be {who} presented a certificate for {cert_role!r}; refused")
    return who


def _endpoint(cs: tuple, name: str, timeout: float) -> ConnectionEndpoint:
    conn, sock, _ = cs
    return ConnectionEndpoint(name, timeout, conn, sock)


def connect(role: str, sec: Security, timeout: float, *, frac_bits: int = DEFAULT_FRAC_BITS,
            listen: socket.socket | None = None, addr_l=None, addr_r=None, announce=None,
            owners: tuple[str, ...] = ()) -> Party:
    """Open this party's channels and return its :class:`Party` (keys not yet set up).

    L listens (for R and the dealer), R connects to L and listens (for the dealer), the dealer connects to both.
    ``listen`` is the listening socket of L or R; ``addr_l``/``addr_r`` are the addresses to connect to, or
    callables returning them (the local launcher learns them only after L and R have bound). ``announce`` is called
    with the bound address once listening."""
    links: dict[str, ConnectionEndpoint] = {}
    if role in ("L", "R") and announce is not None:
        announce(listen.getsockname()[:2])
    resolve = (lambda a: a() if callable(a) else a)  # noqa: E731
    clients = {"L": {"R", "D"}, "R": {"D"}}.get(role, set()) | set(owners)
    if role == "R":
        cs = _connect(tuple(resolve(addr_l)), sec, timeout, "L")
        _hello(cs[0], "R")
        links["L"] = _endpoint(cs, "L", timeout)
    if role in ("L", "R"):
        try:
            while clients - set(links):
                cs = _accept(listen, sec, timeout)
                who = _who(cs, clients - set(links), timeout)
                links[who] = _endpoint(cs, who, timeout)
        finally:
            listen.close()
    else:
        for who, addr in (("L", resolve(addr_l)), ("R", resolve(addr_r))):
            cs = _connect(tuple(addr), sec, timeout, who)
            _hello(cs[0], "D")
            links[who] = _endpoint(cs, who, timeout)
    fp = FixedPoint(frac_bits)
    guard = Guard()
    for who in ("L", "R", "D"):
        if who in links:
            guard.add(links[who])
    if role == "D":
        return Party("D", fp, None, {"L": links["L"], "R": links["R"]})
    other = "R" if role == "L" else "L"
    party = Party(role, fp, links[other], {"D": links["D"]})
    party.owner_links = {name: links[name] for name in owners}
    return party


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc's malloc.h)


def tune_allocator() -> bool:
    """Keep freed memory in this process for reuse instead of returning it to the kernel (glibc only; a no-op
    elsewhere). The protocols allocate and free many tensors of tens of megabytes per round; glibc serves each from
    a fresh ``mmap`` whose pages the kernel must zero on first touch, which cost about a third of a party's time.
    Called once in each party process; returns whether the setting took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


def run_party(role: str, sec: Security, program: Callable, args: tuple, *, listen: socket.socket | None = None,
              addr_l=None, addr_r=None, announce=None, owners: tuple[str, ...] = (),
              frac_bits: int = DEFAULT_FRAC_BITS, timeout: float = DEFAULT_TIMEOUT) -> tuple[Any, dict]:
    """Run this process as party ``role``: open its channels, set up the PRF keys, run ``program(party, *args)``.
    The one path every launcher takes (``aloe mpc party`` on each host, and the local launcher's three processes).
    Returns (result, traffic snapshot) once all three parties have finished; on a failure the party tells the others
    why, where a channel still works, and closes its channels, so they stop too."""
    tune_allocator()
    party = None
    failure = None
    try:
        party = connect(role, sec, timeout, frac_bits=frac_bits, listen=listen, addr_l=addr_l, addr_r=addr_r,
                        announce=announce, owners=owners)
        party.setup_keys()
        result = program(party, *args)
        party.finish()
        return result, party.stats.snapshot()
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if party is not None:
            party.close(failure)


def _process_main(role: str, ctrl: mpc.Connection, sec: Security, program: Callable, args: tuple,
                  frac_bits: int, timeout: float, host: str) -> None:
    torch.set_num_threads(1)
    try:
        if role == "D":
            addrs = ctrl.recv()
            kw = {"addr_l": addrs[0], "addr_r": addrs[1]}
        else:
            kw = {"listen": _listen(host), "addr_l": ctrl.recv if role == "R" else None,
                  "announce": lambda addr: ctrl.send(("addr", addr))}
        result, stats = run_party(role, sec, program, args, frac_bits=frac_bits, timeout=timeout, **kw)
        ctrl.send(("ok", result, stats))
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, then exit non-zero
        msg = str(exc) if isinstance(exc, AloeError) else f"{type(exc).__name__}: {exc}"
        try:
            ctrl.send(("error", msg, type(exc).__name__, traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)


def bundle_security(role: str, certs: str | Path) -> Security:
    """Party ``role``'s TLS credentials from a bundle written by ``aloe mpc certs``."""
    if not Path(certs, CA_FILE).is_file():
        raise AloeError(f"{certs} holds no certificate bundle ({CA_FILE} missing; see `aloe mpc certs`)")
    return Security(creds=Credentials.from_bundle(certs, CERT_ROLE.get(role, role)))


def run_processes(
    program: Callable,
    *args: Any,
    frac_bits: int = DEFAULT_FRAC_BITS,
    timeout: float = DEFAULT_TIMEOUT,
    host: str = "127.0.0.1",
    return_stats: bool = False,
    certs: str | Path | None = None,
    insecure_loopback: bool = False,
) -> dict[str, Any]:
    """Run ``program(party, *args)`` in three OS processes (L, R, dealer) connected over TCP on ``host``.

    The channels are TLS with the bundle in ``certs`` (written by ``aloe mpc certs``), or, without one, with a fresh
    bundle in a private temporary directory removed afterwards; ``insecure_loopback`` makes them plain TCP with an
    HMAC challenge (loopback only). ``program`` and ``args`` must be picklable (a module-level function). Raises
    :class:`AloeError` with every party's error if any party fails; a party that neither finishes nor fails within
    ``timeout`` after another party's failure is terminated."""
    if insecure_loopback:
        if certs is not None:
            raise AloeError("--insecure-loopback and a certificate directory exclude each other")
        key = secrets.token_bytes(32)
        secs = {role: Security(authkey=key) for role in ROLES}
        secs["L"].check_address(host, "host")
        return _run_processes(program, args, secs, frac_bits, timeout, host, return_stats)
    if certs is not None:
        secs = {role: bundle_security(role, certs) for role in ROLES}
        return _run_processes(program, args, secs, frac_bits, timeout, host, return_stats)
    with tempfile.TemporaryDirectory(prefix="aloe-mpc-certs-") as tmp:  # created with mode 0700
        bundle = Path(tmp) / "certs"
        write_bundle(bundle)
        secs = {role: bundle_security(role, bundle) for role in ROLES}
        return _run_processes(program, args, secs, frac_bits, timeout, host, return_stats)


def _run_processes(program: Callable, args: tuple, secs: dict[str, Security], frac_bits: int, timeout: float,
                   host: str, return_stats: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ctrls, procs = {}, {}
    for role in ROLES:
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=_process_main,
            args=(role, child, secs[role], program, args, frac_bits, timeout, host),
            name=f"aloe-mpc-{role}",
            daemon=True,
        )
        p.start()
        child.close()
        ctrls[role], procs[role] = parent, p
    results: dict[str, Any] = {}
    try:
        start_wait = 30.0 + timeout  # interpreter start-up (torch import) on a busy machine
        addrs = {}
        for role in ("L", "R"):
            if not ctrls[role].poll(start_wait):
                raise PartyTimeout(f"party {role} did not start within {start_wait:g} s")
            msg = ctrls[role].recv()
            if msg[0] != "addr":
                raise AloeError(f"party {role} failed during start-up: {msg[1]}")
            addrs[role] = msg[1]
        ctrls["R"].send(addrs["L"])
        ctrls["D"].send((addrs["L"], addrs["R"]))
        pending = set(ROLES)
        errors: dict[str, str] = {}
        deadline = None
        while pending:
            ready = mpc.wait([ctrls[r] for r in pending], timeout=1.0)
            for conn in ready:
                role = next(r for r in pending if ctrls[r] is conn)
                pending.discard(role)
                try:
                    msg = conn.recv()
                except EOFError:
                    errors[role] = f"party {role} exited (code {procs[role].exitcode}) without a result"
                    continue
                if msg[0] == "ok":
                    results[role] = (msg[1], msg[2])
                else:
                    errors[role] = msg[1]
            for role in list(pending):
                if not procs[role].is_alive() and not ctrls[role].poll():
                    pending.discard(role)
                    errors[role] = f"party {role} died (exit code {procs[role].exitcode})"
            if errors and deadline is None:
                deadline = time.monotonic() + timeout + 5.0
            if deadline is not None and time.monotonic() > deadline:
                for role in pending:
                    errors[role] = f"party {role} did not stop within {timeout:g} s after a failure; terminated"
                break
        if errors:
            order = sorted(errors, key=lambda r: ("closed the connection" in errors[r], r))
            raise AloeError("; ".join(f"{r}: {errors[r]}" for r in order))
    finally:
        for p in procs.values():
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()  # also ends a stopped (SIGSTOP) or hung process
                p.join(timeout=2.0)
        for c in ctrls.values():
            c.close()
    out = {role: results[role][0] for role in ROLES}
    if return_stats:
        return out, {role: results[role][1] for role in ROLES}
    return out
