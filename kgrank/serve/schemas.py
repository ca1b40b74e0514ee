"""Request and response models of the serving API (pydantic; bounds give clear 422 errors)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_K = 1000
MAX_QUERY = 512
"""Longest accepted query, in characters."""


class ContextIn(BaseModel):
    """Where and when the request is made (every field optional)."""

    model_config = ConfigDict(extra="forbid")
    time: datetime | None = Field(None, description="Request time (ISO 8601 or epoch seconds); "
                                  "default: the end of the exported history.")
    device: StrictStr | None = Field(None, max_length=64,
                                     description="One of the devices of GET /meta.")
    location: StrictStr | None = Field(None, max_length=128,
                                       description="One of the locations of GET /meta.")


class FiltersIn(BaseModel):
    """Filters applied to the ranked candidates."""

    model_config = ConfigDict(extra="forbid")
    category: StrictStr | None = Field(None, max_length=200,
                                       description="Text contained in a category path.")
    brand: StrictStr | None = Field(None, max_length=200, description="Exact brand (any case).")
    min_price: float | None = Field(None, ge=0)
    max_price: float | None = Field(None, ge=0)


class SearchIn(BaseModel):
    """A search (with ``query``) or recommendation (without) request."""

    model_config = ConfigDict(extra="forbid")
    user_id: StrictStr | None = Field(None, min_length=1, max_length=128,
                                      description="Known user id; unknown or absent: cold start "
                                      "from query + context.")
    query: StrictStr | None = Field(None, max_length=MAX_QUERY)
    context: ContextIn | None = None
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="Number of results (1..1000).")
    filters: FiltersIn | None = None
    explain: StrictBool = Field(True, description="Per-family explanations of each result.")
    explain_method: Literal["path", "shap"] = Field(
        "path", description="path: path attributions (Saabas; a table lookup per tree, well "
        "under a millisecond); shap: TreeSHAP (LightGBM pred_contrib, as the run's "
        "explanations.json; ~1 ms per result). Both sum to the score.")


class HitOut(BaseModel):
    item_id: str
    score: float
    title: str | None
    image_url: str | None
    price: float | None
    why: dict[str, float] = Field(description="LightGBM contribution of each feature family "
                                  "(graph, text, image, behaviour, context, query, fusion, "
                                  "bias); they sum to the score.")
    reasons: list[str] = Field(description="Families that push the result up most.")


class SearchOut(BaseModel):
    results: list[HitOut]
    user_known: bool
    cold_start: bool
    n_candidates: int
    timings_ms: dict[str, float] = Field(description="Milliseconds per step, the whole batch's "
                                         "(see batch_size).")
    batch_size: int = Field(1, description="Requests the server ranked together with this one.")


class SimilarOut(BaseModel):
    item_id: str
    results: list[HitOut]


class HealthOut(BaseModel):
    status: str
    items: int
    users: int
    schema_version: int
    kgrank_version: str
    dataset_fingerprint: str
