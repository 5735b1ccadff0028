"""A user-space stand-in for ``tc netem``: relays Ethernet frames between two interfaces,
delaying and dropping those that go one way.

Kernels without sch_netem (this project's CI machines among them) cannot delay packets
with ``tc``. This relay does it with two packet sockets: run inside a namespace holding
interfaces ``A`` and ``B``, it copies every frame that arrives on one to the other, and
holds each frame arriving on ``A`` for ``--delay-ms`` (plus up to ``--jitter-ms``) and drops
``--loss`` percent of them. :meth:`harness.netns.Node.netem` splices it between a node and
its bridge. Frames must not be larger than the MTU: the harness turns segmentation
offloads off on the interfaces involved, since a packet socket cannot resend the 64 KiB
super-frames a veth otherwise carries.

Usage: ``relay.py A B [--delay-ms MS] [--jitter-ms MS] [--loss PERCENT] [--seed N]``.
It prints ``ready`` once both sockets are bound and runs until killed.
"""

from __future__ import annotations

import argparse
import heapq
import random
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
"""A packet socket also sees the frames this host sends on the interface: not to relay."""
MAX_FRAME = 65536


def packet_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((interface, 0))
    sock.setblocking(False)
    return sock


def relay(a: str, b: str, delay_s: float, jitter_s: float, loss: float, rng: random.Random) -> None:
    ends = {a: packet_socket(a), b: packet_socket(b)}
    other = {ends[a]: ends[b], ends[b]: ends[a]}
    impaired = ends[a]
    # (due, serial, frame): the serial keeps frames due at the same moment in order.
    pending: list[tuple[float, int, bytes]] = []
    serial = 0
    last_due = 0.0
    print("ready", flush=True)
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        readable, _, _ = select.select(list(other), [], [], timeout)
        for sock in readable:
            while True:
                try:
                    frame, address = sock.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                if sock is not impaired:
                    send(other[sock], frame)
                elif rng.random() * 100 >= loss:
                    due = time.monotonic() + delay_s + (rng.random() * jitter_s if jitter_s else 0.0)
                    # Jitter must not reorder: a frame is never due before the one ahead of it.
                    due = last_due = max(due, last_due)
                    heapq.heappush(pending, (due, serial, frame))
                    serial += 1
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, frame = heapq.heappop(pending)
            send(ends[b], frame)


def send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.send(frame)
    except OSError:
        pass  # a full queue or a vanished interface: the frame is lost, as on a wire


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="the impaired side: frames arriving here are delayed and dropped")
    parser.add_argument("b", help="the other side")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0, help="percent of frames to drop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    relay(args.a, args.b, args.delay_ms / 1000, args.jitter_ms / 1000, args.loss, random.Random(args.seed))


if __name__ == "__main__":
    main(sys.argv[1:])
