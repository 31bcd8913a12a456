"""Network profiles for training runs: an application-level link emulation.

Each message on the L<->R channel is held for the profile's one-way delay plus its serialisation time at the
profile's rate before it is written; messages to and from the dealer are paced at the rate only (the dealer runs
ahead of L and R, so its latency is paid once, not per message). Every protocol step sends and then waits for the
peer, so a round costs about ``delay + bytes / rate``, as on a real link. This works without ``tc netem`` (which this
machine's kernel lacks). Messages a party sends back to back are each delayed, which slightly overstates latency
for them.
"""

from __future__ import annotations

import time

from aloe import AloeError
from aloe.mpc.party import Party

# name -> (bits per second, one-way delay in seconds); the ACSAC artifact's profiles are 2.5 ms and 25 ms at 100 Mbit
PROFILES: dict[str, tuple[float, float]] = {
    "100mbit": (100e6, 0.0),
    "100mbit-2.5ms": (100e6, 0.0025),
    "100mbit-25ms": (100e6, 0.025),
}
LENGTH_PREFIX = 4


def profile(name: str) -> tuple[float, float]:
    if name not in PROFILES:
        raise AloeError(f"unknown network profile {name!r} (one of {', '.join(PROFILES)})")
    return PROFILES[name]


def _shape(endpoint, rate: float, delay: float) -> None:
    send = endpoint._send_bytes

    def shaped(data: bytes) -> None:
        time.sleep(delay + (len(data) + LENGTH_PREFIX) * 8.0 / rate)
        send(data)

    endpoint._send_bytes = shaped


def shape_links(party: Party, name: str) -> None:
    """Apply profile ``name`` to this party's outgoing messages."""
    rate, delay = profile(name)
    if party.peer is not None:
        _shape(party.peer, rate, delay)
    for ep in party.dealer_links.values():
        _shape(ep, rate, 0.0)
