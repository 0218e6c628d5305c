"""Planning: manifest rows -> chunks -> batches, and which chunks a resumed run still has to do.

Examples are processed in chunks of ``chunk_size`` manifest rows (chunk ``example_id //
chunk_size``); a chunk is written atomically with its done marker (``lake/writer.py``), so resuming
is doing the chunks that have no marker. A chunk always starts a batch, so a chunk's batches (and
hence its results) are the same whichever process runs it and however the run was interrupted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pipeline.data import Row

HIDDEN_SAMPLE_SEED = 0


@dataclass
class Job:
    """One batch of the plan."""

    chunk: int
    rows: list[Row]
    last: bool  # the chunk's last batch
    first_chunk: bool  # the run's first chunk (it records the manifest's own errors)


@dataclass(frozen=True)
class Plan:
    """The chunks of a run and the ones already committed."""

    chunks: dict[int, list[Row]]
    done: frozenset[int]

    @property
    def first(self) -> int:
        return min(self.chunks)

    @property
    def todo(self) -> dict[int, list[Row]]:
        return {c: rs for c, rs in self.chunks.items() if c not in self.done}

    @property
    def resumed(self) -> int:
        """How many of the run's chunks were committed before."""
        return len(self.done & set(self.chunks))

    @property
    def rows_done(self) -> int:
        return sum(len(rs) for c, rs in self.chunks.items() if c in self.done)


def plan_run(rows: list[Row], chunk_size: int, done: set[int]) -> Plan:
    """Chunk the manifest's rows (a manifest without rows still has chunk 0, for its errors)."""
    chunks: dict[int, list[Row]] = {}
    for r in rows:
        chunks.setdefault(r.example_id // chunk_size, []).append(r)
    if not chunks:
        chunks[0] = []
    return Plan(chunks, frozenset(done))


def plan_jobs(chunks: dict[int, list[Row]], batch_size: int, first_chunk: int) -> list[Job]:
    """The batches of the given chunks, in order; a chunk always starts a batch."""
    jobs = []
    for c in sorted(chunks):
        rs = chunks[c]
        starts = list(range(0, len(rs), batch_size)) or [0]
        jobs += [Job(c, rs[i:i + batch_size], i == starts[-1], c == first_chunk) for i in starts]
    return jobs


def hidden_vector_examples(rows: list[Row], n: int | None, seed: int = HIDDEN_SAMPLE_SEED) -> set[int] | None:
    """The example ids whose hidden vectors are stored: a seeded sample of ``n`` of the manifest's
    accepted rows (None = all). It depends on the manifest alone, not on batches, workers or chunks."""
    if n is None:
        return None
    ids = np.array(sorted(r.example_id for r in rows), dtype=np.int64)
    if n >= len(ids):
        return set(ids.tolist())
    return set(np.random.default_rng(seed).choice(ids, size=n, replace=False).tolist())


def default_workers(device: str = "cpu") -> int:
    """Input worker processes: half the cores (the model's own threads need the rest on a CPU),
    at least 1, at most 8; on CUDA all but one core, at most 8."""
    n = os.cpu_count() or 2
    return max(1, min(8, n - 1 if str(device).startswith("cuda") else n // 2))
