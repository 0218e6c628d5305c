"""Two groups of examples compared head by head: difference of means, effect size, test, correction.

Pure numpy/scipy on the DataFrames of ``lake/queries/`` (``compare_moments``,
``compare_values``, ``paired_moments``, ``paired_values``); no SQL, no Streamlit.
Every head ``(stream, layer, head)`` is one test; a statistic's per-example
value is its ``head_stats.value``. Differences are always **B − A**.

The formulas (quoted by the Compare page's help text, see :data:`HELP`):

Two slices of one run (independent groups)
    An example that passes both filters belongs to neither group: independent
    samples cannot share members, so the overlap is left out of both (B with no
    filter is then "every example not in A"). Per head, with ``n``, mean ``m``
    and sample variance ``v`` (ddof 1) of each group:

- ``hedges_g``: Hedges' g = J · (m_B − m_A) / s_p, pooled SD s_p = sqrt(((n_A − 1) v_A + (n_B − 1) v_B) /
  (n_A + n_B − 2)), small-sample correction J = 1 − 3 / (4 (n_A + n_B) − 9).
- ``welch``: Welch's t = (m_B − m_A) / sqrt(v_A / n_A + v_B / n_B), df = (v_A / n_A + v_B / n_B)² / ((v_A /
  n_A)² / (n_A − 1) + (v_B / n_B)² / (n_B − 1)) (Welch–Satterthwaite), p = 2 · P(T_df > |t|).
- ``mannwhitney``: Mann–Whitney U of B against A (ranks of all values, ties averaged), two-sided p (exact
  for small samples without ties, else the normal approximation with tie and continuity corrections, as
  scipy.stats.mannwhitneyu); the effect size stays Hedges' g.

Two runs over the same manifest (paired by example)
    Only examples present in both runs, passing the filter in both, with a
    value in both, are compared. Per head, with the differences
    d_i = value_B(i) − value_A(i), their mean d̄, sample SD s_d and count n:

- ``d_z``: d_z = d̄ / s_d.
- ``paired_t``: paired t = d̄ / (s_d / sqrt(n)), df = n − 1, p = 2 · P(T_df > |t|).
- ``wilcoxon``: Wilcoxon signed-rank test of the d_i (zero differences dropped), two-sided p (as
  scipy.stats.wilcoxon); the effect size stays d_z.

Correction for the number of heads tested
    m = the number of heads with a p-value. A head with fewer than 2 values in
    a group (or fewer than 2 pairs), or whose values are constant in both
    groups (zero variance: t is undefined), gets NaN for its effect size and
    p-value and does not count in m. With the p-values sorted,
    p_(1) ≤ … ≤ p_(m):

- ``holm``: Holm–Bonferroni (family-wise error): p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j)).
- ``bh``: Benjamini–Hochberg (false discovery rate): p̃_(i) = min_{j ≥ i} min(1, m / j · p_(j)).

Examples that drive a head's difference
    Group B's mean exceeds group A's by D = m_B − m_A, and D = Σ_{i in B} (x_i − m_A) / n_B
    = Σ_{j in A} (m_B − x_j) / n_A. So each example has a share of D:

- ``share_independent``: an example's share is the part of the difference D = m_B − m_A it accounts for within
  its group: an example i of B has share (x_i − m_A) / (n_B · D) (its distance from A's mean over the sum of
  those distances, n_B · D), an example j of A has share (m_B − x_j) / (n_A · D). Each group's shares sum to
  100%, so an example of average weight holds an even share 1 / n of its group; "× even" = share · n says how
  many average examples it is worth, and a negative share pulls against the difference. The largest are the
  examples furthest from the other group's mean in the direction of the difference.
- ``share_paired``: an example i has share d_i / (n · d̄) (its difference over the sum of all differences);
  the shares sum to 100%, an even share is 1 / n, "× even" = share · n, and a negative share pulls against
  the mean difference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

TESTS = ("t", "rank")
CORRECTIONS = ("holm", "bh")
TEST_LABELS = {
    ("independent", "t"): "Welch's t-test",
    ("independent", "rank"): "Mann–Whitney U",
    ("paired", "t"): "paired t-test",
    ("paired", "rank"): "Wilcoxon signed-rank",
}
CORRECTION_LABELS = {"holm": "Holm–Bonferroni (family-wise)", "bh": "Benjamini–Hochberg (FDR)"}
ALPHA = 0.05


def _doc_formula(name: str) -> str:
    """The text of the docstring's bullet ``- ``name``: ...``, so the help and the docstring agree."""
    tag = f"- ``{name}``: "
    lines = __doc__.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(tag))
    text = [lines[i][len(tag):]]
    for ln in lines[i + 1:]:  # continuation lines are indented by two spaces
        if not ln.startswith("  ") or ln.startswith("- "):
            break
        text.append(ln.strip())
    return " ".join(text)


HELP: dict[str, str] = {k: _doc_formula(k) for k in (
    "hedges_g", "welch", "mannwhitney", "d_z", "paired_t", "wilcoxon", "holm", "bh",
    "share_independent", "share_paired")}

RESULT_COLUMNS = ["layer", "head", "n_a", "n_b", "mean_a", "mean_b", "diff", "effect", "t", "df", "p", "p_adj"]


# -- effect sizes and tests, vectorised over heads ----------------------------------------
def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def hedges_g(n_a, mean_a, var_a, n_b, mean_b, var_b) -> np.ndarray:
    """Hedges' g of B against A (see the module docstring); NaN where a group has < 2 values or s_p = 0."""
    n_a, mean_a, var_a, n_b, mean_b, var_b = map(_f, (n_a, mean_a, var_a, n_b, mean_b, var_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        sp = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
        j = 1 - 3 / (4 * (n_a + n_b) - 9)
        g = j * (mean_b - mean_a) / sp
    ok = (n_a >= 2) & (n_b >= 2) & (sp > 0)
    return np.where(ok, g, np.nan)


def welch(n_a, mean_a, var_a, n_b, mean_b, var_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, df, two-sided p) of Welch's t-test of B against A; NaN where undefined."""
    n_a, mean_a, var_a, n_b, mean_b, var_b = map(_f, (n_a, mean_a, var_a, n_b, mean_b, var_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        qa, qb = var_a / n_a, var_b / n_b
        se = np.sqrt(qa + qb)
        t = (mean_b - mean_a) / se
        df = (qa + qb) ** 2 / (qa ** 2 / (n_a - 1) + qb ** 2 / (n_b - 1))
    ok = (n_a >= 2) & (n_b >= 2) & (se > 0)
    t, df = np.where(ok, t, np.nan), np.where(ok, df, np.nan)
    p = np.where(ok, 2 * sps.t.sf(np.abs(np.nan_to_num(t)), np.where(ok, df, 1.0)), np.nan)
    return t, df, p


def paired_t(n, mean_d, var_d) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(d_z, t, df, two-sided p) of the paired t-test of the differences B − A; NaN where undefined."""
    n, mean_d, var_d = map(_f, (n, mean_d, var_d))
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(var_d)
        dz = mean_d / sd
        t = mean_d / (sd / np.sqrt(n))
    ok = (n >= 2) & (sd > 0)
    dz, t = np.where(ok, dz, np.nan), np.where(ok, t, np.nan)
    df = np.where(ok, n - 1, np.nan)
    p = np.where(ok, 2 * sps.t.sf(np.abs(np.nan_to_num(t)), np.where(ok, df, 1.0)), np.nan)
    return dz, t, df, p


def adjust(p, method: str = "holm") -> np.ndarray:
    """p-values adjusted for the number of tests: ``holm`` or ``bh`` (formulas in the module docstring).

    NaN entries stay NaN and are not counted in m.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, not {method!r}")
    p = _f(p).copy()
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    ps = p[order]  # p_(1) <= ... <= p_(m)
    j = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - j + 1) * ps))
    else:
        adj = np.minimum.accumulate(np.minimum(1.0, m / j * ps)[::-1])[::-1]
    out[order] = adj
    return out


# -- one head's rank tests -----------------------------------------------------------------
def _mannwhitney(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if len(a) < 2 or len(b) < 2 or (np.ptp(np.concatenate([a, b])) == 0):
        return np.nan, np.nan
    r = sps.mannwhitneyu(b, a, alternative="two-sided")
    return float(r.statistic), float(r.pvalue)


def _wilcoxon(d: np.ndarray) -> tuple[float, float]:
    if len(d) < 2 or not np.any(d != 0):
        return np.nan, np.nan
    r = sps.wilcoxon(d, alternative="two-sided")
    return float(r.statistic), float(r.pvalue)


# -- whole comparisons ---------------------------------------------------------------------
def _finish(out: pd.DataFrame, correction: str) -> pd.DataFrame:
    out["p_adj"] = adjust(out["p"].to_numpy(), correction)
    out = out.astype({"layer": int, "head": int})
    return out[RESULT_COLUMNS].sort_values(["layer", "head"]).reset_index(drop=True)


def compare_independent(moments: pd.DataFrame, values: pd.DataFrame | None = None, test: str = "t",
                        correction: str = "holm") -> pd.DataFrame:
    """Per head: B against A as independent groups.

    Parameters
    ----------
    moments : layer, head, group (``A``/``B``), n, mean, var (sample variance) — one row per
        head and group (``queries.compare_moments``); a head missing a group gets n = 0.
    values : layer, head, group, value (``queries.compare_values``); needed for ``test="rank"``.
    test : ``t`` (Welch) or ``rank`` (Mann–Whitney U).
    correction : ``holm`` or ``bh``.

    Returns
    -------
    layer, head, n_a, n_b, mean_a, mean_b, diff (B − A), effect (Hedges' g), t (Welch's t, or U),
    df (NaN for U), p, p_adj — by layer, head.
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, not {test!r}")
    w = moments.pivot_table(index=["layer", "head"], columns="group", values=["n", "mean", "var"],
                            aggfunc="first", dropna=False)
    out = pd.DataFrame(index=w.index).reset_index()

    def col(name, g):
        return w[(name, g)].to_numpy(dtype=np.float64) if (name, g) in w.columns else np.full(len(w), np.nan)

    n_a, n_b = np.nan_to_num(col("n", "A")), np.nan_to_num(col("n", "B"))
    m_a, m_b, v_a, v_b = col("mean", "A"), col("mean", "B"), col("var", "A"), col("var", "B")
    out["n_a"], out["n_b"] = n_a.astype(int), n_b.astype(int)
    out["mean_a"], out["mean_b"], out["diff"] = m_a, m_b, m_b - m_a
    out["effect"] = hedges_g(n_a, m_a, v_a, n_b, m_b, v_b)
    if test == "t":
        out["t"], out["df"], out["p"] = welch(n_a, m_a, v_a, n_b, m_b, v_b)
    else:
        if values is None:
            raise ValueError("the Mann–Whitney test needs the per-example values")
        groups = {k: g for k, g in values.dropna(subset=["value"]).groupby(["layer", "head", "group"])}
        empty = np.empty(0)
        u, p = zip(*[_mannwhitney(groups[(l, h, "A")].value.to_numpy() if (l, h, "A") in groups else empty,
                                  groups[(l, h, "B")].value.to_numpy() if (l, h, "B") in groups else empty)
                     for l, h in zip(out.layer, out["head"])]) if len(out) else ((), ())
        out["t"], out["df"], out["p"] = np.array(u, dtype=float), np.nan, np.array(p, dtype=float)
    return _finish(out, correction)


def compare_paired(moments: pd.DataFrame, values: pd.DataFrame | None = None, test: str = "t",
                   correction: str = "holm") -> pd.DataFrame:
    """Per head: run B against run A, paired by example.

    Parameters
    ----------
    moments : layer, head, n (pairs), mean_a, mean_b, mean_d, var_d (sample variance of
        d = b − a) (``queries.paired_moments``).
    values : layer, head, example_id, a, b (``queries.paired_values``); needed for ``test="rank"``.
    test : ``t`` (paired t) or ``rank`` (Wilcoxon signed-rank).
    correction : ``holm`` or ``bh``.

    Returns the columns of :func:`compare_independent`, with n_a = n_b = n, diff = d̄ and
    effect = d_z.
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, not {test!r}")
    out = moments[["layer", "head"]].copy()
    n = moments["n"].to_numpy(dtype=np.float64)
    out["n_a"] = out["n_b"] = n.astype(int)
    out["mean_a"], out["mean_b"] = moments.mean_a.to_numpy(float), moments.mean_b.to_numpy(float)
    out["diff"] = moments.mean_d.to_numpy(float)
    dz, t, df, p = paired_t(n, moments.mean_d, moments.var_d)
    out["effect"] = dz
    if test == "t":
        out["t"], out["df"], out["p"] = t, df, p
    else:
        if values is None:
            raise ValueError("the Wilcoxon test needs the per-example values")
        v = values.dropna(subset=["a", "b"])
        groups = {k: (g.b - g.a).to_numpy(dtype=float) for k, g in v.groupby(["layer", "head"])}
        res = [_wilcoxon(groups.get((l, h), np.empty(0))) for l, h in zip(out.layer, out["head"])]
        out["t"] = [r[0] for r in res]
        out["df"] = np.nan
        out["p"] = [r[1] for r in res]
    return _finish(out, correction)


def untested(result: pd.DataFrame, paired: bool, test: str = "t") -> pd.Series:
    """Why each head of a comparison has no p-value, as a short phrase ("" where it has one): too few
    values (pairs) in a group, or values that leave the test nothing to measure (no spread)."""
    n_a, n_b = result.n_a.to_numpy(), result.n_b.to_numpy()
    if paired:
        few = np.where(n_a < 2, "fewer than 2 pairs", "")
        flat = "every B − A is 0" if test == "rank" else "every B − A is the same (no variance)"
    else:
        few = np.where(n_a < 2, "fewer than 2 values in A", np.where(n_b < 2, "fewer than 2 values in B", ""))
        flat = "every value is the same" if test == "rank" else "no variance in either group"
    why = np.where(few != "", few, flat)
    return pd.Series(np.where(result.p.isna(), why, ""), index=result.index, dtype=object)


RANKS = ("diff", "effect")


def ranked(result: pd.DataFrame, by: str = "diff") -> pd.DataFrame:
    """The heads by |B − A| (``by="diff"``, the difference of means) or by |effect size| (``"effect"``),
    largest first; heads without a value last, ties by layer, head."""
    if by not in RANKS:
        raise ValueError(f"rank by one of {', '.join(RANKS)}, not {by!r}")
    r = result.assign(_k=result[by].abs().fillna(-1.0))
    return r.sort_values(["_k", "layer", "head"], ascending=[False, True, True], kind="stable").drop(
        columns="_k").reset_index(drop=True)


# -- the examples behind one head's difference ----------------------------------------------
def drivers_independent(values: pd.DataFrame) -> pd.DataFrame:
    """Each example's share of one head's difference B − A (``share_independent``).

    ``values``: example_id, group (``A``/``B``), value of one head. Returns example_id, group,
    value, other_mean (the other group's mean), toward (how far the value lies from the other
    group's mean, in the direction of B − A), share, n (the size of the example's group), vs_even
    (share · n: the share over an even share 1 / n) — sorted by group and share (largest first).
    """
    v = values.dropna(subset=["value"]).copy()
    m = v.groupby("group").value.mean()
    n = v.groupby("group").value.count()
    m_a, m_b = float(m.get("A", np.nan)), float(m.get("B", np.nan))
    d = m_b - m_a
    is_b = (v.group == "B").to_numpy()
    x = v.value.to_numpy(dtype=float)
    v["other_mean"] = np.where(is_b, m_a, m_b)
    v["toward"] = np.where(is_b, x - m_a, m_b - x)  # sums to n_group * D within a group
    n_g = np.where(is_b, n.get("B", 0), n.get("A", 0)).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        v["share"] = v.toward / (n_g * d) if d != 0 else np.nan
    v["n"] = n_g.astype(int)
    v["vs_even"] = v.share * n_g
    sign = 1.0 if not np.isfinite(d) or d >= 0 else -1.0
    v["_k"] = v.toward * sign
    return v.sort_values(["group", "_k"], ascending=[True, False], kind="stable").drop(
        columns="_k").reset_index(drop=True)


def drivers_paired(values: pd.DataFrame) -> pd.DataFrame:
    """Each example's share of one head's paired difference (``share_paired``).

    ``values``: example_id, a, b of one head. Returns example_id, a, b, d (= b − a), share, n (the
    number of pairs), vs_even (share · n) — sorted by d in the direction of the mean difference
    (largest first).
    """
    v = values.dropna(subset=["a", "b"]).copy()
    v["d"] = v.b.astype(float) - v.a.astype(float)
    total = float(v.d.sum())
    v["share"] = v.d / total if total != 0 else np.nan
    v["n"] = len(v)
    v["vs_even"] = v.share * len(v)
    sign = 1.0 if total >= 0 else -1.0
    v["_k"] = v.d * sign
    return v.sort_values("_k", ascending=False, kind="stable").drop(columns="_k").reset_index(drop=True)
