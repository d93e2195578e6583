#!/usr/bin/env python3
"""fasa's performance model: step time, ingest time and memory per node for a given
tokens x layers x geometry x nodes x cores x network, fed only by figures the project
measures (bench/perfmodel_run.sh runs the measurements and this in one go):

  --attend FILE    `fasa bench attend --json` of the embedded engine, 1 shard, 1 thread
                   (--threads 1), the Llama-like geometry it uses (32 query / 8 KV heads,
                   head_dim 128): per-thread scan and gather GB/s, the rank-0 candidate
                   select cost per candidate, the merge cost per partial, the fixed rest
                   of a step, and the node's read bandwidth on 1..T threads
  --pingpong FILE  bench/pingpong --json: MPI latency, bandwidth and fan-in into rank 0
  --merge-cost F   bench/merge_cost --json: rank 0's candidate select and partial merge
                   by the number of shards P (interpolated; without it, the --attend file's
                   one-shard costs times P)
  --attend-mt F    optional: the same embedded run on T threads of this machine (--threads
                   T, T = its cores): the per-thread scan rate when T threads scan at once
                   (cores and memory shared), interpolated by threads between 1 and T;
                   without it a thread scans as fast whatever the others do
  --ingest FILE    {"load_gbs_per_worker": x, "append_gbs": y, "alloc_over_kv": z,
                    "service_ms": s}: bulk load per worker (bench/load_bench.sh), appends
                   through the server, the shards' allocated bytes over K and V bytes, the
                   client round trip outside the engine (fasa ping)

A decode step of one layer, exact merge (the default; two round trips):
  scan    every worker scans its N/P tokens' dominant key dims at its rate: threads x
          the per-thread scan rate (at that many threads scanning at once on the node,
          --attend-mt), capped by its share of the node's memory bandwidth (workers on a
          node share it); when a node's ranks outnumber its cores (its workers' threads,
          and rank 0 on the first node, which takes a core of its own: it polls for the
          replies and runs the service) they time-share the cores
  select  rank 0 merges P x units x B candidates (cost per candidate, measured)
  gather  the selected rows' K and V (the bytes phase 2 reads), spread over the workers
  merge   rank 0 merges P partials per head
  net     2 round trips (latency), the candidates (P x units x B x 8 bytes) and the
          partials (P x n_heads x (8 head_dim + 12) bytes) into rank 0 at the fan-in
          bandwidth (the network's, or shared memory's on one node)
  fixed   the rest of a step (measured) and the client's round trip
Local merge (--merge local): each worker keeps its own top ceil(B (1 + eps) / P) per unit
and returns its partial with its log-sum-exp: one round trip, no candidates to rank 0 and
no global select; the gather grows by (1 + eps).
A token's step is n_layers layer steps one after another (each needs the last).
Ingest: K and V bytes over min(P x the per-worker load rate, --fs-gbs) for a bulk load,
over the server's append rate for appends. Memory per node: its workers' K and V times the
shards' allocation overhead.

  perfmodel.py predict --attend A --pingpong P --ingest I --tokens 10M --layers 32 \\
      --nodes 16 --workers-per-node 1 --threads 64 --cores 64 --mem-gbs 300 --net-gbps 100
  perfmodel.py validate --attend A --pingpong P --ingest I --points FILE
      FILE: [{"name": .., "tokens": N, "workers": P, "cores": C, "measured_ms": t,
              "dtype_bytes": 2, "mem_gbs": optional}], each predicted and compared
              (target: within 25%)
"""
import argparse
import json
import math
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


class Figures:
    """The measured inputs, per thread of the measuring machine."""

    def __init__(self, attend, pingpong, ingest, like=None, merge_cost=None, attend_mt=None):
        self.mc = merge_cost
        run = attend["runs"][-1] if attend.get("runs") else attend
        ph = dict(run["phases_ms"])
        if "rest_ms" in run:
            # Only the scan and the whole step were measured there (the device log): rank 0's
            # select and merge and the step's other time come from another run (--split-like,
            # this machine's, at the same geometry and budget), the gather and attention are
            # the rest of that step.
            if not like:
                sys.exit("perfmodel: this --attend file needs --split-like FILE")
            lk = (like["runs"][-1] if like.get("runs") else like)["phases_ms"]
            for k in ("select", "merge", "other"):
                ph[k] = lk[k]
            ph["gather"] = max(0.0, run["rest_ms"] - lk["select"] - lk["merge"] - lk["other"])
            ph["attend"] = 0.0
        self.n0 = run["tokens"]
        self.scan_bytes = run["scan_bytes"]
        self.fasa_bytes = run["fasa_bytes"]
        self.gather_bytes = self.fasa_bytes - self.scan_bytes
        self.es0 = 2 if attend.get("dtype") in ("f16", "bf16") else 4
        self.scan_gbs = self.scan_bytes / (ph["scan"] * 1e6)
        ga = ph["gather"] + ph["attend"]
        self.gather_gbs = self.gather_bytes / (ga * 1e6) if ga > 0 else 1e9
        self.units0, self.b0, self.nh0, self.nkv0, self.d0 = 32, attend.get("budget", 256), 32, 8, 128
        self.sel_ns = ph["select"] * 1e6 / (self.units0 * self.b0)
        self.merge_ns = ph["merge"] * 1e6 / self.nh0
        self.other_ms = ph["other"]
        rb = attend.get("read_gbs_by_threads") or [attend.get("read_gbs", self.scan_gbs)]
        self.read_by_threads = rb
        # A machine whose bandwidth by threads was not measured thread by thread: its
        # one-thread read rate times the threads, capped by its measured node bandwidth.
        self.read_cap = attend.get("node_read_cap_gbs")
        # --attend-mt: the scan on T threads at once; each thread's rate there over the
        # one-thread rate (1: not measured).
        self.mt_threads, self.mt_eff = 1, 1.0
        if attend_mt:
            rm = attend_mt["runs"][-1] if attend_mt.get("runs") else attend_mt
            t = int(attend_mt.get("threads", 1))
            if t > 1 and rm["tokens"] != self.n0:
                sys.exit("perfmodel: --attend-mt must be a run of as many tokens as --attend")
            if t > 1:
                one = self.scan_bytes / self.n0  # bytes per token, both runs' geometry
                rate_t = one * rm["tokens"] / (rm["phases_ms"]["scan"] * 1e6) / t
                self.mt_threads, self.mt_eff = t, rate_t / self.scan_gbs
        self.lat_us = pingpong["lat_us"]
        self.mpi_gbs = pingpong["bw_gbs"]
        self.fanin_gbs = pingpong.get("fanin_gbs") or pingpong["bw_gbs"]
        self.load_gbs = ingest.get("load_gbs_per_worker", 0)
        self.append_gbs = ingest.get("append_gbs", 0)
        self.alloc_over_kv = ingest.get("alloc_over_kv", 1.0)
        self.service_ms = ingest.get("service_ms", 0.0)

    def rank0_ms(self, key, P, scale):
        """Rank 0's select or merge ms at P shards: the merge_cost figures interpolated
        (linear in P between measured P, and beyond the last), else the attend file's
        one-shard cost times P. scale: units x budget (select) or heads x head_dim (merge)
        relative to the measured ones."""
        if not self.mc:
            per = self.sel_ns * self.units0 * self.b0 if key == "select_ms" else self.merge_ns * self.nh0
            return per * P * scale / 1e6
        pts = sorted((int(k), v) for k, v in self.mc[key].items())
        for (p0, t0), (p1, t1) in zip(pts, pts[1:]):
            if P <= p1:
                return scale * (t0 + (t1 - t0) * (P - p0) / (p1 - p0)) if P >= p0 else scale * t0
        (p0, t0), (p1, t1) = pts[-2], pts[-1]
        return scale * (t1 + (t1 - t0) * (P - p1) / (p1 - p0))

    def scan_eff(self, k):
        """A thread's scan rate, relative to one thread alone, while k threads of the node
        scan at once: 1 at k = 1, the measured --attend-mt figure at its T, linear between,
        that figure beyond."""
        if k <= 1 or self.mt_threads <= 1:
            return 1.0
        if k >= self.mt_threads:
            return self.mt_eff
        return 1.0 + (self.mt_eff - 1.0) * (k - 1) / (self.mt_threads - 1)

    def node_read_gbs(self, threads):
        """The measuring machine's read bandwidth on this many threads (its ceiling)."""
        rb = self.read_by_threads
        if self.read_cap:
            return min(threads * rb[0], self.read_cap)
        return rb[min(threads, len(rb)) - 1]


def step_ms(f, *, tokens, workers, threads=1, cores=None, workers_per_node=None, mem_gbs=None,
            net_gbs=None, n_heads=32, n_kv_heads=8, head_dim=128, dtype_bytes=2, budget=256,
            merge="exact", eps=0.25, rank0_core=True, parts=None):
    """Predicted ms of one layer's decode step, and its parts (dict) in parts."""
    P = workers
    wpn = workers_per_node or P
    cores = cores or wpn * threads
    # Geometry scaling from the measured one: the scan reads the dominant dims per KV head
    # (the same fraction of head_dim), the gather whole rows of the selected tokens.
    kv_scale = (n_kv_heads * head_dim * dtype_bytes) / (f.nkv0 * f.d0 * f.es0)
    sb_tok = f.scan_bytes / f.n0 * kv_scale
    units = n_heads
    g_bytes = f.gather_bytes * (n_heads / f.nh0) * (head_dim / f.d0) * (dtype_bytes / f.es0) \
        * (budget / f.b0)
    # A worker's rates: its threads (time-shared when the node has fewer cores), capped by
    # its share of the node's memory bandwidth.
    # A shard runs its KV groups in parallel, one per thread: threads beyond n_kv_heads idle.
    threads = min(threads, n_kv_heads)
    # The first node's ranks: its workers' threads and rank 0 (rank0_core), which takes a
    # core of its own; the step waits for its slowest worker, so that node sets the pace.
    ranks = wpn * threads + (1 if rank0_core else 0)
    share = min(1.0, cores / ranks)
    running = min(cores, wpn * threads)  # threads scanning at once on the node
    node_bw = mem_gbs if mem_gbs else f.node_read_gbs(running)
    scan_rate = min(threads * share * f.scan_eff(running) * f.scan_gbs, node_bw / wpn)
    gather_rate = min(threads * share * f.gather_gbs, node_bw / wpn)
    fan = net_gbs if net_gbs else f.fanin_gbs
    p = {}
    p["scan"] = tokens / P * sb_tok / (scan_rate * 1e6)
    p["fixed"] = f.other_ms + f.service_ms
    p["merge"] = f.rank0_ms("merge_ms", P, (n_heads * head_dim) / (f.nh0 * f.d0))
    reply = P * n_heads * (8 * head_dim + 12)
    if merge == "exact":
        p["gather"] = g_bytes / P / (gather_rate * 1e6)
        p["select"] = f.rank0_ms("select_ms", P, (units * budget) / (f.units0 * f.b0))
        cand = P * units * budget * 8
        p["net"] = 2 * 2 * f.lat_us / 1e3 + (cand + reply) / (fan * 1e6)
    else:
        b_loc = budget if P == 1 else min(budget, math.ceil(budget * (1 + eps) / P))
        p["gather"] = g_bytes * (b_loc * P / budget) / P / (gather_rate * 1e6)
        p["select"] = 0.0
        p["net"] = 2 * f.lat_us / 1e3 + reply / (fan * 1e6)
    if parts is not None:
        parts.update(p)
    return sum(p.values())


def s_figures(args):
    return Figures(load(args.attend), load(args.pingpong), load(args.ingest) if args.ingest else {},
                   load(args.split_like) if args.split_like else None,
                   load(args.merge_cost) if args.merge_cost else None,
                   load(args.attend_mt) if args.attend_mt else None)


def predict(args):
    f = s_figures(args)
    N, L = args.tokens, args.layers
    P = args.nodes * args.workers_per_node
    es = args.dtype_bytes
    net = args.net_gbps / 8 if args.net_gbps else None
    print(f"model: {N} tokens x {L} layers, {args.heads} query / {args.kv_heads} KV heads, "
          f"head_dim {args.head_dim}, {es}-byte K/V, B {args.budget}; {args.nodes} nodes x "
          f"{args.workers_per_node} worker(s) x {args.threads} threads ({args.cores} cores, "
          f"{args.mem_gbs or 'measured'} GB/s memory per node), network "
          f"{args.net_gbps or 'shared memory'} Gb/s")
    print(f"inputs: scan {f.scan_gbs:.2f} GB/s and gather {f.gather_gbs:.2f} GB/s per thread, "
          f"select {f.sel_ns:.2f} ns per candidate, merge {f.merge_ns:.1f} ns per partial, "
          f"step rest {f.other_ms:.3f} ms, service {f.service_ms:.3f} ms, MPI latency "
          f"{f.lat_us:.2f} us, fan-in {f.fanin_gbs:.2f} GB/s, load {f.load_gbs:.3f} GB/s per "
          f"worker, append {f.append_gbs:.3f} GB/s, scan per thread x{f.mt_eff:.2f} at "
          f"{f.mt_threads} threads at once" +
          ("; rank 0's select and merge by shards from --merge-cost" if f.mc else ""))
    out = {}
    for merge in ("exact", "local"):
        parts = {}
        t = step_ms(f, tokens=N, workers=P, threads=args.threads, cores=args.cores,
                    workers_per_node=args.workers_per_node, mem_gbs=args.mem_gbs, net_gbs=net,
                    n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                    dtype_bytes=es, budget=args.budget, merge=merge, eps=args.eps,
                    rank0_core=not args.no_rank0_core, parts=parts)
        tok = t * L
        worst = max(parts, key=parts.get)
        verdict = "met" if tok <= args.target_ms else \
            f"NOT met: {tok - args.target_ms:.1f} ms over ({tok / args.target_ms:.2f}x)"
        print(f"  {merge:5s}: {t:.3f} ms per layer step, {tok:.1f} ms per token of {L} layers "
              f"(target <= {args.target_ms:g} ms: {verdict}); bottleneck: {worst} "
              f"({parts[worst] / t:.0%})")
        print("         " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + " ms")
        out[merge] = {"layer_ms": t, "token_ms": tok, "parts_ms": parts, "bottleneck": worst}
    kv = N * L * args.kv_heads * args.head_dim * es * 2
    mem_node = kv / args.nodes * f.alloc_over_kv
    load_rate = min(P * f.load_gbs, args.fs_gbs) if args.fs_gbs else P * f.load_gbs
    print(f"  memory per node: {mem_node / 2**30:.1f} GiB (K and V {kv / 2**30:.1f} GiB in all, "
          f"x {f.alloc_over_kv:.3f} allocated)")
    if f.load_gbs:
        print(f"  ingest by bulk load: {kv / (load_rate * 1e9):.1f} s at {load_rate:.2f} GB/s "
              f"({P} workers x {f.load_gbs:.3f}" + (f", filesystem {args.fs_gbs} GB/s)" if args.fs_gbs else ")"))
    if f.append_gbs:
        print(f"  ingest by appends: {kv / (f.append_gbs * 1e9):.1f} s at {f.append_gbs:.3f} GB/s")
    out["memory_per_node_bytes"] = mem_node
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


def validate(args):
    f = s_figures(args)
    worst = 0.0
    ok = True
    for pt in load(args.points):
        parts = {}
        t = step_ms(f, tokens=pt["tokens"], workers=pt["workers"], threads=pt.get("threads", 1),
                    cores=pt.get("cores"), workers_per_node=pt["workers"],
                    mem_gbs=pt.get("mem_gbs"), dtype_bytes=pt.get("dtype_bytes", 2),
                    budget=pt.get("budget", 256), merge=pt.get("merge", "exact"),
                    rank0_core=not args.no_rank0_core, parts=parts)
        m = pt["measured_ms"]
        err = (t - m) / m
        worst = max(worst, abs(err))
        ok &= abs(err) <= 0.25
        print(f"  {pt['name']}: {pt['workers']} worker(s), {pt['tokens']} tokens: measured "
              f"{m:.2f} ms, predicted {t:.2f} ms ({err:+.0%}; within 25%: "
              f"{'yes' if abs(err) <= 0.25 else 'NO'}); " +
              ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    print(f"validation: worst error {worst:.0%} (target <= 25%: {'met' if ok else 'NOT met'})")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("predict", "validate"):
        s = sub.add_parser(name)
        s.add_argument("--attend", required=True)
        s.add_argument("--pingpong", required=True)
        s.add_argument("--ingest")
        s.add_argument("--merge-cost", help="bench/merge_cost --json: rank 0's select and merge "
                       "ms by shards")
        s.add_argument("--attend-mt", help="an --attend run of the same machine on T threads "
                       "(its cores): the per-thread scan rate when T threads scan at once")
        s.add_argument("--no-rank0-core", action="store_true", help="rank 0 takes no core of the "
                       "first node (it runs on a node of its own)")
        s.add_argument("--split-like", help="an --attend file whose phase proportions split a "
                       "step measured only as scan + rest (the device log's)")
    p = sub.choices["predict"]
    p.add_argument("--tokens", type=float, required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--workers-per-node", type=int, default=1)
    p.add_argument("--threads", type=int, default=64)
    p.add_argument("--cores", type=int, default=64)
    p.add_argument("--mem-gbs", type=float, default=300)
    p.add_argument("--net-gbps", type=float, default=100)
    p.add_argument("--fs-gbs", type=float, default=0)
    p.add_argument("--eps", type=float, default=0.25)
    p.add_argument("--target-ms", type=float, default=40)
    p.add_argument("--json")
    v = sub.choices["validate"]
    v.add_argument("--points", required=True)
    args = ap.parse_args()
    if args.cmd == "predict":
        args.tokens = int(args.tokens)
        predict(args)
    else:
        validate(args)


if __name__ == "__main__":
    sys.exit(main())
