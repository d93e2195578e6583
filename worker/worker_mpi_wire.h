/* The messages of the MPI transport between the coordinator (rank 0, coord/transport_mpi.c)
 * and the worker ranks (worker/worker_mpi.c), and the polling wait both ends use.
 *
 * Both ends are the same build on one homogeneous cluster, so headers and arrays travel as
 * raw bytes (MPI_BYTE) in host byte order. Every command but APPEND_PARTS is one MPI
 * message, so a command costs one send and (but for STOP) one reply, whatever its size.
 *
 * A command (tag WMPI_TAG_CMD, from rank 0) is a wmpi_cmd header followed by payload_bytes
 * of payload, whose sections depend on the command:
 *   SESSION_NEW  n_dom int32 (n_layers, n_kv_heads), perm int32 (n_layers, n_kv_heads,
 *                head_dim), qmask uint8 (n_layers, n_heads, head_dim), then for the disk
 *                tier (method = SHARD_TIER_DISK) the directory of its files, budget bytes
 *                (no NUL; each worker uses that path on its own node)
 *   DROP, STOP   nothing
 *   APPEND       pos int32 (n), k float (n, n_kv_heads, head_dim), v float (the same)
 *   APPEND_RUNS  n sections, each a wmpi_run then k and v (run.n, n_kv_heads, head_dim) of
 *                the header's dtype (method): rows run.pos0 .. run.pos0 + run.n - 1 of
 *                run.layer, positions ascending within each layer (head_dim is even, so
 *                every section stays 4-byte aligned)
 *   APPEND_PARTS an APPEND_RUNS whose k and v do not travel in the command: the command
 *                holds the header (payload_bytes: the APPEND_RUNS payload it stands for)
 *                and its n wmpi_runs only, and each section's k then v follow as 2 n
 *                messages of tag WMPI_TAG_PART, sent by rank 0 straight from the request's
 *                memory (no copy there). The worker receives them into place, so it serves
 *                (and answers) the APPEND_RUNS they make; a count or size that does not
 *                add up is a protocol failure (fail-stop, like a command it cannot hold).
 *   SCORE        q float (n_heads, head_dim)
 *   ATTEND       q float (n_heads, head_dim), then unless method is dense thr topk_cand
 *                (n_units) and have_thr uint8 (n_units)
 *   STATS        nothing; sid is a session (its geometry in the header, as for the other
 *                session commands) or -1 for every session the worker holds
 *   SNAPSHOT     one wmpi_snap, then the path prefix (prefix_len bytes) and the session id
 *                (id_len bytes), no NULs: the worker writes its shard of sid to
 *                prefix + ".s<rank - 1>.shard" (worker/shard_snap.h)
 *   SCORE_KNEW,  a decode step's k_new riding along with its first phase (one exchange instead
 *   ATTEND_KNEW  of an APPEND and then the phase): one wmpi_knew, k float (n_kv_heads,
 *                head_dim), v float (the same), then the SCORE or ATTEND payload. Every worker
 *                gets the same bytes; only shard wmpi_knew.shard appends the row (position pos
 *                of the header's layer) before running the phase, the others run the phase.
 *   ATTEND_LOCAL q float (n_heads, head_dim): a local-merge step (worker/local_merge.h),
 *                SCORE and ATTEND in one with the worker's own candidates as thresholds
 *   SCORE_ATTEND q float (n_heads, head_dim): an exact sparse step whose visible rows are
 *                all on one shard (coord/engine.c), SCORE and ATTEND in one with the worker's
 *                own worst candidate kept per unit as the threshold (worker/local_merge.h
 *                shard_score_attend); any method but dense
 *   SCORE_ATTEND_KNEW  the same with a decode step's k_new in front (wmpi_knew, k, v), as
 *                SCORE_KNEW
 *   LOAD         one load_job (worker/load_rows.h; its shard is rank - 1): the worker reads
 *                its rows of one layer from the files the job names and appends them
 * Sections follow each other unpadded in that order. The header is a multiple of 8 bytes
 * and the byte-sized sections come last, so every section is aligned for its type in a
 * malloc'd buffer and the receiver uses the payload in place.
 *
 * Every command but STOP gets exactly one reply (tag WMPI_TAG_REPLY): a wmpi_reply header
 * and, when status is WMPI_OK,
 *   SCORE   cands topk_cand (n_units, budget) (the first n_cands[u] of unit u are valid),
 *           n_cands int32 (n_units)
 *   ATTEND  l double (n_heads), o double (n_heads, head_dim), for SPARQ and FASA_PLUS aux double
 *           (n_heads, SHARD_SPARQ_AUX(head_dim)) (shard_sparq_aux), m float (n_heads)
 *   STATS   one wmpi_stats: what the worker's shard of sid (or of every session) holds
 *   SNAPSHOT  one shard_snap_info: the file's checksum and size, or err_no != 0 when the
 *           file could not be written (the worker logs why)
 *   SCORE_KNEW, ATTEND_KNEW  as SCORE, ATTEND. On a status other than OK, bytes_read is 1
 *           when the worker holding the row appended it (the phase failed after), else 0.
 *   ATTEND_LOCAL  as ATTEND (no aux: methods FASA and ORACLE only)
 *   SCORE_ATTEND, SCORE_ATTEND_KNEW  ATTEND's payload (l, o, aux, m), then SCORE's (cands,
 *           n_cands); bytes_read as ATTEND's, or on failure as SCORE_KNEW's
 *   LOAD    one load_report: rows stored and bytes read, or err != LOAD_OK and where
 * A worker serves commands in order and sends nothing else, so the coordinator has at most
 * one reply outstanding per worker and MPI's non-overtaking rule pairs them up. */
#ifndef FASA_WORKER_WORKER_MPI_WIRE_H
#define FASA_WORKER_WORKER_MPI_WIRE_H

#include <stdint.h>
#include <time.h>

#include <mpi.h>

#include "shard.h"
#include "topk.h"

#define WMPI_TAG_CMD 0x4641    /* rank 0 -> worker */
#define WMPI_TAG_REPLY 0x4642  /* worker -> rank 0 */
#define WMPI_TAG_PART 0x4643   /* rank 0 -> worker: APPEND_PARTS's k and v */
#define WMPI_MAGIC 0x31414d57u /* "WMA1" little-endian: wire version 1 */

/* Largest message either end builds. MPI counts are int; staying well under INT_MAX also
 * keeps one message's buffer reasonable. Appends bigger than this are split by rows. */
#define WMPI_MAX_MSG ((int64_t)1 << 30)
/* Largest session number a worker accepts (its table is indexed by sid). */
#define WMPI_MAX_SID (1 << 24)
/* Geometry bounds a worker accepts (the engine's own limits, engine.c). */
#define WMPI_MAX_LAYERS 1024
#define WMPI_MAX_HEADS 1024
#define WMPI_MAX_HEAD_DIM 1024
#define WMPI_MAX_BUDGET (1 << 20)
/* Longest disk-tier directory a SESSION_NEW carries. */
#define WMPI_MAX_DIR 4000

typedef enum wmpi_cmd_code {
    WMPI_STOP = 1,
    WMPI_SESSION_NEW = 2,
    WMPI_SESSION_DROP = 3,
    WMPI_APPEND = 4,
    WMPI_SCORE = 5,
    WMPI_ATTEND = 6,
    WMPI_STATS = 7,
    WMPI_SNAPSHOT = 8,
    WMPI_SCORE_KNEW = 9,   /* SCORE after appending a step's k_new on one shard */
    WMPI_ATTEND_KNEW = 10, /* ATTEND (a dense step's only phase) after the same */
    WMPI_LOAD = 11,
    WMPI_ATTEND_LOCAL = 12,
    /* The runs of one append request for this shard, under a transaction (max_pos: its
     * number, != 0; method: the fasa_dtype of k and v; n: the sections). All or nothing
     * on this shard; the layers it changed stay undoable until APPEND_UNDO of the same
     * transaction or the next transaction. */
    WMPI_APPEND_RUNS = 16,
    WMPI_APPEND_UNDO = 17, /* max_pos: the transaction to put back; no payload */
    /* Tests only: the n-th APPEND_RUNS section from now fails as out of memory (n 0: off). */
    WMPI_TEST_FAULT = 18,
    WMPI_SCORE_ATTEND = 19,      /* SCORE and ATTEND in one (a one-shard exact step) */
    WMPI_SCORE_ATTEND_KNEW = 20, /* the same after appending a step's k_new on one shard */
    WMPI_APPEND_PARTS = 21,      /* APPEND_RUNS with k and v as separate messages (above) */
} wmpi_cmd_code;

typedef enum wmpi_status {
    WMPI_OK = 0,
    WMPI_ENOMEM = 1, /* the worker ran out of memory; nothing changed */
    WMPI_EINVAL = 2, /* malformed command (a coordinator bug); nothing changed */
    WMPI_ENOENT = 3, /* no such session */
    WMPI_EEXIST = 4, /* SESSION_NEW for a session the worker already holds */
} wmpi_status;

/* Command header. The geometry fields travel with every session command, so the worker can
 * check them against the session it holds. Unused fields are 0. */
typedef struct wmpi_cmd {
    uint32_t magic;                                  /* WMPI_MAGIC */
    int32_t cmd;                                     /* wmpi_cmd_code */
    int32_t sid;                                     /* the engine's session number */
    int32_t n_layers, n_heads, n_kv_heads, head_dim; /* session geometry */
    int32_t layer;                                   /* APPEND, SCORE, ATTEND */
    int32_t n;                                       /* APPEND: rows; SESSION_NEW: fasa_dtype */
    int32_t method;                                  /* SCORE, ATTEND: shard_method */
    int32_t gqa;                                     /* shard_gqa */
    int32_t budget;                                  /* tokens per unit */
    int32_t max_pos;                                 /* highest visible position */
    float scale;                                     /* logit scale */
    int32_t n_units;                                 /* the step's selection units */
    int32_t sparq_r;                                 /* SCORE, ATTEND: SPARQ's r, else 0 */
    int64_t payload_bytes;                           /* bytes after this header */
    uint64_t request_id;                             /* the client request it serves (log) */
} wmpi_cmd;

typedef struct wmpi_reply {
    int32_t status;     /* wmpi_status */
    int32_t cmd;        /* the command answered, or -1 when it could not be read */
    int64_t bytes_read; /* ATTEND: KV bytes the shard read for this step (score + attend) */
} wmpi_reply;

/* The STATS reply payload: what the worker's shards hold (shard.h shard_holdings, the same
 * struct the coordinator reports as fasa_shard_stats). */
typedef shard_holdings wmpi_stats;

/* The head of a *_KNEW payload. */
typedef struct wmpi_knew {
    int32_t shard; /* the shard that appends the row (rank shard + 1) */
    int32_t pos;   /* its position */
} wmpi_knew;

/* The SNAPSHOT payload's head. */
typedef struct wmpi_snap {
    int32_t dtype;      /* the session's storage dtype (kernels/dtype.h) */
    int32_t n_shards;   /* shards of the engine (ranks - 1) */
    int32_t prefix_len; /* bytes of the path prefix that follows */
    int32_t id_len;     /* bytes of the session id after it */
} wmpi_snap;

/* One APPEND_RUNS section's head. */
typedef struct wmpi_run {
    int32_t layer, n, pos0, pad;
} wmpi_run;

_Static_assert(sizeof(wmpi_run) == 16, "wmpi_run layout");
_Static_assert(sizeof(wmpi_snap) == 16, "wmpi_snap layout");
_Static_assert(sizeof(wmpi_knew) == 8, "wmpi_knew keeps the sections after it aligned");
_Static_assert(sizeof(wmpi_cmd) == 80 && sizeof(wmpi_cmd) % 8 == 0, "wmpi_cmd layout");
_Static_assert(sizeof(wmpi_reply) == 16, "wmpi_reply layout");
_Static_assert(sizeof(wmpi_stats) == 64, "wmpi_stats layout");
_Static_assert(sizeof(topk_cand) == 8, "topk_cand travels as 8 raw bytes");

/* Waiting without holding a core. Open MPI's blocking calls busy-poll, and it has no
 * progress thread, so something must keep calling into MPI; on a box with fewer cores than
 * ranks a spinning rank takes the CPU from the ranks doing the work (ecosystem-notes §1.3:
 * 5.1 s vs 0.8 s of CPU per idle worker). So a waiting rank polls MPI for a short spin
 * window after its last activity (back-to-back messages are seen at once), then sleeps in
 * the kernel between polls until a peer's wake-up (kick.h: the sender of every command and
 * reply also kicks the receiver on the same node) or a timeout, doubling from
 * WMPI_SLEEP0_NS up to a cap; the cap is long once wake-ups are known to arrive (a peer on
 * this node) and short otherwise (polling between nodes). So the round trips of a decode
 * loop pay a kernel wake-up rather than a sleep, whether or not ranks share cores, and an
 * idle rank costs next to no CPU. The spin window is FASA_SPIN_US in the environment
 * (microseconds, 0 .. 10^7, default WMPI_SPIN_US; a large one busy-polls). Sleeps use a
 * 1 us timer slack (Linux's 50 us default would lengthen every short one). README "Decode
 * latency" has the measurements.
 *
 * The spin window adapts to a decode loop (wmpi_adapt). A kernel wake-up is cheap when the
 * waker runs on the same core, but waking a rank whose core went idle costs tens of
 * microseconds on a VM (its vCPU halted: 15-20 us each way on this project's 2-core VM,
 * against 2 us on one core and under 1 us spinning), and a decode loop pays two per Attend
 * (the worker waking for the command, rank 0 for the reply), because the gap between
 * Attends (the engine's own work between layers) and a step's compute are both longer than
 * 50 us. So each waiting site remembers how long its last WMPI_ADAPT_N waits took until a
 * message came; while most of them (WMPI_ADAPT_MIN) stayed under the cap FASA_SPIN_MAX_US
 * (default WMPI_SPIN_MAX_US, 0 turns this off), the next wait spins for 1.5 x the longest
 * of those plus 20 us (at most the cap) before it sleeps.
 *
 * Where it applies (wmpi_spin_set_ranks): rank 0's wait for a reply, during which the
 * client waits too, only while the ranks on this node do not outnumber its CPUs (a spinning
 * rank must not take the core of one that computes). A worker's wait for its next command
 * spans the client's own work between two Attends: where the node has a CPU more than its
 * ranks, up to the cap; otherwise only through short gaps (at most WMPI_SPIN_GAP_SHARED_US:
 * a tight loop such as `fasa ppl --server`, where the wake-up is a large part of the gap and
 * the client's work between calls is small), since on the 2-core VM with 1 worker (2
 * ranks) a spin through the bench's 2.5 ms gaps shared a core with the client's own compute
 * and 8 interleaved rounds under load put the p90 overhead at 2.7 ms against 1.6 ms
 * without it. FASA_SPIN_GAP=1 spins through gaps up to the cap while ranks <= CPUs, as rank
 * 0's wait does; FASA_SPIN_GAP=0 never. A long spin whose polls come far apart (WMPI_PREEMPTED_NS:
 * another task took its core) goes to sleep, its site back to the base window for WMPI_ADAPT_N
 * waits, twice as many after each such loss (up to WMPI_ADAPT_COOL_MAX), half as many after each
 * long spin that caught its message: a sleeping rank woken by its message runs at once, a spinning
 * one waits for its next time slice, so where other work keeps the machine busy the window stays
 * short.
 *
 * Its cost: while a decode loop runs, each rank that spins holds a core (rank 0 for as long
 * as the steps take); once requests stop, the window runs out after at most the cap and the
 * rank sleeps, so an idle server still costs next to no CPU. The node's ranks are the
 * launcher's count (OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS, SLURM_STEP_TASKS_PER_NODE),
 * its CPUs SLURM_CPUS_ON_NODE or the CPUs online; the same count decides FASA_SPIN_YIELD's
 * default. FASA_SPIN_US=0 FASA_SPIN_MAX_US=0 sleeps at once; FASA_SPIN_MAX_US=0 alone keeps
 * the fixed FASA_SPIN_US window of earlier versions. */
#define WMPI_SPIN_US 50L
#define WMPI_SPIN_MAX_US 5000L       /* the adaptive window's default cap (FASA_SPIN_MAX_US) */
#define WMPI_ADAPT_N 8               /* waits remembered per site */
#define WMPI_ADAPT_MIN 6             /* of which this many under the cap turn the long window on */
#define WMPI_ADAPT_COOL_MAX 1024     /* the most waits a site keeps to the base window */
#define WMPI_SPIN_GAP_SHARED_US 500L /* a worker's cap between commands without a spare CPU */
#define WMPI_SPIN_ALONE_NS 20000L    /* FASA_SPIN_YIELD=1: the first 20 us of a spin never yield */
#define WMPI_SLEEP0_NS 2000L
#define WMPI_KICKED_SLEEP_NS 20000000L /* an idle worker's cap once wake-ups arrive: 20 ms */

#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "kick.h"

/* The spin window in nanoseconds (FASA_SPIN_US, read once per process). */
static inline long wmpi_spin_ns(void)
{
    static long spin_ns = -1;
    if (spin_ns < 0) {
        const char *v = getenv("FASA_SPIN_US");
        char *end = NULL;
        const long us = v && *v ? strtol(v, &end, 10) : WMPI_SPIN_US;
        spin_ns = 1000L * (end && *end      ? WMPI_SPIN_US
                           : us < 0         ? 0
                           : us > 10000000L ? 10000000L
                                            : us);
#ifdef __linux__
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
#endif
    }
    return spin_ns;
}

/* Whether a spinning rank yields its core (sched_yield) after the first WMPI_SPIN_ALONE_NS
 * of a spin: FASA_SPIN_YIELD=1 in the environment, always; 0, never; unset, only when the
 * job has more ranks than this machine has CPUs online (a spinning rank would hold a core
 * a computing one needs). A yielding rank stays runnable, so on a busy machine the message
 * it waits for finds it queued behind the other runnable tasks for a time slice instead of
 * waking it: with ranks <= cores not yielding was as fast or much faster (README "Decode
 * latency"). Each file that waits calls wmpi_spin_set_ranks once with the job's size
 * (until then a spin yields, as with 1). Returns the ns after which a spin yields, or -1. */
static long wmpi_spin_yield_after = WMPI_SPIN_ALONE_NS;
/* The adaptive window's cap in ns (0: off) for waits on a reply, and for a worker's waits
 * for the next command; set by wmpi_spin_set_ranks, off until then. */
static long wmpi_spin_max_ns = 0;
static long wmpi_spin_gap_max_ns = 0;

/* This node's entry of Slurm's SLURM_STEP_TASKS_PER_NODE ("2(x3),1": counts per node, a
 * "(xN)" repeating one N times), node the index of this node (SLURM_NODEID); 0 when the list
 * is malformed or shorter. */
static inline long wmpi_slurm_node_tasks(const char *list, long node)
{
    const char *p = list;
    while (p && *p) {
        char *end = NULL;
        const long n = strtol(p, &end, 10);
        if (end == p || n <= 0) return 0;
        long reps = 1;
        if (*end == '(') {
            if (end[1] != 'x') return 0;
            char *e2 = NULL;
            reps = strtol(end + 2, &e2, 10);
            if (e2 == end + 2 || *e2 != ')' || reps <= 0) return 0;
            end = e2 + 1;
        }
        if (node < reps) return n;
        node -= reps;
        if (*end != ',') return 0;
        p = end + 1;
    }
    return 0;
}

/* The ranks of this job on this node: the launcher's count (Open MPI, MPICH/Hydra, or
 * Slurm's srun: this node's entry, by SLURM_NODEID) when it gives one, else all n_ranks. */
static inline int wmpi_local_ranks(int n_ranks)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"};
    for (int i = 0; i < (int)(sizeof(vars) / sizeof(*vars)); i++) {
        const char *v = getenv(vars[i]);
        char *end = NULL;
        const long n = v && *v ? strtol(v, &end, 10) : 0;
        if (n > 0 && n <= n_ranks && end != v) return (int)n;
    }
    const char *node = getenv("SLURM_NODEID");
    const long n = wmpi_slurm_node_tasks(getenv("SLURM_STEP_TASKS_PER_NODE"),
                                         node && *node ? strtol(node, NULL, 10) : 0);
    return n > 0 && n <= n_ranks ? (int)n : n_ranks;
}

/* The CPUs this node gives the job: Slurm's SLURM_CPUS_ON_NODE, else the CPUs online. */
static inline long wmpi_node_cpus(void)
{
    const char *v = getenv("SLURM_CPUS_ON_NODE");
    char *end = NULL;
    const long n = v && *v ? strtol(v, &end, 10) : 0;
    if (n > 0 && end && !*end) return n;
    return sysconf(_SC_NPROCESSORS_ONLN);
}

/* Whether the adaptive window may apply, given this node's ranks and CPUs (the pure rule,
 * for tests): FASA_SPIN_MAX_US's cap in ns when local_ranks <= cpus, else 0. */
static inline long wmpi_spin_max_for(int local_ranks, long cpus, const char *max_us_env)
{
    char *end = NULL;
    const long us = max_us_env && *max_us_env ? strtol(max_us_env, &end, 10) : WMPI_SPIN_MAX_US;
    const long cap = end && *end ? WMPI_SPIN_MAX_US : us < 0 ? 0 : us > 100000L ? 100000L : us;
    return cpus > 0 && local_ranks <= cpus ? 1000L * cap : 0;
}

static inline void wmpi_spin_set_ranks(int n_ranks)
{
    const char *v = getenv("FASA_SPIN_YIELD");
    const long cpus = wmpi_node_cpus();
    const int local = wmpi_local_ranks(n_ranks);
    const int yield = v && !strcmp(v, "1")   ? 1
                      : v && !strcmp(v, "0") ? 0
                                             : cpus > 0 && local > cpus;
    wmpi_spin_yield_after = yield ? WMPI_SPIN_ALONE_NS : -1;
    const char *max_us = getenv("FASA_SPIN_MAX_US"), *gap = getenv("FASA_SPIN_GAP");
    wmpi_spin_max_ns = wmpi_spin_max_for(local, cpus, max_us);
    /* The gap before the next command is the client's own work: spinning through it takes a
     * CPU that work may need, so by default up to the cap only where a CPU is left over for
     * it, else only through short gaps. */
    const long spare = wmpi_spin_max_for(local + 1, cpus, max_us),
               shared = wmpi_spin_max_ns < 1000L * WMPI_SPIN_GAP_SHARED_US
                            ? wmpi_spin_max_ns
                            : 1000L * WMPI_SPIN_GAP_SHARED_US;
    wmpi_spin_gap_max_ns = gap && !strcmp(gap, "1")   ? wmpi_spin_max_ns
                           : gap && !strcmp(gap, "0") ? 0
                           : spare                    ? spare
                                                      : shared;
}

/* One waiting site's recent waits (the time from the start of a wait to its message). */
typedef struct wmpi_adapt {
    long wait_ns[WMPI_ADAPT_N];
    int n, next;
    int cool;      /* waits left with the base window after a long spin lost its core */
    int penalty;   /* the next such loss's cool: doubles with each loss, halves with each
                    * long spin that caught its message */
    long armed_ns; /* the long window of the wait in progress, else 0 */
    int gap;       /* 1: a worker's wait for its next command (wmpi_spin_gap_max_ns) */
} wmpi_adapt;

static inline void wmpi_adapt_note(wmpi_adapt *a, long ns)
{
    a->wait_ns[a->next] = ns;
    a->next = (a->next + 1) % WMPI_ADAPT_N;
    if (a->n < WMPI_ADAPT_N) a->n++;
    if (a->cool > 0) a->cool--;
    if (a->armed_ns && ns <= a->armed_ns) a->penalty /= 2;
    a->armed_ns = 0;
}

/* A long spin at site a lost its core: the next a->penalty waits keep to the base window. */
static inline void wmpi_adapt_preempted(wmpi_adapt *a)
{
    a->penalty = !a->penalty                            ? WMPI_ADAPT_N
                 : a->penalty < WMPI_ADAPT_COOL_MAX / 2 ? 2 * a->penalty
                                                        : WMPI_ADAPT_COOL_MAX;
    a->cool = a->penalty;
    a->armed_ns = 0;
}

/* The spin window for the next wait at a site with history a, the base window base_ns and
 * the cap max_ns (0: off): base_ns unless WMPI_ADAPT_MIN of the last WMPI_ADAPT_N waits
 * took at most max_ns, else 1.5 x the longest of those + 20 us, within [base_ns, max_ns]. */
static inline long wmpi_adapt_window(const wmpi_adapt *a, long base_ns, long max_ns)
{
    if (max_ns <= base_ns || a->n < WMPI_ADAPT_MIN || a->cool > 0) return base_ns;
    int under = 0;
    long longest = 0;
    for (int i = 0; i < a->n; i++)
        if (a->wait_ns[i] <= max_ns) {
            under++;
            if (a->wait_ns[i] > longest) longest = a->wait_ns[i];
        }
    if (under < WMPI_ADAPT_MIN) return base_ns;
    const long w = longest + longest / 2 + 20000L;
    return w < base_ns ? base_ns : w > max_ns ? max_ns : w;
}

typedef struct wmpi_backoff {
    struct timespec since; /* last activity */
    long sleep_ns;         /* next sleep, once past the spin window */
    long spin_ns;          /* the spin window */
    long last_ns;          /* when the last pause was (ns after since) */
    wmpi_adapt *adapt;     /* the site whose window this is (wmpi_backoff_start), or NULL */
} wmpi_backoff;

static inline void wmpi_backoff_reset(wmpi_backoff *b)
{
    clock_gettime(CLOCK_MONOTONIC, &b->since);
    b->sleep_ns = WMPI_SLEEP0_NS;
    b->spin_ns = wmpi_spin_ns();
    b->last_ns = 0;
    b->adapt = NULL;
}

/* wmpi_backoff_reset for a wait at the site a remembers: its spin window adapts. */
static inline void wmpi_backoff_start(wmpi_backoff *b, wmpi_adapt *a)
{
    wmpi_backoff_reset(b);
    const long base = b->spin_ns;
    b->spin_ns = wmpi_adapt_window(a, base, a->gap ? wmpi_spin_gap_max_ns : wmpi_spin_max_ns);
    a->armed_ns = b->spin_ns > base ? b->spin_ns : 0;
    b->adapt = a;
}

/* A spin whose polls are this far apart lost its core to another task (a poll takes about a
 * microsecond): spinning on would only queue it behind that task, so it sleeps instead (a
 * woken task runs at once) and its site keeps to the base window for WMPI_ADAPT_N waits. */
#define WMPI_PREEMPTED_NS 200000L

/* Nanoseconds since t (CLOCK_MONOTONIC). */
static inline long wmpi_since_ns(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long)(now.tv_sec - t->tv_sec) * 1000000000L + (now.tv_nsec - t->tv_nsec);
}

/* Called between two polls that found nothing: returns at once during the spin window,
 * otherwise sleeps until kick (may be NULL) is woken or the sleep passes, lengthening the
 * next sleep up to max_sleep_ns (kicked_max_ns once kick has been woken). A wake-up
 * starts the spin window again (the message it announces may take a moment to show). With
 * own_sends set (this rank's own sends are not complete: a large message needs its sender
 * to keep calling into MPI) it only yields the core. */
static inline void wmpi_backoff_pause(wmpi_backoff *b, long max_sleep_ns, long kicked_max_ns,
                                      wmpi_kick *kick, int own_sends)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    const long spent =
        (long)(now.tv_sec - b->since.tv_sec) * 1000000000L + (now.tv_nsec - b->since.tv_nsec);
    const long base = wmpi_spin_ns();
    if (b->spin_ns > base && spent < b->spin_ns && spent > base &&
        spent - b->last_ns > WMPI_PREEMPTED_NS) {
        b->spin_ns = base; /* descheduled during a long spin: sleep from now on */
        if (b->adapt) wmpi_adapt_preempted(b->adapt);
    }
    b->last_ns = spent;
    if (spent < b->spin_ns || own_sends) {
        /* Spinning (also while this rank's own sends are unfinished: a large message needs
         * its peer to match it), yielding the core where ranks outnumber CPUs. */
        if (wmpi_spin_yield_after >= 0 && spent >= wmpi_spin_yield_after) sched_yield();
        return;
    }
    if (kick) {
        if (wmpi_kick_wait(kick, b->sleep_ns)) {
            wmpi_backoff_reset(b);
            return;
        }
        if (kick->kicks && max_sleep_ns < kicked_max_ns) max_sleep_ns = kicked_max_ns;
    } else {
        const struct timespec ts = {0, b->sleep_ns};
        nanosleep(&ts, NULL);
    }
    b->sleep_ns = b->sleep_ns * 2 < max_sleep_ns ? b->sleep_ns * 2 : max_sleep_ns;
}

/* MPI_Waitall of this rank's own sends or receives: polls, yielding the core between polls (a
 * large send completes only while its sender calls into MPI). Returns MPI_Testall's error
 * code, MPI_SUCCESS once all are done. */
static inline int wmpi_waitall(int n, MPI_Request *reqs, MPI_Status *statuses, long max_sleep_ns,
                               wmpi_kick *kick)
{
    wmpi_backoff b;
    wmpi_backoff_reset(&b);
    for (;;) {
        int done = 0;
        const int rc = MPI_Testall(n, reqs, &done, statuses);
        if (rc != MPI_SUCCESS || done) return rc;
        wmpi_backoff_pause(&b, max_sleep_ns, max_sleep_ns, kick, 1);
    }
}

#endif
