"""A deployment file (TOML) and the one command each party runs: ``aloe mpc party --role L|R|dealer --config F``.

Example (paths are relative to the file; every host gets the same file, and only its own key)::

    [deployment]
    ca = "certs/ca.pem"
    timeout = 60                    # seconds a party waits for a message
    # insecure_loopback = true      # plain channels, loopback only; then authkey = "<64 hex digits>"

    [parties.L]
    address = "10.0.0.1:7101"       # where the others reach L
    listen = "0.0.0.0:7101"         # what L binds (default: address)
    cert = "certs/L.pem"
    key = "certs/L.key"
    data = "/srv/mnist-images"      # this party's own data (MNIST files it owns); not needed with owners
    model_out = "model.pt"          # where this party writes the revealed model (if it is named in reveal_to)

    [parties.R]                     # likewise; [parties.dealer] needs cert and key (and checkpoints, to resume)
    ...

    [owners.alice]                  # a data owner (``aloe mpc share``): its columns, public shapes only
    columns = 10
    cert = "certs/owner-alice.pem"
    key = "certs/owner-alice.key"

    [owners.bob]
    columns = 10
    labels = true                   # the last column of bob's file is the label

    [train]                         # what the parties run (TrainConfig fields)
    model = "lr"
    dataset = "owners"              # or mnist / blobs (each party loads or generates only its own part)
    examples = 5000                 # public: rows of every owner's file
    epochs = 1
    reveal_to = ["L"]               # who learns the trained model (L, R or both)

R connects to L, the dealer to both, each owner to both. The local launcher (``aloe mpc train``) runs the same
:func:`aloe.mpc.party.run_party` in three processes.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aloe import AloeError
from aloe.mpc.party import ROLES, Security
from aloe.mpc.tls import CERT_ROLE, Credentials, is_loopback, owner_role

ROLE_ALIASES = {"L": "L", "R": "R", "dealer": "D", "D": "D"}
TRAIN_KEYS = ("model", "epochs", "limit", "dataset", "batch", "lr", "momentum", "pool", "seed", "frac_bits",
              "softmax_steps", "sign_bits", "drelu", "wan", "preprocess", "resume")


def parse_addr(value: Any, what: str) -> tuple[str, int]:
    if not isinstance(value, str):
        raise AloeError(f"{what} must be a \"HOST:PORT\" string")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AloeError(f"{what} must be HOST:PORT, got {value!r}")
    return host, int(port)


@dataclass(frozen=True)
class PartySpec:
    address: tuple[str, int] | None = None
    listen: tuple[str, int] | None = None
    cert: str | None = None
    key: str | None = None
    data: str | None = None
    model_out: str | None = None
    checkpoints: str | None = None


@dataclass(frozen=True)
class OwnerSpec:
    name: str
    columns: int
    labels: bool = False
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Deployment:
    path: Path
    parties: dict[str, PartySpec]
    owners: tuple[OwnerSpec, ...] = ()
    ca: str | None = None
    insecure_loopback: bool = False
    authkey: bytes | None = None
    timeout: float = 60.0
    train: dict = field(default_factory=dict)
    examples: int | None = None
    reveal_to: tuple[str, ...] = ("L",)

    def security(self, role: str, cert: str | None = None, key: str | None = None) -> Security:
        """The channel protection of party ``role`` (L, R, D or owner-NAME)."""
        if self.insecure_loopback:
            for who in ("L", "R"):
                for addr in (self.parties[who].address, self.parties[who].listen):
                    if not is_loopback(addr[0]):
                        raise AloeError(f"insecure_loopback allows plain channels on loopback addresses only, "
                                        f"not {who}'s {addr[0]}")
            return Security(authkey=self.authkey)
        if self.ca is None or cert is None or key is None:
            raise AloeError(f"{self.path}: TLS needs [deployment] ca and the cert and key of "
                            f"{CERT_ROLE.get(role, role)}")
        return Security(creds=Credentials(self.ca, cert, key, CERT_ROLE.get(role, role)))

    def owner(self, name: str | None) -> OwnerSpec:
        if name is None:
            if len(self.owners) != 1:
                raise AloeError(f"{self.path} names {len(self.owners)} data owners: say which with --name")
            return self.owners[0]
        for o in self.owners:
            if o.name == name:
                return o
        raise AloeError(f"{self.path} names no data owner {name!r}")


def _table(d: dict, key: str, where: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise AloeError(f"{where}: [{key}] must be a table")
    return v


def load(path: Path) -> Deployment:
    """Read and check a deployment file; relative paths in it are taken from its directory."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise AloeError(f"cannot read deployment file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AloeError(f"bad deployment file {path}: {exc}") from None
    base = path.resolve().parent

    def file(v, what):
        if v is None:
            return None
        if not isinstance(v, str):
            raise AloeError(f"{path}: {what} must be a path string")
        return str((base / v).resolve())

    dep = _table(raw, "deployment", str(path))
    parties_raw = _table(raw, "parties", str(path))
    parties = {}
    for name, role in (("L", "L"), ("R", "R"), ("dealer", "D")):
        p = parties_raw.get(name)
        if not isinstance(p, dict):
            raise AloeError(f"{path}: missing table [parties.{name}]")
        addr = listen = None
        if role != "D":
            addr = parse_addr(p.get("address"), f"{path}: parties.{name}.address")
            listen = parse_addr(p["listen"], f"{path}: parties.{name}.listen") if "listen" in p else addr
        parties[role] = PartySpec(addr, listen, file(p.get("cert"), f"parties.{name}.cert"),
                                  file(p.get("key"), f"parties.{name}.key"), file(p.get("data"), "data"),
                                  file(p.get("model_out"), "model_out"), file(p.get("checkpoints"), "checkpoints"))
    owners = []
    for name, o in _table(raw, "owners", str(path)).items():
        owner_role(name)
        if not isinstance(o, dict) or not isinstance(o.get("columns"), int) or o["columns"] < 1:
            raise AloeError(f"{path}: owners.{name}.columns must be a positive integer")
        owners.append(OwnerSpec(name, o["columns"], bool(o.get("labels", False)),
                                file(o.get("cert"), f"owners.{name}.cert"), file(o.get("key"), f"owners.{name}.key")))
    train = dict(_table(raw, "train", str(path)))
    reveal = train.pop("reveal_to", ["L"])
    examples = train.pop("examples", None)
    unknown = sorted(set(train) - set(TRAIN_KEYS))
    if unknown:
        raise AloeError(f"{path}: unknown [train] keys {', '.join(unknown)}")
    if not isinstance(reveal, list) or not reveal or any(r not in ("L", "R") for r in reveal):
        raise AloeError(f"{path}: train.reveal_to must list L and/or R")
    if train.get("dataset") == "owners":
        if not owners or sum(o.labels for o in owners) != 1:
            raise AloeError(f"{path}: dataset 'owners' needs [owners.*] tables, exactly one with labels = true")
        if not isinstance(examples, int) or examples < 1:
            raise AloeError(f"{path}: dataset 'owners' needs train.examples (the public number of rows)")
    insecure = bool(dep.get("insecure_loopback", False))
    authkey = None
    if insecure:
        try:
            authkey = bytes.fromhex(dep.get("authkey", ""))
        except ValueError:
            authkey = b""
        if len(authkey) < 16:
            raise AloeError(f"{path}: insecure_loopback needs deployment.authkey, at least 32 hex digits")
    timeout = dep.get("timeout", 60.0)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise AloeError(f"{path}: deployment.timeout must be a positive number")
    return Deployment(path, parties, tuple(owners), file(dep.get("ca"), "deployment.ca"), insecure, authkey,
                      float(timeout), train, examples, tuple(dict.fromkeys(reveal)))


def role_of(name: str) -> str:
    if name not in ROLE_ALIASES:
        raise AloeError(f"unknown role {name!r} (L, R or dealer)")
    return ROLE_ALIASES[name]


def train_config(dep: Deployment, role: str, **extra):
    """The TrainConfig party ``role`` runs (its own data and checkpoint directory)."""
    from aloe.mpc.nn.train import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    kw = {k: v for k, v in dep.train.items() if k in known}
    if "model" not in kw:
        raise AloeError(f"{dep.path}: [train] needs model")
    spec = dep.parties.get(role, PartySpec())
    owners = tuple((o.name, o.columns, o.labels) for o in dep.owners) if kw.get("dataset") == "owners" else ()
    cfg = TrainConfig(**kw, timeout=dep.timeout, data_dir=spec.data, checkpoint_dir=spec.checkpoints,
                      owners=owners, examples=dep.examples, reveal_to=dep.reveal_to, **extra)
    cfg.validate()
    return cfg


def run(role: str, dep: Deployment, program, args: tuple, frac_bits: int) -> tuple[Any, dict]:
    """Run party ``role`` (L, R or D) of ``dep``: bind, connect, set up keys, run ``program(party, *args)``."""
    import socket

    from aloe.mpc.party import run_party

    if role not in ROLES:
        raise AloeError(f"unknown role {role!r}")
    spec = dep.parties[role]
    sec = dep.security(role, spec.cert, spec.key)
    listen = None
    if role in ("L", "R"):
        try:
            listen = socket.create_server(spec.listen)
        except OSError as exc:
            raise AloeError(f"cannot listen on {spec.listen[0]}:{spec.listen[1]}: {exc.strerror or exc}") from None
    owners = tuple(owner_role(o.name) for o in dep.owners) if dep.train.get("dataset") == "owners" else ()
    return run_party(role, sec, program, args, listen=listen, addr_l=dep.parties["L"].address,
                     addr_r=dep.parties["R"].address, owners=owners if role != "D" else (), frac_bits=frac_bits,
                     timeout=dep.timeout)
