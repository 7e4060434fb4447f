/* open()+close() cost from inside a cgroup: joins CGROUP, warms up, then times N opens of
 * PATH and prints nanoseconds per iteration. Built by bench/open_cost.py at run time. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: openbench CGROUP PATH N\n");
        return 2;
    }
    char procs[4096];
    snprintf(procs, sizeof procs, "%s/cgroup.procs", argv[1]);
    int pfd = open(procs, O_WRONLY);
    if (pfd < 0 || write(pfd, "0", 1) != 1) { perror(procs); return 1; }
    close(pfd);
    long n = atol(argv[3]);
    for (long i = 0; i < n / 10; i++) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) { perror(argv[2]); return 1; }
        close(fd);
    }
    double start = now_ns();
    for (long i = 0; i < n; i++) close(open(argv[2], O_RDONLY));
    printf("%.1f\n", (now_ns() - start) / n);
    return 0;
}
