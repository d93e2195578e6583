/* The Prometheus text exposition format (version 0.0.4) of a fasa-server's statistics:
 * metrics named fasa_*, per-rank gauges fasa_rank_* labelled rank (and kind for the bytes),
 * step times as the summary fasa_step_seconds by method, and with a session its
 * fasa_session_* gauges. `fasa stats --format prometheus` prints it; fasa-server serves it at
 * /metrics with --metrics-bind. */
#ifndef FASA_CLIENT_PROM_H
#define FASA_CLIENT_PROM_H

#include <stdio.h>

#include "fasa_client.h"

void fasa_prom_write(FILE *f, const fasa_client_stats *st);

#endif
