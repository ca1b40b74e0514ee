"""The FastAPI app of ``kgrank serve OUT_DIR``.

``POST /search``, ``GET /items/{id}/similar``, ``GET /items/{id}/image``, ``GET /meta`` (pickers
for the page), ``GET /healthz``, ``GET /`` (the static demo page), OpenAPI at ``/openapi.json``
and ``/docs``. Invalid requests get 422 with ``{"error": "<field>: <problem>", "detail": [...]}``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

import kgrank
from kgrank.serve.batching import MicroBatcher, Slot, thread_slot
from kgrank.serve.responses import answering, hit_out
from kgrank.serve.schemas import MAX_K, HealthOut, SearchIn, SearchOut, SimilarOut
from kgrank.serve.searcher import Context, Filters, Hit, SearchArgs, Searcher


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    if len(loc) == 2 and loc[0] == "body" and isinstance(loc[1], int):
        return f"body (JSON at character {loc[1]})"
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _message(errors: list[dict[str, Any]]) -> str:
    out = []
    for e in errors:
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "json_invalid":
            msg = f"malformed JSON ({msg})"
        out.append(f"{_field(e.get('loc', ()))}: {msg}")
    return "; ".join(out)


def _unprocessable(field: str, msg: str) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["body", *field.split(".")], "msg": msg,
                                       "type": "value_error"}])


def create_app(searcher: Searcher, max_batch: int = 8, max_wait_ms: float = 2.0,
               rankers: Sequence[Slot[SearchArgs, bytes]] = ()) -> FastAPI:
    """The API over one :class:`Searcher`.

    ``/search`` requests are ranked in batches (:class:`~kgrank.serve.batching.MicroBatcher`:
    the requests that queued while the rankers were busy, at most ``max_batch`` a batch,
    after waiting up to ``max_wait_ms`` for a batch to fill) by ``searcher`` on one thread of
    this process and by the extra ``rankers`` (ranking processes,
    :func:`kgrank.serve.rankers.ranker_slots`: one per further core). The other endpoints run
    in FastAPI's thread pool (the searcher's per-part state is read-only after start-up and
    its query caches lock themselves). Rankers answer with the JSON bytes of the
    :class:`SearchOut` (:mod:`kgrank.serve.responses`)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()  # stops the ranking processes

    app = FastAPI(title="kgrank", version=kgrank.__version__, lifespan=lifespan,
                  description="Knowledge-graph-augmented multimodal search and recommendation.")
    manifest = searcher.export.manifest
    batcher: MicroBatcher[SearchArgs, bytes] = MicroBatcher(
        max_batch=max_batch, max_wait_ms=max_wait_ms,
        slots=[thread_slot(answering(searcher.search_many)), *rankers])
    app.state.batcher = batcher
    devices, locations = set(searcher.devices), set(searcher.locations)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")}
                  for e in exc.errors()]
        return JSONResponse({"error": _message(errors), "detail": errors}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail
        msg = _message(detail) if isinstance(detail, list) else str(detail)
        return JSONResponse({"error": msg, "detail": detail}, status_code=exc.status_code)

    @app.get("/healthz", response_model=HealthOut)
    def healthz() -> HealthOut:
        return HealthOut(status="ok", items=manifest.n_items, users=manifest.n_users,
                         schema_version=manifest.schema_version,
                         kgrank_version=manifest.kgrank_version,
                         dataset_fingerprint=manifest.dataset_fingerprint)

    @app.get("/meta")
    def meta() -> dict[str, Any]:
        """Devices, locations and some user ids (for the page's pickers)."""
        return {"devices": sorted(devices), "locations": sorted(locations),
                "users": list(searcher.user_row)[:50], "max_k": MAX_K}

    @app.post("/search", response_model=SearchOut)
    async def search(body: SearchIn) -> Response:
        ctx = body.context
        if ctx is not None and ctx.device is not None and ctx.device not in devices:
            raise _unprocessable("context.device", f"unknown device {ctx.device!r}; known: "
                                 f"{sorted(devices)}")
        if ctx is not None and ctx.location is not None and ctx.location not in locations:
            raise _unprocessable("context.location", f"unknown location {ctx.location!r}; "
                                 f"known: {sorted(locations)}")
        f = body.filters
        if (f is not None and f.min_price is not None and f.max_price is not None
                and f.min_price > f.max_price):
            raise _unprocessable("filters.min_price", "min_price is above max_price")
        context = Context() if ctx is None else Context(
            None if ctx.time is None else int(ctx.time.timestamp()), ctx.device, ctx.location)
        filters = None if f is None else Filters(f.category, f.brand, f.min_price, f.max_price)
        # ranked by the next free ranker, in a batch with the requests that queued meanwhile
        answer = await batcher.submit(SearchArgs(body.user_id, body.query, context, body.k,
                                                 filters, body.explain, body.explain_method))
        return Response(answer, media_type="application/json")  # a SearchOut, serialised

    @app.get("/items/{item_id}/similar", response_model=SimilarOut)
    def similar(item_id: str, k: int = Query(10, ge=1, le=MAX_K)) -> SimilarOut:
        if item_id not in searcher.item_row:
            raise HTTPException(404, f"unknown item {item_id!r}")
        pairs = searcher.similar(item_id, k)
        hits = []
        for iid, score in pairs:
            i = searcher.item_row[iid]
            hits.append(hit_out(Hit(iid, score, searcher.titles[i], searcher.images[i],
                                    searcher.price(i), {}, [])))
        return SimilarOut(item_id=item_id, results=hits)

    @app.get("/items/{item_id}/image")
    def image(item_id: str) -> FileResponse:
        if item_id not in searcher.item_row:
            raise HTTPException(404, f"unknown item {item_id!r}")
        rel = searcher.images[searcher.item_row[item_id]]
        root = searcher.export.path("dataset").resolve()
        path = (root / rel).resolve() if isinstance(rel, str) else None
        if path is None or not path.is_file() or root not in path.parents:
            raise HTTPException(404, f"item {item_id!r} has no image")
        return FileResponse(path)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        page = resources.files("kgrank.serve").joinpath("static/index.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    return app


SWITCH_INTERVAL_S = 0.0005
"""The serving process's GIL switch interval (Python's default is 0.005 s)."""


def serve(export_dir: Path, host: str = "127.0.0.1", port: int = 8000,
          candidates: int | None = None, threads: int = 1, workers: int = 1,
          max_batch: int = 8, max_wait_ms: float = 2.0, pin_cpus: bool = False) -> None:
    """Load the export and serve it with uvicorn until interrupted: one HTTP process whose
    searcher ranks on a thread, plus ``workers - 1`` ranking processes (one searcher each:
    memory times ``workers``; throughput scales with the cores). One queue feeds them all
    (:mod:`kgrank.serve.batching`); ``max_batch`` and ``max_wait_ms``: see :func:`create_app`.
    ``pin_cpus``: each process on its own CPU (:func:`kgrank.serve.rankers.serving_cpus`; for a
    machine that serves only this)."""
    import uvicorn

    from kgrank.export.loader import load
    from kgrank.serve.rankers import (
        freeze_loaded,
        ranker_slots,
        serving_cpus,
        stop,
        wait_ready,
    )

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    cpus = serving_cpus(workers - 1) if pin_cpus else None
    if cpus is not None:  # before loading: every thread started from here inherits it
        os.sched_setaffinity(0, {cpus[0]})
    export = load(export_dir)  # fails here, once, on a bad export
    rankers = ranker_slots(export_dir, workers - 1, candidates, threads,  # load meanwhile
                           None if cpus is None else cpus[1:])
    try:
        app = create_app(Searcher(export, candidates=candidates, threads=threads), max_batch,
                         max_wait_ms, rankers)
        wait_ready(rankers)
    except BaseException:
        stop(rankers)
        raise
    freeze_loaded()
    # this process's ranking thread holds the GIL for most of a batch; with the default 5 ms
    # switch interval the event loop waited that long to read or answer a request (demo, 2
    # clients: HTTP p50 21.7 -> 19.2 ms; 8 clients: 166.7 -> 194.6 req/s at 0.5 ms)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    uvicorn.run(app, host=host, port=port, log_level="warning")
