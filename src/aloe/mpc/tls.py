"""TLS for the parties' channels: a per-deployment CA, one certificate per role, mutual authentication.

``aloe mpc certs DIR`` writes a bundle: ``ca.pem`` (the deployment's CA certificate; its private key is used once to
sign the role certificates and then discarded) and, per role, ``ROLE.pem`` + ``ROLE.key`` (mode 0600). The roles
are ``L``, ``R``, ``dealer`` and one ``owner-NAME`` per data owner. Each certificate's subject common name is its
role; a party checks, after the handshake, that the peer's certificate names the role it expects on that channel, so
a certificate of another role (signed by the same CA) is refused, and one from another CA fails the handshake.

A channel is TLS 1.3 over TCP driven through memory BIOs (:class:`ssl.SSLObject`): one thread reads while another
writes, each holding the TLS state only for the in-memory step, never during socket I/O, so a large send and a large
receive proceed at once (the channel's reader thread needs that) without sharing an ``SSLSocket`` between threads.
Messages are framed by a 4-byte length inside the encrypted stream. TLS authenticates and orders every record, so a
modified, dropped, reordered or replayed record ends the channel with an error; the message layer's sequence numbers
stay in place beneath it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aloe import AloeError

CERT_ROLE = {"L": "L", "R": "R", "D": "dealer"}  # party role -> the role its certificate names
CA_FILE = "ca.pem"
VALID_DAYS = 825
PLAIN_PREAMBLE = b"ALMPPLN1"  # what a plain (--insecure-loopback) client sends first
_LEN = struct.Struct("!I")
_CHUNK = 1 << 20


def owner_role(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 32:
        raise AloeError(f"bad data-owner name {name!r} (letters, digits, '-' and '_', at most 32)")
    return f"owner-{name}"


# ---------------------------------------------------------------- the bundle


def _name(cn: str, deployment: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"aloe mpc deployment {deployment}"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_bundle(out: Path, owners: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Write a fresh CA and one key + certificate per role into ``out`` (which must not exist, or be an empty
    directory): built in a private temporary directory beside it, then renamed into place. Returns the roles."""
    out = Path(out)
    roles = ["L", "R", "dealer", *(owner_role(o) for o in owners)]
    if len(set(roles)) != len(roles):
        raise AloeError("data-owner names must be distinct")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AloeError(f"{out} exists and is not empty (certificates are never overwritten)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise AloeError(f"directory {parent} does not exist")
    deployment = secrets.token_hex(8)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"aloe mpc CA {deployment}", deployment)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        _write(tmp / CA_FILE, ca.public_bytes(serialization.Encoding.PEM), 0o644)
        for role in roles:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (x509.CertificateBuilder().subject_name(_name(role, deployment)).issuer_name(ca_name)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(start).not_valid_after(end)
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                          ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                   critical=False)
                    .sign(ca_key, hashes.SHA256()))
            _write(tmp / f"{role}.key", _pem_key(key), 0o600)
            _write(tmp / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        os.chmod(tmp, 0o700)
        if out.exists():
            out.rmdir()  # empty (checked above); the rename below then puts the bundle in its place
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return roles


@dataclass(frozen=True)
class Credentials:
    """What one party needs for TLS: the deployment CA, its own certificate and key, and the role it names."""

    ca: str
    cert: str
    key: str
    role: str  # the certificate role: L, R, dealer, owner-NAME

    @classmethod
    def from_bundle(cls, bundle: str | Path, role: str) -> Credentials:
        b = Path(bundle)
        return cls(str(b / CA_FILE), str(b / f"{role}.pem"), str(b / f"{role}.key"), role)

    def context(self, server: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # parties are named by role, not host: checked by :func:`peer_role`
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(self.ca)
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise AloeError(f"cannot load the TLS credentials of {self.role} ({self.cert}, {self.key}, CA "
                            f"{self.ca}): {getattr(exc, 'strerror', None) or exc}") from None
        if server:
            ctx.num_tickets = 0  # no session resumption: every channel is one full handshake
        return ctx


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the channel


class TLSClosed(EOFError):
    pass


class TLSConnection:
    """A TLS 1.3 channel over a connected TCP socket, with ``send_bytes`` / ``recv_bytes`` of whole messages (the
    interface of :class:`multiprocessing.connection.Connection` that the endpoints use)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server: bool) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server)
        self._state = threading.Lock()  # held only around in-memory TLS steps
        self._sending = threading.Lock()  # orders the encrypted bytes on the socket
        self._closed = False
        self.last_recv = time.monotonic()  # when bytes last arrived (a large message in transit is a sign of life)

    # -------------------------------------------------------- handshake
    def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise TLSClosed("the other side closed the connection during the TLS handshake") from None
                self._in.write(data)
        self._flush()

    def peer_role(self) -> str:
        cert = self._tls.getpeercert()
        for rdn in (cert or {}).get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
        return ""

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    # -------------------------------------------------------- messages
    def send_bytes(self, data: bytes) -> None:
        if len(data) >= 1 << 32:
            raise ValueError("message too large for one frame")
        view = memoryview(data)
        with self._sending:
            with self._state:
                self._tls.write(_LEN.pack(len(data)))
            for i in range(0, max(len(view), 1), _CHUNK):
                part = view[i:i + _CHUNK]
                with self._state:
                    if len(part):
                        self._tls.write(part)
                    out = self._out.read()
                self.sock.sendall(out)

    def _read_into(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            with self._state:
                try:
                    n = self._tls.read(len(buf) - got, buf[got:])
                except ssl.SSLWantReadError:
                    n = -1
                except ssl.SSLZeroReturnError:
                    raise TLSClosed("the other side closed the channel") from None
            if n > 0:
                got += n
                continue
            if n == 0:
                raise TLSClosed("the other side closed the channel")
            data = self.sock.recv(_CHUNK)
            if not data:
                raise TLSClosed("the other side closed the connection")
            self.last_recv = time.monotonic()
            with self._state:
                self._in.write(data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        head = bytearray(_LEN.size)
        self._read_into(memoryview(head))
        (n,) = _LEN.unpack(head)
        if maxlength is not None and n > maxlength:
            raise OSError(f"message of {n} bytes is longer than {maxlength}")
        buf = bytearray(n)
        self._read_into(memoryview(buf))
        return bytes(buf)

    def poll(self, timeout: float) -> bool:
        """Whether data may be ready within ``timeout`` (buffered plaintext or bytes on the socket)."""
        if self._tls.pending() or self._in.pending:
            return True
        import select

        return bool(select.select([self.sock], [], [], timeout)[0])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass
