/*
 * The kernel floor of the benchmark's workload (bench/compare.py builds it
 * with `cc -O2`): a relay that makes exactly the syscalls a proxy must make
 * per keep-alive request and does no HTTP work at all.
 *
 *   floor LISTEN_PORT APP_PORT [THREADS]   relay: per request one read from
 *       the client, one write to the app, one read from the app, one write to
 *       the client, on a connection to the app opened with the client's
 *       (plus epoll_wait when there is nothing to do);
 *   floor LISTEN_PORT 0 [THREADS]          short-circuit: per request one read
 *       and one write of a fixed 503 answer of healthgate's size.
 *
 * It relies on what wrk and nginx do in the benchmark (one small message per
 * read), so it is a yardstick, not a proxy. THREADS threads each run their
 * own epoll loop on their own SO_REUSEPORT socket, like healthgate's workers.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static int listen_port, app_port;

static const char answer[] =
    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 5\r\n"
    "content-length: 90\r\ndate: Mon, 30 Nov 2026 00:00:00 GMT\r\n\r\n"
    "{\"type\":\"about:blank\",\"title\":\"Service Unavailable\",\"status\":503,\"cause\":\"OUT OF SERVICE\"}";

/* The peer of each fd (client <-> app); -1 for the listening socket. */
static int peer[65536];

static int tcp_socket(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    return s;
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void watch(int ep, int fd) {
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void drop_pair(int fd) {
    int p = peer[fd];
    close(fd);
    if (p >= 0) close(p);
}

static void *loop(void *arg) {
    (void)arg;
    int l = tcp_socket();
    struct sockaddr_in a = loopback(listen_port);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096)) {
        perror("listen");
        exit(1);
    }
    int ep = epoll_create1(0);
    watch(ep, l);
    struct epoll_event evs[256];
    static __thread char buf[65536];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == l) {
                int c = accept4(l, NULL, NULL, 0);
                if (c < 0) continue;
                int one = 1;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                peer[c] = -1;
                if (app_port) {
                    int u = socket(AF_INET, SOCK_STREAM, 0);
                    struct sockaddr_in app = loopback(app_port);
                    if (connect(u, (struct sockaddr *)&app, sizeof app)) {
                        close(u);
                        close(c);
                        continue;
                    }
                    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    peer[c] = u;
                    peer[u] = c;
                    watch(ep, u);
                }
                watch(ep, c);
                continue;
            }
            ssize_t k = read(fd, buf, sizeof buf);
            if (k <= 0) {
                drop_pair(fd);
                continue;
            }
            if (peer[fd] < 0) {
                if (write(fd, answer, sizeof answer - 1) < 0) drop_pair(fd);
            } else if (write(peer[fd], buf, k) != k) {
                drop_pair(fd);
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: floor LISTEN_PORT APP_PORT [THREADS]\n");
        return 2;
    }
    listen_port = atoi(argv[1]);
    app_port = atoi(argv[2]);
    int threads = argc > 3 ? atoi(argv[3]) : 1;
    pthread_t t;
    for (int i = 1; i < threads; i++) pthread_create(&t, NULL, loop, NULL);
    loop(NULL);
}
