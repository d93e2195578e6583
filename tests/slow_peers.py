#!/usr/bin/env python3
"""Slow and silent ZMTP peers for fasa-server's limits (tests/hold_test.sh).

Each of N raw TCP connections speaks just enough ZMTP 3.0 (NULL mechanism) to be a DEALER:
the greeting, a READY command, then the header of one frame of FRAME bytes, of which it
sends SEND bytes and then nothing more. With SEND a multiple of FRAME above it, it sends
SEND / FRAME whole frames instead (requests the server answers and forgets) and then
nothing more. It never answers a heartbeat PING. The script runs
until every connection has been closed by the server or HOLD seconds have passed (bounded
loops only) and prints one line:
  clients N sent BYTES closed C first_close_s T0 last_close_s T1
usage: slow_peers.py HOST PORT N FRAME SEND HOLD
"""
import errno
import select
import socket
import struct
import sys
import time


def greeting():
    # signature, version 3.0, mechanism NULL, as-server 0, filler
    return b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def ready():
    name, value = b"Socket-Type", b"DEALER"
    body = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    return b"\x04" + bytes([len(body)]) + body


def main():
    host, port, n, frame, send, hold = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                        int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    chunk = b"\x00" * (1 << 20)
    conns = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        s.setblocking(False)
        head = greeting() + ready() + b"\x02" + struct.pack(">Q", frame)
        whole = send // frame if send > frame and send % frame == 0 else 0
        conns.append({"s": s, "head": head, "left": frame if whole else send, "closed": None,
                      "frames": whole - 1 if whole else 0})
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < hold:
        live = [c for c in conns if c["closed"] is None]
        if not live:
            break
        want_w = [c["s"] for c in live if c["head"] or c["left"] > 0]
        r, w, _ = select.select([c["s"] for c in live], want_w, [], 0.05)
        for c in live:
            s = c["s"]
            if s in r:
                try:
                    data = s.recv(65536)  # the server's greeting, READY, PINGs: ignored
                    if not data:
                        c["closed"] = time.monotonic() - t0
                        continue
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        c["closed"] = time.monotonic() - t0
                        continue
            if s in w:
                try:
                    if c["head"]:
                        k = s.send(c["head"])
                        c["head"] = c["head"][k:]
                    elif c["left"] > 0:
                        k = s.send(chunk[: min(len(chunk), c["left"])])
                        c["left"] -= k
                        sent += k
                        if c["left"] == 0 and c["frames"] > 0:
                            c["frames"] -= 1
                            c["left"] = frame
                            c["head"] = b"\x02" + struct.pack(">Q", frame)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        c["closed"] = time.monotonic() - t0
    closes = sorted(c["closed"] for c in conns if c["closed"] is not None)
    print("clients %d sent %d closed %d first_close_s %.2f last_close_s %.2f" %
          (n, sent, len(closes), closes[0] if closes else -1, closes[-1] if closes else -1))
    for c in conns:
        c["s"].close()


if __name__ == "__main__":
    main()
