"""The device's federated training data from the user's examples: consented, featurized, no text.

`federated_dataset` is what the device client trains the shared intent model
on. It reads the examples only after checking the user's consent
(`consent.federated_examples`), keeps those whose intent is one of the
shared model's classes, and returns them as a `Dataset` of hashed bucket ids
(`common.text.featurize`, the wire contract) and label indices: the raw text
does not leave this function, and what leaves the device in a round is the
model update computed from these ids, never the ids themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from client.assistant.consent import federated_examples
from client.assistant.store import UserStore
from common.data import Dataset
from common.text import TextFeatures, featurize

__all__ = ["federated_dataset"]


def federated_dataset(store: UserStore, intents: Sequence[str], features: TextFeatures) -> Dataset:
    """The user's consented examples of the shared model's intents, featurized.

    Raises ConsentRequiredError (before reading any example) without consent.
    """
    index = {name: i for i, name in enumerate(intents)}
    rows = [(t, index[i]) for t, i in federated_examples(store) if i in index]
    x = featurize([t for t, _ in rows], features)
    y = np.fromiter((label for _, label in rows), np.int64, len(rows))
    return Dataset(x, y)
