/* labelproxy bench load generators. Loopback only; every mode is bounded in count and time
 * and prints one JSON line on stdout.
 *
 *   lpclient shortconn HOST PORT CONCURRENCY SECONDS SIZE   connect, SIZE B request, echo, close
 *   lpclient pingpong  HOST PORT COUNT SIZE SECONDS         SIZE B round trips over one connection
 *   lpclient hold      HOST PORT COUNT SECONDS              open COUNT echoed connections, print,
 *                                                          hold them until stdin closes
 *   lpclient udpflood  HOST PORT COUNT SIZE RATE            send COUNT datagrams (RATE/s, 0 = max)
 *   lpclient udprtt    HOST PORT COUNT SIZE TIMEOUT_MS SECONDS   datagram echo round trips
 *
 * With LPCLIENT_FIRST=FILE, shortconn and pingpong send FILE's bytes (at most 16 KiB: a TLS
 * ClientHello for a proxy that routes by name) first on each connection and expect them
 * echoed along with the rest.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in target;
static char first[16384];
static int first_len = 0;

static void die(const char *what);
static void load_first(void) {
    const char *path = getenv("LPCLIENT_FIRST");
    if (!path || !*path) return;
    FILE *f = fopen(path, "rb");
    if (!f) die("LPCLIENT_FIRST");
    first_len = (int)fread(first, 1, sizeof first, f);
    fclose(f);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) { perror(what); exit(1); }

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t pct(const int64_t *sorted, long n, double p) {
    if (n == 0) return 0;
    long i = (long)(p * (double)n + 0.999999) - 1;
    if (i < 0) i = 0;
    if (i >= n) i = n - 1;
    return sorted[i];
}

static void print_latencies(int64_t *v, long n, long lost) {
    qsort(v, (size_t)n, sizeof *v, cmp_i64);
    double sum = 0;
    for (long i = 0; i < n; i++) sum += (double)v[i];
    printf("{\"count\": %ld, \"lost\": %ld, \"p50_us\": %.2f, \"p99_us\": %.2f, \"mean_us\": %.2f}\n",
           n, lost, (double)pct(v, n, 0.50) / 1e3, (double)pct(v, n, 0.99) / 1e3,
           n ? sum / (double)n / 1e3 : 0.0);
}

static int tcp_socket(int nonblock) {
    int fd = socket(AF_INET, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* ---- shortconn ---- */
enum { CONNECTING, READING };
struct slot { int fd; int state; int got; };

static int start_conn(int ep, struct slot *s, int idx) {
    s->fd = tcp_socket(1);
    if (s->fd < 0) return -1;
    s->got = 0;
    s->state = CONNECTING;
    if (connect(s->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)idx};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    return 0;
}

static int shortconn(int conc, double seconds, int size) {
    struct slot *slots = calloc((size_t)conc, sizeof *slots);
    char req[65536 + sizeof first], buf[65536];
    memset(req, 'x', sizeof req);
    memcpy(req, first, (size_t)first_len);
    size += first_len;
    int ep = epoll_create1(0);
    long completed = 0, errors = 0;
    int64_t start = now_ns(), deadline = start + (int64_t)(seconds * 1e9);
    for (int i = 0; i < conc; i++) if (start_conn(ep, &slots[i], i) < 0) { errors++; slots[i].fd = -1; }
    struct epoll_event evs[256];
    for (;;) {
        int64_t t = now_ns();
        if (t >= deadline) break;
        int n = epoll_wait(ep, evs, 256, 10);
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            struct slot *s = &slots[i];
            int failed = 0, done = 0;
            if (s->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(s->fd, req, (size_t)size) != size) failed = 1;
                else {
                    s->state = READING;
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                }
            } else {
                ssize_t r = read(s->fd, buf, sizeof buf);
                if (r < 0 && errno == EAGAIN) continue;
                if (r <= 0) failed = 1;
                else if ((s->got += (int)r) >= size) done = 1;
            }
            if (failed || done) {
                close(s->fd);
                s->fd = -1;
                if (done) completed++; else errors++;
                if (now_ns() < deadline && start_conn(ep, s, i) < 0) errors++;
            }
        }
        for (int i = 0; i < conc; i++)  /* retry slots whose socket() or connect() failed */
            if (slots[i].fd < 0 && now_ns() < deadline && start_conn(ep, &slots[i], i) < 0) errors++;
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    printf("{\"completed\": %ld, \"errors\": %ld, \"seconds\": %.4f, \"rate\": %.1f}\n",
           completed, errors, elapsed, (double)completed / elapsed);
    return 0;
}

/* ---- pingpong ---- */
static int read_full(int fd, char *buf, int size) {
    int got = 0;
    while (got < size) {
        ssize_t r = read(fd, buf + got, (size_t)(size - got));
        if (r <= 0) { if (r < 0 && errno == EINTR) continue; return -1; }
        got += (int)r;
    }
    return 0;
}

static int pingpong(long count, int size, double seconds) {
    int fd = tcp_socket(0);
    struct timeval tv = {.tv_sec = 2, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) die("connect");
    char buf[65536];
    if (first_len && (write(fd, first, (size_t)first_len) != first_len
                      || read_full(fd, buf, first_len) < 0)) die("first bytes");
    memset(buf, 'p', sizeof buf);
    int64_t *v = calloc((size_t)count, sizeof *v);
    for (int i = 0; i < 50; i++)  /* warm-up */
        if (write(fd, buf, (size_t)size) != size || read_full(fd, buf, size) < 0) die("warm-up");
    long n = 0;
    int64_t deadline = now_ns() + (int64_t)(seconds * 1e9);
    while (n < count) {
        int64_t t0 = now_ns();
        if (t0 > deadline) break;
        if (write(fd, buf, (size_t)size) != size || read_full(fd, buf, size) < 0) die("round trip");
        v[n++] = now_ns() - t0;
    }
    close(fd);
    print_latencies(v, n, 0);
    return 0;
}

/* ---- hold ---- */
static int hold(int count, double seconds) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) == 0) { r.rlim_cur = r.rlim_max; setrlimit(RLIMIT_NOFILE, &r); }
    int *fds = calloc((size_t)count, sizeof *fds);
    char *state = calloc((size_t)count, 1); /* 0 not started, 1 connecting, 2 awaiting echo, 3 ready, 4 failed */
    int ep = epoll_create1(0);
    int next = 0, inflight = 0, ready = 0, failed = 0;
    const int window = 64;
    int64_t start = now_ns(), deadline = start + (int64_t)(seconds * 1e9);
    struct epoll_event evs[256];
    char b = 'h';
    while (ready + failed < count && now_ns() < deadline) {
        while (inflight < window && next < count) {
            int i = next++;
            fds[i] = tcp_socket(1);
            if (fds[i] < 0 || (connect(fds[i], (struct sockaddr *)&target, sizeof target) < 0 &&
                               errno != EINPROGRESS)) { state[i] = 4; failed++; continue; }
            state[i] = 1;
            inflight++;
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
            epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        }
        int n = epoll_wait(ep, evs, 256, 50);
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            if (state[i] == 1) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fds[i], SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(fds[i], &b, 1) != 1) { state[i] = 4; failed++; inflight--; continue; }
                state[i] = 2;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
                epoll_ctl(ep, EPOLL_CTL_MOD, fds[i], &ev);
            } else if (state[i] == 2) {
                char c;
                ssize_t rr = read(fds[i], &c, 1);
                if (rr < 0 && errno == EAGAIN) continue;
                inflight--;
                epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
                if (rr == 1) { state[i] = 3; ready++; } else { state[i] = 4; failed++; }
            }
        }
    }
    printf("{\"ready\": %d, \"failed\": %d, \"pending\": %d, \"seconds\": %.4f}\n", ready, failed,
           count - ready - failed, (double)(now_ns() - start) / 1e9);
    fflush(stdout);
    char sink[64];
    while (read(0, sink, sizeof sink) > 0) {}  /* hold until the bench closes our stdin */
    return 0;
}

/* ---- UDP ---- */
static int udp_connected(void) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int sz = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) die("connect");
    return fd;
}

static int udpflood(long count, int size, double rate) {
    int fd = udp_connected();
    enum { BATCH = 32 };
    static char buf[65536];
    memset(buf, 'u', sizeof buf);
    struct iovec iov = {.iov_base = buf, .iov_len = (size_t)size};
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) { msgs[i].msg_hdr.msg_iov = &iov; msgs[i].msg_hdr.msg_iovlen = 1; }
    long sent = 0, errors = 0;
    int64_t start = now_ns();
    while (sent < count) {
        if (rate > 0) {
            int64_t due = start + (int64_t)((double)sent / rate * 1e9);
            int64_t t = now_ns();
            if (due > t) {
                struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(due - t)};
                nanosleep(&ts, NULL);
            }
        }
        long want = count - sent < BATCH ? count - sent : BATCH;
        int n = sendmmsg(fd, msgs, (unsigned)want, 0);
        if (n > 0) sent += n;
        else { errors++; if (errors > 1000000) break; sent++; }  /* a refused datagram is lost */
    }
    int64_t end = now_ns();
    printf("{\"sent\": %ld, \"errors\": %ld, \"start_ns\": %lld, \"end_ns\": %lld}\n", sent, errors,
           (long long)start, (long long)end);
    return 0;
}

static int udprtt(long count, int size, int timeout_ms, double seconds) {
    int fd = udp_connected();
    char buf[65536], in[65536];
    memset(buf, 'r', sizeof buf);
    if (size < 8) size = 8;
    int64_t *v = calloc((size_t)count, sizeof *v);
    long n = 0, lost = 0;
    int64_t deadline = now_ns() + (int64_t)(seconds * 1e9);
    for (uint64_t seq = 1; n + lost < count && now_ns() < deadline; seq++) {
        memcpy(buf, &seq, sizeof seq);
        int64_t t0 = now_ns();
        if (send(fd, buf, (size_t)size, 0) < 0) { lost++; continue; }
        for (;;) {
            int left = timeout_ms - (int)((now_ns() - t0) / 1000000);
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (left <= 0 || poll(&p, 1, left) <= 0) { lost++; break; }
            ssize_t r = recv(fd, in, sizeof in, 0);
            if (r >= 8 && memcmp(in, &seq, sizeof seq) == 0) { v[n++] = now_ns() - t0; break; }
        }
    }
    print_latencies(v, n, lost);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc < 4) { fprintf(stderr, "usage: see the comment at the top of lpclient.c\n"); return 2; }
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &target.sin_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }
    load_first();
    const char *m = argv[1];
    if (!strcmp(m, "shortconn") && argc == 7) return shortconn(atoi(argv[4]), atof(argv[5]), atoi(argv[6]));
    if (!strcmp(m, "pingpong") && argc == 7) return pingpong(atol(argv[4]), atoi(argv[5]), atof(argv[6]));
    if (!strcmp(m, "hold") && argc == 6) return hold(atoi(argv[4]), atof(argv[5]));
    if (!strcmp(m, "udpflood") && argc == 7) return udpflood(atol(argv[4]), atoi(argv[5]), atof(argv[6]));
    if (!strcmp(m, "udprtt") && argc == 8)
        return udprtt(atol(argv[4]), atoi(argv[5]), atoi(argv[6]), atof(argv[7]));
    fprintf(stderr, "bad arguments for %s\n", m);
    return 2;
}
