/* The floor case's forwarder in C (benchmarks/patterns_cases/floor.py): one unix-stream client
 * and one UDP peer on 127.0.0.1, each read written on to the other side as it is, nothing else.
 *
 *   floor_forward UNIX_PATH [PEER_PORT]
 *
 * Prints {"port": N} (its UDP port) and "ready", then accepts one client on UNIX_PATH. Without
 * PEER_PORT it answers whoever sent the last datagram. It exits when the client hangs up or its
 * stdin closes (the role that started it is gone). */
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static void watch(int epoll, int fd) {
    struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event) != 0) {
        perror("epoll_ctl");
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: floor_forward UNIX_PATH [PEER_PORT]\n");
        return 2;
    }
    struct sockaddr_un path = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof path.sun_path) {
        fprintf(stderr, "floor_forward: socket path too long\n");
        return 2;
    }
    strcpy(path.sun_path, argv[1]);
    int server = socket(AF_UNIX, SOCK_STREAM, 0);
    unlink(argv[1]);
    if (bind(server, (struct sockaddr *)&path, sizeof path) != 0 || listen(server, 1) != 0) {
        perror("floor_forward: unix socket");
        return 1;
    }
    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in peer = local;
    socklen_t size = sizeof local;
    if (bind(udp, (struct sockaddr *)&local, sizeof local) != 0 ||
        getsockname(udp, (struct sockaddr *)&local, &size) != 0) {
        perror("floor_forward: udp socket");
        return 1;
    }
    int known = argc == 3;
    if (known)
        peer.sin_port = htons((unsigned short)atoi(argv[2]));
    printf("{\"port\": %d}\nready\n", ntohs(local.sin_port));
    fflush(stdout);

    int client = accept(server, NULL, NULL);
    if (client < 0) {
        perror("floor_forward: accept");
        return 1;
    }
    int epoll = epoll_create1(0);
    watch(epoll, client);
    watch(epoll, udp);
    watch(epoll, STDIN_FILENO);
    static char buffer[65536];
    for (;;) {
        struct epoll_event ready[3];
        int n = epoll_wait(epoll, ready, 3, -1);
        if (n < 0 && errno == EINTR)
            continue;
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            if (fd == client) {
                ssize_t got = read(client, buffer, sizeof buffer);
                if (got <= 0)
                    return 0;
                if (known)
                    sendto(udp, buffer, (size_t)got, 0, (struct sockaddr *)&peer, sizeof peer);
            } else if (fd == udp) {
                socklen_t from = sizeof peer;
                ssize_t got = recvfrom(udp, buffer, sizeof buffer, 0, (struct sockaddr *)&peer, &from);
                known = 1;
                if (got > 0 && write(client, buffer, (size_t)got) < 0)
                    return 0;
            } else if (read(STDIN_FILENO, buffer, sizeof buffer) <= 0) {
                return 0;
            }
        }
    }
}
