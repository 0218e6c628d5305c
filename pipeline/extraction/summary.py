"""What a run did: counts for the command's last line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Summary:
    run: str
    lake: str
    extracted: int = 0
    skipped: int = 0
    truncated: int = 0
    resumed_chunks: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    workers: int = 0
    ray_actors: int = 0
    peak_rss_mb: float | None = None
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter, repr=False)

    def add(self, other: "Summary") -> None:
        """Count in what a chunk (run elsewhere, e.g. on a Ray actor) did."""
        self.extracted += other.extracted
        self.skipped += other.skipped
        self.truncated += other.truncated
        self.errors.extend(tuple(x) for x in other.errors)

    def finish(self) -> "Summary":
        self.seconds = time.perf_counter() - self.started
        self.peak_rss_mb = peak_rss_mb()
        return self

    def line(self) -> str:
        if self.already_complete:
            return f"run {self.run!r} in {self.lake} is already complete; nothing to do"
        rate = self.extracted / self.seconds if self.seconds else 0.0
        s = (f"extracted {self.extracted} examples into {self.lake} (run {self.run!r}) in {self.seconds:.1f} s "
             f"({rate:.1f} examples/s); {self.skipped} skipped")
        if self.truncated:
            s += f", {self.truncated} truncated"
        if self.skipped or self.truncated:
            s += f" (see: vlatlas sql --lake {self.lake} \"SELECT * FROM errors WHERE run = '{self.run}'\")"
        if self.ray_actors:
            s += f"; on {self.ray_actors} Ray actor" + ("" if self.ray_actors == 1 else "s")
        if self.resumed_chunks:
            s += f"; resumed after {self.resumed_chunks} finished chunks"
        if self.peak_rss_mb is not None:
            s += f"; peak memory {self.peak_rss_mb:.0f} MB"
        return s


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux/macOS), MB."""
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024
    except Exception:  # noqa: BLE001 - informational only
        return None
