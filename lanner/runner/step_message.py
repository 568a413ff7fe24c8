"""The one message rank 0 sends every other tensor-parallel rank per step: the step's
flattened layout (token ids, positions, attention lengths, block tables, the rows that
compute logits) as int64 arrays in one buffer, not an object per request. The other
messages between rank 0 and its workers (start-up, cache sizing, shutdown) are rare and
travel pickled."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from lanner.runner.model_runner import StepLayout

STEP = b"S"
COMMAND = b"C"
# Header fields, in order: the length of each array that follows, then two flags.
_HEADER = (
    "tokens",
    "seqs",
    "tables",
    "table_entries",
    "chunks",
    "sample_rows",
    "prompt_rows",
    "device_rows",
    "all_flattened",
    "replay",
)


def encode_step(layout: StepLayout) -> bytes:
    """``layout`` as one buffer. Block tables repeated for the rows of a flattened chunk
    (the same list each time) travel once."""
    tables: list[list[int]] = []
    table_of_seq: list[int] = []
    for table in layout.block_tables:
        if not tables or table is not tables[-1]:
            tables.append(table)
        table_of_seq.append(len(tables) - 1)
    table_lens = [len(table) for table in tables]
    header = [
        len(layout.input_ids),
        len(layout.query_lens),
        len(tables),
        sum(table_lens),
        len(layout.first_rows),
        len(layout.sample_rows),
        len(layout.prompt_rows),
        len(layout.device_rows),
        int(layout.all_flattened),
        int(layout.replay),
    ]
    # numpy reads each list at C speed (a Python loop over the entries would cost ~1 ms
    # at 256 rows of 2000-token contexts).
    lists = [
        header,
        layout.input_ids,
        layout.positions,
        layout.query_lens,
        layout.seq_lens,
        table_of_seq,
        table_lens,
        *tables,
        layout.first_rows,
        layout.sample_rows,
        layout.prompt_rows,
        layout.device_rows,
    ]
    flat = np.concatenate([np.asarray(values, dtype=np.int64) for values in lists])
    return STEP + flat.tobytes()


def decode_step(message: bytes) -> StepLayout:
    flat = np.frombuffer(message, dtype=np.int64, offset=len(STEP))
    header = dict(zip(_HEADER, flat[: len(_HEADER)].tolist(), strict=True))
    offset = len(_HEADER)

    def take(count: int) -> list[int]:
        nonlocal offset
        values = flat[offset : offset + count].tolist()
        offset += count
        return values

    tokens, seqs = header["tokens"], header["seqs"]
    input_ids, positions = take(tokens), take(tokens)
    query_lens, seq_lens, table_of_seq = take(seqs), take(seqs), take(seqs)
    table_lens = take(header["tables"])
    entries = take(header["table_entries"])
    tables, start = [], 0
    for length in table_lens:
        tables.append(entries[start : start + length])
        start += length
    return StepLayout(
        input_ids=input_ids,
        positions=positions,
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=[tables[index] for index in table_of_seq],
        first_rows=take(header["chunks"]),
        sample_rows=take(header["sample_rows"]),
        prompt_rows=take(header["prompt_rows"]),
        all_flattened=bool(header["all_flattened"]),
        device_rows=take(header["device_rows"]),
        replay=bool(header["replay"]),
    )


def encode_command(name: str, *args: Any) -> bytes:
    return COMMAND + pickle.dumps((name, args))


def decode_command(message: bytes) -> tuple[str, tuple[Any, ...]]:
    if not message.startswith(COMMAND):
        raise ValueError(f"not a command message: {message[:8]!r}")
    return pickle.loads(message[len(COMMAND) :])
