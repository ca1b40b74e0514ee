"""Latency of ``POST /search`` on an export: in-process and over loopback HTTP under load.

Requests replay the run's test requests (user, time, device, location and query of each test
target, cycled), ``k`` results each, with the per-source top-N set so that about
``--target-candidates`` candidates reach the ranker. In-process: one request at a time
(``Searcher.search_many`` of one), with the share of time per step (query embedding,
candidates = source scoring + top-N union, feature table, tree-ensemble predict, per-family
explanations: path attributions by default, TreeSHAP with `--explain-method shap`), then the
cost of batches of 1 / 2 / 4 / 8 requests (``--batch-rounds``). Over HTTP: ``python -m
kgrank.serve`` (``kgrank serve``: ``--workers`` rankers behind one dynamic-batching queue,
``--max-batch`` / ``--max-wait-ms``) in a subprocess on a free loopback port, ``--requests``
requests from ``--concurrency`` client threads (bounded load: closed loop), or with ``--rate
R`` Poisson arrivals at R requests/s (open loop, at most ``--concurrency`` in flight; latency
counted from each arrival, so waiting for a free client is included). The clients use
``http.client`` with keep-alive by default (``--client httpx`` for httpx): they share the
cores with the server. Errors (non-200 answers, exceptions) are counted; the bar is 0. The mean
batch is the mean over requests of the size of the batch each was ranked in.

    .venv/bin/python benchmarks/serve_latency.py --export runs/export/demo
    .venv/bin/python benchmarks/serve_latency.py --export runs/export/demo --workers 2
    .venv/bin/python benchmarks/serve_latency.py --run runs/demo --export runs/export/demo
"""

from __future__ import annotations

import argparse
import gc
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import machine
from tqdm.auto import tqdm

from kgrank.export import load
from kgrank.features.requests import requests_for_targets
from kgrank.serve.searcher import Context, SearchArgs, Searcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


N_CALIBRATE = 100
"""Requests the calibration replays; the measured in-process requests start after them (their
queries are in the cache by then)."""


def calibrate(searcher: Searcher, bodies: list[dict[str, Any]], target: int, base: int) -> int:
    """The smallest per-source top-N whose mean candidate count (over the first
    ``N_CALIBRATE`` requests) reaches ``target``: the union of the sources' top-N lists grows
    with N, so a bisection finds it (a grid of multiples of the run's N left Amazon Beauty at
    ~1,100 candidates)."""
    means: dict[int, float] = {}

    def mean_size(n: int) -> float:
        if n not in means:
            searcher.stage.rc = searcher.stage.rc.model_copy(update={"candidates": n})
            means[n] = float(np.mean([run_one(searcher, b).n_candidates
                                      for b in bodies[:N_CALIBRATE]]))
        return means[n]

    hi = max(base, 1)
    while mean_size(hi) < target and hi < 64 * max(base, 1):
        hi *= 2
    lo = 1
    while lo < hi:  # the smallest N whose mean reaches the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if mean_size(mid) < target else (lo, mid)
    searcher.stage.rc = searcher.stage.rc.model_copy(update={"candidates": lo})
    return lo


def args_of(body: dict[str, Any]) -> SearchArgs:
    ctx = body.get("context", {})
    return SearchArgs(body.get("user_id"), body.get("query"),
                      Context(ctx.get("time"), ctx.get("device"), ctx.get("location")),
                      k=body["k"], explain=body.get("explain", True),
                      method=body.get("explain_method", "path"))


def run_one(searcher: Searcher, body: dict[str, Any]) -> Any:
    return searcher.search_many([args_of(body)])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True, help="export directory")
    parser.add_argument("--run", type=Path, help="export this run first (to --export)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--inprocess", type=int, default=500, help="in-process requests")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="client threads (closed loop), or the most requests in flight "
                        "with --rate")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: Poisson arrivals at this many requests/s, latency "
                        "from each arrival (0: closed loop, each client sends when answered)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-rounds", type=int, default=30,
                        help="in-process search_many calls per batch size 1 / 2 / 4 / 8 (0: skip)")
    parser.add_argument("--target-candidates", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="threads per server process")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--client", choices=["stdlib", "httpx"], default="stdlib",
                        help="HTTP client of the load threads: http.client (keep-alive, little "
                        "CPU: the client shares the cores with the server) or httpx")
    parser.add_argument("--max-wait-ms", type=float, default=2.0,
                        help="the server's wait for a batch to fill")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="the server's dynamic batching limit (1: one request at a time)")
    parser.add_argument("--pin-cpus", action="store_true",
                        help="the server pins its processes to CPUs (kgrank serve --pin-cpus)")
    parser.add_argument("--no-explain", dest="explain", action="store_false",
                        help="requests without per-family explanations")
    parser.add_argument("--explain-method", choices=["path", "shap"], default="path",
                        help="path attributions (the API's default) or TreeSHAP")
    args = parser.parse_args()
    if args.run is not None:
        from kgrank.export.writer import export_run

        t0 = time.perf_counter()
        export_run(args.run, args.export)
        print(f"exported {args.run} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    t0 = time.perf_counter()
    searcher = Searcher(load(args.export), threads=args.threads)
    start_s = time.perf_counter() - t0
    reqs = requests_for_targets(searcher.split.test)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(reqs))
    users = searcher.dataset.users["user_id"].to_numpy()
    bodies: list[dict[str, Any]] = []
    for r in order:
        ctx = {k: v for k, v in (("time", int(reqs.timestamp[r])), ("device", reqs.device[r]),
                                 ("location", reqs.location[r])) if v is not None}
        body: dict[str, Any] = {"user_id": str(users[reqs.user_idx[r]]), "k": args.k,
                                "context": ctx, "explain": args.explain,
                                "explain_method": args.explain_method}
        if reqs.query[r] is not None:
            body["query"] = reqs.query[r]
        bodies.append(body)
    n_top = calibrate(searcher, bodies, args.target_candidates, searcher.cfg.ranking.candidates)

    # in-process
    enc = searcher.query_text
    hits0, misses0 = (enc.hits, enc.misses) if enc is not None else (0, 0)
    steps: dict[str, float] = {}
    lat: list[float] = []
    sizes: list[int] = []
    errors_in = 0
    for i in tqdm(range(args.inprocess), desc="in-process"):
        t = time.perf_counter()
        try:
            res = run_one(searcher, bodies[(N_CALIBRATE + i) % len(bodies)])
        except Exception as exc:  # counted, reported
            errors_in += 1
            print(f"in-process error: {exc!r}", file=sys.stderr)
            continue
        lat.append(time.perf_counter() - t)
        sizes.append(res.n_candidates)
        for key, v in res.timings.items():
            steps[key] = steps.get(key, 0.0) + v
    total = sum(steps.values())
    share = {k: v / total for k, v in steps.items()}
    n_queries = sum("query" in bodies[(N_CALIBRATE + i) % len(bodies)]
                    for i in range(args.inprocess))
    # queries served without a text-encoder pass (the run's pinned vectors or the LRU cache)
    lookups = (enc.hits - hits0) + (enc.misses - misses0) if enc is not None else 0
    query_hit = (enc.hits - hits0) / lookups if enc is not None and lookups else float("nan")

    # in-process batches (Searcher.search_many, what the server's batcher calls): ms per batch
    batch_ms: dict[int, float] = {}
    for size in (1, 2, 4, 8) if args.batch_rounds > 0 else ():
        times = []
        for j in range(args.batch_rounds):
            at = N_CALIBRATE + j * size
            group = [args_of(bodies[(at + m) % len(bodies)]) for m in range(size)]
            t = time.perf_counter()
            searcher.search_many(group)
            times.append(time.perf_counter() - t)
        batch_ms[size] = float(np.median(times) * 1000)

    # over loopback HTTP, bounded load. The load threads share this process: a full garbage
    # collection over the in-process searcher's objects (~300 ms) stalled every client thread
    # and counted as server latency (one 389 ms request), so it goes first.
    del searcher, enc
    gc.collect()
    gc.freeze()
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kgrank.serve", str(args.export),
                             "--port", str(port), "--candidates", str(n_top),
                             "--threads", str(args.threads), "--workers", str(args.workers),
                             "--max-batch", str(args.max_batch),
                             "--max-wait-ms", str(args.max_wait_ms),
                             *(["--pin-cpus"] if args.pin_cpus else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        local = threading.local()

        payloads = [json.dumps(b).encode() for b in bodies]

        def post(i: int) -> tuple[int, bytes]:
            if args.client == "httpx":
                client = getattr(local, "client", None)
                if client is None:
                    client = local.client = httpx.Client(base_url=url, timeout=60)
                resp = client.post("/search", content=payloads[i % len(payloads)],
                                   headers={"content-type": "application/json"})
                return resp.status_code, resp.content
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                conn.request("POST", "/search", body=payloads[i % len(payloads)],
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (OSError, http.client.HTTPException):
                local.conn = None  # reconnect on the next request
                conn.close()
                raise

        def call(i: int, due: float | None = None) -> tuple[float, bytes | None]:
            """Latency to the whole answer read, and the answer (None: an error). The JSON is
            parsed after the load: the load threads share the cores with the server."""
            if due is not None:  # open loop: wait for the arrival time, measure from it
                time.sleep(max(0.0, due - time.perf_counter()))
            t = time.perf_counter() if due is None else due
            try:
                status, content = post(i)
            except (OSError, http.client.HTTPException, httpx.HTTPError):
                return time.perf_counter() - t, None
            return time.perf_counter() - t, content if status == 200 else None

        n_warm = max(20, 4 * args.concurrency)
        with ThreadPoolExecutor(args.concurrency) as pool:  # warm-up (not counted)
            list(pool.map(call, range(n_warm)))
        t_http = time.perf_counter()
        ids = range(n_warm, n_warm + args.requests)  # requests after the warm-up's
        dues: list[float | None] = [None] * args.requests
        if args.rate > 0:  # Poisson arrivals; latency counts the wait for a free client too
            gaps = np.random.default_rng(1).exponential(1.0 / args.rate, args.requests)
            dues = list(t_http + 0.05 + np.cumsum(gaps))
        with ThreadPoolExecutor(args.concurrency) as pool:
            out = list(tqdm(pool.map(call, ids, dues), total=args.requests,
                            desc=f"http x{args.concurrency}"))
        wall = time.perf_counter() - t_http
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    http_lat = [t for t, _ in out]
    answers = [json.loads(content) for _, content in out if content is not None]
    errors_http = len(out) - sum("results" in a for a in answers)
    batch_mean = float(np.mean([a.get("batch_size", 1) for a in answers])) if answers else 0.0

    ex = load(args.export)
    print(f"machine: {machine()}; export {args.export} ({ex.manifest.run_name}: "
          f"{ex.manifest.n_users} users, {ex.manifest.n_items} items); searcher start "
          f"{start_s:.1f}s; top-{n_top} per source -> {np.mean(sizes):.0f} candidates per "
          f"request (min {min(sizes)}, max {max(sizes)}); {n_queries}/{args.inprocess} with a "
          f"query, {query_hit:.0%} of text-encoder lookups cached")
    print(f"in-process ({args.inprocess} sequential): p50 {pct(lat, 50):.1f} ms, p99 "
          f"{pct(lat, 99):.1f} ms; share " + ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
    if batch_ms:
        print("in-process batches (search_many, median of "
              f"{args.batch_rounds}): " + ", ".join(
                  f"{b} -> {ms:.1f} ms ({ms / b:.1f} ms a request)" for b, ms in batch_ms.items()))
    load_desc = (f"open loop at {args.rate:g} req/s, <= {args.concurrency} in flight"
                 if args.rate > 0 else f"concurrency {args.concurrency}")
    print(f"HTTP ({args.requests} requests, {load_desc}, {args.workers} "
          f"worker process(es) x {args.threads} thread(s)): p50 "
          f"{pct(http_lat, 50):.1f} ms, p90 {pct(http_lat, 90):.1f} ms, p99 "
          f"{pct(http_lat, 99):.1f} ms, max {max(http_lat) * 1000:.1f} ms, "
          f"{args.requests / wall:.1f} req/s, errors {errors_http}; mean batch {batch_mean:.2f} "
          f"(max {args.max_batch})")
    fields = {
        "export": ex.manifest.run_name, "items": ex.manifest.n_items, "k": args.k,
        "candidates_mean": round(float(np.mean(sizes))), "top_n": n_top,
        "inproc_n": args.inprocess, "inproc_p50_ms": round(pct(lat, 50), 1),
        "inproc_p99_ms": round(pct(lat, 99), 1), "query_cache_hit": round(query_hit, 3),
        **{f"share_{k}": round(v, 3) for k, v in share.items()},
        "http_n": args.requests, "concurrency": args.concurrency, "rate": args.rate,
        "http_p50_ms": round(pct(http_lat, 50), 1), "http_p90_ms": round(pct(http_lat, 90), 1),
        "http_p99_ms": round(pct(http_lat, 99), 1), "http_max_ms": round(max(http_lat) * 1000, 1),
        "http_rps": round(args.requests / wall, 1), "errors": errors_in + errors_http,
        "threads": args.threads, "workers": args.workers, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "pin_cpus": args.pin_cpus,
        "batch_mean": round(batch_mean, 2), "client": args.client, "explain": args.explain,
        "explain_method": args.explain_method,
        **{f"batch{b}_ms": round(ms, 1) for b, ms in batch_ms.items()},
    }
    print("RESULT serve_latency " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
