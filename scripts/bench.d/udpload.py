#!/usr/bin/python3
"""Datagrams per second through a SOCKS5 UDP relay, against a UDP echo on loopback.

  udpload.py compare [--secs S] [--size N] [--window W] [--bin-dir DIR]

starts a UDP echo, then measures for S seconds each: the echo reached directly (the load
generator's ceiling), tcpsplice's relay (tcpsplice-listen -> tcpsplice-auth -n -U ->
tcpsplice-dial -a ECHO) and danted's (a generated config, no auth, udpassociate and
udpreply rules). One client process keeps W datagrams of N bytes in flight through one
association and counts the echoes that come back; a datagram lost is replaced after
50 ms. Relay CPU is the user+system time of every process of the relay (from /proc),
per datagram relayed (each round trip is two datagrams through the relay).

Loopback only; every run is bounded in time and stops what it started.
"""

import argparse
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")


def echo_main(port_out):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    s.settimeout(120)
    os.write(port_out, b"%d\n" % s.getsockname()[1])
    os.close(port_out)
    buf = bytearray(65536)
    try:
        while True:
            n, peer = s.recvfrom_into(buf)
            s.sendto(memoryview(buf)[:n], peer)
    except (socket.timeout, KeyboardInterrupt):
        pass


def socks5_udp_associate(proxy):
    """Opens the control connection and asks for an association: (ctl, relay addr)."""
    c = socket.create_connection(proxy, timeout=10)
    c.sendall(b"\x05\x01\x00")
    if c.recv(2) != b"\x05\x00":
        raise SystemExit("udpload: the proxy refused no-auth")
    c.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    head = b""
    while len(head) < 10:
        more = c.recv(10 - len(head))
        if not more:
            raise SystemExit("udpload: the proxy closed the connection")
        head += more
    if head[1] != 0 or head[3] != 1:
        raise SystemExit("udpload: UDP ASSOCIATE refused: %r" % head)
    ip = socket.inet_ntoa(head[4:8])
    port = struct.unpack(">H", head[8:10])[0]
    if ip == "0.0.0.0":
        ip = proxy[0]
    return c, (ip, port)


def client(proxy, target, secs, size, window):
    """Round trips per second with `window` datagrams in flight."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((HOST, 0))
    payload = b"x" * size
    ctl = None
    if proxy:
        ctl, relay = socks5_udp_associate(proxy)
        header = b"\x00\x00\x00\x01" + socket.inet_aton(target[0]) + struct.pack(">H", target[1])
        msg, to = header + payload, relay
    else:
        msg, to = payload, target
    u.settimeout(0.05)
    for _ in range(window):
        u.sendto(msg, to)
    done = 0
    lost = 0
    start = time.monotonic()
    end = start + secs
    while True:
        try:
            u.recv(65536)
            done += 1
            u.sendto(msg, to)
        except socket.timeout:
            lost += 1
            for _ in range(window):
                u.sendto(msg, to)
        if done & 255 == 0 and time.monotonic() >= end:
            break
    took = time.monotonic() - start
    if ctl:
        ctl.close()
    return done / took, lost


def descendants(pid):
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open("/proc/%s/stat" % p) as f:
                    st = f.read()
            except OSError:
                continue
            ppid = int(st.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_of(pid):
    """user+system seconds of `pid` and its descendants, their children's included."""
    total = 0
    for p in descendants(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / TICK


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, what):
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit("udpload: %s exited: %s" % (what, proc.returncode))
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("udpload: %s is not listening" % what)


def measure(name, proxy_proc, proxy, target, a):
    # A short warm-up association first (page faults, caches), then the measured one.
    client(proxy, target, 0.3, a.size, a.window)
    time.sleep(0.2)
    before = cpu_of(proxy_proc.pid) if proxy_proc else 0
    rate, lost = client(proxy, target, a.secs, a.size, a.window)
    time.sleep(0.3)
    cpu = (cpu_of(proxy_proc.pid) - before) if proxy_proc else None
    dgrams = 2 * rate * a.secs
    return name, rate, lost, cpu, (cpu / dgrams * 1e6 if cpu is not None and dgrams else None)


def compare(a):
    tmp = tempfile.mkdtemp(prefix="udpload-")
    r, w = os.pipe()
    echo = subprocess.Popen([sys.executable, __file__, "echo", str(w)], pass_fds=[w])
    os.close(w)
    target = (HOST, int(os.read(r, 64).strip()))
    os.close(r)
    procs = [echo]
    rows = []
    try:
        rows.append(measure("direct (no relay)", None, None, target, a))
        port = free_port()
        b = lambda n: os.path.join(a.bin_dir, n)
        ts = subprocess.Popen(
            [b("tcpsplice-listen"), "-q", HOST, str(port), b("tcpsplice-auth"), "-n", "-U",
             b("tcpsplice-dial"), "-a", "%s:%d" % target, b("tcpsplice")],
            env=dict(os.environ, TCPSPLICE_LOG="none"))
        procs.append(ts)
        wait_port(port, ts, "tcpsplice-listen")
        rows.append(measure("tcpsplice", ts, (HOST, port), target, a))
        dport = free_port()
        conf = os.path.join(tmp, "danted.conf")
        with open(conf, "w") as f:
            f.write(
                "logoutput: /dev/null\n"
                "internal: %s port = %d\nexternal: %s\n"
                "clientmethod: none\nsocksmethod: none\n"
                "user.privileged: root\nuser.unprivileged: nobody\n"
                "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
                "socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 command: udpassociate }\n"
                "socks pass { from: 0.0.0.0/0 to: 127.0.0.0/8 command: udpreply }\n"
                % (HOST, dport, HOST))
        da = subprocess.Popen(["danted", "-f", conf, "-p", os.path.join(tmp, "danted.pid")])
        procs.append(da)
        wait_port(dport, da, "danted")
        rows.append(measure("dante", da, (HOST, dport), target, a))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    print("%d-byte datagrams, %d in flight, %g s per row, one association; round trips/s"
          " through the relay (2 datagrams each)\n" % (a.size, a.window, a.secs))
    print("| relay | round trips/s | datagrams/s relayed | vs dante | lost (50 ms refills) |"
          " relay CPU s | relay CPU µs/datagram |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    dante = next((x[1] for x in rows if x[0] == "dante"), None)
    for name, rate, lost, cpu, per in rows:
        print("| %s | %.0f | %s | %s | %d | %s | %s |" % (
            name, rate, "–" if cpu is None else "%.0f" % (2 * rate),
            "%.2fx" % (rate / dante) if dante and cpu is not None else "–", lost,
            "–" if cpu is None else "%.2f" % cpu, "–" if per is None else "%.1f" % per))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        echo_main(int(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["compare"])
    ap.add_argument("--secs", type=float, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--bin-dir", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "release"))
    compare(ap.parse_args())


if __name__ == "__main__":
    main()
