"""Build the cold-start intent body shipped with the package, reproducibly.

    python scripts/build_intent_body.py            # writes client/assistant/data/clinc150-body.npz
    python scripts/build_intent_body.py --check    # rebuild and compare with the shipped file

The fastText-style intent model (`common.models.FastText`, 8192 buckets,
dim 64, char 3-5-grams) is trained on CLINC150's 15,000 in-scope training
queries (all 150 intents; Adam lr 0.01, batch 32, 8 epochs, label smoothing
`LABEL_SMOOTHING`, seed 0, one thread); its embedding table with each row
multiplied by its bucket's IDF over those queries (`clinc150_body`), stored
as float16 in a compressed `.npz`, is the body. Prints the SHA-256 and size
of the result.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.assistant.bodies import SHIPPED_BODY, body_bytes, clinc150_body

MAX_BYTES = 5 * 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_BODY)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args()
    embedding, features, intents = clinc150_body(epochs=args.epochs, seed=args.seed)
    data = body_bytes(embedding, features, intents)
    digest = hashlib.sha256(data).hexdigest()
    print(f"{len(data)} bytes, sha256 {digest}")
    if len(data) > MAX_BYTES:
        print(f"error: the body is over {MAX_BYTES} bytes", file=sys.stderr)
        return 1
    if args.check:
        same = args.out.exists() and args.out.read_bytes() == data
        print("identical to the shipped body" if same else f"DIFFERS from {args.out}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
