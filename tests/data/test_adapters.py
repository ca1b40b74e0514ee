"""Tests for kgrank.data.adapters: tiny synthetic sources in each exact format, error cases, and
imports of the real source data under ``shared/datasets`` (beside the repository)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kgrank.data.adapters import ADAPTERS, import_dataset
from kgrank.data.adapters.amazon import import_amazon_5core, parse_category_paths
from kgrank.data.adapters.hm import import_hm_catalog
from kgrank.data.adapters.kgat import import_kgat
from kgrank.data.adapters.lightgcn import import_lightgcn, read_split_file
from kgrank.data.adapters.movielens import import_movielens_100k
from kgrank.data.adapters.tabular import import_tabular
from kgrank.data.dataset import load_dataset
from kgrank.data.schema import DatasetError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


def utc(s: str) -> pd.Timestamp:
    return pd.Timestamp(s, tz="UTC")


def vals(series: pd.Series) -> list[object]:
    """Values with missing ones as None (loaded string columns hold NaN for missing)."""
    return [None if not isinstance(v, list | np.ndarray) and pd.isna(v) else v for v in series]


def no_hidden(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- amazon-5core

AMAZON_HEADER = (
    "item_id:token\ttitle:token\tsales_type:token\tsales_rank:float\tcategories:token_seq\t"
    "price:float\tbrand:token\n"
)


def write_amazon(root: Path, item_rows: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = item_rows or [
        "B1\tLip Gloss\tBeauty\t10.0\t'Beauty', 'Makeup', 'Lips'\t5.5\tAcme\n",
        # a tab inside a quoted title; two concatenated paths; empty brand
        'B2\t"Brush \t Set"\tHealth & Personal Care\t200.0\t'
        "'Beauty', 'Tools & Accessories', 'Brushes', 'Beauty', 'Makeup', 'Face'\t12\t\n",
        # a double-quoted token inside a CSV-quoted field; empty title, rank, price
        "B3\t\t\t\t\"'Beauty', 'Fragrance', \"\"Women's\"\"\"\t\tPrada\n",
    ]
    (root / "Amazon_Beauty.item").write_text(AMAZON_HEADER + "".join(rows), encoding="utf-8")
    (root / "interactions.csv").write_text(
        "user_id,item_id,timestamp,p5_user_idx,p5_item_idx,seq_pos\n"
        "U1,B3,1318896000,1,3,0\n"
        "U1,B1,1000000000,1,1,1\n"
        "U2,B2,1391040000,2,2,0\n"
        "U2,B3,1391040000,2,3,1\n",
        encoding="utf-8",
    )
    return root


def test_parse_category_paths() -> None:
    assert parse_category_paths("'Beauty', 'Makeup', 'Face'") == ["Beauty > Makeup > Face"]
    assert parse_category_paths("'Beauty', 'A', 'Beauty', 'B', 'C'") == ["Beauty > A", "Beauty > B > C"]
    assert parse_category_paths("'Beauty', \"Women's\"") == ["Beauty > Women's"]
    assert parse_category_paths("") == []


def test_amazon_synthetic(tmp_path: Path) -> None:
    src = write_amazon(tmp_path / "src")
    ds = import_amazon_5core(src, tmp_path / "out")
    items = ds.items
    assert items["item_id"].tolist() == ["B1", "B2", "B3"]
    assert vals(items["title"]) == ["Lip Gloss", "Brush \t Set", None]
    assert [list(c) for c in items["categories"]] == [
        ["Beauty > Makeup > Lips"],
        ["Beauty > Tools & Accessories > Brushes", "Beauty > Makeup > Face"],
        ["Beauty > Fragrance > Women's"],
    ]
    assert vals(items["brand"]) == ["Acme", None, "Prada"]
    assert items["price"].iloc[:2].tolist() == [5.5, 12.0] and math.isnan(items["price"].iloc[2])
    assert vals(items["sales_type"]) == ["Beauty", "Health & Personal Care", None]
    assert items["sales_rank"].iloc[:2].tolist() == [10.0, 200.0]
    assert math.isnan(items["sales_rank"].iloc[2])
    inter = ds.interactions
    assert inter["user_id"].tolist() == ["U1", "U1", "U2", "U2"]
    assert inter["item_id"].tolist() == ["B3", "B1", "B2", "B3"]  # file order, not time order
    assert inter["timestamp"].tolist() == [
        utc("2011-10-18"), utc("2001-09-09 01:46:40"), utc("2014-01-30"), utc("2014-01-30")
    ]
    assert str(inter["timestamp"].dt.tz) == "UTC"
    assert set(inter["event"]) == {"purchase"} and set(inter["weight"]) == {1.0}
    assert inter["seq_pos"].tolist() == [0, 1, 0, 1]
    assert ds.n_users == 2 and ds.n_items == 3
    assert "interactions.csv" in (ds.root / "README.md").read_text()


def test_amazon_errors(tmp_path: Path) -> None:
    bad_cat = ["B1\tT\tBeauty\t1.0\t'Beauty', Makeup\t1.0\tA\n"]
    with pytest.raises(DatasetError) as err:
        import_amazon_5core(write_amazon(tmp_path / "a", bad_cat), tmp_path / "out")
    assert (err.value.row, err.value.column) == (0, "categories")
    assert err.value.file.endswith("Amazon_Beauty.item")
    bad_price = [
        "B1\tT\tBeauty\t1.0\t'Beauty'\t1.0\tA\n",
        "B2\tT\tBeauty\t1.0\t'Beauty'\tcheap\tA\n",
        "B3\tT\tBeauty\t1.0\t'Beauty'\t1.0\tA\n",
    ]
    with pytest.raises(DatasetError) as err:
        import_amazon_5core(write_amazon(tmp_path / "b", bad_price), tmp_path / "out")
    assert (err.value.row, err.value.column) == (1, "price")
    src = write_amazon(tmp_path / "c")
    with (src / "interactions.csv").open("a") as fh:
        fh.write("U3,B9,1391040000,3,9,0\n")
    with pytest.raises(DatasetError) as err:
        import_amazon_5core(src, tmp_path / "out")
    assert (err.value.row, err.value.column) == (4, "item_id")
    src = write_amazon(tmp_path / "d")
    with (src / "interactions.csv").open("a") as fh:
        fh.write("U3,B1,1391040000,3,9\n")  # a field short
    with pytest.raises(DatasetError) as err:
        import_amazon_5core(src, tmp_path / "out")
    assert err.value.file.endswith("interactions.csv") and err.value.row == 4
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- movielens-100k

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


def write_movielens(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n\n")
    (root / "u.item").write_bytes(
        (f"1|Toy Story (1995)|01-Jan-1995||http://x/1|{flags('Animation', 'Comedy')}\n"
         f"2|Café Society (1995)|15-Mar-1995||http://x/2|{flags('Drama')}\n"
         f"3|unknown|||| {flags()}\n".replace("|| ", "||")).encode("latin-1")
    )
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    (root / "u.data").write_text(
        "2\t1\t5\t881250949\n1\t2\t3\t891717742\n1\t1\t1\t878887116\n2\t3\t4\t878887116\n"
    )
    return root


def test_movielens_synthetic(tmp_path: Path) -> None:
    ds = import_movielens_100k(write_movielens(tmp_path / "src"), tmp_path / "out")
    items = ds.items
    assert items["item_id"].tolist() == ["1", "2", "3"]
    assert items["title"].tolist() == ["Toy Story (1995)", "Café Society (1995)", "unknown"]
    assert [list(c) for c in items["categories"]] == [
        ["Movies > Animation", "Movies > Comedy"], ["Movies > Drama"], []
    ]
    assert vals(items["release_date"]) == ["01-Jan-1995", "15-Mar-1995", None]
    assert items["year"].iloc[:2].tolist() == [1995.0, 1995.0] and math.isnan(items["year"].iloc[2])
    users = ds.users
    assert users["user_id"].tolist() == ["1", "2"]
    assert users["age"].tolist() == [24.0, 53.0]
    assert users["gender"].tolist() == ["M", "F"]
    assert users["occupation"].tolist() == ["technician", "other"]
    assert users["region"].tolist() == ["85711", "T8H1N"]
    inter = ds.interactions
    assert inter["user_id"].tolist() == ["2", "1", "1", "2"]
    assert inter["item_id"].tolist() == ["1", "2", "1", "3"]
    assert inter["weight"].tolist() == [5.0, 3.0, 1.0, 4.0]
    assert set(inter["event"]) == {"rating"}
    assert inter["location"].tolist() == ["T8H1N", "85711", "85711", "T8H1N"]
    assert inter["timestamp"].iloc[0] == pd.Timestamp(881250949, unit="s", tz="UTC")


def test_movielens_errors(tmp_path: Path) -> None:
    src = write_movielens(tmp_path / "src")
    (src / "u.data").write_text("1\t1\t5\t881250949\n1\t2\tfive\t891717742\n")
    with pytest.raises(DatasetError) as err:
        import_movielens_100k(src, tmp_path / "out")
    assert (err.value.row, err.value.column) == (1, "rating")
    (src / "u.data").write_text("1\t1\t5\t881250949\n7\t2\t4\t891717742\n")
    with pytest.raises(DatasetError) as err:
        import_movielens_100k(src, tmp_path / "out")
    assert (err.value.row, err.value.column) == (1, "user_id")


# ---------------------------------------------------------------- lightgcn

def write_split(root: Path, train: str, test: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    return root


def test_lightgcn_without_lists(tmp_path: Path) -> None:
    # user 1 has no training items; item 4 is never seen (ids run 0..max)
    src = write_split(tmp_path / "src", "0 0 1 2\n1\n2 1 5\n", "0 3\n1 2\n2 0\n")
    ds = import_lightgcn(src, tmp_path / "out")
    inter = ds.interactions
    assert inter["user_id"].tolist() == ["0", "0", "0", "2", "2", "0", "1", "2"]
    assert inter["item_id"].tolist() == ["0", "1", "2", "1", "5", "3", "2", "0"]
    assert inter["split"].tolist() == ["train"] * 5 + ["test"] * 3
    assert (inter["timestamp"] == EPOCH).all() and str(inter["timestamp"].dt.tz) == "UTC"
    assert set(inter["event"]) == {"click"} and set(inter["weight"]) == {1.0}
    assert ds.items["item_id"].tolist() == ["0", "1", "2", "3", "4", "5"]
    assert ds.users["user_id"].tolist() == ["0", "1", "2"]
    readme = (ds.root / "README.md").read_text()
    assert "NO TIME INFORMATION" in readme and "split" in readme


def test_lightgcn_with_lists(tmp_path: Path) -> None:
    src = write_split(tmp_path / "src", "1 2 0\n0 1\n", "0 2\n1\n")
    (src / "user_list.txt").write_text("org_id remap_id\nalice 1\nbob 0\n")
    (src / "item_list.txt").write_text("org_id remap_id\n007 0\n042 1\n100 2\n")
    ds = import_lightgcn(src, tmp_path / "out")
    assert ds.users["user_id"].tolist() == ["0", "1"]
    assert ds.users["org_id"].tolist() == ["bob", "alice"]
    assert ds.items["item_id"].tolist() == ["0", "1", "2"]
    assert ds.items["org_id"].tolist() == ["007", "042", "100"]  # leading zeros kept
    assert ds.interactions["user_id"].tolist() == ["1", "1", "0", "0"]
    assert ds.interactions["item_id"].tolist() == ["2", "0", "1", "2"]
    assert ds.interactions["split"].tolist() == ["train", "train", "train", "test"]


def test_lightgcn_read_split_file(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("3 1 2\n\n4\n5 9\n")
    f = read_split_file(path)
    assert f.users.tolist() == [3, 3, 5] and f.items.tolist() == [1, 2, 9]
    assert f.pair_lines.tolist() == [0, 0, 3]
    assert f.line_users.tolist() == [3, 4, 5] and f.lines.tolist() == [0, 2, 3]


@pytest.mark.parametrize(
    ("train", "row", "column"),
    [("0 1 2\n1 3 x4\n", 1, "item"), ("0 1\n1 2\nu2 3\n", 2, "user"), ("0 1\n1 2.5\n", 1, "item"),
     ("0 -1\n", 0, "item")],
)
def test_lightgcn_bad_token(tmp_path: Path, train: str, row: int, column: str) -> None:
    src = write_split(tmp_path / "src", train, "0 1\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(DatasetError) as err:
        import_lightgcn(src, tmp_path / "out" / "ds")
    assert err.value.file.endswith("train.txt")
    assert (err.value.row, err.value.column) == (row, column)
    assert list((tmp_path / "out").iterdir()) == []


def test_lightgcn_unknown_item_in_list(tmp_path: Path) -> None:
    src = write_split(tmp_path / "src", "0 0\n", "0 1\n0 5\n")
    (src / "item_list.txt").write_text("org_id remap_id\na 0\nb 1\n")
    with pytest.raises(DatasetError) as err:
        import_lightgcn(src, tmp_path / "out")
    assert err.value.file.endswith("test.txt") and (err.value.row, err.value.column) == (1, "item")


# ---------------------------------------------------------------- kgat

def write_kgat(root: Path, kg: bool = True) -> Path:
    src = write_split(root, "0 0 1\n1 2\n", "0 2\n1 0\n")
    (src / "user_list.txt").write_text("org_id remap_id\nA1 0\nA2 1\n")
    (src / "item_list.txt").write_text(
        "org_id remap_id freebase_id\n0553092626 0 m.item0\nB1 1 m.item1\nB2 2 m.item2\n"
    )
    (src / "entity_list.txt").write_text(
        "org_id remap_id\nm.item0 0\nm.item1 1\nm.item2 2\nm.author 3\n\"\"\"I Love You 4\n 5\n"
    )
    (src / "relation_list.txt").write_text(
        "org_id remap_id\nhttp://fb/book.author 0\nhttp://fb/book.genre 1\n"
    )
    if kg:
        (src / "kg_final.txt").write_text("0 0 3\n1 1 4\n2 0 5\n3 1 0\n0 0 3\n")
    return src


def test_kgat_with_kg(tmp_path: Path) -> None:
    ds = import_kgat(write_kgat(tmp_path / "src"), tmp_path / "out")
    assert ds.items["item_id"].tolist() == ["0", "1", "2"]
    assert ds.items["freebase_id"].tolist() == ["m.item0", "m.item1", "m.item2"]
    assert ds.items["org_id"].tolist() == ["0553092626", "B1", "B2"]
    assert ds.users["org_id"].tolist() == ["A1", "A2"]
    assert ds.interactions["split"].tolist() == ["train"] * 3 + ["test"] * 2
    assert ds.triples is not None
    a, g = "http://fb/book.author", "http://fb/book.genre"
    assert ds.triples.to_dict("records") == [
        {"head": "0", "relation": a, "tail": "m.author"},
        {"head": "1", "relation": g, "tail": '"""I Love You'},
        {"head": "2", "relation": a, "tail": "e5"},  # empty entity name -> e<id>
        {"head": "m.author", "relation": g, "tail": "0"},
        {"head": "0", "relation": a, "tail": "m.author"},  # duplicate fact kept
    ]
    assert "duplicate" in (ds.root / "README.md").read_text()


def test_kgat_without_lists_and_errors(tmp_path: Path) -> None:
    src = write_kgat(tmp_path / "src")
    (src / "entity_list.txt").unlink()
    (src / "relation_list.txt").unlink()
    ds = import_kgat(src, tmp_path / "out")
    assert ds.triples is not None
    assert ds.triples["head"].tolist() == ["0", "1", "2", "e3", "0"]
    assert ds.triples["relation"].tolist() == ["r0", "r1", "r0", "r1", "r0"]
    assert ds.triples["tail"].tolist() == ["e3", "e4", "e5", "0", "e3"]
    (src / "kg_final.txt").write_text("0 0 3\n1 1\n")
    with pytest.raises(DatasetError) as err:
        import_kgat(src, tmp_path / "out2")
    assert err.value.file.endswith("kg_final.txt") and err.value.row == 1
    (src / "kg_final.txt").write_text("0 0 3\n1 x 2\n")
    with pytest.raises(DatasetError) as err:
        import_kgat(src, tmp_path / "out2")
    assert (err.value.row, err.value.column) == (1, "relation")


def test_kgat_no_kg(tmp_path: Path) -> None:
    ds = import_kgat(write_kgat(tmp_path / "src", kg=False), tmp_path / "out")
    assert ds.triples is None and not (ds.root / "triples.parquet").exists()
    assert "NO knowledge-graph triples" in (ds.root / "README.md").read_text()


# ---------------------------------------------------------------- hm-catalog

HM_COLUMNS = (
    "article_id,product_code,prod_name,product_type_no,product_type_name,product_group_name,"
    "graphical_appearance_no,graphical_appearance_name,colour_group_code,colour_group_name,"
    "perceived_colour_value_id,perceived_colour_value_name,perceived_colour_master_id,"
    "perceived_colour_master_name,department_no,department_name,index_code,index_name,"
    "index_group_no,index_group_name,section_no,section_name,garment_group_no,garment_group_name,"
    "detail_desc"
)


def hm_row(aid: str, name: str, ptype: str, group: str, desc: str) -> str:
    return (f"{aid},{aid[1:7]},{name},1,{ptype},{group},2,Solid,9,Black,4,Dark,5,Black,3608,"
            f"Tights basic,B,Lingeries/Tights,1,Ladieswear,62,\"Womens Nightwear, Socks\","
            f"1021,Socks and Tights,{desc}\n")


def write_hm(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "articles_sample.csv").write_text(
        HM_COLUMNS + "\n"
        + hm_row("0111565001", "Stockings", "Underwear Tights", "Socks & Tights", '"Sheer, 20 den."')
        + hm_row("0123456002", "Tee", "T-shirt", "Garment Upper body", "")
        + hm_row("0987654003", "Cap", "Cap/peaked", "Accessories", "A cap.")
    )
    for aid, content in (("0111565001", b"jpeg-1"), ("0987654003", b"jpeg-3")):
        (root / "images" / aid[:3]).mkdir(parents=True)
        (root / "images" / aid[:3] / f"{aid}.jpg").write_bytes(content)
    return root


def test_hm_synthetic(tmp_path: Path) -> None:
    ds = import_hm_catalog(write_hm(tmp_path / "src"), tmp_path / "out")
    items = ds.items
    assert items["item_id"].tolist() == ["0111565001", "0123456002", "0987654003"]
    assert items["title"].tolist() == ["Stockings", "Tee", "Cap"]
    assert vals(items["description"]) == ["Sheer, 20 den.", None, "A cap."]
    assert [list(c) for c in items["categories"]] == [
        ["Ladieswear > Socks & Tights > Underwear Tights"],
        ["Ladieswear > Garment Upper body > T-shirt"],
        ["Ladieswear > Accessories > Cap/peaked"],
    ]
    assert items["brand"].isna().all() and items["price"].isna().all()
    assert vals(items["image"]) == ["images/011/0111565001.jpg", None, "images/098/0987654003.jpg"]
    assert (ds.root / "images/011/0111565001.jpg").read_bytes() == b"jpeg-1"
    assert (ds.root / "images/098/0987654003.jpg").read_bytes() == b"jpeg-3"
    assert not (ds.root / "images/012").exists()
    assert items["section_name"].iloc[0] == "Womens Nightwear, Socks"
    assert items["product_code"].tolist() == ["111565", "123456", "987654"]
    for col in ("product_type_name", "colour_group_name", "garment_group_name", "index_name"):
        assert col in items.columns
    assert len(ds.interactions) == 0 and ds.n_users == 0
    assert str(ds.interactions["timestamp"].dtype).endswith("UTC]")


# ---------------------------------------------------------------- tabular

def test_tabular_csv_with_mapping(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text(
        "uid,sku,when,kind,stars,channel\n"
        "u1,i1,2020-01-02T03:04:05Z,view,1,web\n"
        "u2,i2,2020-01-02 05:00:00+02:00,rating,4.5,app\n"
        "u1,i2,2020-01-03,purchase,1,\n",
        encoding="utf-8",
    )
    (tmp_path / "catalog.csv").write_text(
        "sku,name,categories,price,colour\n"
        "i1,\"Red, shoe\",Shoes > Sneakers|Sale,19.9,red\n"
        "i2,Hat,,,\n"
        "i3,Scarf,Accessories,5,blue\n",
        encoding="utf-8",
    )
    mapping = {
        "interactions.user_id": "uid", "interactions.item_id": "sku",
        "interactions.timestamp": "when", "interactions.event": "kind",
        "interactions.weight": "stars", "items.item_id": "sku", "items.title": "name",
    }
    (tmp_path / "users.csv").write_text("user_id,age,region\nu1,31,EU\nu2,,\n", encoding="utf-8")
    ds = import_tabular(tmp_path / "events.csv", tmp_path / "out", items=tmp_path / "catalog.csv",
                        users=tmp_path / "users.csv", mapping=mapping)
    inter = ds.interactions
    assert inter["user_id"].tolist() == ["u1", "u2", "u1"]
    assert inter["item_id"].tolist() == ["i1", "i2", "i2"]
    assert inter["timestamp"].tolist() == [
        utc("2020-01-02 03:04:05"), utc("2020-01-02 03:00:00"), utc("2020-01-03")
    ]
    assert inter["event"].tolist() == ["view", "rating", "purchase"]
    assert inter["weight"].tolist() == [1.0, 4.5, 1.0]
    assert vals(inter["channel"]) == ["web", "app", None]  # extra column kept
    assert ds.items["item_id"].tolist() == ["i1", "i2", "i3"]
    assert ds.items["title"].tolist() == ["Red, shoe", "Hat", "Scarf"]
    assert [list(c) for c in ds.items["categories"]] == [["Shoes > Sneakers", "Sale"], [], ["Accessories"]]
    assert ds.items["price"].iloc[0] == pytest.approx(19.9) and math.isnan(ds.items["price"].iloc[1])
    assert vals(ds.items["colour"]) == ["red", None, "blue"]
    assert ds.users["age"].iloc[0] == 31.0 and math.isnan(ds.users["age"].iloc[1])


def test_tabular_parquet_epoch_ms_and_derived_items(tmp_path: Path) -> None:
    pd.DataFrame({
        "user_id": ["a", "b", "a"], "item_id": [10, 20, 10],
        "timestamp": np.array([0, 1_600_000_000_000, 1_600_000_000_500], dtype=np.int64),
        "score": [1.0, 2.0, 3.0],
    }).to_parquet(tmp_path / "ev.parquet")
    ds = import_dataset("tabular", tmp_path / "ev.parquet", tmp_path / "out", timestamp_unit="ms")
    assert ds.interactions["timestamp"].tolist() == [
        EPOCH, utc("2020-09-13 12:26:40"), utc("2020-09-13 12:26:40.500")
    ]
    assert ds.interactions["item_id"].tolist() == ["10", "20", "10"]
    assert ds.interactions["score"].tolist() == [1.0, 2.0, 3.0]
    assert ds.items["item_id"].tolist() == ["10", "20"]
    assert set(ds.interactions["event"]) == {"purchase"}


def test_tabular_parquet_items_lists_and_position(tmp_path: Path) -> None:
    pd.DataFrame({
        "user_id": ["a", "b"], "item_id": ["x", "y"],
        "timestamp": pd.to_datetime(["2021-05-01 12:00", "2021-05-02 00:00"]),  # naive = UTC
        "pos": [0, 3],
    }).to_parquet(tmp_path / "ev.parquet")
    pd.DataFrame({
        "item_id": ["x", "y"], "categories": [["A > B", "C"], []], "price": [1.5, None],
    }).to_parquet(tmp_path / "items.parquet")
    ds = import_tabular(tmp_path / "ev.parquet", tmp_path / "out", items=tmp_path / "items.parquet",
                        mapping={"interactions.position": "pos"})
    assert ds.interactions["timestamp"].tolist() == [utc("2021-05-01 12:00"), utc("2021-05-02")]
    assert ds.interactions["position"].tolist() == [0, 3]
    assert [list(c) for c in ds.items["categories"]] == [["A > B", "C"], []]


def test_tabular_csv_epoch_seconds(tmp_path: Path) -> None:
    (tmp_path / "ev.csv").write_text("user_id,item_id,timestamp\nu,i,1318896000\nu,j,86400.5\n")
    ds = import_tabular(tmp_path / "ev.csv", tmp_path / "out")
    assert ds.interactions["timestamp"].tolist() == [utc("2011-10-18"), utc("1970-01-02 00:00:00.5")]


def test_tabular_invalid_utf8(tmp_path: Path) -> None:
    (tmp_path / "ev.csv").write_bytes(
        b"user_id,item_id,timestamp,note\n"
        b"u1,i1,2020-01-01,ok\n"
        b"u2,\"i\n2\",2020-01-01,ok\n"  # a quoted newline: still data row 1
        b"u3,i3,2020-01-01,caf\xe9\n"
    )
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out")
    assert err.value.file.endswith("ev.csv")
    assert (err.value.row, err.value.column) == (2, "note")


def test_tabular_bad_timestamp_names_source_column(tmp_path: Path) -> None:
    (tmp_path / "ev.csv").write_text(
        "who,what,at\nu1,i1,2020-01-01T00:00:00\nu2,i2,2020-01-02\nu3,i3,yesterday\n"
    )
    mapping = {"interactions.user_id": "who", "interactions.item_id": "what",
               "interactions.timestamp": "at"}
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", mapping=mapping)
    assert (err.value.row, err.value.column) == (2, "at")
    (tmp_path / "ev.csv").write_text("who,what,at\nu1,i1,1600000000\nu2,i2,16e8x\n")
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", mapping=mapping)
    assert (err.value.row, err.value.column) == (1, "at")
    (tmp_path / "ev.csv").write_text("who,what,at\nu1,i1,2020-01-01\nu2,i2,2150-01-01\n")
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", mapping=mapping)
    assert (err.value.row, err.value.column) == (1, "at")


def test_tabular_missing_columns_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "ev.csv").write_text("user,item_id,timestamp\nu1,i1,0\n")
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", mapping={"interactions.user_id": "usr"})
    assert err.value.file.endswith("ev.csv") and err.value.column == "usr"
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out")
    assert err.value.column == "user_id"  # unmapped and not present by name
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "empty.csv", tmp_path / "out")
    assert err.value.file.endswith("empty.csv") and "empty" in str(err.value)
    with pytest.raises(ValueError, match="table.column"):
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", mapping={"user_id": "user"})


def test_tabular_row_errors(tmp_path: Path) -> None:
    (tmp_path / "ev.csv").write_text("u,i,t,w\nu1,i1,0,1\nu2,i2,0,\n")
    mapping = {"interactions.user_id": "u", "interactions.item_id": "i",
               "interactions.timestamp": "t", "interactions.weight": "w"}
    with pytest.raises(DatasetError) as err:  # weight is not nullable
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", mapping=mapping)
    assert (err.value.row, err.value.column) == (1, "w")
    (tmp_path / "ev.csv").write_text("u,i,t,e\nu1,i1,0,view\nu2,i2,0,like\n")
    mapping = {"interactions.user_id": "u", "interactions.item_id": "i",
               "interactions.timestamp": "t", "interactions.event": "e"}
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", mapping=mapping)
    assert (err.value.row, err.value.column) == (1, "e")
    (tmp_path / "ev.csv").write_text("user_id,item_id,timestamp\nu1,i1,0\nu2,i2\n")
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out")
    assert err.value.row == 1
    (tmp_path / "ev.csv").write_text("user_id,item_id,timestamp\nu1,i1,0\nu2,i9,0\n")
    (tmp_path / "items.csv").write_text("item_id\ni1\ni2\n")
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", items=tmp_path / "items.csv")
    assert err.value.file.endswith("ev.csv") and (err.value.row, err.value.column) == (1, "item_id")
    (tmp_path / "items.csv").write_text("item_id\ni1\ni9\ni1\n")
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", tmp_path / "out", items=tmp_path / "items.csv")
    assert err.value.file.endswith("items.csv") and (err.value.row, err.value.column) == (2, "item_id")


# ---------------------------------------------------------------- registry, dst handling

def test_registry_and_unknown_format(tmp_path: Path) -> None:
    assert set(ADAPTERS) == {"amazon-5core", "movielens-100k", "lightgcn", "kgat", "hm-catalog",
                             "tabular"}
    with pytest.raises(ValueError, match="amazon-5core.*tabular"):
        import_dataset("nope", tmp_path, tmp_path / "out")
    src = write_split(tmp_path / "src", "0 0\n", "0 1\n")
    ds = import_dataset("lightgcn", str(src), str(tmp_path / "out"))
    assert ds.n_items == 2 and load_dataset(tmp_path / "out").fingerprint == ds.fingerprint


def test_dst_exists_without_overwrite(tmp_path: Path) -> None:
    src = write_split(tmp_path / "src", "0 0\n", "0 1\n")
    dst = tmp_path / "out" / "ds"
    dst.mkdir(parents=True)
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        import_lightgcn(src, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    ds = import_lightgcn(src, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and ds.n_users == 1
    assert no_hidden(dst.parent) == []


def test_failure_inside_writer_leaves_no_temp_dir(tmp_path: Path) -> None:
    # the image path escapes the dataset directory: only write_dataset's validation catches it
    (tmp_path / "ev.csv").write_text("user_id,item_id,timestamp\nu1,i1,0\n")
    (tmp_path / "items.csv").write_text("item_id,image\ni1,../secret.jpg\n")
    dst = tmp_path / "out" / "ds"
    with pytest.raises(DatasetError) as err:
        import_tabular(tmp_path / "ev.csv", dst, items=tmp_path / "items.csv")
    assert err.value.column == "image"
    assert not dst.exists() and no_hidden(dst.parent) == []
    # the same failure with overwrite=True leaves the existing dataset as it was
    (tmp_path / "good.csv").write_text("item_id\ni1\n")
    first = import_tabular(tmp_path / "ev.csv", dst, items=tmp_path / "good.csv")
    with pytest.raises(DatasetError):
        import_tabular(tmp_path / "ev.csv", dst, items=tmp_path / "items.csv", overwrite=True)
    assert load_dataset(dst).fingerprint == first.fingerprint
    assert no_hidden(dst.parent) == []


# ---------------------------------------------------------------- real data

def test_shared_path() -> None:
    assert SHARED.is_dir(), f"shared datasets not found at {SHARED}"
    assert (SHARED / "movielens-100k" / "SOURCE.md").is_file()


def test_real_amazon_beauty(tmp_path: Path) -> None:
    ds = import_amazon_5core(SHARED / "amazon-beauty-2014-5core", tmp_path / "beauty")
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (22_363, 12_101, 198_502)
    items = ds.items.set_index("item_id")
    assert list(items.loc["7806397051", "categories"]) == [
        "Beauty > Makeup > Face > Concealers & Neutralizers"
    ]
    assert "\t" in items.loc["B000SDI6MI", "title"]  # a tab inside double quotes
    assert int(items["title"].isna().sum()) == 7 and int(items["brand"].isna().sum()) == 2_098
    assert int(items["price"].isna().sum()) == 585
    # in this file every item has a single path (no second path starting again with 'Beauty')
    assert ds.items["categories"].map(len).eq(1).all()
    assert ds.items["categories"].map(lambda c: c[0].startswith("Beauty > ")).all()
    first = ds.interactions.iloc[0]
    assert (first["user_id"], first["item_id"], first["timestamp"]) == (
        "A1YJEY40YUW4SE", "B004756YJA", utc("2011-10-18")
    )
    assert ds.interactions["timestamp"].min() == utc("2002-06-12")
    assert ds.interactions["timestamp"].max() == utc("2014-07-23")


def test_real_movielens_100k(tmp_path: Path) -> None:
    ds = import_movielens_100k(SHARED / "movielens-100k", tmp_path / "ml")
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (943, 1_682, 100_000)
    first = ds.interactions.iloc[0]
    assert (first["user_id"], first["item_id"], first["weight"]) == ("196", "242", 3.0)
    assert ds.interactions["timestamp"].min() >= utc("1997-09-20")
    assert ds.interactions["timestamp"].max() < utc("1998-04-23")
    items = ds.items.set_index("item_id")
    assert list(items.loc["1", "categories"]) == [
        "Movies > Animation", "Movies > Children's", "Movies > Comedy"
    ]
    assert items["title"].str.contains("é").any()  # latin-1 decoded
    assert ds.users.set_index("user_id").loc["1", "region"] == "85711"


def test_real_hm_catalog(tmp_path: Path) -> None:
    src = SHARED / "hm-fashion-catalog-images-subset"
    ds = import_hm_catalog(src, tmp_path / "hm")
    assert ds.n_items == 11_800 and len(ds.interactions) == 0
    with_image = ds.items["image"].dropna()
    assert len(with_image) == 3_934
    expected = set((src / "images_subset_ids.txt").read_text().split())
    assert set(ds.items.loc[ds.items["image"].notna(), "item_id"]) == expected
    assert ds.items["item_id"].str.len().eq(10).all() and ds.items["item_id"].iloc[0] == "0111565001"
    assert sum(1 for _ in (ds.root / "images").rglob("*.jpg")) == 3_934
    rel = with_image.iloc[0]
    assert (ds.root / rel).stat().st_size == (src / rel).stat().st_size
