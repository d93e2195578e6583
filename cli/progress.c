#include "progress.h"

#include <stdio.h>
#include <unistd.h>

void progress_init(progress *p, const char *label, long total)
{
    p->label = label;
    p->total = total > 0 ? total : 1;
    p->tty = isatty(2);
    p->last_pct = -1;
}

void progress_update(progress *p, long done)
{
    if (!p->tty) return;
    const int pct = (int)(100 * done / p->total);
    if (pct == p->last_pct) return;
    p->last_pct = pct;
    char bar[41];
    const int fill = pct * 40 / 100;
    for (int i = 0; i < 40; i++) bar[i] = i < fill ? '#' : '.';
    bar[40] = 0;
    fprintf(stderr, "\r%-12s [%s] %3d%% (%ld/%ld)", p->label, bar, pct, done, p->total);
    fflush(stderr);
}

void progress_done(progress *p)
{
    if (p->tty && p->last_pct >= 0) fprintf(stderr, "\n");
}

void progress_callback(void *arg, long done, long total)
{
    progress *p = arg;
    p->total = total > 0 ? total : 1;
    progress_update(p, done);
}
