"""Joining the ranks of a distributed job into one table: a ``rank`` column, and (for sharded models)
the norms combined across ranks.

Placeholder rules until sharded recording lands: every rank's rows as recorded, with ``rank`` added.
"""

from __future__ import annotations

import pyarrow as pa

from gradscope.store.meta import RunMeta


def join_ranks(kind: str, per_rank: list[tuple[int, RunMeta, pa.Table]]) -> pa.Table:
    """The rows of every rank of a job, each with its ``rank`` (int32), in rank order."""
    tables = [with_rank(table, rank) for rank, _meta, table in sorted(per_rank, key=lambda item: item[0])]
    return pa.concat_tables(tables)


def with_rank(table: pa.Table, rank: int) -> pa.Table:
    """``table`` with a constant ``rank`` column appended (replaced if present)."""
    if "rank" in table.column_names:
        table = table.drop_columns(["rank"])
    return table.append_column("rank", pa.repeat(pa.scalar(rank, pa.int32()), table.num_rows))
