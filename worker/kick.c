#define _GNU_SOURCE /* ppoll */
/* Wake-ups between the ranks of one node: see kick.h. */
#include "kick.h"

#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The abstract socket name of rank in job: a NUL, then "fasa-kick-JOB-RANK". */
static socklen_t s_addr(struct sockaddr_un *a, const char *job, int rank)
{
    memset(a, 0, sizeof(*a));
    a->sun_family = AF_UNIX;
    const int n = snprintf(a->sun_path + 1, sizeof(a->sun_path) - 1, "fasa-kick-%s-%d", job, rank);
    const size_t len = n < 0                                 ? 0
                       : (size_t)n < sizeof(a->sun_path) - 1 ? (size_t)n
                                                             : sizeof(a->sun_path) - 2;
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
}

int wmpi_kick_open(wmpi_kick *k, int rank)
{
    memset(k, 0, sizeof(*k));
    k->fd = -1;
    const char *ns = getenv("PMIX_NAMESPACE"), *job = getenv("SLURM_JOB_ID"),
               *step = getenv("SLURM_STEP_ID");
    if (ns && *ns)
        snprintf(k->job, sizeof(k->job), "%.90s", ns);
    else if (job && *job)
        snprintf(k->job, sizeof(k->job), "slurm%.40s.%.40s", job, step ? step : "");
    else
        snprintf(k->job, sizeof(k->job), "ppid%ld", (long)getppid());
    /* Characters that cannot confuse the name's end: anything else becomes '_'. */
    for (char *p = k->job; *p; p++)
        if (*p == '-' || *p == '/' || (unsigned char)*p < 33 || (unsigned char)*p > 126) *p = '_';
#ifdef __linux__
    const int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    struct sockaddr_un a;
    const socklen_t len = s_addr(&a, k->job, rank);
    if (bind(fd, (struct sockaddr *)&a, len)) {
        close(fd);
        return 0;
    }
    k->fd = fd;
#else
    (void)rank;
#endif
    return 0;
}

void wmpi_kick_close(wmpi_kick *k)
{
    if (k->fd >= 0) close(k->fd);
    k->fd = -1;
}

void wmpi_kick_send(const wmpi_kick *k, int peer)
{
    if (k->fd < 0) return;
    struct sockaddr_un a;
    const socklen_t len = s_addr(&a, k->job, peer);
    const char b = 1;
    /* ECONNREFUSED / ENOENT (no such socket here) and EAGAIN (the peer has unread
     * wake-ups already, so it wakes anyway) all leave nothing to do. */
    (void)sendto(k->fd, &b, 1, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&a, len);
}

int wmpi_kick_wait(wmpi_kick *k, long timeout_ns)
{
    if (k->fd < 0) {
        const struct timespec ts = {timeout_ns / 1000000000L, timeout_ns % 1000000000L};
        nanosleep(&ts, NULL);
        return 0;
    }
    struct pollfd p = {.fd = k->fd, .events = POLLIN};
    /* poll(2) counts milliseconds: ppoll takes the exact timeout. */
    const struct timespec ts = {timeout_ns / 1000000000L, timeout_ns % 1000000000L};
    const int rc = ppoll(&p, 1, &ts, NULL);
    if (rc <= 0) return 0;
    char buf[64];
    int got = 0;
    while (recv(k->fd, buf, sizeof(buf), MSG_DONTWAIT) > 0) got = 1;
    k->kicks += got;
    return got;
}
