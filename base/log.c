/* See log.h. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static int s_rank;
static fasa_log_level s_level = FASA_LOG_INFO;
static const char *const s_names[] = {"error", "warn", "info", "debug"};
static const char *const s_tags[] = {"ERROR", "WARN", "INFO", "DEBUG"};
static _Thread_local uint64_t s_request;

void fasa_log_set_request(uint64_t request_id)
{
    s_request = request_id;
}

uint64_t fasa_log_request(void)
{
    return s_request;
}

void fasa_log_setup(int rank, fasa_log_level level)
{
    s_rank = rank;
    s_level = level;
}

int fasa_log_level_parse(const char *name, fasa_log_level *out_p)
{
    for (int i = 0; i < 4; i++)
        if (strcmp(name, s_names[i]) == 0) {
            *out_p = (fasa_log_level)i;
            return 0;
        }
    return -1;
}

const char *fasa_log_level_name(fasa_log_level level)
{
    return (unsigned)level < 4 ? s_names[level] : "unknown";
}

int fasa_log_enabled(fasa_log_level level)
{
    return level <= s_level;
}

void fasa_log(fasa_log_level level, uint64_t request_id, const char *fmt, ...)
{
    if (level > s_level || (unsigned)level > FASA_LOG_DEBUG) return;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char line[1024], id[24] = "-";
    if (!request_id) request_id = s_request;
    if (request_id) snprintf(id, sizeof(id), "%llu", (unsigned long long)request_id);
    int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s rank=%d req=%s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000, s_tags[level], s_rank, id);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && n < (int)sizeof(line)) vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    /* One write per line, so lines of concurrent ranks do not interleave mid-line. */
    for (char *p = line; *p; p++)
        if (*p == '\n') *p = ' ';
    fprintf(stderr, "%s\n", line);
}
