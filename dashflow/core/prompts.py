"""The prepared prompts of a run: reading a split, and which prompts each iteration samples.

Prepare writes base/prompts/{train,eval}.parquet (schema.PROMPTS); sample, learn and
evaluate read them through here.
"""

from __future__ import annotations

import random

import pyarrow as pa

from dashflow.core import schema, store
from dashflow.core.config import Params


def read_prompts(params: Params, split: str) -> pa.Table:
    directory = params.layout.base / "prompts"
    store.require_output(directory, needed_by="prompts")
    return store.read_shard(directory / f"{split}.parquet", schema.PROMPTS, stage="prepare")



def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The train split's prompt order in one epoch: a fresh seeded permutation per epoch."""
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def iteration_prompts(prompts: pa.Table, iteration: int, count: int, seed: int) -> list[dict]:
    """The `count` prompts of iteration i: the train split walked epoch by epoch, each epoch
    in its own seeded permutation (every prompt once per epoch, a new order each epoch)."""
    rows = prompts.to_pylist()
    n = len(rows)
    orders: dict[int, list[int]] = {}
    out = []
    for k in range(min(count, n)):
        epoch, pos = divmod(iteration * count + k, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(rows[orders[epoch][pos]])
    return out
