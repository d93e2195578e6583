/* libFuzzer target over the server's request path: the bytes of one input are handed to
 * fasa_service_handle exactly as rank 0 hands it a client's frame (proto/edge.c decodes them,
 * coord/service.c checks them against the session and drives the engine), over an embedded
 * engine of 2 in-process shards with a 16-token placement block (fixture.h), with the
 * service's default limits.
 *
 * An input that starts with "FRM" is a multipart message instead: the Request and raw data
 * frames after it (fixture.h's fuzz_split), handed over as rank 0 hands them over.
 *
 * Beyond the sanitizers (ASan, UBSan), every input must keep these invariants, or the target
 * aborts with a line saying which:
 *   - a response always comes back, decodes as a Response, carries protocol_version 1 and a
 *     known status, and echoes the request id whenever the bytes unpack as a Request;
 *   - an error has a one-line message and no body; an OK has the body of its request kind
 *     (and never for bytes that do not unpack);
 *   - a rejected request changes no stored state: session count, what each shard holds
 *     (sessions, tokens, rows, bytes by part, allocated bytes), and the named session's
 *     length per layer, bytes and profile are compared before and after;
 *   - an accepted request changes exactly what it says: an Append adds its rows, an
 *     Attend's k_new one row, a Create one session, a Drop removes that session's rows;
 *   - Attend results have the session's shape, the expected number of visible tokens, and
 *     selected positions that are -1 or distinct visible positions; Stats agrees with the
 *     engine (and its requests by type add up to requests); ListSessions lists every session
 *     in id order with the engine's numbers; DeleteProfile changes no session; Ping echoes
 *     its payload.
 * State carries over between inputs (sessions grow, profiles get stored), so the fixture is
 * rebuilt every FUZZ_RESET_EVERY inputs, or as soon as it holds more than FUZZ_MAX_SESSIONS
 * sessions or FUZZ_MAX_KV_BYTES of keys and values, which keeps memory flat. With
 * FASA_FUZZ_RESET_EVERY=1 in the environment every input starts from a fresh fixture, so a
 * crash reproduces from its input alone. */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "edge.h"
#include "fixture.h"

#define FUZZ_RESET_EVERY 1000
#define FUZZ_MAX_SESSIONS 8
#define FUZZ_MAX_KV_BYTES ((int64_t)16 << 20)

static void s_broken(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void s_broken(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("fuzz_request: invariant broken: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        if (!(cond)) s_broken(__VA_ARGS__);                                                        \
    } while (0)

/* What the engine holds: everything a request could change. sess_* describe one session,
 * the one the request names. */
typedef struct snap {
    int n_sessions;
    int64_t kv_bytes;
    fasa_shard_stats shard[FUZZ_SHARDS]; /* summed over every session */
    int sess_exists, sess_layers, sess_has_profile;
    int64_t sess_kv_bytes, sess_rows, sess_tokens;
    int32_t sess_len[EDGE_MAX_LAYERS]; /* (sess_layers) */
} snap;

static void s_snap(fasa_engine_t *e, const char *id, snap *s)
{
    fasa_error fe;
    memset(s, 0, sizeof(*s));
    s->n_sessions = fasa_engine_count(e);
    s->kv_bytes = fasa_engine_kv_bytes(e, NULL);
    CHECK(fasa_engine_shard_stats(e, NULL, s->shard, &fe) == FASA_OK, "shard stats: %s", fe.msg);
    int64_t part_bytes = 0;
    for (int i = 0; i < FUZZ_SHARDS; i++)
        part_bytes += s->shard[i].kdom_bytes + s->shard[i].krest_bytes + s->shard[i].v_bytes;
    CHECK(part_bytes == s->kv_bytes, "kv_bytes %lld but the shards hold %lld",
          (long long)s->kv_bytes, (long long)part_bytes);
    const fasa_session_config *c = id ? fasa_engine_config(e, id) : NULL;
    if (!c) return;
    s->sess_exists = 1;
    s->sess_layers = c->n_layers;
    s->sess_has_profile = c->profile != NULL;
    s->sess_kv_bytes = fasa_engine_kv_bytes(e, id);
    for (int l = 0; l < c->n_layers; l++) s->sess_len[l] = fasa_engine_length(e, id, l);
    fasa_shard_stats per[FUZZ_SHARDS];
    CHECK(fasa_engine_shard_stats(e, id, per, &fe) == FASA_OK, "shard stats of '%s': %s", id,
          fe.msg);
    for (int i = 0; i < FUZZ_SHARDS; i++) {
        s->sess_rows += per[i].rows;
        s->sess_tokens += per[i].tokens;
    }
    CHECK(s->sess_tokens == s->sess_len[0], "session '%s' holds %lld tokens, length %d", id,
          (long long)s->sess_tokens, (int)s->sess_len[0]);
    CHECK(s->sess_kv_bytes ==
              2 * s->sess_rows * c->n_kv_heads * c->head_dim * (int64_t)fasa_dtype_size(c->dtype),
          "session '%s': %lld kv bytes for %lld rows", id, (long long)s->sess_kv_bytes,
          (long long)s->sess_rows);
}

static int64_t s_sum(const snap *s, size_t offset)
{
    int64_t n = 0;
    for (int i = 0; i < FUZZ_SHARDS; i++)
        n += *(const int64_t *)((const char *)&s->shard[i] + offset);
    return n;
}

/* The session a request names (a batch: its first item's), or NULL. */
static const char *s_session_of(const Fasa__V1__Request *m)
{
    switch (m->body_case) {
    case FASA__V1__REQUEST__BODY_CREATE_SESSION:
        return m->create_session->session_id;
    case FASA__V1__REQUEST__BODY_APPEND:
        return m->append->session_id;
    case FASA__V1__REQUEST__BODY_ATTEND:
        return m->attend->session_id;
    case FASA__V1__REQUEST__BODY_BATCH_ATTEND:
        return m->batch_attend->n_items ? m->batch_attend->items[0]->session_id : NULL;
    case FASA__V1__REQUEST__BODY_SET_PROFILE:
        return m->set_profile->session_id;
    case FASA__V1__REQUEST__BODY_DROP_SESSION:
        return m->drop_session->session_id;
    case FASA__V1__REQUEST__BODY_STATS:
        return m->stats->session_id;
    case FASA__V1__REQUEST__BODY_LOAD_SESSION:
        return m->load_session->session_id;
    default:
        return NULL;
    }
}

/* The response body an OK answer to body case bc carries. */
static Fasa__V1__Response__BodyCase s_body_for(Fasa__V1__Request__BodyCase bc)
{
    switch (bc) {
    case FASA__V1__REQUEST__BODY_PING:
        return FASA__V1__RESPONSE__BODY_PING;
    case FASA__V1__REQUEST__BODY_CREATE_SESSION:
        return FASA__V1__RESPONSE__BODY_CREATE_SESSION;
    case FASA__V1__REQUEST__BODY_APPEND:
        return FASA__V1__RESPONSE__BODY_APPEND;
    case FASA__V1__REQUEST__BODY_ATTEND:
        return FASA__V1__RESPONSE__BODY_ATTEND;
    case FASA__V1__REQUEST__BODY_BATCH_ATTEND:
        return FASA__V1__RESPONSE__BODY_BATCH_ATTEND;
    case FASA__V1__REQUEST__BODY_CALIBRATE:
        return FASA__V1__RESPONSE__BODY_CALIBRATE;
    case FASA__V1__REQUEST__BODY_STATS:
        return FASA__V1__RESPONSE__BODY_STATS;
    case FASA__V1__REQUEST__BODY_LIST_SESSIONS:
        return FASA__V1__RESPONSE__BODY_LIST_SESSIONS;
    case FASA__V1__REQUEST__BODY_LOAD_SESSION:
        return FASA__V1__RESPONSE__BODY_LOAD_SESSION;
    default:
        return FASA__V1__RESPONSE__BODY__NOT_SET;
    }
}

static int s_same_id(const char *a, const char *b)
{
    return a && b && strcmp(a, b) == 0;
}

/* Checks one Attend result. len: the lengths per layer of the request's session just before
 * this step (NULL when not known: a batch item on another session). */
static void s_check_attend(const fasa_engine_t *e, const Fasa__V1__Attend *a, const int32_t *len,
                           const Fasa__V1__AttendResult *res)
{
    const fasa_session_config *c = fasa_engine_config(e, a->session_id);
    CHECK(c, "attend OK on session '%s' that does not exist", a->session_id);
    CHECK(res && res->out && res->stats, "attend OK without out or stats");
    const Fasa__V1__Tensor *o = res->out;
    CHECK(o->dtype == FASA__V1__DTYPE__F32 && o->n_shape == 2 &&
              o->shape[0] == (uint64_t)c->n_heads && o->shape[1] == (uint64_t)c->head_dim &&
              o->data.len == (size_t)c->n_heads * c->head_dim * 4,
          "attend.out is not F32 [n_heads %d, head_dim %d]", c->n_heads, c->head_dim);
    CHECK(res->stats->method_used >= FASA__V1__METHOD__FASA &&
              res->stats->method_used <= FASA__V1__METHOD__FASA_PLUS,
          "stats.method_used %d", (int)res->stats->method_used);
    if (len) {
        /* Visible: positions 0..max_pos of the layer, k_new appended first. */
        const int64_t length = len[a->layer] + (a->k_new ? 1 : 0);
        const int64_t vis = a->max_pos < 0 ? length : a->max_pos + 1;
        CHECK(res->stats->n_visible == (uint64_t)vis,
              "stats.n_visible %u, expected %lld (layer %u of %lld tokens, max_pos %lld)",
              res->stats->n_visible, (long long)vis, a->layer, (long long)length,
              (long long)a->max_pos);
    }
    const uint32_t n_vis = res->stats->n_visible;
    const Fasa__V1__StepStats *ss = res->stats;
    if (ss->has_merge_used && ss->merge_used == FASA__V1__MERGE__LOCAL)
        CHECK((ss->method_used == FASA__V1__METHOD__FASA ||
               ss->method_used == FASA__V1__METHOD__ORACLE) &&
                  ss->has_local_budget && ss->local_budget >= 1,
              "a local-merge step of method %d with local_budget %u", (int)ss->method_used,
              ss->local_budget);
    if (!(a->has_return_selected && a->return_selected)) {
        CHECK(!res->selected, "selected without return_selected");
        return;
    }
    const Fasa__V1__Tensor *sel = res->selected;
    const uint64_t budget = a->has_budget ? a->budget : (uint64_t)c->budget;
    CHECK(sel && sel->dtype == FASA__V1__DTYPE__I32 && sel->n_shape == 2 &&
              sel->shape[0] == (uint64_t)c->n_heads && sel->shape[1] == budget &&
              sel->data.len == (size_t)c->n_heads * budget * 4,
          "attend.selected is not I32 [n_heads %d, budget %llu]", c->n_heads,
          (unsigned long long)budget);
    uint8_t *seen = calloc(n_vis ? n_vis : 1, 1);
    CHECK(seen, "out of memory");
    for (int h = 0; h < c->n_heads; h++) {
        memset(seen, 0, n_vis ? n_vis : 1);
        for (uint64_t j = 0; j < budget; j++) {
            int32_t p;
            memcpy(&p, sel->data.data + 4 * ((size_t)h * budget + j), 4);
            CHECK(p == -1 || (p >= 0 && (uint32_t)p < n_vis),
                  "selected[%d][%llu] = %d outside [-1, %u)", h, (unsigned long long)j, (int)p,
                  n_vis);
            if (p < 0) continue;
            CHECK(!seen[p], "selected[%d] lists position %d twice", h, (int)p);
            seen[p] = 1;
        }
    }
    free(seen);
}

/* Checks that an OK answer changed exactly what the request asked for. */
static void s_check_ok(const fasa_engine_t *e, const Fasa__V1__Request *m,
                       const Fasa__V1__Response *r, const snap *b, const snap *a,
                       const char *tracked)
{
    int64_t d_sessions = 0, d_rows = 0, d_tokens = 0;
    int32_t want_len[EDGE_MAX_LAYERS];
    int want_layers = b->sess_layers, want_exists = b->sess_exists;
    int want_profile = b->sess_has_profile;
    memcpy(want_len, b->sess_len, sizeof(int32_t) * (size_t)b->sess_layers);

    switch (m->body_case) {
    case FASA__V1__REQUEST__BODY_PING: {
        const Fasa__V1__PingResult *p = r->ping;
        const int had = m->ping->has_payload;
        CHECK(p->has_payload == had &&
                  (!had || (p->payload.len == m->ping->payload.len &&
                            memcmp(p->payload.data, m->ping->payload.data, p->payload.len) == 0)),
              "ping does not echo its payload");
        break;
    }
    case FASA__V1__REQUEST__BODY_CREATE_SESSION: {
        const Fasa__V1__CreateSession *c = m->create_session;
        CHECK(!b->sess_exists, "create_session OK over an existing session '%s'", c->session_id);
        d_sessions = 1;
        want_exists = 1;
        want_layers = (int)c->n_layers;
        memset(want_len, 0, sizeof(int32_t) * c->n_layers);
        want_profile = c->profile_text || c->profile_name;
        CHECK(r->create_session->n_shards == FUZZ_SHARDS, "create_session.n_shards %u",
              r->create_session->n_shards);
        break;
    }
    case FASA__V1__REQUEST__BODY_APPEND: {
        const Fasa__V1__Append *ap = m->append;
        const int all = ap->layer < 0;
        const int64_t n = (int64_t)ap->k->shape[all ? 1 : 0];
        d_rows = n * (all ? b->sess_layers : 1);
        d_tokens = all || ap->layer == 0 ? n : 0;
        for (int l = 0; l < b->sess_layers; l++)
            if (all || l == ap->layer) want_len[l] += (int32_t)n;
        CHECK(r->append->length == (uint64_t)want_len[all ? 0 : ap->layer],
              "append.length %llu, expected %d", (unsigned long long)r->append->length,
              (int)want_len[all ? 0 : ap->layer]);
        break;
    }
    case FASA__V1__REQUEST__BODY_LOAD_SESSION: {
        /* An empty session filled (or, check_only, nothing changed), every layer alike. */
        const Fasa__V1__LoadSessionResult *lr = r->load_session;
        const int check = m->load_session->has_check_only && m->load_session->check_only;
        CHECK(b->sess_exists, "load_session OK on no session");
        CHECK(lr->n_shards == FUZZ_SHARDS && lr->length > 0,
              "load_session: %zu shards, length %llu", lr->n_shards,
              (unsigned long long)lr->length);
        uint64_t rows = 0, bytes = 0;
        for (size_t i = 0; i < lr->n_shards; i++)
            rows += lr->shards[i]->rows, bytes += lr->shards[i]->file_bytes;
        CHECK(rows == lr->length * (uint64_t)b->sess_layers && bytes == lr->file_bytes,
              "load_session: shards report %llu rows, %llu bytes", (unsigned long long)rows,
              (unsigned long long)bytes);
        if (check) {
            CHECK(lr->stored_bytes == 0, "load_session check_only stored %llu bytes",
                  (unsigned long long)lr->stored_bytes);
            break;
        }
        for (int l = 0; l < b->sess_layers; l++) {
            CHECK(b->sess_len[l] == 0, "load_session OK on a session with tokens in layer %d", l);
            want_len[l] = (int32_t)lr->length;
        }
        d_rows = (int64_t)lr->length * b->sess_layers;
        d_tokens = (int64_t)lr->length;
        break;
    }
    case FASA__V1__REQUEST__BODY_ATTEND: {
        const Fasa__V1__Attend *at = m->attend;
        s_check_attend(e, at, want_len, r->attend);
        if (at->k_new) {
            d_rows = 1;
            d_tokens = at->layer == 0;
            want_len[at->layer]++;
        }
        break;
    }
    case FASA__V1__REQUEST__BODY_BATCH_ATTEND: {
        const Fasa__V1__BatchAttendResult *br = r->batch_attend;
        CHECK(br->n_items == m->batch_attend->n_items, "batch_attend: %zu items for %zu",
              br->n_items, m->batch_attend->n_items);
        for (size_t i = 0; i < br->n_items; i++) {
            const Fasa__V1__BatchAttendItem *it = br->items[i];
            const Fasa__V1__Attend *at = m->batch_attend->items[i];
            CHECK(it->status >= FASA__V1__STATUS__OK && it->status <= FASA__V1__STATUS__UNAVAILABLE,
                  "batch_attend.items[%zu].status %d", i, (int)it->status);
            if (it->status != FASA__V1__STATUS__OK) {
                CHECK(it->message && it->message[0] && !strchr(it->message, '\n') && !it->result,
                      "batch_attend.items[%zu]: an error needs a one-line message and no result",
                      i);
                continue;
            }
            CHECK(!it->message, "batch_attend.items[%zu]: OK with a message", i);
            s_check_attend(e, at, s_same_id(at->session_id, tracked) ? want_len : NULL, it->result);
            if (!at->k_new) continue;
            d_rows++;
            d_tokens += at->layer == 0;
            if (s_same_id(at->session_id, tracked)) want_len[at->layer]++;
        }
        break;
    }
    case FASA__V1__REQUEST__BODY_CALIBRATE:
        CHECK(r->calibrate->profile_text && r->calibrate->profile_text[0],
              "calibrate OK without a profile");
        break;
    case FASA__V1__REQUEST__BODY_SET_PROFILE:
        CHECK(b->sess_exists, "set_profile OK on no session");
        for (int l = 0; l < b->sess_layers; l++)
            CHECK(b->sess_len[l] == 0, "set_profile OK on a session with tokens in layer %d", l);
        want_profile = 1;
        break;
    case FASA__V1__REQUEST__BODY_DROP_SESSION:
        CHECK(b->sess_exists, "drop_session OK on no session");
        d_sessions = -1;
        d_rows = -b->sess_rows;
        d_tokens = -b->sess_tokens;
        want_exists = 0;
        break;
    case FASA__V1__REQUEST__BODY_STATS: {
        const Fasa__V1__StatsResult *st = r->stats;
        /* errors counts failed BatchAttend items too (errors_by_code adds up to it). */
        CHECK(st->n_sessions == (uint32_t)a->n_sessions && st->kv_bytes == (uint64_t)a->kv_bytes &&
                  st->errors <= st->requests + st->batch_items && st->n_shards == FUZZ_SHARDS,
              "stats disagree with the engine: sessions %u (engine %d), kv_bytes %llu (engine "
              "%lld), errors %llu of %llu requests and %llu batch items, n_shards %u",
              st->n_sessions, a->n_sessions, (unsigned long long)st->kv_bytes,
              (long long)a->kv_bytes, (unsigned long long)st->errors,
              (unsigned long long)st->requests, (unsigned long long)st->batch_items, st->n_shards);
        uint64_t errs = 0;
        for (size_t i = 0; i < st->n_errors_by_code; i++) errs += st->errors_by_code[i]->count;
        CHECK(errs == st->errors, "stats: errors_by_code add up to %llu, errors %llu",
              (unsigned long long)errs, (unsigned long long)st->errors);
        uint64_t by_type = 0;
        for (size_t i = 0; i < st->n_requests_by_type; i++)
            by_type += st->requests_by_type[i]->count;
        CHECK(by_type == st->requests, "stats: requests_by_type add up to %llu, requests %llu",
              (unsigned long long)by_type, (unsigned long long)st->requests);
        if (m->stats->session_id) {
            const Fasa__V1__SessionInfo *si = st->session;
            CHECK(si && si->length == (uint64_t)b->sess_len[0] &&
                      si->kv_bytes == (uint64_t)b->sess_kv_bytes,
                  "stats.session disagrees with the engine");
            CHECK(si->has_pairing && si->has_gqa && si->dense_layers,
                  "stats.session lacks pairing, gqa or dense_layers");
            for (size_t i = 0; i < si->dense_layers->n_layers; i++)
                CHECK(si->dense_layers->layers[i] < si->n_layers &&
                          (i == 0 || si->dense_layers->layers[i] > si->dense_layers->layers[i - 1]),
                      "stats.session.dense_layers not ascending layers below n_layers");
        }
        break;
    }
    case FASA__V1__REQUEST__BODY_LIST_SESSIONS: {
        /* Every session the engine holds, ordered by id, with the engine's numbers. */
        const Fasa__V1__ListSessionsResult *ls = r->list_sessions;
        CHECK(ls->n_sessions == (size_t)a->n_sessions, "list_sessions: %zu sessions, engine %d",
              ls->n_sessions, a->n_sessions);
        for (size_t i = 0; i < ls->n_sessions; i++) {
            const Fasa__V1__SessionSummary *ss = ls->sessions[i];
            const fasa_session_config *c = fasa_engine_config(e, ss->session_id);
            CHECK(c && ss->n_layers == (uint32_t)c->n_layers &&
                      ss->n_kv_heads == (uint32_t)c->n_kv_heads &&
                      ss->length == (uint64_t)fasa_engine_length(e, ss->session_id, 0) &&
                      ss->kv_bytes == (uint64_t)fasa_engine_kv_bytes(e, ss->session_id),
                  "list_sessions: '%s' disagrees with the engine", ss->session_id);
            CHECK(i == 0 || strcmp(ls->sessions[i - 1]->session_id, ss->session_id) < 0,
                  "list_sessions: not ordered by id");
        }
        for (size_t i = 1; i < ls->n_profile_names; i++)
            CHECK(strcmp(ls->profile_names[i - 1], ls->profile_names[i]) < 0,
                  "list_sessions: profile names not ordered");
        break;
    }
    default:
        break;
    }

    CHECK(a->n_sessions == b->n_sessions + d_sessions, "sessions %d -> %d, expected %+lld",
          b->n_sessions, a->n_sessions, (long long)d_sessions);
    const int64_t rows_b = s_sum(b, offsetof(fasa_shard_stats, rows));
    const int64_t rows_a = s_sum(a, offsetof(fasa_shard_stats, rows));
    const int64_t tok_b = s_sum(b, offsetof(fasa_shard_stats, tokens));
    const int64_t tok_a = s_sum(a, offsetof(fasa_shard_stats, tokens));
    CHECK(rows_a == rows_b + d_rows, "rows %lld -> %lld, expected %+lld", (long long)rows_b,
          (long long)rows_a, (long long)d_rows);
    CHECK(tok_a == tok_b + d_tokens, "tokens %lld -> %lld, expected %+lld", (long long)tok_b,
          (long long)tok_a, (long long)d_tokens);
    if (!tracked) return;
    CHECK(a->sess_exists == want_exists, "session '%s' exists %d, expected %d", tracked,
          a->sess_exists, want_exists);
    if (!want_exists) return;
    CHECK(a->sess_layers == want_layers && a->sess_has_profile == want_profile,
          "session '%s': layers %d profile %d, expected %d %d", tracked, a->sess_layers,
          a->sess_has_profile, want_layers, want_profile);
    for (int l = 0; l < want_layers; l++)
        CHECK(a->sess_len[l] == want_len[l], "session '%s' layer %d holds %d, expected %d", tracked,
              l, (int)a->sess_len[l], (int)want_len[l]);
}

/* A rejected request changed nothing. */
static void s_check_unchanged(const snap *b, const snap *a, const char *tracked)
{
    CHECK(a->n_sessions == b->n_sessions && a->kv_bytes == b->kv_bytes,
          "a rejected request changed the sessions (%d -> %d) or kv bytes (%lld -> %lld)",
          b->n_sessions, a->n_sessions, (long long)b->kv_bytes, (long long)a->kv_bytes);
    CHECK(memcmp(a->shard, b->shard, sizeof(a->shard)) == 0,
          "a rejected request changed what the shards hold");
    CHECK(a->sess_exists == b->sess_exists && a->sess_layers == b->sess_layers &&
              a->sess_has_profile == b->sess_has_profile && a->sess_kv_bytes == b->sess_kv_bytes &&
              memcmp(a->sess_len, b->sess_len, sizeof(int32_t) * (size_t)a->sess_layers) == 0,
          "a rejected request changed session '%s'", tracked ? tracked : "");
}

static fuzz_fixture *s_fx;
static unsigned long s_inputs, s_reset_every = FUZZ_RESET_EVERY;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *env = getenv("FASA_FUZZ_RESET_EVERY");
    if (env && atol(env) > 0) s_reset_every = (unsigned long)atol(env);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (s_fx &&
        (s_inputs % s_reset_every == 0 || fasa_engine_count(s_fx->engine) > FUZZ_MAX_SESSIONS ||
         fasa_engine_kv_bytes(s_fx->engine, NULL) > FUZZ_MAX_KV_BYTES))
        fuzz_fixture_destroy(&s_fx);
    if (!s_fx) s_fx = fuzz_fixture_new();
    s_inputs++;

    /* A multipart input: the Request, then raw data frames (fixture.h). */
    const uint8_t *req;
    size_t req_len;
    static edge_frame frames[FUZZ_MAX_FRAMES];
    int n_frames;
    fuzz_split(data, size, &req, &req_len, frames, &n_frames);
    /* An independent reading of the bytes (protobuf-c without the edge's limits). */
    Fasa__V1__Request *m = fasa__v1__request__unpack(NULL, req_len, req);
    const char *tracked = m ? s_session_of(m) : NULL;
    static snap before, after;
    s_snap(s_fx->engine, tracked, &before);

    uint8_t *reply = NULL;
    size_t n = 0;
    int shutdown = 0;
    CHECK(fasa_service_handle_frames(s_fx->svc, req, req_len, frames, n_frames, &reply, &n,
                                     &shutdown) == 0,
          "no response (fasa_service_handle_frames failed)");
    CHECK(reply != NULL, "no response bytes");
    Fasa__V1__Response *r = fasa__v1__response__unpack(NULL, n, reply);
    CHECK(r, "the response (%zu bytes) does not decode", n);
    CHECK(r->protocol_version == 1, "response protocol_version %u", r->protocol_version);
    CHECK(r->status >= FASA__V1__STATUS__OK && r->status <= FASA__V1__STATUS__UNAVAILABLE,
          "unknown status %d", (int)r->status);
    if (m)
        CHECK(r->request_id == m->request_id, "request id %llu came back as %llu",
              (unsigned long long)m->request_id, (unsigned long long)r->request_id);
    s_snap(s_fx->engine, tracked, &after);

    if (r->status != FASA__V1__STATUS__OK) {
        CHECK(r->message && r->message[0] && !strchr(r->message, '\n'),
              "an error needs a one-line message (status %d)", (int)r->status);
        CHECK(r->body_case == FASA__V1__RESPONSE__BODY__NOT_SET, "an error with a body");
        s_check_unchanged(&before, &after, tracked);
    } else {
        CHECK(m, "OK for bytes that do not unpack as a Request");
        CHECK(m->protocol_version == 1, "OK for protocol_version %u", m->protocol_version);
        CHECK(r->body_case == s_body_for(m->body_case), "OK with body %d for request body %d",
              (int)r->body_case, (int)m->body_case);
        CHECK(!r->message, "OK with a message: %s", r->message);
        CHECK(shutdown == (m->body_case == FASA__V1__REQUEST__BODY_SHUTDOWN), "shutdown flag %d",
              shutdown);
        s_check_ok(s_fx->engine, m, r, &before, &after, tracked);
    }
    fasa__v1__response__free_unpacked(r, NULL);
    free(reply);
    if (m) fasa__v1__request__free_unpacked(m, NULL);
    return 0;
}
