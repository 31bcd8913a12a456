"""A userspace one-way delay for TCP links (for kernels without ``sch_netem``): relays each connection and holds
every chunk for ``--delay`` seconds before forwarding it, in order, in both directions. TLS passes through it
unchanged (the parties check certificates, not addresses).

Usage: python delay_proxy.py --delay SECONDS LISTEN_HOST:PORT=TARGET_HOST:PORT ...
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
import time


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    q: queue.Queue = queue.Queue()

    def sender() -> None:
        while True:
            due, data = q.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if data is None:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    threading.Thread(target=sender, daemon=True).start()
    while True:
        try:
            data = src.recv(1 << 16)
        except OSError:
            data = b""
        q.put((time.monotonic() + delay, data or None))
        if not data:
            return


def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float, ready: threading.Event) -> None:
    srv = socket.create_server(listen)
    ready.set()
    while True:
        a, _ = srv.accept()
        threading.Thread(target=_relay, args=(a, target, delay), daemon=True).start()


def _relay(a: socket.socket, target: tuple[str, int], delay: float) -> None:
    b = None
    deadline = time.monotonic() + 30  # the target may not listen yet: wait for it, as a direct connect would
    while b is None and time.monotonic() < deadline:
        try:
            b = socket.create_connection(target, timeout=5)
        except OSError:
            time.sleep(0.05)
    if b is None:
        a.close()
        return
    b.settimeout(None)
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=_pump, args=(a, b, delay), daemon=True).start()
    threading.Thread(target=_pump, args=(b, a, delay), daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, required=True)
    ap.add_argument("links", nargs="+")
    args = ap.parse_args()
    events = []
    for link in args.links:
        listen, _, target = link.partition("=")
        ev = threading.Event()
        threading.Thread(target=_serve, args=(_addr(listen), _addr(target), args.delay, ev), daemon=True).start()
        events.append(ev)
    for ev in events:
        ev.wait(10)
    print("ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
