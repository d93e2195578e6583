/* The Prometheus text exposition of a server's statistics, shared by `fasa stats --format
 * prometheus` and fasa-server's --metrics-bind endpoint. See prom.h. */
#include "prom.h"

#include <stdio.h>

static const char *s_method_name(fasa_client_method m)
{
    static const char *const names[] = {"default", "fasa",  "dense", "oracle",
                                        "stream",  "quest", "sparq", "fasa-plus"};
    return (unsigned)m <= FASA_CLIENT_METHOD_LAST ? names[m] : "unknown";
}

static const char *const s_kinds[] = {"kdom", "krest", "v"};

static uint64_t s_kind_bytes(const fasa_client_rank_stats *r, int kind)
{
    return kind == 0 ? r->kdom_bytes : kind == 1 ? r->krest_bytes : r->v_bytes;
}

/* A Prometheus metric family's HELP and TYPE lines. */
static void s_prom_family(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value with \, " and newline escaped (text exposition format). */
static void s_prom_escaped(FILE *f, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            fprintf(f, "\\%c", *v);
        else if (*v == '\n')
            fputs("\\n", f);
        else
            fputc(*v, f);
    }
}

/* One per-rank number: 0 shards, 1 sessions, 2 tokens, 3 rows, 4 bytes of kind (s_kinds),
 * 5 allocated bytes, 6 resident bytes. */
static uint64_t s_rank_value(const fasa_client_rank_stats *r, int field, int kind)
{
    const uint64_t v[] = {r->shards,      r->sessions, r->tokens, r->rows, s_kind_bytes(r, kind),
                          r->alloc_bytes, r->rss_bytes};
    return v[field];
}

/* The per-rank gauges of a holdings array, named PREFIX_*; with a session label (and the
 * help text prefixed by what) when session is not NULL. */
static void s_prom_ranks(FILE *f, const char *prefix, const char *what, const char *session,
                         size_t n, const fasa_client_rank_stats *r)
{
    static const struct {
        const char *name, *help;
    } g[] = {
        {"shards", "Shards the rank holds (0: the coordinator of a multi-rank server)"},
        {"sessions", "Sessions with a shard on the rank"},
        {"tokens", "Token positions of layer 0 held on the rank"},
        {"rows", "Rows held on the rank, every layer"},
        {"kv_bytes", "Bytes of the rows held on the rank by kind: kdom (the dominant key dims), "
                     "krest (the other key dims), v (the values)"},
        {"alloc_bytes", "Bytes allocated on the rank for the rows (what --memory-limit counts)"},
        {"rss_bytes", "Resident memory of the rank's process"}};
    char name[96], help[256];
    for (int g_i = 0; g_i < 7; g_i++) {
        if (session && g_i == 1) continue; /* 1 on every rank holding a shard of it */
        if (session && g_i == 6) continue; /* the whole rank's, not the session's */
        snprintf(name, sizeof(name), "%s_%s", prefix, g[g_i].name);
        snprintf(help, sizeof(help), "%s%s", what, g[g_i].help);
        s_prom_family(f, name, "gauge", help);
        for (size_t i = 0; i < n; i++)
            for (int kind = 0; kind < (g_i == 4 ? 3 : 1); kind++) {
                fprintf(f, "%s{", name);
                if (session) {
                    fputs("session=\"", f);
                    s_prom_escaped(f, session);
                    fputs("\",", f);
                }
                fprintf(f, "rank=\"%u\"", r[i].rank);
                if (g_i == 4) fprintf(f, ",kind=\"%s\"", s_kinds[kind]);
                fprintf(f, "} %llu\n", (unsigned long long)s_rank_value(&r[i], g_i, kind));
            }
    }
}

void fasa_prom_write(FILE *f, const fasa_client_stats *st)
{
    s_prom_family(f, "fasa_ranks", "gauge", "MPI ranks in the job");
    fprintf(f, "fasa_ranks %u\n", st->n_ranks);
    s_prom_family(f, "fasa_shards", "gauge", "Shards each session is spread over");
    fprintf(f, "fasa_shards %u\n", st->n_shards);
    s_prom_family(f, "fasa_sessions", "gauge", "Sessions held");
    fprintf(f, "fasa_sessions %u\n", st->n_sessions);
    s_prom_family(f, "fasa_profiles", "gauge", "Profiles stored on the server");
    fprintf(f, "fasa_profiles %u\n", st->n_profiles);
    s_prom_family(f, "fasa_kv_bytes", "gauge", "Bytes of keys and values held, every session");
    fprintf(f, "fasa_kv_bytes %llu\n", (unsigned long long)st->kv_bytes);
    s_prom_family(f, "fasa_uptime_seconds", "gauge", "Seconds since the server started");
    fprintf(f, "fasa_uptime_seconds %.3f\n", st->uptime_s);
    s_prom_family(f, "fasa_requests_total", "counter",
                  "Requests answered by type, failed ones included (a batch counts once as "
                  "batch_attend)");
    for (size_t i = 0; i < st->n_request_types; i++) {
        fputs("fasa_requests_total{type=\"", f);
        s_prom_escaped(f, st->requests_by_type[i].type);
        fprintf(f, "\"} %llu\n", (unsigned long long)st->requests_by_type[i].count);
    }
    s_prom_family(f, "fasa_errors_total", "counter",
                  "Responses and batch items with a status other than OK, by status");
    for (int c = FASA_CLIENT_INVALID_ARGUMENT; c <= FASA_CLIENT_UNAVAILABLE; c++)
        fprintf(f, "fasa_errors_total{code=\"%s\"} %llu\n",
                fasa_client_status_name((fasa_client_status)c),
                (unsigned long long)st->errors_by_code[c]);
    s_prom_family(f, "fasa_attend_steps_total", "counter",
                  "Attend steps run (Attend requests and batch items)");
    fprintf(f, "fasa_attend_steps_total %llu\n", (unsigned long long)st->attend_steps);
    s_prom_family(f, "fasa_batch_items_total", "counter", "BatchAttend items received");
    fprintf(f, "fasa_batch_items_total %llu\n", (unsigned long long)st->batch_items);
    s_prom_family(f, "fasa_step_seconds", "summary",
                  "Server-side time of attend steps by the method run (quantiles within about "
                  "2%)");
    static const double qs[] = {0.5, 0.9, 0.99};
    for (int m = FASA_CLIENT_METHOD_FASA; m <= FASA_CLIENT_METHOD_LAST; m++) {
        const fasa_client_latency *l = &st->latency[m];
        const double v[] = {l->p50_us, l->p90_us, l->p99_us};
        const char *name = s_method_name((fasa_client_method)m);
        for (int q = 0; q < 3; q++) {
            fprintf(f, "fasa_step_seconds{method=\"%s\",quantile=\"%g\"} ", name, qs[q]);
            if (l->count)
                fprintf(f, "%.9g\n", v[q] * 1e-6);
            else
                fputs("NaN\n", f);
        }
        fprintf(f, "fasa_step_seconds_sum{method=\"%s\"} %.9g\n", name, l->sum_us * 1e-6);
        fprintf(f, "fasa_step_seconds_count{method=\"%s\"} %llu\n", name,
                (unsigned long long)l->count);
    }
    s_prom_family(f, "fasa_step_seconds_max", "gauge", "Longest attend step by the method run");
    for (int m = FASA_CLIENT_METHOD_FASA; m <= FASA_CLIENT_METHOD_LAST; m++)
        fprintf(f, "fasa_step_seconds_max{method=\"%s\"} %.9g\n",
                s_method_name((fasa_client_method)m), st->latency[m].max_us * 1e-6);
    s_prom_ranks(f, "fasa_rank", "", NULL, st->n_rank_stats, st->rank_stats);
    if (st->has_session) {
        const fasa_client_session_info *s = &st->session;
        s_prom_family(f, "fasa_session_tokens", "gauge", "Tokens held by layer 0 of the session");
        fputs("fasa_session_tokens{session=\"", f);
        s_prom_escaped(f, s->session_id);
        fprintf(f, "\"} %llu\n", (unsigned long long)s->length);
        s_prom_family(f, "fasa_session_kv_bytes", "gauge",
                      "Bytes of keys and values the session holds");
        fputs("fasa_session_kv_bytes{session=\"", f);
        s_prom_escaped(f, s->session_id);
        fprintf(f, "\"} %llu\n", (unsigned long long)s->kv_bytes);
        s_prom_ranks(f, "fasa_session_rank", "Of the session: ", s->session_id, s->n_rank_stats,
                     s->rank_stats);
    }
}
