/* A one-line progress bar on stderr, drawn only when stderr is a terminal. */
#ifndef FASA_CLIENT_PROGRESS_H
#define FASA_CLIENT_PROGRESS_H

typedef struct progress {
    const char *label;
    long total;
    int tty;      /* 1 when stderr is a terminal */
    int last_pct; /* last percentage drawn */
} progress;

void progress_init(progress *p, const char *label, long total);
/* Draws done/total; cheap when nothing visible changes. */
void progress_update(progress *p, long done);
/* Finishes the line (terminal only). */
void progress_done(progress *p);
/* Adapter for fasa_calib_opts.progress (arg is a progress *). */
void progress_callback(void *arg, long done, long total);

#endif
