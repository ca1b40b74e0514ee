"""H&M fashion catalog subset (articles + product images, no transactions) -> kgrank dataset.

Source format (``hm-fashion-catalog-images-subset``, from the Kaggle "H&M Personalized Fashion
Recommendations" data):

- ``articles_sample.csv``: comma-separated, double-quote quoting, header with 25 columns
  (``article_id, product_code, prod_name, product_type_no, product_type_name, product_group_name,
  graphical_appearance_no/name, colour_group_code/name, perceived_colour_value_id/name,
  perceived_colour_master_id/name, department_no/name, index_code/name, index_group_no/name,
  section_no/name, garment_group_no/name, detail_desc``). ``article_id`` is a 10-digit string with a
  leading zero (read as text).
- ``images/<first 3 digits>/<article_id>.jpg``: product photos for a subset of the articles.

The result is a catalog-only dataset: an empty interactions table. Errors name the file, the
0-based data row and the column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kgrank.data.adapters.tabular import read_csv
from kgrank.data.dataset import Dataset, write_dataset
from kgrank.data.schema import DatasetError

CATEGORY_LEVELS = ("index_group_name", "product_group_name", "product_type_name")
ATTRIBUTES = (
    "product_type_name", "product_group_name", "colour_group_name",
    "perceived_colour_master_name", "graphical_appearance_name", "department_name", "index_name",
    "section_name", "garment_group_name", "product_code",
)
REQUIRED = ("article_id", "prod_name", "detail_desc", *CATEGORY_LEVELS, *ATTRIBUTES)


def image_path(article_id: str) -> str:
    """Relative image path of an article, as in the source and in the dataset."""
    return f"images/{article_id[:3]}/{article_id}.jpg"


def read_articles(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetError(path, "file not found")
    raw = read_csv(path)  # strict: UTF-8, field counts; empty fields -> None
    for col in dict.fromkeys(REQUIRED):
        if col not in raw.columns:
            raise DatasetError(path, "column missing from the header", column=col)
    ids = raw["article_id"].str.strip()
    bad = ~ids.str.fullmatch(r"\d+").to_numpy(dtype=bool, na_value=False)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(path, f"{raw['article_id'].iat[row]!r} is not a numeric article id",
                           row=row, column="article_id")
    dup = ids.duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DatasetError(path, f"duplicate article id {ids.iat[row]!r}", row=row,
                           column="article_id")
    raw["article_id"] = ids
    return raw


def import_hm_catalog(src: Path, dst: Path, *, overwrite: bool = False) -> Dataset:
    """Import the H&M articles and the images present in ``src/images``."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    raw = read_articles(src / "articles_sample.csv")

    def text(col: str) -> pd.Series:
        return raw[col].astype(object)

    ids = raw["article_id"].tolist()
    images = [image_path(a) if (src / image_path(a)).is_file() else None for a in ids]
    files = {rel: src / rel for rel in images if rel is not None}
    levels = raw[list(CATEGORY_LEVELS)].to_numpy(dtype=object)
    categories = [[" > ".join(v for v in lv if v)] if any(lv) else [] for lv in levels]
    items = pd.DataFrame({
        "item_id": pd.Series(ids, dtype=object),
        "title": text("prod_name"),
        "description": text("detail_desc"),
        "categories": pd.Series(categories, dtype=object),
        "brand": pd.Series([None] * len(ids), dtype=object),
        "price": np.full(len(ids), np.nan),
        "image": pd.Series(images, dtype=object),
    })
    for col in ATTRIBUTES:
        items[col] = text(col)
    interactions = pd.DataFrame({
        "user_id": pd.Series([], dtype=str),
        "item_id": pd.Series([], dtype=str),
        "timestamp": pd.Series([], dtype="datetime64[s, UTC]"),
    })
    n_no_desc = int(items["description"].isna().sum())
    partial = sum(1 for lv in levels if not all(lv))
    readme = "\n".join([
        "# H&M fashion catalog (subset with images)",
        "",
        f"Imported by kgrank from `{src}` (Kaggle H&M competition data; non-commercial research "
        "use).",
        "",
        "## Transformation",
        f"- items: `articles_sample.csv` in file order ({len(items):,} rows): item_id = article_id "
        "(10-digit string, leading zero kept), title = prod_name, description = detail_desc, "
        "categories = ['index_group_name > product_group_name > product_type_name'], brand and "
        f"price null. Attribute columns: {', '.join(ATTRIBUTES)}. The numeric code columns "
        "(*_no, *_code, *_id) and perceived_colour_value_name are not kept.",
        f"- image: `images/<3 digits>/<article_id>.jpg`, copied from the source, for the "
        f"{len(files):,} articles whose photo is in the subset; null for the other "
        f"{len(items) - len(files):,}.",
        "",
        "## Caveats",
        "- NO USERS AND NO INTERACTIONS: the interactions table is empty (catalog only: "
        "content-based and image/text models, not CF training).",
        f"- {n_no_desc} article(s) have no description"
        + (f"; {partial} have an empty category level (left out of the path)." if partial
           else "."),
        "",
    ])
    return write_dataset(dst, items, interactions, files=files, overwrite=overwrite, readme=readme)
