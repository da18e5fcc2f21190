"""What CURVE costs the notebook's predict socket: a REQ/REP round trip, plain beside CURVE, one run.

    python benchmarks/secure_socket.py [--repeat 300]

Off loopback a rank's predict socket is a CURVE server that admits only the notebook's key
(:mod:`dinb.job.secure_socket`); on loopback it stays plain. Both are timed here on loopback with
the same server code (a REP socket answering with the request's bytes), for request payloads of
8 KiB, 1 MiB and 16 MiB. Medians over ``--repeat`` round trips after a warm-up; ratio = CURVE
over plain. Results go to ``benchmarks/results/secure_socket.json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).parent))
from predict_overhead import machine  # noqa: E402

from dinb.job import secure_socket  # noqa: E402

SIZES = (8 * 2**10, 2**20, 16 * 2**20)


def echo(sock: zmq.Socket) -> None:
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 1 and bytes(frames[0]) == b"stop":
            sock.send(b"")
            return
        sock.send_multipart(frames, copy=False)


def round_trip_ms(curve: bool, size: int, repeat: int) -> float:
    keys = secure_socket.ClientKeys() if curve else None
    # the rank's server code; CURVE is asked for on loopback, for the comparison
    server, server_key = secure_socket.reply_socket("127.0.0.1", keys and keys.public, curve=curve)
    thread = threading.Thread(target=echo, args=(server,), daemon=True)
    thread.start()
    client = secure_socket.request_socket(secure_socket.endpoint_of(server), server_key, keys)
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    times = []
    for i in range(repeat + 10):
        t0 = time.perf_counter()
        client.send_multipart([b"{}", payload], copy=False)
        client.recv_multipart(copy=False)
        if i >= 10:
            times.append(time.perf_counter() - t0)
    client.send(b"stop")
    client.recv()
    client.close()
    thread.join()
    server.close()
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=300)
    args = p.parse_args()
    rows = []
    print(f"{'payload':>10} {'plain ms':>10} {'curve ms':>10} {'ratio':>7}")
    for size in SIZES:
        repeat = max(20, args.repeat * 8 * 2**10 // size) if size > 2**20 else args.repeat
        plain = round_trip_ms(False, size, repeat)
        curve = round_trip_ms(True, size, repeat)
        rows.append({"bytes": size, "plain_ms": plain, "curve_ms": curve, "ratio": curve / plain})
        print(f"{size:>10} {plain:>10.3f} {curve:>10.3f} {curve / plain:>7.2f}")
    out = Path(__file__).parent / "results" / "secure_socket.json"
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(f"machine: {machine()['cpu']}; written to {out}")


if __name__ == "__main__":
    main()
