#!/usr/bin/env python3
"""Short-connection load for scripts/bench: an echo-ish target and a load generator.

    netload.py target PORT PROCS
        Listens on 127.0.0.1:PORT with PROCS processes (SO_REUSEPORT). Each connection:
        read 64 bytes, write 64 bytes, close.
    netload.py load HOST PORT CONCURRENCY SECONDS PROCS [SOCKS]
        PROCS processes keep CONCURRENCY connections in flight in total for SECONDS.
        Each connection: connect, (SOCKS5 handshake and CONNECT), write 64 bytes,
        read 64 bytes and then until EOF, close. Prints one JSON line with the totals.
    netload.py hold PORT
        Listens on 127.0.0.1:PORT, one process. Accepts every connection and holds it
        without sending; reads and drops what arrives, closes at EOF.
    netload.py idle HOST PORT COUNT SECONDS [SOCKS]
        Opens COUNT connections (at most 16 handshakes at once), each up to the SOCKS5
        CONNECT reply when asked, prints one JSON line {"ok": N, "errors": {...}}, then
        holds them idle until its standard input ends or SECONDS pass, and closes them.

    SOCKS is "socks5 TARGETHOST TARGETPORT" (no-auth, method 00) or
    "socks5auth USER PASSWORD TARGETHOST TARGETPORT" (RFC 1929 username/password,
    method 02).

Non-blocking sockets driven by selectors, one generator per connection, so one process
serves many connections; several processes so python is not the bottleneck (bench.py
measures the direct rate first to show the ceiling). Every wait is bounded.
"""

import errno
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time

MSG = 64
PAYLOAD = bytes(range(MSG))
CONN_DEADLINE = 10.0  # a connection still open after this long counts as a timeout


def die(msg):
    sys.stderr.write("netload: fatal: %s\n" % msg)
    sys.exit(111)


# ---------------------------------------------------------------------------- target
def target_proc(lsock):
    sel = selectors.DefaultSelector()
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    conns = {}  # sock -> [bytes read, opened at]
    while True:
        now = time.monotonic()
        for key, _ in sel.select(1.0):
            s = key.fileobj
            if s is lsock:
                for _ in range(64):
                    try:
                        c, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                            break
                        raise
                    c.setblocking(False)
                    conns[c] = [0, now]
                    sel.register(c, selectors.EVENT_READ, None)
                continue
            st = conns[s]
            try:
                d = s.recv(MSG - st[0])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                d = b""
            if d:
                st[0] += len(d)
                if st[0] < MSG:
                    continue
                try:
                    s.send(PAYLOAD)
                except OSError:
                    pass
            sel.unregister(s)
            del conns[s]
            s.close()
        # Drop connections that never sent their 64 bytes.
        for s in [s for s, st in conns.items() if now - st[1] > CONN_DEADLINE]:
            sel.unregister(s)
            del conns[s]
            s.close()


def target(port, procs):
    socks = []
    for _ in range(procs):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(4096)
        socks.append(s)
    kids = []
    for s in socks:
        pid = os.fork()
        if pid == 0:
            try:
                target_proc(s)
            finally:
                os._exit(1)
        kids.append(pid)
    def stop(*_):
        for k in kids:
            os.kill(k, signal.SIGTERM)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


# ---------------------------------------------------------------------------- load
def socks5_request(host, port):
    return b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


def read_exactly(s, n):
    """Generator: waits for and returns exactly n bytes from non-blocking socket s."""
    got = b""
    while len(got) < n:
        yield selectors.EVENT_READ
        try:
            d = s.recv(n - len(got))
        except (BlockingIOError, InterruptedError):
            continue
        if not d:
            raise OSError(errno.ECONNRESET, "early EOF after %d of %d bytes" % (len(got), n))
        got += d
    return got


def connected(s):
    """Generator: waits for a non-blocking connect to complete; raises its error."""
    yield selectors.EVENT_WRITE
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def socks5_handshake(s, socks):
    """Generator: SOCKS5 method choice, RFC 1929 login when socks has a user, CONNECT,
    and the whole reply. socks = (target host, target port, user or None, password)."""
    host, port, user, password = socks
    method = b"\x02" if user is not None else b"\x00"
    s.send(b"\x05\x01" + method)
    r = yield from read_exactly(s, 2)
    if r != b"\x05" + method:
        raise OSError(errno.EPROTO, "socks5 method reply %r" % r)
    if user is not None:
        u, p = user.encode(), password.encode()
        s.send(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        r = yield from read_exactly(s, 2)
        if r != b"\x01\x00":
            raise OSError(errno.EACCES, "socks5 login refused %r" % r)
    s.send(socks5_request(host, port))
    r = yield from read_exactly(s, 4)
    if r[1] != 0:
        raise OSError(errno.ECONNREFUSED, "socks5 reply code %d" % r[1])
    atyp = r[3]
    if atyp == 1:
        rest = 6
    elif atyp == 4:
        rest = 18
    elif atyp == 3:
        ln = yield from read_exactly(s, 1)
        rest = ln[0] + 2
    else:
        raise OSError(errno.EPROTO, "socks5 reply address type %d" % atyp)
    yield from read_exactly(s, rest)


def opening(s, socks):
    """Generator: the connect, then the SOCKS5 handshake when socks is given."""
    yield from connected(s)
    if socks:
        yield from socks5_handshake(s, socks)


def conversation(s, socks):
    """Generator: yields the selector event it waits for; returns when the exchange ended
    with EOF after the 64-byte reply, raises on anything else."""
    yield from opening(s, socks)
    s.send(PAYLOAD)
    r = yield from read_exactly(s, MSG)
    if r != PAYLOAD:
        raise OSError(errno.EPROTO, "wrong reply bytes")
    while True:
        yield selectors.EVENT_READ
        try:
            d = s.recv(4096)
        except (BlockingIOError, InterruptedError):
            continue
        if not d:
            return
        raise OSError(errno.EPROTO, "bytes after the reply")


def count_error(errors, e):
    k = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
    errors[k] = errors.get(k, 0) + 1


def start(host, port, socks, gen_of, sel, live, errors):
    """Starts a non-blocking connect and registers its generator gen_of(sock, socks) in
    sel and live (sock -> (generator, started)). False when the connect failed at once."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rc = s.connect_ex((host, port))
    if rc not in (0, errno.EINPROGRESS):
        count_error(errors, OSError(rc, os.strerror(rc)))
        s.close()
        return False
    gen = gen_of(s, socks)
    ev = gen.send(None)
    live[s] = (gen, time.monotonic())
    sel.register(s, ev, gen)
    return True


def time_out(live, errors, finish):
    """Ends (finish(sock)) and counts the connections of live older than CONN_DEADLINE."""
    now = time.monotonic()
    for s in [s for s, (_, t0) in live.items() if now - t0 > CONN_DEADLINE]:
        count_error(errors, OSError(errno.ETIMEDOUT, "timeout"))
        finish(s)


def load_proc(host, port, conc, secs, socks, wfd):
    sel = selectors.DefaultSelector()
    ok = 0
    errors = {}
    lat = []  # connection durations, seconds (a sample)
    live = {}  # sock -> (generator, started)
    start_t = time.monotonic()
    stop_at = start_t + secs

    def finish(s):
        sel.unregister(s)
        del live[s]
        s.close()

    def advance(s, gen):
        nonlocal ok
        try:
            ev = gen.send(None)
        except StopIteration:
            now = time.monotonic()
            if now <= stop_at:  # exchanges still running at the end are drained, not counted
                ok += 1
                if len(lat) < 200000:
                    lat.append(now - live[s][1])
            finish(s)
            return
        except OSError as e:
            count_error(errors, e)
            finish(s)
            return
        sel.modify(s, ev, gen)

    while True:
        now = time.monotonic()
        if now < stop_at:
            for _ in range(conc - len(live)):
                if not start(host, port, socks, conversation, sel, live, errors):
                    time.sleep(0.001)
                    break
        elif not live or now > stop_at + CONN_DEADLINE:
            break
        for key, _ in sel.select(0.2):
            advance(key.fileobj, key.data)
        time_out(live, errors, finish)
    for s in list(live):
        finish(s)
    lat.sort()
    os.write(wfd, (json.dumps({"ok": ok, "errors": errors, "lat": lat[:: max(1, len(lat) // 2000)]}) + "\n").encode())


def load(host, port, conc, secs, procs, socks):
    # A pipe per load process: a report is one line of up to ~80 KB (the latency
    # sample), and writes above PIPE_BUF from two processes into one pipe interleave.
    kids = []
    per = [conc // procs + (1 if i < conc % procs else 0) for i in range(procs)]
    t0 = time.monotonic()
    for c in per:
        if c == 0:
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                load_proc(host, port, c, secs, socks, w)
                os._exit(0)
            except BaseException as e:  # report, never hang the parent
                sys.stderr.write("netload: load process failed: %r\n" % e)
                os._exit(111)
        os.close(w)
        kids.append((pid, r))
    data = b""
    for _, r in kids:
        with os.fdopen(r, "rb") as f:
            data += f.read()
    kids = [pid for pid, _ in kids]
    for k in kids:
        os.waitpid(k, 0)
    elapsed = time.monotonic() - t0
    tot = {"ok": 0, "errors": {}, "lat": [], "procs": len(kids), "concurrency": conc}
    for line in data.decode().splitlines():
        d = json.loads(line)
        tot["ok"] += d["ok"]
        tot["lat"] += d["lat"]
        for k, v in d["errors"].items():
            tot["errors"][k] = tot["errors"].get(k, 0) + v
    if len(data.decode().splitlines()) != len(kids):
        die("a load process did not report")
    tot["lat"].sort()
    lat = tot.pop("lat")
    pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6 if lat else None
    tot["p50_us"] = pct(0.5)
    tot["p99_us"] = pct(0.99)
    tot["seconds"] = secs
    tot["elapsed"] = elapsed
    tot["rate"] = tot["ok"] / secs
    print(json.dumps(tot))


# ---------------------------------------------------------------------------- idle
IDLE_HANDSHAKES = 16  # connections of `idle` being opened at once


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def hold(port):
    raise_fd_limit()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select(1.0):
            s = key.fileobj
            if s is lsock:
                try:
                    c, _ = lsock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, None)
                continue
            try:
                d = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                d = b""
            if not d:
                sel.unregister(s)
                s.close()


def idle(host, port, count, secs, socks):
    raise_fd_limit()
    sel = selectors.DefaultSelector()
    errors = {}
    opening_now = {}  # sock -> (generator, started)
    held = []
    tried = 0
    deadline = time.monotonic() + secs

    def finish(s):
        sel.unregister(s)
        del opening_now[s]
        s.close()

    while (tried < count or opening_now) and time.monotonic() < deadline:
        while tried < count and len(opening_now) < IDLE_HANDSHAKES:
            tried += 1
            start(host, port, socks, opening, sel, opening_now, errors)
        for key, _ in sel.select(0.2):
            s = key.fileobj
            try:
                ev = key.data.send(None)
            except StopIteration:
                sel.unregister(s)
                del opening_now[s]
                held.append(s)
                continue
            except OSError as e:
                count_error(errors, e)
                finish(s)
                continue
            sel.modify(s, ev, key.data)
        time_out(opening_now, errors, finish)
    for s in list(opening_now):
        count_error(errors, OSError(errno.ETIMEDOUT, "timeout"))
        finish(s)
    print(json.dumps({"ok": len(held), "errors": errors}), flush=True)
    # Hold them until stdin ends or the deadline; count those the relay ends meanwhile.
    for s in held:
        sel.register(s, selectors.EVENT_READ, None)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    ended = 0
    while time.monotonic() < deadline:
        ready = sel.select(max(0.0, min(1.0, deadline - time.monotonic())))
        if any(key.fileobj is sys.stdin for key, _ in ready) and not os.read(sys.stdin.fileno(), 4096):
            break
        for key, _ in ready:
            if key.fileobj is not sys.stdin:
                sel.unregister(key.fileobj)
                ended += 1
    for s in held:
        s.close()
    print(json.dumps({"ended_while_idle": ended}), flush=True)


def parse_socks(args):
    """[] | socks5 HOST PORT | socks5auth USER PASSWORD HOST PORT -> None or
    (host, port, user or None, password or None)."""
    if not args:
        return None
    if args[0] == "socks5" and len(args) == 3:
        return (args[1], int(args[2]), None, None)
    if args[0] == "socks5auth" and len(args) == 5:
        return (args[3], int(args[4]), args[1], args[2])
    die("unknown SOCKS mode or wrong arguments: %s" % " ".join(args))


def main(argv):
    if len(argv) >= 3 and argv[0] == "target":
        target(int(argv[1]), int(argv[2]))
    elif len(argv) >= 6 and argv[0] == "load":
        load(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), int(argv[5]), parse_socks(argv[6:]))
    elif len(argv) == 2 and argv[0] == "hold":
        hold(int(argv[1]))
    elif len(argv) >= 5 and argv[0] == "idle":
        idle(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), parse_socks(argv[5:]))
    else:
        sys.stderr.write(__doc__)
        sys.exit(100)


if __name__ == "__main__":
    main(sys.argv[1:])
