"""Unpacks a decode graph's staged inputs on the device, inside the graph.

A replay's inputs travel from the host as one int64 block in one copy (each separate
host-to-device copy costs ~12 µs of host time on the H200's host, and a step had six,
two of which also converted dtypes or scattered through a temporary). The block holds
the token ids, positions and cache slots (read in place by the model), where the tokens
still on the device come from (rows, and their source rows and columns, read by the
replay's gathers) and, for this kernel, each row's context length, the shared-prefix
length, the block tables' width and the tables themselves, row after row at that width.
The kernel writes the int32 tensors the attention kernels read: the context lengths, the
prefix length, and the tables at the stride the graph was captured with.

Layout (``GraphInputLayout``, n = the graph's largest batch rounded up to even, so that
every field starts 16-byte aligned): ids [0, n), positions [n, 2n), slots [2n, 3n),
context lengths [3n, 4n), device-token rows, sources and source columns [4n, 7n), prefix
length 7n, width 7n + 1, tables from 7n + 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # table entries a program copies


class GraphInputLayout:
    """Offsets into the packed block for graphs of at most ``max_batch`` rows and tables
    of at most ``max_blocks`` entries a row."""

    def __init__(self, max_batch: int, max_blocks: int) -> None:
        self.max_batch, self.max_blocks = max_batch, max_blocks
        rows = max_batch + max_batch % 2
        self.rows = rows
        (
            self.ids,
            self.positions,
            self.slots,
            self.seq_lens,
            self.token_rows,
            self.token_sources,
            self.token_columns,
        ) = (field * rows for field in range(7))
        self.prefix = 7 * rows
        self.width = self.prefix + 1
        self.tables = self.prefix + 2
        self.size = self.tables + max_batch * max_blocks


# The offsets follow each engine's largest graph: unspecialized, every engine (and the
# startup's compile-ahead, whose graphs may be sized otherwise) shares one variant.
_LAYOUT_ARGS = ["seq_lens_offset", "prefix_offset", "width_offset", "tables_offset", "table_stride"]


@triton.jit(do_not_specialize=_LAYOUT_ARGS)
def _unpack_graph_inputs_kernel(
    packed_ptr,
    seq_lens_ptr,
    prefix_ptr,
    tables_ptr,
    seq_lens_offset,
    prefix_offset,
    width_offset,
    tables_offset,
    table_stride,
    BLOCK: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    width = tl.load(packed_ptr + width_offset).to(tl.int32)
    if HAS_LENGTHS:  # noqa: SIM102 - a compile-time branch: the other is not compiled
        if part == 0:
            seq_len = tl.load(packed_ptr + seq_lens_offset + row)
            tl.store(seq_lens_ptr + row, seq_len.to(tl.int32))
            if row == 0:
                tl.store(prefix_ptr, tl.load(packed_ptr + prefix_offset).to(tl.int32))
    columns = part * BLOCK + tl.arange(0, BLOCK)
    # Entries past the step's width are never read (attention stops at the context
    # length): they keep what an earlier step wrote.
    mask = columns < width
    values = tl.load(packed_ptr + tables_offset + row * width + columns, mask=mask)
    tl.store(tables_ptr + row * table_stride + columns, values.to(tl.int32), mask=mask)


def unpack_graph_inputs(
    packed: torch.Tensor,
    layout: GraphInputLayout,
    batch: int,
    seq_lens: torch.Tensor,
    prefix: torch.Tensor,
    tables: torch.Tensor,
) -> None:
    """Write rows [0, batch) of ``seq_lens`` (int32 [n]), ``prefix`` (int32 [1]) and
    ``tables`` (int32 [n, max_blocks]) from the packed int64 block."""
    _launch(
        packed,
        batch,
        seq_lens,
        prefix,
        tables,
        layout.seq_lens,
        layout.prefix,
        layout.width,
        layout.tables,
        True,
    )


def widen_block_tables(
    packed: torch.Tensor, width_offset: int, tables_offset: int, batch: int, tables: torch.Tensor
) -> None:
    """Only the block tables: rows [0, batch) of ``tables`` (int32 [n, max_blocks]) from
    the rows packed at ``tables_offset``, as wide as the value at ``width_offset`` says
    (the EAGLE head's draft chain, whose other inputs are read in place)."""
    _launch(packed, batch, tables, tables, tables, 0, 0, width_offset, tables_offset, False)


def _launch(
    packed: torch.Tensor,
    batch: int,
    seq_lens: torch.Tensor,
    prefix: torch.Tensor,
    tables: torch.Tensor,
    seq_lens_offset: int,
    prefix_offset: int,
    width_offset: int,
    tables_offset: int,
    has_lengths: bool,
) -> None:
    grid = (batch, triton.cdiv(tables.shape[1], BLOCK))
    _unpack_graph_inputs_kernel[grid](
        packed,
        seq_lens,  # (not written without lengths)
        prefix,
        tables,
        seq_lens_offset,
        prefix_offset,
        width_offset,
        tables_offset,
        tables.stride(0),
        BLOCK=BLOCK,
        HAS_LENGTHS=has_lengths,
        num_warps=1,
    )


def widen_block_tables_reference(
    packed: torch.Tensor, width_offset: int, tables_offset: int, batch: int, tables: torch.Tensor
) -> None:
    """``widen_block_tables`` in torch (the kernel's oracle)."""
    width = int(packed[width_offset])
    rows = packed[tables_offset : tables_offset + batch * width].view(batch, width)
    tables[:batch, :width] = rows.to(torch.int32)


def unpack_graph_inputs_reference(
    packed: torch.Tensor,
    layout: GraphInputLayout,
    batch: int,
    seq_lens: torch.Tensor,
    prefix: torch.Tensor,
    tables: torch.Tensor,
) -> None:
    """``unpack_graph_inputs`` in torch (the kernel's oracle)."""
    seq_lens[:batch] = packed[layout.seq_lens : layout.seq_lens + batch].to(torch.int32)
    prefix[0] = packed[layout.prefix].to(torch.int32)
    widen_block_tables_reference(packed, layout.width, layout.tables, batch, tables)
