/* fasa-server's settings. Every setting can come from four places; a later one wins:
 *   the default  <  the config file (--config FILE or FASA_CONFIG)  <  the environment
 *   (FASA_<NAME>)  <  the command line (--name VALUE).
 * The config file has one `name = value` per line ('#' starts a comment; names as the long
 * options, '-' or '_'). Every error names where the bad value came from. */
#ifndef FASA_COORD_SERVER_CONFIG_H
#define FASA_COORD_SERVER_CONFIG_H

#include <stddef.h>
#include <stdio.h>

#include "log.h"

typedef struct server_config {
    char bind[256];
    char endpoint_file[512];   /* "" = none */
    char pid_file[512];        /* "" = none */
    char config[512];          /* the config file read, "" = none */
    char curve_secret[512];    /* the server's CURVE secret key file, "" = no CURVE */
    char authorized_keys[512]; /* directory of the clients' NAME.pub keys, "" = none */
    long block;
    long long max_message;
    long long max_pending;  /* bytes unfinished requests may hold in rank 0 (conn_guard.h) */
    long peer_timeout;      /* seconds: heartbeat and handshake timeout, 0 = none */
    long long memory_limit; /* KV store bytes per rank, 0 = none */
    long long reserve;      /* bytes each shard-holding rank pre-faults (shard_reserve), 0 = none */
    int max_sessions;
    long deadline_ms; /* default queue deadline, 0 = none */
    fasa_log_level log_level;
    char state_dir[512];    /* snapshots go here and --restore reads them; "" = none */
    int restore;            /* 1: reload every snapshotted session at start */
    long snapshot_interval; /* seconds between snapshots of changed sessions; 0 = never */
    long stop_grace;        /* seconds the final snapshot of a stop may take */
    int wal;                /* fasa_wal_mode (coord/wal.h) */
    char metrics_bind[256]; /* ADDR:PORT of the HTTP metrics endpoint, "" = none */
    int tier;               /* default tier of new sessions: 0 ram, 1 disk */
    char tier_dir[512];     /* the disk tier's directory on every node, "" = none */
    double merge_eps;       /* local merge's eps (--merge-eps) */
    char load_root[512];    /* LoadSession reads only inside it, "" = no loads (--load-root) */
} server_config;

/* Fills c from defaults, the config file, env (getenv) and argv. Returns 0 to run, 1 when
 * --help or --version was handled (text written to out), 2 on an error (one line in err). */
int server_config_load(server_config *c, int argc, char **argv, FILE *out, char *err,
                       size_t err_len);

/* 1 when endpoint listens on this host only: tcp:// on 127.x.y.z, localhost or [::1], or
 * ipc:// or inproc://. Without CURVE (curve-secret and authorized-keys) the server binds
 * nothing else. */
int server_config_bind_is_loopback(const char *endpoint);

/* Writes the settings as a config file would hold them (for the start-up log). */
void server_config_describe(const server_config *c, char *buf, size_t len);

#endif
