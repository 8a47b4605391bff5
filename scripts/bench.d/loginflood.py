#!/usr/bin/env python3
"""A flood of wrong SOCKS5 logins from one address, and a victim logging in from another.

    loginflood.py PORT USER PASSWORD [--flood N] [--secs S] [--victims V]

Against a SOCKS5 proxy on 127.0.0.1:PORT (user/password method): N threads connect
from 127.0.0.2 and log in with a wrong password, again and again, for S seconds; V
victim threads connect from 127.0.0.3 and log in with the right one, one login after
another (no CONNECT), measuring how long each login takes from connect to the status
byte. First the victims run alone for S/2 seconds (the baseline), then with the flood.
Prints one JSON line: victim latencies (p50, p99, max, count) alone and under the flood,
the flood's refusals per second, and the lowest MemAvailable seen (KiB). Every socket
has a timeout; every loop ends after S seconds. Loopback addresses only.
"""

import json
import socket
import sys
import threading
import time


def login(port, src, user, pw, timeout=30.0):
    """One login; returns (seconds, status byte or None on error)."""
    t0 = time.monotonic()
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"\x05\x01\x02")
        if s.recv(2) != b"\x05\x02":
            return time.monotonic() - t0, None
        u, p = user.encode(), pw.encode()
        s.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        r = s.recv(2)
        return time.monotonic() - t0, (r[1] if len(r) == 2 else None)
    except OSError:
        return time.monotonic() - t0, None
    finally:
        s.close()


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def pct(v, q):
    if not v:
        return None
    v = sorted(v)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)


def run(port, user, pw, flood, secs, victims):
    stop = threading.Event()
    lat = {"alone": [], "flood": []}
    phase = ["alone"]
    refused = [0]
    lowest = [mem_available()]

    def victim():
        while not stop.is_set():
            dt, st = login(port, "127.0.0.3", user, pw)
            if st == 0:
                lat[phase[0]].append(dt)

    def flooder():
        while not stop.is_set():
            _, st = login(port, "127.0.0.2", user, pw + "-wrong")
            if st is not None and st != 0:
                refused[0] += 1

    vs = [threading.Thread(target=victim, daemon=True) for _ in range(victims)]
    for t in vs:
        t.start()
    time.sleep(secs / 2)
    phase[0] = "flood"
    fs = [threading.Thread(target=flooder, daemon=True) for _ in range(flood)]
    t_flood = time.monotonic()
    for t in fs:
        t.start()
    end = time.monotonic() + secs
    while time.monotonic() < end:
        lowest[0] = min(lowest[0], mem_available())
        time.sleep(0.1)
    stop.set()
    flood_secs = time.monotonic() - t_flood
    for t in vs + fs:
        t.join(35)
    out = {"flood_threads": flood, "victims": victims, "secs": secs,
           "flood_refusals_per_s": round(refused[0] / flood_secs, 1),
           "mem_available_start_kib": mem_available(), "mem_available_lowest_kib": lowest[0]}
    for k, v in lat.items():
        out[k] = {"logins": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99),
                  "max_ms": round(max(v) * 1000, 1) if v else None}
    print(json.dumps(out))


def main(argv):
    if len(argv) < 3:
        sys.stderr.write(__doc__)
        sys.exit(100)
    port, user, pw = int(argv[0]), argv[1], argv[2]
    opts = {"--flood": 200, "--secs": 20.0, "--victims": 1}
    rest = argv[3:]
    while rest:
        k = rest.pop(0)
        if k not in opts or not rest:
            sys.stderr.write("loginflood: usage: see the docstring\n")
            sys.exit(100)
        opts[k] = type(opts[k])(rest.pop(0))
    run(port, user, pw, int(opts["--flood"]), float(opts["--secs"]), int(opts["--victims"]))


if __name__ == "__main__":
    main(sys.argv[1:])
