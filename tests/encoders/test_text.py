"""Text encoder tests: a tiny random BERT for the mechanics, the bundled MiniLM for semantics."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from kgrank.encoders.text import (
    TextEncoder,
    TextEncoderConfig,
    default_text_model_dir,
    item_text,
)

WORDS = ["red", "blue", "green", "cotton", "shirt", "tee", "men", "women", "steel", "knife",
         "kitchen", "shoe", "running", "soft", "warm", "wool", "hat", "cup", "coffee", "big",
         "for", "with", "and", "of"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_bert")
    tokens = SPECIAL + WORDS + list("abcdefghijklmnopqrstuvwxyz.,'-")
    # transformers 5 ignores ``vocab_file``; pass the vocabulary itself
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    ids = tok("red cotton shirt")["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 5
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(model=tiny_dir, max_length=32, batch_size=3))


def test_saved_tokenizer_knows_words(tiny: TextEncoder) -> None:
    ids = tiny.tokenizer("blue wool hat")["input_ids"]
    assert tiny.tokenizer.unk_token_id not in ids


def test_shapes_and_unit_norm(tiny: TextEncoder) -> None:
    texts = ["red cotton shirt", "steel knife", "", "warm wool hat for women"]
    emb = tiny.encode(texts)
    assert emb.shape == (4, 16) and emb.dtype == np.float32 and tiny.dim == 16
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert tiny.encode([]).shape == (0, 16)


def test_length_sorted_batching_preserves_order(tiny: TextEncoder) -> None:
    texts = ["big", "red cotton shirt for men running shoe", "cup", "soft warm wool hat",
             "green tee", "kitchen steel knife coffee cup big blue", "", "women"]
    batched = tiny.encode(texts)
    alone = np.stack([tiny.encode([t])[0] for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    # distinct texts really give distinct vectors, so a permutation would have been caught
    assert np.abs(batched[0] - batched[1]).max() > 1e-3


def test_padding_does_not_change_embedding(tiny: TextEncoder) -> None:
    short = "red tee"
    long = "red cotton shirt for men with a soft warm wool hat and running shoe"
    with_pad = tiny.encode([short, long])[0]
    np.testing.assert_allclose(with_pad, tiny.encode([short])[0], atol=1e-5)


def test_none_and_empty_encode_consistently(tiny: TextEncoder) -> None:
    emb = tiny.encode(["", None, "red"])  # type: ignore[list-item]
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)


def test_encoder_id_stable_and_keyed_on_max_length(tiny_dir: Path, tiny: TextEncoder) -> None:
    same = TextEncoder(model=tiny_dir, max_length=32, batch_size=7)
    other = TextEncoder(model=tiny_dir, max_length=16)
    assert same.encoder_id == tiny.encoder_id
    assert other.encoder_id != tiny.encoder_id
    assert tiny_dir.name in tiny.encoder_id and "mean" in tiny.encoder_id


def test_truncation_at_max_length(tiny_dir: Path) -> None:
    enc = TextEncoder(model=tiny_dir, max_length=4)
    a, b = enc.encode(["red cotton shirt tee", "red cotton shirt tee big big big big"])
    np.testing.assert_allclose(a, b, atol=1e-5)  # both cut to [CLS] red cotton [SEP]


def test_item_text_skips_missing() -> None:
    items = pd.DataFrame({
        "item_id": ["a", "b", "c"],
        "title": ["Red Tee", None, "Knife"],
        "brand": ["Acme", "Zed", np.nan],
        "categories": [["Clothing > Tops", "Sale"], [], None],
        "description": ["Soft cotton.", np.nan, ""],
    })
    assert item_text(items) == [
        "Red Tee. Brand: Acme. Categories: Clothing > Tops; Sale. Soft cotton.",
        "Brand: Zed.",
        "Knife.",
    ]
    assert item_text(pd.DataFrame({"item_id": ["x"]})) == [""]


def test_default_model_dir_is_packaged_minilm() -> None:
    d = default_text_model_dir()
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def test_minilm_paraphrase_scores_higher() -> None:
    enc = TextEncoder()
    assert enc.dim == 384
    a, para, other = enc.encode(
        ["red cotton t-shirt for men", "men's crimson cotton tee", "stainless steel kitchen knife"]
    )
    assert float(a @ para) > float(a @ other) + 0.2
    np.testing.assert_allclose(np.linalg.norm([a, para, other], axis=1), 1.0, atol=1e-5)


def test_minilm_matches_reference_pooling() -> None:
    """Length-sorted batched encoding equals one-by-one encoding on the real model."""
    enc = TextEncoder(batch_size=2)
    texts = ["wireless earbuds", "a very long description of a waterproof hiking boot", "mug"]
    batched = enc.encode(texts)
    t0 = time.perf_counter()
    alone = np.stack([enc.encode([t])[0] for t in texts])
    assert time.perf_counter() - t0 < 30
    np.testing.assert_allclose(batched, alone, atol=1e-5)
