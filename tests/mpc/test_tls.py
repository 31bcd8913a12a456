"""TLS on the parties' channels: the certificate bundle, role checks, foreign CAs, plain peers, tampering."""

import socket
import stat
import threading

import pytest
import torch

from aloe import AloeError
from aloe.cli import main
from aloe.mpc import party as P
from aloe.mpc.comm import TamperedMessage
from aloe.mpc.tls import Credentials, write_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls") / "certs"
    write_bundle(d, ["alice"])
    return d


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls") / "other"
    write_bundle(d)
    return d


def tls(bundle, role):
    return P.Security(creds=Credentials.from_bundle(bundle, role))


def pair(server_sec, client_sec, client_role="R", expect="L", allowed=("R", "D"), via=None):
    """Server L accepts one party; the client connects as ``client_role`` expecting ``expect``. Returns
    (server endpoint or error, client endpoint or error)."""
    srv = socket.create_server(("127.0.0.1", 0))
    addr = srv.getsockname()[:2]
    out = {}

    def serve():
        try:
            cs = P._accept(srv, server_sec, 10.0)
            who = P._who(cs, set(allowed), 10.0)
            out["server"] = P._endpoint(cs, who, 10.0)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            out["server"] = exc
        finally:
            srv.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        cs = P._connect(via(addr) if via else addr, client_sec, 10.0, expect)
        P._hello(cs[0], client_role)
        out["client"] = P._endpoint(cs, expect, 10.0)
    except Exception as exc:  # noqa: BLE001 - inspected by the test
        out["client"] = exc
    t.join(20)
    return out["server"], out["client"]


def _close(*eps):
    for ep in eps:
        if not isinstance(ep, Exception):
            ep.close()


def test_bundle_files_modes_and_no_overwrite(bundle, capsys):
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted(["ca.pem"] + [f"{r}.{e}" for r in ("L", "R", "dealer", "owner-alice")
                                         for e in ("pem", "key")])
    assert all(stat.S_IMODE((bundle / f"{r}.key").stat().st_mode) == 0o600 for r in ("L", "R", "dealer"))
    assert "PRIVATE KEY" not in (bundle / "ca.pem").read_text()  # the CA key is not kept
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    assert main(["mpc", "certs", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    assert not [p for p in bundle.parent.iterdir() if ".tmp-" in p.name]  # nothing half-written beside it


def test_mutual_tls_carries_messages(bundle):
    server, client = pair(tls(bundle, "L"), tls(bundle, "R"))
    assert server.name == "R"
    x = torch.arange(300_000, dtype=torch.int64) * 7919
    client.send(0, [(x, 0)])
    _, (y,), _ = server.recv([((300_000,), 0)])
    assert torch.equal(x, y)
    _close(server, client)


def test_another_roles_certificate_is_refused(bundle):
    # a party that says it is the dealer but holds R's certificate
    server, client = pair(tls(bundle, "L"), tls(bundle, "R"), client_role="D")
    assert isinstance(server, AloeError) and "claiming to be D presented a certificate for 'R'" in str(server)
    _close(client)
    # the server side holds the dealer's certificate where R expects L
    server, client = pair(tls(bundle, "dealer"), tls(bundle, "R"))
    assert isinstance(client, AloeError) and "certificate for 'dealer', expected 'L'" in str(client)
    _close(server)
    # a data owner's certificate does not admit it as a computing party
    server, client = pair(tls(bundle, "L"), tls(bundle, "owner-alice"), client_role="owner-alice")
    assert isinstance(server, AloeError) and "unexpected party 'owner-alice'" in str(server)
    _close(client)


def test_a_foreign_ca_is_refused(bundle, foreign):
    server, client = pair(tls(bundle, "L"), tls(foreign, "R"))
    assert isinstance(server, AloeError) and "TLS handshake" in str(server)
    assert isinstance(client, AloeError)
    server, client = pair(tls(foreign, "L"), tls(bundle, "R"))
    assert isinstance(client, AloeError) and "TLS handshake with party L" in str(client)
    assert "certificate verify failed" in str(client)
    _close(server)


def test_plain_client_against_tls_server_fails_with_one_line(bundle):
    plain = P.Security(authkey=b"k" * 32)
    server, client = pair(tls(bundle, "L"), plain)
    assert isinstance(server, AloeError) and "opened a plain channel" in str(server) and "TLS only" in str(server)
    assert isinstance(client, AloeError) and "\n" not in str(client)
    assert "closed the connection during authentication (does it require TLS?)" in str(client)
    # and the other way round: a TLS client against a plain server
    server, client = pair(plain, tls(bundle, "R"))
    assert isinstance(server, AloeError) and "opened a TLS channel" in str(server)
    assert isinstance(client, AloeError) and "\n" not in str(client)


def test_plain_channels_only_on_loopback():
    with pytest.raises(AloeError, match="loopback addresses only"):
        P.run_processes(_noop, host="0.0.0.0", insecure_loopback=True)


def _noop(party):
    return None


class Proxy:
    """A TCP relay that can replay or corrupt the next TLS record going from the client to the server."""

    def __init__(self, target):
        self.target = target
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.action = None
        self.last = b""
        self.forwarded = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def addr(self, _target=None):
        return self.srv.getsockname()[:2]

    def _run(self):
        a, _ = self.srv.accept()
        b = socket.create_connection(self.target)
        threading.Thread(target=self._pump_back, args=(b, a), daemon=True).start()
        try:
            self._relay(a, b)
        except OSError:   # a side hung up mid-relay (the server refusing a record closes its end): the relay is over
            pass
        finally:
            b.close()

    def _relay(self, a, b):
        buf = b""
        while data := a.recv(65536):
            buf += data
            while len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big"):
                n = 5 + int.from_bytes(buf[3:5], "big")
                rec, buf = buf[:n], buf[n:]
                if rec[0] == 0x17 and self.action == "replay":
                    b.sendall(self.last)
                    self.action = None
                elif rec[0] == 0x17 and self.action == "flip":
                    rec = rec[:-1] + bytes([rec[-1] ^ 1])
                    self.action = None
                b.sendall(rec)
                self.last = rec
                self.forwarded.set()

    @staticmethod
    def _pump_back(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:   # a side hung up: the relay is over
            pass
        finally:
            dst.close()


@pytest.mark.parametrize("action", ["replay", "flip"])
def test_a_replayed_or_modified_record_is_refused(bundle, action):
    srv_probe = socket.create_server(("127.0.0.1", 0))  # reserve the server's address for the relay's target
    target = srv_probe.getsockname()[:2]
    srv_probe.close()
    proxy = Proxy(target)

    def via(addr):
        proxy.target = addr
        return proxy.addr()

    server, client = pair(tls(bundle, "L"), tls(bundle, "R"), via=via)
    msg = [(torch.arange(10, dtype=torch.int64), 0)]
    client.send(0, msg)
    _, (got,), _ = server.recv([((10,), 0)])
    assert torch.equal(got, msg[0][0])
    proxy.action = action
    client.send(0, msg)
    with pytest.raises(TamperedMessage, match="failed TLS authentication"):
        server.recv([((10,), 0)])
    _close(server, client)


def test_message_layer_refuses_a_replayed_message():
    # beneath TLS the message layer numbers every message: a copy of an earlier one is out of order
    from aloe.mpc.comm import MalformedMessage, QueueEndpoint

    a, b = QueueEndpoint.pair("L", "R", 1.0)
    a.send(0, [(torch.zeros(3, dtype=torch.int64), 0)])
    data = b.inbox.get()
    b.inbox.put(data)
    b.inbox.put(data)  # replayed
    b.recv([((3,), 0)])
    with pytest.raises(MalformedMessage, match="out-of-order message: sequence 0, expected 1"):
        b.recv([((3,), 0)])
