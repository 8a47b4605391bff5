#!/usr/bin/env python3
"""Writes the seed corpora fuzz/corpus/TARGET/ (committed; run again after changing an
input format in fuzz/src). Each seed is a small valid input of its target's format, so
that AFL++ starts from the paths that matter."""

import os
import random
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
rng = random.Random(14)

seeds = {t: [] for t in ("handshake", "users", "hash", "rules", "proxy", "udp", "http", "proxyin")}

# handshake: a configuration byte, a piece size, then the client's bytes
# (fuzz/src/handshake.rs).
CHECKER, ANON, ANON_ONLY, PIPES = 0x00, 0x08, 0x18, 0x80


def hs(cfg, client, chunk=0):
    seeds["handshake"].append(bytes([cfg, chunk]) + client)


def socks5_userpass(user, pw, req):
    return bytes([5, 1, 2, 1, len(user)]) + user + bytes([len(pw)]) + pw + req


V4_REQ = bytes([5, 1, 0, 1, 93, 184, 216, 34, 1, 187])
NAME_REQ = bytes([5, 1, 0, 3, 11]) + b"example.com" + bytes([0, 80])
V6_REQ = bytes([5, 1, 0, 4]) + bytes.fromhex("20010db8000000000000000000000001") + bytes([0, 22])
HTTP_AUTH = (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
             b"Proxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n")
for cfg in (CHECKER, CHECKER | PIPES):
    hs(cfg, socks5_userpass(b"alice", b"pw", V4_REQ))
    hs(cfg, socks5_userpass(b"bob", b"pw!", NAME_REQ))
    hs(cfg, socks5_userpass(b"carol", b"tmp", V6_REQ))
    hs(cfg, HTTP_AUTH)
for cfg in (ANON, ANON_ONLY | PIPES):
    hs(cfg, bytes([5, 1, 0]) + V4_REQ)
    hs(cfg | 0x10, bytes([5, 2, 0, 2]) + V6_REQ)
    hs(cfg, bytes([4, 1, 0, 80, 93, 184, 216, 34]) + b"user\0")
    hs(cfg, bytes([4, 1, 1, 187, 0, 0, 0, 1]) + b"\0example.com\0")
    hs(cfg, b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n")
hs(0x20 | ANON, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
# In pieces: a peek sees part of the head; the terminator is split.
hs(CHECKER, HTTP_AUTH, chunk=7)
hs(ANON, b"CONNECT a.example:22 HTTP/1.0\r\n\r\n", chunk=1)
hs(CHECKER, socks5_userpass(b"alice", b"pw", NAME_REQ), chunk=3)
# Plain-HTTP forwarding: absolute-form requests, a body behind one.
hs(CHECKER, b"GET http://example.com/a?b HTTP/1.1\r\nHost: example.com\r\n"
   b"Proxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n")
hs(ANON, b"POST http://[2001:db8::1]:8080/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", chunk=9)

# users: files (hashes made with mkpasswd, htpasswd -B -C 10 and argon2).
Y = "$y$j9T$S8KjiwYSEUcrKLwZmUN.g0$8PbySdTCt/6GKzvWZER3k13SUNV1w/53qXpY8red8j8"
Y_SMALL = "$y$j7T$fHtcvEYqQvA/icxXkUjK3/$ibAtb8cGI/uIi8zGI4fjkelE8E63qjMXwkyRDftIhU."
S6 = ("$6$kxyFWb5gST/sBsNR$Ggg5MyyAHXSw94J94VH4BdQiKvtyn74TsP7xBW7N/WnZYpflWqfekdGr5ib0q2HSTb1"
      "TTVDzEUHFyqhUstyrr1")
S5 = "$5$rounds=10000$3t4DgfrZ7AyLGj4a$rsMKSzSDvF2cLgLXdT10j.6hrLUFFyRK7B1p.YP5U04"
B = "$2y$10$z/IRHKtpQVCP4mTLD67Mv.FTzRhSmCmkDn5cX87JMwGGOlxd1/E6u"
A = "$argon2id$v=19$m=8192,t=5,p=1$c29tZXNhbHQxMg$1fKnB2wDBiJryIIMt7vDbYblHq2QzspyU+XBkIdNfJM"
seeds["users"] += [
    f"alice:{Y}\n".encode(),
    f"# users\n\nbob:{S6}:10.0.0.0/8, 192.0.2.1/32:443\r\ncarol:{B}\n".encode(),
    f"dave:{A}:[2001:db8::/32]:443 *:80-90\nerin:{S5}\n".encode(),
    f"frank:{Y_SMALL}:::ffff:127.0.0.0/104\n".encode(),
    b"bad:$1$abc$def\n",
]

# hash: a selector byte (format | 0x40 templated | 0x80 verify), then the spelling.
ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
BCRYPT64 = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
ALPHABETS = [ITOA64 + "$", B64 + "$=,", BCRYPT64 + "$", ITOA64 + "$=", ITOA64 + "$="]
PREFIXES = ["$y$", "$argon2id$", "$2b$", "$5$", "$6$"]


def unspell(fmt, text):
    assert text.startswith(PREFIXES[fmt]), text
    return bytes(ALPHABETS[fmt].index(c) for c in text[len(PREFIXES[fmt]):])


for fmt, text in [(0, Y), (0, Y_SMALL), (1, A), (2, "$2b$" + B[4:]), (3, S5), (4, S6)]:
    seeds["hash"].append(bytes([fmt | 0x80]) + unspell(fmt, text))
for fmt in range(5):
    seeds["hash"].append(bytes([fmt | 0x40 | 0x80]) + bytes(rng.randrange(256) for _ in range(120)))

# rules and proxy: choices (any bytes are an input); a raw text follows them.
for _ in range(6):
    seeds["rules"].append(bytes(rng.randrange(256) for _ in range(rng.randrange(40, 160))))
seeds["rules"].append(bytes(80) + b" 10.0.0.0/8 [::1]:22 *:443 ::ffff:127.0.0.0/104 64:ff9b::/96")
for _ in range(4):
    seeds["proxy"].append(bytes(rng.randrange(256) for _ in range(64)))
for raw in (b"192.0.2.1:56324", b"[2001:db8::1]:443", b"::1:5", b"[::ffff:127.0.0.1]:80"):
    seeds["proxy"].append(struct.pack(">HBIBH", 1080, 1, 0x7F000001, 0, 0) + raw)

# udp: datagrams as a client sends them to the relay (RSV FRAG ATYP DST PORT DATA).
V6 = bytes.fromhex("20010db8000000000000000000000001")
MAPPED = bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
seeds["udp"] += [
    bytes([0, 0, 0, 1, 192, 0, 2, 1, 0, 53]) + b"query",
    bytes([0, 0, 0, 4]) + V6 + bytes([1, 187]) + b"\x00" * 16,
    bytes([0, 0, 0, 4]) + MAPPED + bytes([0, 9]),
    bytes([0, 0, 0, 3, 11]) + b"example.com" + bytes([0, 53]) + b"q",
    bytes([0, 0, 1, 1, 127, 0, 0, 1, 0, 7]) + b"fragment",
    bytes([0, 0, 0, 3, 3]) + b"a b" + bytes([0, 1]),
    bytes([0, 0, 0, 9, 1, 2, 3]),
]

# http: a mode byte (0 request head, 1 chunked body, 2 response head), then the bytes.
seeds["http"] += [
    b"\0GET http://example.com/a?b HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic YTpi\r\n"
    b"Connection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
    b"\0POST http://[2001:db8::1]:8080/ HTTP/1.1\r\nContent-Length: 5\r\n"
    b"Expect: 100-continue\r\n\r\n",
    b"\0PUT http://a:81/p HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n",
    b"\0OPTIONS http://a HTTP/1.0\r\nContent-Length: 0, 0\r\n\r\n",
    b"\x01" + b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nX-Sum: 9\r\n\r\nGET / HTTP/1.1\r\n",
    b"\x01" + b"a\r\n0123456789\r\n0\r\n\r\n",
    b"\x02HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    b"\x02HTTP/1.0 200 OK\r\nConnection: keep-alive, X-H\r\nX-H: 1\r\nKeep-Alive: t=5\r\n"
    b"Content-Length: 2\r\n\r\nhi",
    b"\x02HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\n\r\n",
]

# proxyin: a control byte (bit 7 a pipe; the rest the size of the pieces, 0 at once),
# then what a balancer sends: a header and the client's first bytes.
SIG = b"\r\n\r\n\0\r\nQUIT\n"
V4_BODY = bytes([192, 0, 2, 1, 127, 0, 0, 1]) + struct.pack(">HH", 56324, 1080)
V6_BODY = V6 + bytes(15) + b"\x01" + struct.pack(">HH", 443, 1080)
seeds["proxyin"] += [
    b"\x00PROXY TCP4 192.0.2.1 127.0.0.1 56324 1080\r\n\x05\x01\x00",
    b"\x07PROXY TCP6 2001:db8::1 ::1 443 1080\r\nGET / HTTP/1.1\r\n\r\n",
    b"\x81PROXY UNKNOWN\r\nhello",
    b"\x00" + SIG + b"\x21\x11\x00\x0c" + V4_BODY + b"\x05\x01\x02",
    b"\x85" + SIG + b"\x21\x21\x00\x29" + V6_BODY + b"\x04\x00\x02ab" + b"data",
    b"\x03" + SIG + b"\x20\x00\x00\x00",
    b"\x00" + SIG + b"\x21\x00\x00\x00" + SIG,
    b"\x01PROXY TCP4 1.2.3.4 5.6.7.8 1",
    b"\x00" + SIG + b"\x21\x12\x00\x0c" + V4_BODY,
]

for target, inputs in seeds.items():
    d = os.path.join(CORPUS, target)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i, data in enumerate(inputs):
        with open(os.path.join(d, f"seed-{i:02d}"), "wb") as f:
            f.write(data)
