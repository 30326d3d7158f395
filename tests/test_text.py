"""The text features of the intent model: the protocol's test vectors and the plain references.

docs/protocol.md §4.1 lists these vectors for devices written in other
languages; if this file changes, that table must change with it.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.models import FastText, ModelSpec, build_model
from common.text import (
    PAD,
    TextFeatures,
    feature_strings,
    featurize,
    fnv1a_32,
    fnv1a_32_many,
    tokenize,
)

HI_BOB_FEATURES = [
    "w|hi", "w|bob", "b|hi bob", "c|<hi", "c|<hi>", "c|hi>",
    "c|<bo", "c|<bob", "c|<bob>", "c|bob", "c|bob>", "c|ob>",
]  # fmt: skip
HI_BOB_HASHES = [
    4199665297, 1875524857, 2404102155, 1538675317, 2869136401, 3426946777,
    899551677, 1188438541, 3055015497, 640736277, 1240111025, 2453508411,
]  # fmt: skip
HI_BOB_BUCKETS = [3729, 7417, 4107, 4725, 3089, 3801, 4541, 525, 5705, 7189, 6065, 4411]


def test_fnv1a_matches_the_published_vectors() -> None:
    # From the FNV reference (Fowler, Noll, Vo; draft-eastlake-fnv), 32-bit FNV-1a.
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968
    assert fnv1a_32_many([b"", b"a", b"foobar"]).tolist() == [0x811C9DC5, 0xE40C292C, 0xBF9CF968]


def test_protocol_vectors() -> None:
    assert tokenize("What's the weather in São Paulo?") == [
        "what", "s", "the", "weather", "in", "são", "paulo",
    ]  # fmt: skip
    # "\ufb01" is the fi ligature; "\uff30..." fullwidth PHONE; "\u2116" the numero sign.
    assert tokenize("\ufb01nd my \uff30\uff28\uff2f\uff2e\uff25 \u21165") == [
        "find", "my", "phone", "no5",
    ]  # fmt: skip
    assert tokenize("e\u0301te\u0301") == ["\u00e9t\u00e9"]
    assert tokenize("") == [] and tokenize("...") == []
    assert tokenize("İSTANBUL") == ["i\u0307stanbul"]
    assert feature_strings("Hi, Bob!") == HI_BOB_FEATURES
    assert [fnv1a_32(f.encode()) for f in HI_BOB_FEATURES] == HI_BOB_HASHES
    assert featurize(["Hi, Bob!"], TextFeatures(8192))[0].tolist() == HI_BOB_BUCKETS
    assert featurize(["e\u0301te\u0301"], TextFeatures(8192))[0].tolist() == [
        278, 174, 4762, 6188, 4146, 740, 504,
    ]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_vectorized_fnv_matches_the_byte_loop(items: list[bytes]) -> None:
    assert fnv1a_32_many(items).tolist() == [fnv1a_32(b) for b in items]


def _plain_words(text: str) -> list[str]:
    """Independent reference: scan code points, cut at anything not L/M/N."""
    words, current = [], ""
    for ch in unicodedata.normalize("NFKC", text).lower():
        if unicodedata.category(ch)[0] in "LMN":
            current += ch
        else:
            if current:
                words.append(current)
            current = ""
    return [*words, current] if current else words


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.integers(1, 4), st.integers(0, 6), st.integers(1, 5000))
def test_featurize_is_the_hash_of_each_feature_string(
    text: str, char_min: int, char_max: int, buckets: int
) -> None:
    assert tokenize(text) == _plain_words(text)
    features = TextFeatures(buckets, char_min, char_max)
    row = featurize([text, "padding partner with several words"], features)[0]
    strings = feature_strings(text, char_min, char_max)
    want = [fnv1a_32(f.encode("utf-8")) % buckets for f in strings]
    assert row[: len(want)].tolist() == want
    assert (row[len(want) :] == PAD).all()
    # Counts: words, adjacent pairs, then every substring of <word> of an allowed length.
    words = tokenize(text)
    chars = sum(max(0, len(w) + 2 - n + 1) for w in words for n in range(char_min, char_max + 1))
    assert len(strings) == len(words) + max(0, len(words) - 1) + chars


def test_featurize_pads_rows_and_keeps_repeats() -> None:
    x = featurize(["set a timer", "timer timer", ""], TextFeatures(64))
    assert x.dtype == np.int64 and x.shape[0] == 3
    assert (x[2] == PAD).all()
    row = x[1][x[1] != PAD].tolist()
    assert row.count(int(fnv1a_32(b"w|timer") % 64)) >= 2  # the repeated word counts twice


def test_fasttext_model_is_the_mean_of_its_feature_rows() -> None:
    model = build_model(ModelSpec("fasttext", {"buckets": 50, "dim": 4, "num_classes": 3}), seed=1)
    assert isinstance(model, FastText)
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.tensor([[3, 3, 7, PAD], [PAD, PAD, PAD, PAD], [1, 2, 3, 4]])
    logits = model(x)
    emb, w, b = model.embedding.weight, model.head.weight, model.head.bias
    want = torch.stack([(emb[3] * 2 + emb[7]) / 3, torch.zeros(4), emb[1:5].mean(0)]) @ w.t() + b
    torch.testing.assert_close(logits, want)
    names = list(model.state_dict())
    assert names == ["embedding.weight", "head.weight", "head.bias"]


def test_fasttext_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="buckets"):
        FastText(buckets=0)
    with pytest.raises(ValueError, match="char_min"):
        FastText(char_min=0)
    with pytest.raises(ValueError, match="padded batch"):
        FastText(buckets=10, dim=2, num_classes=2)(torch.zeros(3, dtype=torch.long))
