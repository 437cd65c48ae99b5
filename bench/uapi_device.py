"""A synthetic userspace WireGuard device for the server-scale benchmark:
``python -m bench.uapi_device --socket PATH --n N --dist D``.

It answers ``get=1`` on a UAPI socket, as wireguard-go does, with the hub's state for
the synthetic population (``bench.synthetic``), from its own process (as a real device
is), so the server reads it through its real UAPI reader and parser. Like a live hub,
every answer has new byte counters for every peer, and a new handshake for the
clients whose turn it is (each client handshakes every ``--rekey`` seconds, spread
evenly), so a read of the device finds a realistic trickle of changed peers.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import sys
import time

from bench.synthetic import population

REKEY_S = 120


def serve(path: str, n: int, distribution: str, rekey: float) -> None:
    clients = population(n, distribution)
    started = time.time()
    phases = [i * rekey / n for i in range(n)]
    blocks = [b""] * n
    turns = [-2] * n

    def render(i: int, now: float) -> None:
        # The latest handshake: the last time this client's turn came round. Counters
        # change with it (a real device changes them all the time; the server drops
        # them either way, and rendering all 100 000 in Python per read would cost
        # this process far more CPU than wireguard-go spends).
        c = clients[i]
        turn = int((now - started - phases[i]) // rekey)
        turns[i] = turn
        handshake = int(started + phases[i] + turn * rekey)
        blocks[i] = (
            f"public_key={base64.b64decode(c.pubkey).hex()}\n"
            f"endpoint={c.public_ip}:{c.public_port}\n"
            f"last_handshake_time_sec={handshake}\nlast_handshake_time_nsec=0\n"
            f"tx_bytes={148 * (turn + 3)}\nrx_bytes={92 * (turn + 3)}\n"
            f"persistent_keepalive_interval=0\nallowed_ip={c.tunnel_ip}/32\n"
            "protocol_version=1\n"
        ).encode()

    now = time.time()
    for i in range(n):
        render(i, now)
    header = ("private_key=" + "ab" * 32 + "\nlisten_port=51820\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(16)
        print("ready", flush=True)
        while True:
            conn, _ = listener.accept()
            with conn:
                request = b""
                while not request.endswith(b"\n\n"):
                    data = conn.recv(4096)
                    if not data:
                        break
                    request += data
                if request != b"get=1\n\n":
                    continue
                now = time.time()
                # Only the clients whose turn came since the last read are re-rendered.
                for i in range(n):
                    if int((now - started - phases[i]) // rekey) != turns[i]:
                        render(i, now)
                conn.sendall(header + b"".join(blocks) + b"errno=0\n\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.uapi_device")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--dist", required=True)
    parser.add_argument("--rekey", type=float, default=REKEY_S)
    args = parser.parse_args(argv)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    serve(args.socket, args.n, args.dist, args.rekey)
    return 0


if __name__ == "__main__":
    sys.exit(main())
