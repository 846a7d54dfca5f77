/* labelproxy bench upstreams: a TCP epoll echo server (also holds idle connections),
 * a UDP echo server and a counting UDP sink. Loopback only. Prints "ready" once bound.
 *
 *   lpserver tcp-echo PORT | udp-echo PORT | udp-sink PORT
 *
 * The sink prints one JSON line on SIGUSR1 (after its input has been quiet for 150 ms, at most
 * 3 s after the signal) with the datagrams received since the previous report, then resets.
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

#define BATCH 64
#define DGRAM_MAX 65536

static volatile sig_atomic_t report_requested = 0;

static void on_usr1(int sig) { (void)sig; report_requested = 1; }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) { perror(what); exit(1); }

static void raise_nofile(void) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) == 0) { r.rlim_cur = r.rlim_max; setrlimit(RLIMIT_NOFILE, &r); }
}

static int bound_socket(int type, int port) {
    int fd = socket(AF_INET, type, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (type == SOCK_DGRAM) {
        int sz = 8 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz);
        setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz);
    }
    return fd;
}

static int write_all(int fd, const char *buf, ssize_t len) {
    while (len > 0) {
        ssize_t w = write(fd, buf, (size_t)len);
        if (w > 0) { buf += w; len -= w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 2000) <= 0) return -1;
            continue;
        }
        return -1;
    }
    return 0;
}

static _Noreturn void tcp_echo(int port) {
    raise_nofile();
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("ready\n");
    fflush(stdout);
    static char buf[65536];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0 || write_all(fd, buf, r) < 0) close(fd);
        }
    }
}

static void prepare_batch(struct mmsghdr *msgs, struct iovec *iov, struct sockaddr_in *addrs,
                          char (*bufs)[DGRAM_MAX]) {
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = DGRAM_MAX;
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &addrs[i];
        msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
    }
}

static _Noreturn void udp_echo(int port) {
    int fd = bound_socket(SOCK_DGRAM, port);
    static char bufs[BATCH][DGRAM_MAX];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in addrs[BATCH];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        prepare_batch(msgs, iov, addrs, bufs);
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) continue;
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        sendmmsg(fd, msgs, (unsigned)n, 0);
    }
}

static _Noreturn void udp_sink(int port) {
    int fd = bound_socket(SOCK_DGRAM, port);
    struct timeval tv = {.tv_sec = 0, .tv_usec = 20000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    static char bufs[BATCH][DGRAM_MAX];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in addrs[BATCH];
    long long received = 0, bytes = 0;
    int64_t first = 0, last = 0, asked = 0;
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        prepare_batch(msgs, iov, addrs, bufs);
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        int64_t t = now_ns();
        if (n > 0) {
            if (received == 0) first = t;
            last = t;
            received += n;
            for (int i = 0; i < n; i++) bytes += msgs[i].msg_len;
        }
        if (report_requested && asked == 0) asked = t;
        if (asked && (t - (last > asked ? last : asked) > 150000000LL || t - asked > 3000000000LL)) {
            printf("{\"received\": %lld, \"bytes\": %lld, \"first_ns\": %lld, \"last_ns\": %lld}\n",
                   received, bytes, (long long)first, (long long)last);
            fflush(stdout);
            received = bytes = 0;
            first = last = asked = 0;
            report_requested = 0;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: lpserver tcp-echo|udp-echo|udp-sink PORT\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    int port = atoi(argv[2]);
    if (!strcmp(argv[1], "tcp-echo")) tcp_echo(port);
    if (!strcmp(argv[1], "udp-echo")) udp_echo(port);
    if (!strcmp(argv[1], "udp-sink")) udp_sink(port);
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
