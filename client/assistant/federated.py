"""The device's federated training data from the user's examples: consented, and only on it.

`federated_shard` is what the device client trains the shared intent model
on. It reads the examples only after checking the user's consent
(`consent.federated_examples`), keeps those whose intent is one of the
shared model's classes, and returns them as a `TextShard` (texts and label
indices). The device client featurizes them for the task's model
(`common.text`) and sends only the model update computed from them: the
text never leaves the device (tests/test_assistant_federated.py records a
real round's traffic).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from client.assistant.consent import federated_examples
from client.assistant.store import UserStore
from common.tasks import TextShard

__all__ = ["federated_shard"]


def federated_shard(store: UserStore, intents: Sequence[str]) -> TextShard:
    """The user's consented examples of the shared model's intents, with label indices.

    Raises ConsentRequiredError (before reading any example) without consent.
    """
    index = {name: i for i, name in enumerate(intents)}
    rows = [(t, index[i]) for t, i in federated_examples(store) if i in index]
    labels = np.fromiter((label for _, label in rows), np.int64, len(rows))
    return TextShard(tuple(t for t, _ in rows), labels)
