"""The example filter every page and query shares, and the WHERE clause it binds."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ExampleFilter:
    """A filter over a run's examples; ``None`` means "any".

    Parameters
    ----------
    text : case-insensitive substring of the example's text (``ILIKE``).
    answer, prediction, split : exact values.
    correct : ``True`` / ``False`` for right / wrong predictions.
    meta_key, meta_value : ``meta[meta_key] == meta_value`` (as a string).
    """

    text: str | None = None
    answer: str | None = None
    prediction: str | None = None
    correct: bool | None = None
    split: str | None = None
    meta_key: str | None = None
    meta_value: str | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) in (None, "") for f in fields(self))

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``text ~ 'red', correct = False``."""
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if v in (None, "") or f.name == "meta_value":
                continue
            if f.name == "text":
                parts.append(f"text contains {v!r}")
            elif f.name == "meta_key":
                if self.meta_value not in (None, ""):
                    parts.append(f"meta.{v} = {self.meta_value!r}")
            else:
                parts.append(f"{f.name} = {v!r}")
        return ", ".join(parts) or "no filter"


def _json_pointer(key: str) -> str:
    """JSON pointer (RFC 6901) of a top-level key, bound as a value, so any key is safe."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def _example_where(run: str, flt: ExampleFilter | None, prefix: str = "") -> tuple[str, dict]:
    """WHERE clause (constant text) and its named parameters for examples of ``run`` passing ``flt``.

    The parameters are named ``$<prefix>run``, ``$<prefix>text``, ``$<prefix>answer`` and so on,
    so that two filters can sit in one query under two prefixes; with the default prefix the
    run is ``$run``, which the enclosing query may share.
    """
    sql, params = [f"run = ${prefix}run"], {f"{prefix}run": run}
    flt = flt or ExampleFilter()
    if flt.text:
        sql.append(f"text ILIKE ${prefix}text ESCAPE '\\'")
        params[f"{prefix}text"] = "%" + flt.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    for col in ("answer", "prediction", "split"):
        v = getattr(flt, col)
        if v not in (None, ""):
            sql.append(f"{col} = ${prefix}{col}")  # col is one of three constants
            params[f"{prefix}{col}"] = v
    if flt.correct is not None:
        sql.append(f"correct = ${prefix}correct")
        params[f"{prefix}correct"] = bool(flt.correct)
    if flt.meta_key and flt.meta_value not in (None, ""):
        sql.append(f"json_extract_string(meta, ${prefix}meta_key) = ${prefix}meta_value")
        params[f"{prefix}meta_key"] = _json_pointer(flt.meta_key)
        params[f"{prefix}meta_value"] = str(flt.meta_value)
    return " AND ".join(sql), params
