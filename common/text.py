"""Text features of the fastText-style intent model: tokenizer, feature strings, stable hash.

This is a wire contract (docs/protocol.md, "Text features"): a device written
in another language must produce the same bucket ids for the same text, or
the shared model means nothing on it. So every step is specified exactly and
uses nothing that varies between runtimes (Python's `hash` is salted per
process; it is never used here):

1. Normalize: Unicode NFKC, then lower case (full Unicode lowercase mapping,
   Python's `str.lower`), Unicode 14.0 character data (Python 3.11).
2. Words: maximal runs of characters whose general category is a letter (L*),
   a mark (M*) or a number (N*); every other character separates words.
3. Feature strings, in this order: `"w|" + word` for each word; `"b|" + w1 +
   " " + w2` for each pair of adjacent words; for each word, `"c|" + g` for
   each substring g of `"<" + word + ">"` of n code points,
   char_min <= n <= char_max, by start position then by length.
4. Bucket: FNV-1a 32-bit (offset basis 2166136261, prime 16777619) of the
   feature string's UTF-8 bytes, modulo the number of buckets.

A text's features are the multiset of its buckets: repeats count (the model
averages over them, so order does not matter). `featurize` returns a batch as
one int64 matrix padded with PAD (-1), the model's input.

Speed: feature strings are built in Python (short texts), but each distinct
string is hashed once, and the FNV-1a rounds run as numpy operations over all
distinct strings at once (one pass per byte position), not per byte in Python.
"""

from __future__ import annotations

import functools
import itertools
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PAD",
    "TextFeatures",
    "feature_strings",
    "featurize",
    "fnv1a_32",
    "fnv1a_32_many",
    "tokenize",
]

PAD = -1
"""Padding entry of a featurized batch; never a bucket."""

FNV_OFFSET_BASIS = 2166136261
FNV_PRIME = 16777619
_MASK32 = 0xFFFFFFFF


@functools.lru_cache(maxsize=1 << 16)
def _is_word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LMN"


def normalize(text: str) -> str:
    """NFKC, then lower case."""
    return unicodedata.normalize("NFKC", text).lower()


def tokenize(text: str) -> list[str]:
    """The words of text: runs of letters, marks and numbers after normalization."""
    chars = normalize(text)
    return "".join(ch if _is_word_char(ch) else " " for ch in chars).split()


@dataclass(frozen=True)
class TextFeatures:
    """Featurization settings; part of the model's spec, so server and devices agree."""

    buckets: int = 1 << 13
    char_min: int = 3
    char_max: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.buckets <= 1 << 32:
            raise ValueError("buckets must be in 1..2**32")
        if self.char_min < 1 or self.char_max < 0:
            raise ValueError("char_min must be >= 1 and char_max >= 0 (0: no char n-grams)")


def feature_strings(text: str, char_min: int = 3, char_max: int = 5) -> list[str]:
    """The feature strings of text, in the specified order (before hashing)."""
    words = tokenize(text)
    out = ["w|" + w for w in words]
    out += ["b|" + a + " " + b for a, b in itertools.pairwise(words)]
    for w in words:
        s = "<" + w + ">"
        for start in range(len(s)):
            for n in range(char_min, min(char_max, len(s) - start) + 1):
                out.append("c|" + s[start : start + n])
    return out


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bits, of data: the plain reference of fnv1a_32_many."""
    h = FNV_OFFSET_BASIS
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & _MASK32
    return h


def fnv1a_32_many(items: Sequence[bytes]) -> np.ndarray:
    """FNV-1a 32 of each byte string, as uint64; one numpy pass per byte position."""
    count = len(items)
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    lengths = np.fromiter((len(b) for b in items), np.int64, count)
    width = int(lengths.max())
    # Every string's bytes, left-aligned in a (count, width) matrix.
    matrix = np.zeros((count, max(width, 1)), dtype=np.uint64)
    flat = np.frombuffer(b"".join(items), dtype=np.uint8)
    rows = np.repeat(np.arange(count), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    matrix[rows, cols] = flat
    h = np.full(count, FNV_OFFSET_BASIS, dtype=np.uint64)
    prime, mask = np.uint64(FNV_PRIME), np.uint64(_MASK32)
    for k in range(width):
        stepped = ((h ^ matrix[:, k]) * prime) & mask  # < 2**56: exact in uint64
        h = np.where(lengths > k, stepped, h)
    return h


def featurize(texts: Iterable[str], features: TextFeatures) -> np.ndarray:
    """Bucket ids of each text, one row per text, padded with PAD to the longest row (int64)."""
    vocab: dict[str, int] = {}
    rows: list[list[int]] = []
    for text in texts:
        row = []
        for f in feature_strings(text, features.char_min, features.char_max):
            row.append(vocab.setdefault(f, len(vocab)))
        rows.append(row)
    hashes = fnv1a_32_many([f.encode("utf-8") for f in vocab])
    buckets = (hashes % np.uint64(features.buckets)).astype(np.int64)
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    if lengths.sum():
        flat = np.fromiter((i for r in rows for i in r), np.int64, int(lengths.sum()))
        mask = np.arange(width) < lengths[:, None]
        out[mask] = buckets[flat]
    return out
