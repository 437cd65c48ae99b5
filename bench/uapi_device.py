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
    # The static part of each peer's block, and its handshake phase within a rekey period.
    heads = [
        (
            f"public_key={base64.b64decode(c.pubkey).hex()}\n"
            f"endpoint={c.public_ip}:{c.public_port}\n",
            f"persistent_keepalive_interval=0\nallowed_ip={c.tunnel_ip}/32\nprotocol_version=1\n",
            (i * rekey / n),
        )
        for i, c in enumerate(clients)
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(16)
        print("ready", flush=True)
        reads = 0
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
                reads += 1
                now = time.time()
                parts = ["private_key=" + "ab" * 32 + "\nlisten_port=51820\n"]
                for head, tail, phase in heads:
                    # The latest handshake: the last time this client's turn came round.
                    turns = int((now - started - phase) // rekey)
                    handshake = int(started + phase + turns * rekey)
                    parts.append(
                        f"{head}last_handshake_time_sec={handshake}\n"
                        f"last_handshake_time_nsec=0\ntx_bytes={reads * 148}\n"
                        f"rx_bytes={reads * 92}\n{tail}"
                    )
                parts.append("errno=0\n\n")
                conn.sendall("".join(parts).encode())


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
