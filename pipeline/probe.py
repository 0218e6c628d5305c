"""Linear probes with control tasks on a run's stored vectors: the lake's ``probes`` table.

``vlatlas probe --lake L --run R --target COLUMN`` asks, at every layer of every stream, whether a
linear classifier (or, for a numeric target, a linear regression) reads the target off the stored
vectors of chosen tokens better than it reads a meaningless relabelling of the same examples.

Features (:func:`select_tokens`): the stored vectors (``hidden_states.vec``, or ``activations.vec``
of the captured modules a ``source`` names) of the tokens a selector picks; only examples with
stored vectors take part.

- ``image-in-box``: the image tokens whose patch centre ((x0+x1)/2, (y0+y1)/2) lies inside (edges
  included) the example's first box of ``examples.boxes``; every token is one sample;
- ``word``: the first prompt text token whose text (lowercased, piece marks ``##``, ``▁``, ``Ġ``
  removed) equals the first word of the first box's label;
- ``last``: the last prompt text token (modality text, role neither ``generated`` nor ``pad``);
- ``mean-image``: the mean of the example's image-token vectors (one sample per example).

Examples without a box (image-in-box, word), or whose selector picks no token, take no part.

Target: ``answer`` or a key of ``examples.meta`` (the manifest's extra columns); an example whose
value is missing takes no part. Numeric when every value is a number (or a string that reads as
one): ridge regression, metric r2; otherwise categorical: logistic regression, metric accuracy.
Both on standardised float32 features (``StandardScaler`` fitted on each training fold),
scikit-learn's defaults otherwise (C = 1, solver :data:`SOLVER`, ``max_iter`` :data:`MAX_ITER`;
ridge alpha = 1).

Evaluation: k-fold cross-validation grouped by example (``StratifiedGroupKFold`` for a category,
``GroupKFold`` for a number, both shuffled with the seed: :func:`split_folds`), so no example's
tokens are on both sides of a split. The metric is that of the pooled out-of-fold predictions.

Control task (Hewitt and Liang 2019): the same probe, with the same folds, on labels permuted
across *examples* (an example's tokens keep one label, class frequencies are kept):
``rng = numpy.random.default_rng(seed)``; permutation ``i`` gives example ``j`` (in example_id
order) the label of example ``rng.permutation(n)[j]`` (:func:`permuted_labels`). ``control`` is
the mean metric over the permutations, ``selectivity = value - control``, and
``p_value = (1 + #{permuted metric >= value}) / (1 + permutations)``.

The rows of one probe (its key ``"<target> <selector> <source>"``) are written to
``<lake>/probes/run=<run>/probe-<hash of the key>.parquet`` atomically; running it again
replaces them. This module does not import torch: the app runs probes too.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from lake import queries
from lake.catalog import Catalog
from lake.commit import partition_rel
from lake.queries import probes as pq
from lake.schema import PROBES
from lake.writer import check_run_name, write_table
from pipeline.capture_config import module_matches

SELECTORS = ("image-in-box", "word", "last", "mean-image")
# Newton-CG rather than lbfgs: the same objective (multinomial, L2, C = 1), but on the control task's
# permuted labels it reaches the optimum in ~8 Newton steps where lbfgs takes ~200 iterations and
# stops short of it: twice as fast on the demo, and its predictions are the optimum's.
SOLVER = "newton-cg"
MAX_ITER = 1000
QUERY_TIMEOUT_S = 600.0  # reading a layer of a large run can take longer than the app's 10 s
PIECE_MARKS = ("##", "▁", "Ġ")  # WordPiece, SentencePiece and byte-level BPE word marks
COLUMNS = [f.name for f in PROBES.schema]

Progress = Callable[[int, int, str], None]


class ProbeError(ValueError):
    """The probe cannot run (bad target, selector or source, too few examples); one sentence saying why."""


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: what it predicts, from which tokens and vectors, and how it is evaluated."""

    target: str  # "answer" or a key of examples.meta (the manifest's extra columns)
    selector: str = "image-in-box"
    source: str = "hidden"  # "hidden", or a module name / pattern (as --capture-modules) in activations
    folds: int = 5
    permutations: int = 20  # control task permutations (p-value resolution 1/(1+permutations))
    seed: int = 0
    streams: tuple[str, ...] | None = None  # None: every stream that has vectors

    @property
    def key(self) -> str:
        """The ``probes.probe`` value naming this probe's rows."""
        return f"{self.target} {self.selector} {self.source}"


@dataclass
class ProbeFit:
    """One probe at one stream and layer (:func:`fit_probe`).

    fold : ``[samples]`` the fold each sample is tested in (every sample of an example in one fold).
    permuted : ``[permutations]`` the metric on each permuted labelling.
    predictions : ``[samples]`` out-of-fold predictions.
    """

    metric: str
    value: float
    permuted: np.ndarray
    fold: np.ndarray
    predictions: np.ndarray
    confusion: dict | None = None

    @property
    def control(self) -> float:
        return float(np.mean(self.permuted)) if len(self.permuted) else float("nan")

    @property
    def p_value(self) -> float:
        return p_value(self.value, self.permuted)


# -- targets ----------------------------------------------------------------------------------
def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _number(v) -> float | None:
    """``v`` as a finite number, else None (booleans are categories, not numbers)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return None


def _label(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def target_values(examples: pd.DataFrame, target: str) -> tuple[pd.Series, bool]:
    """(the target's value of every example that has one, indexed by example_id; whether it is numeric).

    Values are floats for a numeric target, strings (JSON for non-strings) for a categorical one.
    """
    if target == "answer":
        raw = dict(zip(examples.example_id.astype(int), examples.answer))
    else:
        raw = {int(e): queries.parse_json(m).get(target) for e, m in zip(examples.example_id, examples.meta)}
    raw = {e: v for e, v in raw.items() if not _missing(v)}
    nums = {e: _number(v) for e, v in raw.items()}
    numeric = bool(raw) and all(x is not None for x in nums.values())
    vals = nums if numeric else {e: _label(v) for e, v in raw.items()}
    s = pd.Series(vals, dtype=np.float64 if numeric else object)
    s.index = s.index.astype(np.int64)
    return s.sort_index(), numeric


def meta_columns(examples: pd.DataFrame) -> list[str]:
    """The keys of ``examples.meta`` (the manifest's extra columns), sorted."""
    keys: set[str] = set()
    for m in examples.meta:
        keys.update(queries.parse_json(m))
    return sorted(keys)


# -- selectors --------------------------------------------------------------------------------
def first_box(raw) -> tuple[str, tuple[float, float, float, float]] | None:
    """(label, (x0, y0, x1, y1)) of the first box of an ``examples.boxes`` JSON list, else None."""
    try:
        boxes = json.loads(raw) if isinstance(raw, str) else None
        b = boxes[0]
        x0, y0, x1, y1 = (float(c) for c in b["box"])
        return str(b.get("label") or ""), (x0, y0, x1, y1)
    except (TypeError, ValueError, IndexError, KeyError):
        return None


def piece_text(token) -> str:
    """A token's text without word-piece marks, lowercased ('##ing' -> 'ing', '▁Red' -> 'red')."""
    if not isinstance(token, str):
        return ""
    for m in PIECE_MARKS:
        token = token.replace(m, "")
    return token.strip().lower()


def select_tokens(tokens: pd.DataFrame, examples: pd.DataFrame, selector: str) -> pd.DataFrame:
    """The tokens ``selector`` picks from one stream's token table.

    Parameters
    ----------
    tokens : example_id, token_idx, modality, role, token, seq_pos, x0, y0, x1, y1 of one stream.
    examples : example_id, boxes (JSON) of the examples.
    selector : one of :data:`SELECTORS`.

    Returns
    -------
    example_id, token_idx of the picked tokens, by (example_id, token_idx); for ``mean-image`` every
    image token (their vectors are averaged per example).
    """
    if selector not in SELECTORS:
        raise ProbeError(f"unknown token selector {selector!r}: use one of {', '.join(SELECTORS)}")
    cols = ["example_id", "token_idx"]
    t = tokens.copy()
    t["order"] = t.seq_pos.fillna(t.token_idx) if "seq_pos" in t else t.token_idx
    if selector == "mean-image":
        out = t[t.modality == "image"]
    elif selector == "last":
        prompt = t[(t.modality == "text") & ~t.role.isin(["generated", "pad"])]
        out = prompt.sort_values(["example_id", "order", "token_idx"]).groupby("example_id").tail(1)
    else:
        boxes = {int(e): first_box(b) for e, b in zip(examples.example_id, examples.boxes)}
        boxes = {e: b for e, b in boxes.items() if b is not None}
        if selector == "word":
            words = {e: (lab.split() or [""])[0].lower() for e, (lab, _) in boxes.items()}
            text = t[(t.modality == "text") & (t.role != "generated") & t.example_id.isin(words)]
            hit = text[text.token.map(piece_text).to_numpy() == text.example_id.map(words).to_numpy()]
            out = hit.sort_values(["example_id", "order", "token_idx"]).groupby("example_id").head(1)
        else:  # image-in-box
            img = t[(t.modality == "image") & t.example_id.isin(boxes)].dropna(subset=["x0", "y0", "x1", "y1"])
            box = np.array([boxes[int(e)][1] for e in img.example_id], dtype=np.float64).reshape(-1, 4)  # [token, 4]
            cx = (img.x0.to_numpy(np.float64) + img.x1.to_numpy(np.float64)) / 2
            cy = (img.y0.to_numpy(np.float64) + img.y1.to_numpy(np.float64)) / 2
            inside = (cx >= box[:, 0]) & (cx <= box[:, 2]) & (cy >= box[:, 1]) & (cy <= box[:, 3])
            out = img[inside]
    return out[cols].astype({"example_id": np.int64, "token_idx": np.int64}).sort_values(cols).reset_index(drop=True)


def features(vecs: pd.DataFrame, selector: str) -> tuple[np.ndarray, np.ndarray]:
    """(``[samples, dim]`` float32 features, ``[samples]`` example ids) from the selected tokens'
    vectors (example_id, token_idx, vec by example_id): one sample per token, or per example
    (the mean of its vectors) for ``mean-image``."""
    if vecs.empty:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    x = np.stack(vecs.vec.to_numpy()).astype(np.float32)  # [tokens, dim]
    ex = vecs.example_id.to_numpy(np.int64)
    if selector != "mean-image":
        return x, ex
    ids, inv = np.unique(ex, return_inverse=True)
    sums = np.zeros((len(ids), x.shape[1]))  # [examples, dim], summed in float64
    np.add.at(sums, inv, x)
    return (sums / np.bincount(inv)[:, None]).astype(np.float32), ids


# -- fitting ----------------------------------------------------------------------------------
def _model(numeric: bool):
    """The probe without its scaler (:func:`_out_of_fold` standardises each training fold once for all labelings)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    return Ridge(alpha=1.0) if numeric else LogisticRegression(solver=SOLVER, max_iter=MAX_ITER)


def split_folds(groups: np.ndarray, y: np.ndarray, folds: int, seed: int, numeric: bool) -> np.ndarray:
    """``[samples]`` the test fold of each sample: grouped by example (``groups``), stratified by class
    for a category, shuffled with ``seed``."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    fold = np.full(len(groups), -1, np.int64)
    if numeric:
        cv = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = cv.split(np.zeros(len(groups)), y, groups)
    else:
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # "least populated class": checked per example before
            warnings.simplefilter("ignore", UserWarning)
            splits = list(cv.split(np.zeros(len(groups)), y, groups))
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    return fold


def permuted_labels(example_labels: np.ndarray, permutations: int, seed: int) -> list[np.ndarray]:
    """The control task's labellings: each a permutation of the examples' labels (in example_id order)."""
    rng = np.random.default_rng(seed)
    return [example_labels[rng.permutation(len(example_labels))] for _ in range(permutations)]


def p_value(value: float, permuted: np.ndarray) -> float:
    """The permutation test: ``(1 + #{permuted >= value}) / (1 + permutations)``."""
    permuted = np.asarray(permuted, np.float64)
    return float((1 + np.sum(permuted >= value)) / (1 + len(permuted)))


def _out_of_fold(x: np.ndarray, labelings: list[np.ndarray], fold: np.ndarray, numeric: bool) -> list[np.ndarray]:
    """Out-of-fold predictions of the probe for each labeling (``[samples]`` floats, or class codes):
    per fold, the scaler is fitted on the training rows once and shared by every labeling, which is
    what ``make_pipeline(StandardScaler(), model)`` fitted per labeling computes."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    preds = [np.empty(len(y), dtype=y.dtype) for y in labelings]
    for k in np.unique(fold):
        test = fold == k
        train = ~test
        scaler = StandardScaler().fit(x[train])
        xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
        if numeric:  # ridge solves every target column on its own: one fit for all labelings
            ys = np.stack([y[train] for y in labelings], axis=1)  # [train, labelings]
            out = _model(True).fit(xtr, ys).predict(xte).reshape(int(test.sum()), len(labelings))
            for p, col in zip(preds, out.T):
                p[test] = col
            continue
        for p, y in zip(preds, labelings):
            if len(np.unique(y[train])) == 1:  # a permuted training fold of one class
                p[test] = y[train][0]
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                p[test] = _model(False).fit(xtr, y[train]).predict(xte)
    return preds


def _score(y: np.ndarray, pred: np.ndarray, numeric: bool) -> float:
    if numeric:
        from sklearn.metrics import r2_score

        return float(r2_score(y, pred))
    return float(np.mean(y == pred))


def fit_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, numeric: bool, folds: int = 5,
              permutations: int = 20, seed: int = 0, fold: np.ndarray | None = None) -> ProbeFit:
    """Cross-validate a linear probe of ``y`` on ``x`` and its control task.

    Parameters
    ----------
    x : ``[samples, dim]`` features.
    y : ``[samples]`` targets (the same for every sample of an example): floats when ``numeric``,
        else class labels.
    groups : ``[samples]`` example ids.
    numeric : ridge regression (r2) instead of logistic regression (accuracy).
    fold : the folds, when :func:`split_folds` already gave them for these groups and targets.
    """
    x = np.asarray(x, np.float32)  # the stored precision; float32 fits are twice as fast
    groups = np.asarray(groups, np.int64)
    if numeric:
        classes, y = None, np.asarray(y, np.float64)
    else:  # class codes in sorted label order (what LogisticRegression's own encoding does)
        classes, y = np.unique(np.asarray(y).astype(str), return_inverse=True)
    if fold is None:
        fold = split_folds(groups, y, folds, seed, numeric)
    ids, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    labelings = [y] + [yp[inv] for yp in permuted_labels(y[first], permutations, seed)]
    preds = _out_of_fold(x, labelings, fold, numeric)
    scores = [_score(lab, p, numeric) for lab, p in zip(labelings, preds)]
    value, permuted, pred = scores[0], np.array(scores[1:], np.float64), preds[0]
    confusion = None
    if not numeric:
        counts = np.zeros((len(classes), len(classes)), np.int64)  # [truth, predicted]
        np.add.at(counts, (y, pred), 1)
        confusion = {"labels": classes.tolist(), "counts": counts.tolist()}
        pred = classes[pred]
    return ProbeFit("r2" if numeric else "accuracy", value, permuted, fold, pred, confusion)


# -- the lake ---------------------------------------------------------------------------------
def _catalog(lake) -> tuple[Catalog, bool]:
    """(a catalog on ``lake``, whether this module opened it and must close it)."""
    if isinstance(lake, Catalog):
        return lake, False
    return Catalog(lake, timeout_s=QUERY_TIMEOUT_S, memory_limit="4GB"), True


def _check_run(cat: Catalog, run: str) -> None:
    check_run_name(run)
    if queries.run_info(cat, run).empty:
        runs = queries.list_runs(cat).run.tolist()
        raise ProbeError(f"run {run!r} is not in the lake at {cat.root}"
                         + (f"; its runs are: {', '.join(runs)}" if runs else "; it has no runs yet"))


def _keep_hidden(cat: Catalog, run: str) -> str:
    return str(queries.run_capture(cat, run).get("keep_hidden", "?"))


def _units(cat: Catalog, run: str, source: str) -> dict[str, list[tuple[int | None, str | None]]]:
    """``{stream: [(layer, module)]}``: where the source has stored vectors (module None for hidden)."""
    if source == "hidden":
        layers = pq.hidden_vector_layers(cat, run)
        if layers.empty:
            raise ProbeError(f"run {run!r} stores no hidden vectors to probe (it was extracted with --keep-hidden "
                             f"{_keep_hidden(cat, run)}); extract it again with --keep-hidden all (or sample:N) "
                             "under another --run name")
        return {s: [(int(x), None) for x in g.layer] for s, g in layers.groupby("stream", sort=True)}
    mods = pq.stored_modules(cat, run)
    if mods.empty:
        raise ProbeError(f"run {run!r} stores no module activations to probe with --source {source}: extract it "
                         "with --capture-modules PATTERN and --keep-hidden all (or sample:N), or use --source hidden")
    hit = mods[mods.module.map(lambda m: module_matches(source, m))]
    if hit.empty:
        names = sorted(set(mods.module))
        shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
        raise ProbeError(f"--source {source!r} matches no module stored for run {run!r} (`*` stands for one dotted "
                         f"segment, `**` any number); its modules are: {shown}")
    return {s: [(None if pd.isna(lay) else int(lay), str(m)) for lay, m in zip(g.layer, g.module)]
            for s, g in hit.groupby("stream", sort=True)}


def _vector_examples(cat: Catalog, run: str) -> set[int]:
    """Examples with a stored hidden vector in any stream (:func:`lake.queries.hidden_vector_examples`)."""
    out: set[int] = set()
    for s in sorted(set(pq.hidden_vector_layers(cat, run).stream)):
        out |= set(queries.hidden_vector_examples(cat, run, s).example_id.astype(int))
    return out


def probe_targets(lake, run: str) -> list[str]:
    """'answer' and the meta keys a probe can use (at least two distinct values among examples with vectors)."""
    cat, own = _catalog(lake)
    try:
        _check_run(cat, run)
        ex = pq.probe_examples(cat, run)
        have = _vector_examples(cat, run)
        ex = ex[ex.example_id.astype(int).isin(have)]
        out = []
        for target in ["answer", *meta_columns(ex)]:
            vals, _ = target_values(ex, target)
            if vals.nunique() >= 2:
                out.append(target)
        return out
    finally:
        if own:
            cat.close()


def check_samples(y_by_example: pd.Series, numeric: bool, folds: int, what: str) -> None:
    """ProbeError unless the examples taking part can be split into ``folds`` folds with two values."""
    n = len(y_by_example)
    if y_by_example.nunique() < 2:
        one = f" ({y_by_example.iloc[0]!r})" if n else ""
        raise ProbeError(f"{what} has {'one value' + one if n else 'no value'} among the {n} examples that take "
                         "part: a probe needs at least two")
    if n < folds:
        raise ProbeError(f"too few examples for {folds} folds: {what} has {n} examples that take part; "
                         "use a smaller --folds or more examples")
    if not numeric:
        counts = y_by_example.value_counts()
        if counts.min() < folds:
            raise ProbeError(f"too few examples for {folds} folds: class {counts.idxmin()!r} of {what} has "
                             f"{int(counts.min())} examples that take part (every class needs at least {folds}); "
                             "use a smaller --folds or more examples")


def run_probe(lake, run: str, spec: ProbeSpec, progress: Progress | None = None, *,
              fits: dict | None = None) -> pd.DataFrame:
    """The probes-table rows (every column of lake.schema.PROBES, without run) for every stream and
    layer that has vectors; progress(done: int, total: int, what: str) is called after each layer.

    ``fits``, when given, receives ``{(stream, layer, source): ProbeFit}`` (folds, permuted metrics,
    predictions) of every row. Raises :class:`ProbeError` (one sentence) when the probe cannot run.
    """
    if spec.selector not in SELECTORS:
        raise ProbeError(f"unknown token selector {spec.selector!r}: use one of {', '.join(SELECTORS)}")
    if int(spec.folds) < 2:
        raise ProbeError(f"--folds must be at least 2, not {spec.folds}")
    if int(spec.permutations) < 1:
        raise ProbeError(f"--permutations must be at least 1, not {spec.permutations}")
    cat, own = _catalog(lake)
    try:
        _check_run(cat, run)
        table = "hidden_states" if spec.source == "hidden" else "activations"
        units = _units(cat, run, spec.source)
        if spec.streams is not None:
            unknown = sorted(set(spec.streams) - set(units))
            if unknown:
                raise ProbeError(f"run {run!r} has no stored vectors of stream(s) {', '.join(unknown)} "
                                 f"for --source {spec.source}; it has {', '.join(units)}")
            units = {s: v for s, v in units.items() if s in set(spec.streams)}
        ex = pq.probe_examples(cat, run)
        if spec.target != "answer" and spec.target not in meta_columns(ex):
            cols = ", ".join(["answer", *meta_columns(ex)])
            raise ProbeError(f"run {run!r} has no target column {spec.target!r}: use one of {cols}")
        y_all, numeric = target_values(ex, spec.target)
        what = f"target {spec.target!r}"

        plans, errors = {}, []
        for stream, todo in units.items():  # what takes part, checked before any fit
            layer, module = todo[0]
            have = set(pq.vector_examples(cat, run, table, stream, layer=layer, module=module).example_id.astype(int))
            sel = select_tokens(pq.probe_tokens(cat, run, stream), ex, spec.selector)
            sel = sel[sel.example_id.isin(have) & sel.example_id.isin(y_all.index)]
            if sel.empty:
                errors.append(ProbeError(f"the {spec.selector} selector picks no token with a stored vector and a "
                                         f"{spec.target!r} value in stream {stream!r} of run {run!r}"))
                continue
            try:
                check_samples(y_all.loc[sorted(set(sel.example_id))], numeric, spec.folds,
                              f"{what} (stream {stream!r}, {spec.selector})")
            except ProbeError as e:
                errors.append(e)
                continue
            plans[stream] = sel
        if errors and (spec.streams is not None or not plans):
            raise errors[0]

        total = sum(len(units[s]) for s in plans)
        done, rows = 0, []
        created = datetime.now(timezone.utc)
        split: dict = {}  # the same samples at every layer get the same folds (StratifiedGroupKFold is slow)
        for stream, sel in plans.items():
            pairs = (sel.example_id.tolist(), sel.token_idx.tolist())
            for layer, module in units[stream]:
                vecs = pq.selected_vectors(cat, run, table, stream, pairs, layer=layer, module=module)
                x, groups = features(vecs, spec.selector)
                y = y_all.loc[groups].to_numpy()
                source = module or "hidden"
                check_samples(y_all.loc[np.unique(groups)], numeric, spec.folds,
                              f"{what} (stream {stream!r}, layer {layer}, {source})")
                key = (groups.tobytes(), str(y.tolist()))
                if key not in split:
                    labels = y.astype(np.float64) if numeric else np.unique(y.astype(str), return_inverse=True)[1]
                    split[key] = split_folds(groups, labels, spec.folds, spec.seed, numeric)
                fit = fit_probe(x, y, groups, numeric=numeric, folds=spec.folds, permutations=spec.permutations,
                                seed=spec.seed, fold=split[key])
                if fits is not None:
                    fits[(stream, layer, source)] = fit
                rows.append(dict(
                    probe=spec.key, stream=stream, layer=layer, source=source, target=spec.target,
                    selector=spec.selector, metric=fit.metric, value=fit.value, control=fit.control,
                    selectivity=fit.value - fit.control, p_value=fit.p_value, permutations=int(spec.permutations),
                    folds=int(spec.folds), n=int(len(np.unique(groups))), n_vectors=int(len(groups)),
                    confusion=None if fit.confusion is None else json.dumps(fit.confusion), created_at=created,
                ))
                done += 1
                if progress is not None:
                    progress(done, total, f"{stream} {module}" if module else f"{stream} layer {layer}")
        out = pd.DataFrame(rows, columns=COLUMNS)
        return out.astype({"layer": "Int32", "permutations": np.int32, "folds": np.int16, "n": np.int32,
                           "n_vectors": np.int32})
    finally:
        if own:
            cat.close()


def probe_file(key: str) -> str:
    """The file name of one probe's rows: a short hash of its key (keys hold spaces, `*` and `/`)."""
    return f"probe-{hashlib.sha1(key.encode()).hexdigest()[:16]}.parquet"


def write_probes(lake, run: str, rows: pd.DataFrame) -> str:
    """Write one probe's rows atomically (replacing an earlier run of the same probe key); return the file."""
    check_run_name(run)
    keys = sorted(set(rows.probe)) if len(rows) else []
    if len(keys) != 1:
        raise ProbeError(f"write_probes takes the rows of one probe, got {len(keys)} probe keys")
    cat, own = _catalog(lake)
    try:
        rel = f"{partition_rel(PROBES, {'run': run})}/{probe_file(keys[0])}"
        data = pa.Table.from_pandas(rows[COLUMNS].reset_index(drop=True), preserve_index=False)
        write_table(cat.store, rel, PROBES, data, {"vlatlas.run": run, "vlatlas.probe": keys[0]})
        return cat.store.url(rel)
    finally:
        if own:
            cat.close()


@dataclass
class ProbeSummary:
    """What :func:`probe` did; ``table()`` is the command's printout."""

    rows: pd.DataFrame
    path: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        d = self.rows
        lines = [f"{'stream':<10} {'layer':>5} {'source':<12} {d.metric.iloc[0] if len(d) else 'metric':>9} "
                 f"{'control':>8} {'select.':>8} {'p':>6}"]
        for r in d.itertuples():
            src = r.source if len(r.source) <= 12 else "…" + r.source[-11:]
            lay = "-" if pd.isna(r.layer) else int(r.layer)
            lines.append(f"{r.stream:<10} {lay:>5} {src:<12} {r.value:>9.3f} {r.control:>8.3f} "
                         f"{r.selectivity:>+8.3f} {r.p_value:>6.3f}")
        return "\n".join(lines)


def probe(lake, run: str, spec: ProbeSpec, *, progress: bool = True) -> ProbeSummary:
    """``vlatlas probe``: run the probe with a progress bar and write its rows to the lake."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    bars: list = []  # opened at the first finished layer: a refused probe prints nothing but its sentence

    def step(done: int, total: int, what: str) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="layer", desc=f"probe {spec.key}", disable=not progress,
                             dynamic_ncols=True))
        bars[0].set_postfix_str(what)
        bars[0].update(done - bars[0].n)

    try:
        rows = run_probe(lake, run, spec, step)
    finally:
        for bar in bars:
            bar.close()
    summary = ProbeSummary(rows)
    summary.path = write_probes(lake, run, rows)
    summary.seconds = time.perf_counter() - t0
    return summary
