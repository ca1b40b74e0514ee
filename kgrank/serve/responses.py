"""The JSON answers of the API, built where the ranking ran.

A ``POST /search`` answer is serialised by the ranker that ranked it (a ranking process, or the
HTTP process's ranking thread), so the event loop only writes bytes: it also reads every
request and sends every answer, and under load the requests' next turns wait on it. The bytes
are what FastAPI would send for the :class:`~kgrank.serve.schemas.SearchOut` (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kgrank.serve.schemas import HitOut, SearchOut
from kgrank.serve.searcher import Hit, SearchArgs, SearchResult


def hit_out(h: Hit) -> HitOut:
    """One result of the API (its image is served by ``GET /items/{id}/image``)."""
    url = f"/items/{h.item_id}/image" if h.image else None
    return HitOut(item_id=h.item_id, score=h.score, title=h.title, image_url=url,
                  price=h.price, why=h.why, reasons=h.reasons)


def search_out(res: SearchResult) -> SearchOut:
    """The ``POST /search`` answer of one ranked request."""
    return SearchOut(results=[hit_out(h) for h in res.hits], user_known=res.user_known,
                     cold_start=not res.user_known, n_candidates=res.n_candidates,
                     timings_ms={k: round(v * 1000, 3) for k, v in res.timings.items()},
                     batch_size=res.batch_size)


def search_json(res: SearchResult) -> bytes:
    """:func:`search_out` as JSON bytes."""
    return search_out(res).model_dump_json().encode()


def answering(search_many: Callable[[Sequence[SearchArgs]], list[SearchResult]]
              ) -> Callable[[Sequence[SearchArgs]], list[bytes]]:
    """A batch function that ranks with ``search_many`` and answers with JSON bytes."""
    def answer_many(batch: Sequence[SearchArgs]) -> list[bytes]:
        return [search_json(res) for res in search_many(batch)]
    return answer_many
