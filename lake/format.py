"""Plain-text tables of query results, for ``vlatlas sql``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def _cell(v: object, max_width: int) -> str:
    if v is None or v is pd.NA or v is pd.NaT:
        s = "NULL"
    elif isinstance(v, (float, np.floating)):
        s = "NULL" if math.isnan(v) else f"{v:.6g}"
    elif isinstance(v, (bytes, bytearray, memoryview)):
        s = f"<{len(v)} bytes>"
    elif isinstance(v, (list, tuple, np.ndarray)):
        items = list(v[: max_width // 2 + 1])
        s = "[" + ", ".join(_cell(x, max_width) for x in items)
        s += (", …]" if len(v) > len(items) else "]")
    elif isinstance(v, dict):
        s = "{" + ", ".join(f"{k}: {_cell(x, max_width)}" for k, x in v.items()) + "}"
    else:
        s = str(v)
    s = " ".join(s.split()) if any(c in s for c in "\n\r\t") else s
    return s if len(s) <= max_width else s[: max_width - 1] + "…"


def format_table(df: pd.DataFrame, *, max_width: int = 40, truncated: bool = False) -> str:
    """Render a DataFrame as a plain-text table (for ``vlatlas sql``).

    Parameters
    ----------
    df : the rows to show.
    max_width : longest cell (and header), in characters; longer ones are cut with "…".
    truncated : whether the query had more rows than ``df`` holds (adds a note).
    """
    max_width = max(2, int(max_width))
    headers = [_cell(str(c), max_width) for c in df.columns]
    columns = [[_cell(v, max_width) for v in df.iloc[:, i].tolist()] for i in range(df.shape[1])]
    right = [pd.api.types.is_numeric_dtype(df.dtypes.iloc[i]) and not pd.api.types.is_bool_dtype(df.dtypes.iloc[i])
             for i in range(df.shape[1])]
    widths = [max([len(h)] + [len(s) for s in col]) for h, col in zip(headers, columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(s.rjust(w) if r else s.ljust(w) for s, w, r in zip(cells, widths, right)).rstrip()

    lines = []
    if headers:
        lines.append(line(headers))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(line([col[r] for col in columns]) for r in range(len(df)))
    n = len(df)
    footer = f"{n} row" + ("" if n == 1 else "s")
    if truncated:
        footer += f" (truncated at {n} rows)"
    lines.append(footer)
    return "\n".join(lines)
