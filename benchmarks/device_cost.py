"""One simulated intents device's CPU per round, by step, for cohorts of n; one JSON line.

    python benchmarks/device_cost.py --cohorts 100,250,500,1000

What `xeno-fl simulate --task intents` asks of each device of a round, timed
as CPU of this thread (`time.thread_time`, one torch thread), so that other
processes' load on a shared machine does not enter it:

  train_s      local training (5 epochs, batch 16, the simulation's optimizer
               and rate: Adam at 0.1) on one simulated CLINC150 user's shard, when
               the users are --users (a user of 100 holds ~120 queries, of 1,000 ~12)
  secagg_s     the device side of SecAgg+ but the masking, for a cohort of n:
               the device's and its neighbours' rows of the graph, verifying the k
               neighbours' signed keys, Shamir-sharing two secrets among k + 1
               holders, k key agreements, k AES-GCM shares sealed and opened, 2(k + 1)
               commitments (`client.secagg`'s own functions)
  mask_s       encoding and masking the ~400k-value update: k + 1 AES-CTR
               keystreams added in one blocked pass (`SecAggDevice.mask`)

k is the degree the server derives for n (`common.secagg.graph.derive_params`).
Multiplied by the cohort and divided by the cores, the sum is a floor under a
round's wall time on this machine, before the server's work and gRPC.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch


def _cpu(fn: Any, repeats: int) -> float:
    """Median thread CPU seconds of fn() over repeats."""
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        fn()
        times.append(time.thread_time() - started)
    return statistics.median(times)


def _train_cost(users: int, repeats: int) -> dict[str, Any]:
    """CPU of one local training of a simulated user of a fleet of `users`."""
    from client.training import LocalTrainingConfig, train_local
    from common.models import build_model
    from common.tasks import TaskName, model_spec_for, simulated_shard
    from common.tensors import flatten_state_dict
    from xeno.simulation import INTENTS_LEARNING_RATE, INTENTS_LOCAL_OPTIMIZER

    model = build_model(model_spec_for(TaskName.INTENTS, []))
    weights = flatten_state_dict(model.state_dict())
    training = LocalTrainingConfig(
        5, 16, INTENTS_LEARNING_RATE, 0.0, 0.9, optimizer=INTENTS_LOCAL_OPTIMIZER
    )
    shard = simulated_shard(TaskName.INTENTS, 0, users, 0.5, 0)
    data = shard.featurized(model.features)  # type: ignore[union-attr,arg-type]
    train_local(model, weights, data, training)  # warm-up
    seconds = _cpu(lambda: train_local(model, weights, data, training), repeats)
    return {"examples": len(data), "train_s": round(seconds, 4)}


def _cohort_cost(n: int, d: int, repeats: int) -> dict[str, Any]:
    """CPU of one device's SecAgg+ work (all but masking) and masking, in a cohort of n."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from common.quantize import FixedPoint
    from common.secagg import (
        agree,
        decrypt_share,
        encrypt_share,
        generate_keypair,
        keys_message,
        sign_keys,
        split,
        verify_keys,
    )
    from common.secagg.crypto import (
        apply_masks,
        mask_info,
        share_commitment,
        share_key_info,
        share_point,
    )
    from common.secagg.graph import derive_params, graph_seed, neighbourhood
    from common.secagg.shamir import encode_share
    from xeno.simulation import INTENTS_SECAGG_CLIP_NORM

    update = np.random.default_rng(0).normal(0, 0.01, d).astype(np.float32)
    rng = np.random.default_rng(1)
    params = derive_params(n)
    k, t = params.degree, params.threshold
    participants = sorted(f"dev-{i:016x}" for i in range(n))
    me, peers = participants[0], participants[1 : k + 1]
    round_id = os.urandom(16).hex()
    identities = {p: Ed25519PrivateKey.generate() for p in participants[: k + 1]}
    enc = {p: generate_keypair() for p in participants[: k + 1]}
    msk = {p: generate_keypair() for p in participants[: k + 1]}
    signed = {
        p: sign_keys(identities[p], keys_message(round_id, p, enc[p].public, msk[p].public))
        for p in peers
    }
    pub = {
        p: identities[p].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for p in peers
    }

    def secagg() -> None:
        graph = neighbourhood(participants, k, graph_seed(round_id, participants), me)
        assert len(graph[me]) == k
        for p in peers:
            message = keys_message(round_id, p, enc[p].public, msk[p].public)
            assert verify_keys(pub[p], message, signed[p])
        holders = sorted([*peers, me])
        points = [share_point(participants, h) for h in holders]
        key_shares = split(msk[me].private_bytes(), points, t)
        seed_shares = split(os.urandom(32), points, t)
        info = share_key_info(round_id)
        for p, x in zip(holders, points, strict=True):
            blob = encode_share(key_shares[x]) + encode_share(seed_shares[x])
            share_commitment(round_id, me, p, 1, encode_share(key_shares[x]))
            share_commitment(round_id, me, p, 2, encode_share(seed_shares[x]))
            if p != me:
                # One agreement per neighbour: its key also opens the neighbour's share.
                key = agree(enc[me].private, enc[p].public, info)
                decrypt_share(key, encrypt_share(key, blob, b"ad"), b"ad")

    fp = FixedPoint.for_round(INTENTS_SECAGG_CLIP_NORM, n, 1000)

    def mask() -> None:  # as SecAggDevice.run and .mask
        encoded = fp.encode(update, 12, rng)
        info = mask_info(round_id)
        masks = [(os.urandom(32), 1)] + [
            (agree(msk[me].private, msk[p].public, info), 1 if me < p else -1) for p in peers
        ]
        apply_masks(encoded, masks)

    return {
        "degree": k,
        "threshold": t,
        "secagg_s": round(_cpu(secagg, repeats), 4),
        "mask_s": round(_cpu(mask, repeats), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cohorts", default="100,250,500,1000")
    parser.add_argument("--users", default="100,1000", help="fleet sizes the shards come from")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from common.tasks import TaskName, model_spec_for

    train = {u: _train_cost(int(u), args.repeats) for u in args.users.split(",")}
    from common.models import build_model

    d = sum(p.numel() for p in build_model(model_spec_for(TaskName.INTENTS, [])).parameters())
    cohorts = {c: _cohort_cost(int(c), d, args.repeats) for c in args.cohorts.split(",")}
    print(json.dumps({"params": d, "train": train, "cohorts": cohorts}))


if __name__ == "__main__":
    main()
