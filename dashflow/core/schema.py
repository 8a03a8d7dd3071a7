"""The data contract: Arrow schemas of every stage's Parquet output, defined once.

Each stage validates what it reads and what it writes with `validate`, so a missing
or mistyped column is reported with the stage, the file and the column. Extra
columns are allowed and passed on.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),        # the question shown to the model (before the chat template)
        ("answer", pa.string()),        # reference final answer
        ("solution", pa.string()),      # reference worked solution, when the dataset has one
        ("source", pa.string()),        # dataset / difficulty tag
        ("context", pa.string()),       # JSON chat turns before the question: system, demonstrations
    ]
)

ROLLOUTS = pa.schema(
    [
        ("run", pa.string()),
        ("iteration", pa.int32()),
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),   # 0..G-1 within the prompt group
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),      # chat-formatted prompt: context turns + the question
        ("completion_token_ids", pa.list_(pa.int32())),  # includes the EOS token when finish_reason == stop
        ("completion", pa.string()),
        ("sampler_logprobs", pa.list_(pa.float32())),    # log-prob of each sampled token under the sampler
        ("finish_reason", pa.string()),                  # stop | length
        ("policy_version", pa.string()),                 # content digest of the sampling policy
        ("prompt_text", pa.string()),                    # the rendered prompt: prompt_token_ids as text
    ]
)

REWARDED = pa.schema(
    list(ROLLOUTS)
    + [
        ("reward", pa.float32()),         # the weighted sum of reward.functions (each also as reward_<name>)
        ("correct", pa.bool_()),          # the answer the first `math` reward reads is right (strict without one)
        ("parsed_answer", pa.string()),   # that answer; null when none could be extracted
        ("reward_error", pa.string()),    # null unless a reward function or a check failed or timed out
        ("strict_correct", pa.bool_()),   # the DASH paper's checker (dashflow/core/answers.py)
        ("flexible_correct", pa.bool_()), # last box anywhere, else the last number
    ]
)

ADVANTAGED = pa.schema(
    list(REWARDED)
    + [
        ("advantage", pa.float32()),
        ("group_mean", pa.float32()),
        ("group_std", pa.float32()),
    ]
)

KEPT = ADVANTAGED

# kept rows + the frozen reference policy's log-prob of each completion token (only
# written when the learner's KL penalty is on, so the reference forward pass runs once)
REFERENCED = pa.schema(list(KEPT) + [("ref_logprobs", pa.list_(pa.float32()))])

EVAL = pa.schema(
    [
        ("eval_set", pa.string()),       # evaluate.sets: heldout, or the name of a benchmark file / hub set
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("prompt_text", pa.string()),    # the rendered prompt the policy saw (context turns + question)
        ("mode", pa.string()),           # greedy | sampled
        ("sample_index", pa.int32()),    # 0 for greedy; 0..n-1 of the sampled completions
        ("completion", pa.string()),
        ("completion_tokens", pa.int32()),
        ("strict_answer", pa.string()),  # the DASH paper's extraction (null: no box in the last 4 lines)
        ("strict_correct", pa.bool_()),
        ("flexible_answer", pa.string()),
        ("flexible_correct", pa.bool_()),
        ("reward_error", pa.string()),
    ]
)


# Columns a table may lack (it reads as null there): what the prompt format added, which
# outputs and hand-made tables from before it do not have.
OPTIONAL = frozenset({"context", "prompt_text"})


class SchemaError(ValueError):
    pass


def validate(table: pa.Table, schema: pa.Schema, *, stage: str, path: Path | str) -> pa.Table:
    """Check `table` has every column of `schema` with a compatible type.

    Returns the table with those columns cast to the exact schema types (extra columns kept;
    an OPTIONAL column it lacks added as nulls).
    """
    for field in schema:
        if field.name not in table.column_names and field.name in OPTIONAL:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
            continue
        if field.name not in table.column_names:
            raise SchemaError(f"{stage}: {path}: missing column {field.name!r} ({field.type})")
        col = table.column(field.name)
        if col.type != field.type:
            try:
                table = table.set_column(table.column_names.index(field.name), field.name, col.cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"{stage}: {path}: column {field.name!r} has type {col.type}, expected {field.type}"
                ) from exc
    return table


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
