/* floor: the least a relay with one process per connection can do, as a yardstick for
 * scripts/bench (relays "floor" and "floor-socks", "floor-socks-auth"). Not a product:
 * no logging, no limits, no timeouts, IPv4 only.
 *
 * N processes forked at start each accept on the shared listener (the kernel wakes one
 * of the blocked accept calls per connection), connect to the target, move bytes with
 * read/write until both directions have ended, close, and accept again. No supervisor,
 * no hand-over, no exec, no pipes: what is left is what any design that gives each
 * connection its own process while it lives pays per connection: its process's wakeups
 * and the kernel's TCP work.
 *
 * usage: floor PORT NPROC fwd TARGET_PORT
 *        floor PORT NPROC socks [USER PASSWORD]
 * The listener and the targets are on 127.0.0.1.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *user, *password;

static int dial(struct sockaddr_in *a) {
    int t = socket(AF_INET, SOCK_STREAM, 0);
    if (t < 0) return -1;
    if (connect(t, (struct sockaddr *)a, sizeof *a) < 0) {
        close(t);
        return -1;
    }
    return t;
}

static int read_full(int fd, unsigned char *b, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, b + got, n - got);
        if (r <= 0) return -1;
        got += r;
    }
    return 0;
}

/* SOCKS5 as microsocks does it: greeting, optional RFC 1929 login, CONNECT to IPv4. */
static int socks(int c) {
    unsigned char b[600];
    if (read_full(c, b, 2) || read_full(c, b + 2, b[1])) return -1;
    int want = user ? 2 : 0, offered = 0;
    for (int i = 0; i < b[1]; i++) offered |= b[2 + i] == want;
    unsigned char m[2] = {5, offered ? want : 0xff};
    if (write(c, m, 2) != 2 || !offered) return -1;
    if (user) {
        if (read_full(c, b, 2) || read_full(c, b + 2, b[1] + 1)) return -1;
        int ul = b[1], pl = b[2 + ul];
        if (read_full(c, b + 3 + ul, pl)) return -1;
        int ok = ul == (int)strlen(user) && !memcmp(b + 2, user, ul) && pl == (int)strlen(password) &&
                 !memcmp(b + 3 + ul, password, pl);
        unsigned char r[2] = {1, ok ? 0 : 1};
        if (write(c, r, 2) != 2 || !ok) return -1;
    }
    if (read_full(c, b, 10) || b[1] != 1 || b[3] != 1) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET};
    memcpy(&a.sin_addr, b + 4, 4);
    memcpy(&a.sin_port, b + 8, 2);
    int t = dial(&a);
    unsigned char r[10] = {5, t < 0 ? 5 : 0, 0, 1};
    if (write(c, r, 10) != 10 && t >= 0) {
        close(t);
        return -1;
    }
    return t;
}

static void relay(int c, int t) {
    struct pollfd p[2] = {{c, POLLIN, 0}, {t, POLLIN, 0}};
    char buf[16384];
    int open = 2;
    while (open) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return;
        }
        for (int i = 0; i < 2; i++) {
            if (!p[i].revents) continue;
            ssize_t n = read(p[i].fd, buf, sizeof buf);
            if (n <= 0) {
                shutdown(p[1 - i].fd, SHUT_WR);
                p[i].fd = -1;
                open--;
            } else if (write(p[1 - i].fd, buf, n) != n) {
                return;
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: floor PORT NPROC fwd TARGET_PORT | socks [USER PASSWORD]\n");
        return 100;
    }
    int fwd = !strcmp(argv[3], "fwd");
    struct sockaddr_in target = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fwd && argc == 5) {
        target.sin_port = htons(atoi(argv[4]));
    } else if (!fwd && !strcmp(argv[3], "socks") && (argc == 4 || argc == 6)) {
        if (argc == 6) user = argv[4], password = argv[5];
    } else {
        fprintf(stderr, "floor: bad arguments\n");
        return 100;
    }
    signal(SIGPIPE, SIG_IGN);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                             .sin_port = htons(atoi(argv[1]))};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr *)&me, sizeof me) || listen(l, 1024)) {
        perror("floor: bind/listen");
        return 111;
    }
    int n = atoi(argv[2]);
    for (int i = 0; i < n; i++) {
        if (fork() == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            for (;;) {
                int c = accept(l, NULL, NULL);
                if (c < 0) continue;
                int t = fwd ? dial(&target) : socks(c);
                if (t >= 0) {
                    relay(c, t);
                    close(t);
                }
                close(c);
            }
        }
    }
    while (wait(NULL) > 0 || errno == EINTR)
        ;
    return 0;
}
