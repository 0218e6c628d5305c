"""openTSNE maps of hidden states, aligned across layers: the lake's ``embeddings`` table.

``vlatlas embed --lake DIR --run NAME`` draws, for every stream of a run, one
sample of tokens from all examples with stored hidden vectors (seeded, stratified
by modality; a run extracted with ``--keep-hidden sample:N`` stores the vectors
of N examples and only the norms of the others) and fits a
t-SNE map of their hidden states at every stored hidden-state layer. The same
tokens are mapped at every layer of a stream, and the maps are *aligned*:

- layer ``l0`` (the lowest stored) starts from the PCA of its vectors
  (``openTSNE.initialization.pca``) and is optimised the usual way (early
  exaggeration, then plain gradient descent);
- layer ``l`` starts from the map of the previous stored layer, rescaled
  (``openTSNE.initialization.rescale``) and is optimised without early
  exaggeration, so a token moves only as far as its neighbourhood changed
  between the two layers, and its path through the layers can be read.

Affinities are perplexity-based over cosine distances of the full vectors.
Everything random is seeded (the sample, PCA's jitter, the kNN index) and the
optimisation runs on ``n_jobs`` fixed threads, so the same lake, run and seed
give identical coordinates.

The maps are written, atomically, to ``<lake>/embeddings/run=<run>/part-tsne.parquet``
(``method = 'tsne'``); running the command again replaces them. The file's
Parquet metadata ``vlatlas.tsne`` records the fit (seed, perplexity, metric,
kNN and gradient methods, iterations, sample sizes).

Placing new tokens
------------------
:func:`place` puts the tokens of any examples onto a finished map with
``openTSNE.TSNEEmbedding.transform``: each new token is initialised at the
median of its nearest sampled neighbours and optimised against the fixed map.
Nothing but the lake is needed: the map's sample *is* the ``embeddings``
table's rows, so :func:`reference_map` reads the sample's vectors back from
``hidden_states``, indexes them for nearest-neighbour search with the fit's
metric and kNN method (recorded in the file's metadata), and wraps the stored
coordinates in a ``TSNEEmbedding`` whose affinities give ``transform`` what it
uses: the affinities of new tokens to the sample. No pickles are stored (a
lake may come from someone else, and unpickling runs code).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lake import queries
from lake.catalog import Catalog
from lake.schema import EMBEDDINGS
from lake.store import Store, open_store
from lake.commit import partition_rel
from lake.writer import check_run_name, conform, with_metadata

METHOD = "tsne"
FILE_NAME = "part-tsne.parquet"
META_KEY = "vlatlas.tsne"
DEFAULT_SAMPLE = 5000
QUERY_TIMEOUT_S = 600.0  # reading a layer of a large run can take longer than the app's 10 s


class EmbedError(ValueError):
    """The run cannot be mapped (missing, incomplete, no hidden states); the message says what to do."""


@dataclass(frozen=True)
class TSNEConfig:
    """How the maps are fitted; recorded in the file's metadata.

    Parameters
    ----------
    perplexity : effective number of neighbours of each token (affinities use
        ``3 * perplexity`` nearest neighbours).
    metric : distance between hidden vectors (``cosine``: their direction, not
        their norm, which grows through the layers).
    early_exaggeration, early_exaggeration_iter : the first layer's exaggeration phase.
    n_iter : plain iterations of the first layer.
    n_iter_aligned : iterations of every later layer, started from the previous
        layer's map with no exaggeration phase.
    n_jobs : threads (fixed, so results do not depend on the machine).
    exact_below : exact nearest neighbours up to this many tokens, Annoy above.
    bh_below : Barnes-Hut gradients below this many tokens, FFT interpolation above.
    place_perplexity, place_n_iter : :func:`place`'s ``transform`` (openTSNE's defaults).
    """

    perplexity: float = 30.0
    metric: str = "cosine"
    early_exaggeration: float = 12.0
    early_exaggeration_iter: int = 250
    n_iter: int = 500
    n_iter_aligned: int = 300
    n_jobs: int = 1
    exact_below: int = 20_000
    bh_below: int = 10_000
    place_perplexity: float = 5.0
    place_n_iter: int = 250

    def knn_method(self, n: int) -> str:
        return "exact" if n <= self.exact_below else "annoy"

    def gradient_method(self, n: int) -> str:
        return "bh" if n < self.bh_below else "fft"

    def effective_perplexity(self, n: int) -> float:
        """The perplexity actually used for ``n`` tokens (at most ``(n - 1) / 3``)."""
        return float(max(1.0, min(self.perplexity, (n - 1) / 3)))


@dataclass
class EmbedSummary:
    """What :func:`embed` did; ``line()`` is the command's last line."""

    run: str
    lake: str
    seed: int
    path: str = ""
    streams: dict[str, dict] = field(default_factory=dict)  # stream -> {n_tokens, n_text, n_image, layers, n_examples}
    seconds: float = 0.0

    def line(self) -> str:
        parts = [f"stream {s!r}: {d['n_tokens']} tokens ({d['n_text']} text, {d['n_image']} image) "
                 f"x {len(d['layers'])} layers" + (f", from the {d['n_examples']} examples with hidden vectors"
                                                   if d.get("n_examples") is not None else "")
                 for s, d in self.streams.items()]
        return (f"mapped run {self.run!r} in {self.lake} with t-SNE (seed {self.seed}): {'; '.join(parts)} "
                f"in {self.seconds:.1f} s -> {self.path}")


# -- the sample -------------------------------------------------------------------------------
def sample_tokens(keys: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of ``n`` tokens, stratified by modality.

    Every modality gets an equal share of ``n`` (all of its tokens when it has
    fewer; what it leaves goes to the others), drawn uniformly without
    replacement from that modality's tokens of all examples, so a run with 200
    patches and 10 words per example still shows its words.

    Parameters
    ----------
    keys : example_id, token_idx, modality of every candidate token.
    n : sample size (all tokens when there are fewer).
    seed : seeds the draw.

    Returns
    -------
    The sampled rows of ``keys``, sorted by (example_id, token_idx).
    """
    keys = keys.sort_values(["example_id", "token_idx"], kind="stable").reset_index(drop=True)
    if n >= len(keys):
        return keys
    rng = np.random.default_rng(seed)
    groups = {m: np.flatnonzero((keys.modality == m).to_numpy()) for m in sorted(keys.modality.dropna().unique())}
    other = np.flatnonzero(keys.modality.isna().to_numpy())
    if len(other):
        groups["(none)"] = other
    quota = {m: 0 for m in groups}
    left, open_ = int(n), sorted(groups, key=lambda m: len(groups[m]))
    while left > 0 and open_:  # water-filling: equal shares, capped by what each modality has
        share = max(1, left // len(open_))
        for m in list(open_):
            take = min(share, len(groups[m]) - quota[m], left)
            quota[m] += take
            left -= take
            if quota[m] == len(groups[m]):
                open_.remove(m)
            if left == 0:
                break
    chosen = np.concatenate([rng.choice(groups[m], quota[m], replace=False) for m in groups if quota[m]])
    return keys.iloc[np.sort(chosen)].reset_index(drop=True)


def to_matrix(vecs: pd.Series | np.ndarray) -> np.ndarray:
    """A column of float lists (DuckDB ``FLOAT[]`` read into pandas) as a ``[rows, dim]`` float32 matrix."""
    arr = vecs.to_numpy() if isinstance(vecs, pd.Series) else vecs
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    return np.stack(arr).astype(np.float32, copy=False)  # [rows, dim]


# -- fitting ------------------------------------------------------------------------------------
def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _cosine_knn_class():
    from openTSNE.nearest_neighbors import KNNIndex

    class CosineKNN(KNNIndex):
        """Exact nearest neighbours by cosine distance (``1 - cos``).

        openTSNE's own exact search finds the neighbours on unit vectors and
        then recomputes each row's cosine distances in a Python loop (seconds
        for a few thousand tokens); on unit vectors ``1 - cos = |u - v|^2 / 2``,
        so the brute-force Euclidean search already has them.
        """

        VALID_METRICS = ["cosine"]

        def fit(self):
            """Index the data for :meth:`query` (without finding the data's own neighbours)."""
            from sklearn.neighbors import NearestNeighbors

            self.index = NearestNeighbors(algorithm="brute", metric="euclidean").fit(_unit_rows(self.data))
            return self

        def build(self):
            self.fit()
            d, idx = self.index.kneighbors(n_neighbors=min(self.k, self.n_samples - 1))  # excludes each row itself
            return idx, self._cosine(d)

        def query(self, query, k):
            d, idx = self.index.kneighbors(_unit_rows(query), n_neighbors=min(int(k), self.n_samples))
            return idx, self._cosine(d)

        @staticmethod
        def _cosine(euclid: np.ndarray) -> np.ndarray:
            return np.clip(np.asarray(euclid, np.float64) ** 2 / 2.0, 0.0, 2.0)

    return CosineKNN


def _affinities(x: np.ndarray, cfg: TSNEConfig, seed: int):
    """Perplexity-based affinities of the rows of ``x`` (kNN: exact cosine, or Annoy for large samples)."""
    from openTSNE import affinity

    n = len(x)
    perplexity = cfg.effective_perplexity(n)
    if cfg.knn_method(n) == "exact" and cfg.metric == "cosine":
        knn = _cosine_knn_class()(x, k=min(n - 1, int(3 * perplexity)), metric="cosine")
        return affinity.PerplexityBasedNN(perplexity=perplexity, knn_index=knn, n_jobs=cfg.n_jobs)
    return affinity.PerplexityBasedNN(x, perplexity=perplexity, method=cfg.knn_method(n),
                                      metric=cfg.metric, n_jobs=cfg.n_jobs, random_state=seed)


def _placement_affinities(x: np.ndarray, cfg: TSNEConfig, seed: int):
    """What ``TSNEEmbedding.transform`` needs of a finished map's affinities: the kNN index of its
    sample, for the affinities of new points to it (``to_new``, openTSNE's own). The sample's
    affinities among themselves only served the fit, so with exact search they are not recomputed."""
    import scipy.sparse as sp
    from openTSNE import affinity

    n = len(x)
    if not (cfg.knn_method(n) == "exact" and cfg.metric == "cosine"):
        return _affinities(x, cfg, seed)  # Annoy: the index is built as the fit built it

    class PlacementAffinities(affinity.Affinities):
        to_new = affinity.PerplexityBasedNN.to_new
        check_perplexity = staticmethod(affinity.PerplexityBasedNN.check_perplexity)

    aff = PlacementAffinities()
    aff.knn_index = _cosine_knn_class()(x, k=min(n - 1, int(3 * cfg.effective_perplexity(n))), metric="cosine").fit()
    aff.P = sp.csr_matrix((n, n))  # unused by transform; TSNEEmbedding checks its shape
    aff.perplexity, aff.n_jobs = cfg.effective_perplexity(n), cfg.n_jobs
    return aff


def _tsne_embedding(init: np.ndarray, aff, cfg: TSNEConfig, seed: int, gradient: str | None = None):
    from openTSNE import TSNEEmbedding

    return TSNEEmbedding(init, aff, n_jobs=cfg.n_jobs, random_state=seed,
                         negative_gradient_method=gradient or cfg.gradient_method(len(init)))


def fit_aligned(mats: Iterable[np.ndarray], cfg: TSNEConfig = TSNEConfig(), seed: int = 0,
                aligned: bool = True) -> Iterator[np.ndarray]:
    """Fit one map per matrix (the same tokens, one matrix per layer, in layer order).

    Parameters
    ----------
    mats : ``[tokens, dim]`` float32 matrices, the same rows in every one.
    cfg : the fit's settings.
    seed : random state of PCA, the kNN index and jitter.
    aligned : start each map from the previous one (rescaled); ``False`` fits
        every layer on its own from PCA (for comparisons).

    Yields
    ------
    ``[tokens, 2]`` float64 coordinates of each layer's map.
    """
    from openTSNE import initialization

    prev = None
    for x in mats:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) < 4:
            raise EmbedError(f"t-SNE needs at least 4 tokens, got {len(x)}")
        aff = _affinities(x, cfg, seed)
        if prev is None or not aligned:
            init = initialization.pca(x, random_state=seed)
            emb = _tsne_embedding(init, aff, cfg, seed)
            emb = emb.optimize(cfg.early_exaggeration_iter, exaggeration=cfg.early_exaggeration, momentum=0.5)
            emb = emb.optimize(cfg.n_iter, momentum=0.8)
        else:
            emb = _tsne_embedding(initialization.rescale(prev), aff, cfg, seed)
            emb = emb.optimize(cfg.n_iter_aligned, momentum=0.8)
        prev = np.asarray(emb, dtype=np.float64)
        yield prev


# -- the lake ---------------------------------------------------------------------------------
def _catalog(lake) -> Catalog:
    return Catalog(lake, timeout_s=QUERY_TIMEOUT_S, memory_limit="4GB")


def check_run(cat: Catalog, run: str) -> pd.DataFrame:
    """The run's hidden-state layers (stream, layer, n); EmbedError when there is nothing to map."""
    info = queries.run_info(cat, run)
    if info.empty:
        runs = queries.list_runs(cat).run.tolist()
        raise EmbedError(f"run {run!r} is not in the lake at {cat.root}"
                         + (f"; its runs are: {', '.join(runs)}" if runs else "; it has no runs yet"))
    if info.status.iloc[0] != "complete":
        raise EmbedError(f"run {run!r} is not complete (status {info.status.iloc[0]}): finish it by running "
                         "the same `vlatlas extract` command again, then map it")
    layers = queries.hidden_layers(cat, run)
    keep = queries.parse_json(info.capture.iloc[0]).get("keep_hidden", "?")
    if layers.empty:
        raise EmbedError(f"run {run!r} has no hidden states to map (it was extracted with --keep-hidden {keep}); "
                         "extract it again with --keep-hidden all (or a list of layers) under another --run name")
    if all(queries.hidden_vector_examples(cat, run, s).empty for s in sorted(layers.stream.unique())):
        raise EmbedError(f"run {run!r} stores hidden-state norms but no hidden vectors to map (it was extracted "
                         f"with --keep-hidden {keep}); extract it again with --keep-hidden sample:N (N > 0) or all "
                         "under another --run name")
    return layers


def no_vectors_message(cat: Catalog, run: str, stream: str, missing: Iterable[int]) -> str:
    """One sentence: these examples have no stored hidden vectors, and which examples do."""
    keep = queries.run_capture(cat, run).get("keep_hidden", "?")
    have = [int(i) for i in queries.hidden_vector_examples(cat, run, stream).example_id]
    shown = ", ".join(map(str, have[:20])) + (", …" if len(have) > 20 else "")
    ids = ", ".join(map(str, sorted(missing)))
    return (f"run {run!r} stores no hidden vectors of example(s) {ids} (it keeps vectors for a sample of "
            f"examples only: --keep-hidden {keep}); "
            + (f"pick one of the {len(have)} examples with vectors: {shown}" if have
               else "no example of this run has them"))


def embed(lake: str | Path, run: str, *, n_tokens: int | None = None, seed: int = 0, progress: bool = True,
          config: TSNEConfig = TSNEConfig(), streams: Iterable[str] | None = None) -> EmbedSummary:
    """Fit aligned t-SNE maps of a run's hidden states and write them to ``embeddings``.

    Parameters
    ----------
    lake : the lake's root folder.
    run : the run to map.
    n_tokens : tokens per stream, drawn from all examples (default :data:`DEFAULT_SAMPLE`).
    seed : seeds the sample and the fit; the same seed gives identical maps.
    progress : show a progress bar over the layers.
    config : fit settings (:class:`TSNEConfig`).
    streams : only these streams (default: every stream with hidden states).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    check_run_name(run)
    n_tokens = DEFAULT_SAMPLE if n_tokens is None else int(n_tokens)
    if n_tokens < 4:
        raise EmbedError(f"--sample must be at least 4 tokens, not {n_tokens}")
    store = open_store(lake)
    root = store.uri
    cat = _catalog(store)
    try:
        layers = check_run(cat, run)
        todo = {s: sorted(int(x) for x in g.layer) for s, g in layers.groupby("stream", sort=True)}
        if streams is not None:
            unknown = sorted(set(streams) - set(todo))
            if unknown:
                raise EmbedError(f"run {run!r} has no hidden states of stream(s) {', '.join(unknown)}; "
                                 f"it has {', '.join(todo)}")
            todo = {s: v for s, v in todo.items() if s in set(streams)}
        summary = EmbedSummary(run=run, lake=str(root), seed=seed)
        tables, fits = [], {}
        bar = tqdm(total=sum(len(v) for v in todo.values()), unit="layer", desc=f"embed {run}",
                   disable=not progress, dynamic_ncols=True)
        try:
            for stream, stream_layers in todo.items():
                keys = queries.hidden_token_keys(cat, run, stream, len(stream_layers))  # tokens with vectors
                sample = sample_tokens(keys, n_tokens, seed)
                if len(sample) < 4:
                    raise EmbedError(f"run {run!r}, stream {stream!r} has only {len(sample)} tokens with hidden "
                                     "vectors at every layer; t-SNE needs at least 4")
                pairs = (sample.example_id.tolist(), sample.token_idx.tolist())

                def mats() -> Iterator[np.ndarray]:
                    for layer in stream_layers:
                        bar.set_postfix_str(f"{stream} layer {layer}")
                        v = queries.hidden_vectors(cat, run, stream, layer, pairs=pairs)
                        if len(v) != len(sample):
                            raise EmbedError(f"run {run!r}: stream {stream!r} layer {layer} lacks hidden states "
                                             "of some sampled tokens; is the lake complete?")
                        yield to_matrix(v.vec)

                for layer, xy in zip(stream_layers, fit_aligned(mats(), config, seed)):
                    tables.append(pa.table({
                        "stream": pa.array([stream] * len(sample)),
                        "layer": pa.array(np.full(len(sample), layer, np.int32)),
                        "example_id": pa.array(sample.example_id.to_numpy(np.int64)),
                        "token_idx": pa.array(sample.token_idx.to_numpy(np.int32)),
                        "method": pa.array([METHOD] * len(sample)),
                        "x": pa.array(xy[:, 0].astype(np.float32)), "y": pa.array(xy[:, 1].astype(np.float32)),
                    }))
                    bar.update(1)
                n_text = int((sample.modality == "text").sum())
                n_image = int((sample.modality == "image").sum())
                summary.streams[stream] = dict(n_tokens=len(sample), n_text=n_text, n_image=n_image,
                                               layers=stream_layers, n_examples=int(keys.example_id.nunique()))
                n = len(sample)
                fits[stream] = dict(n_tokens=n, n_text=n_text, n_image=n_image, layers=stream_layers,
                                    n_examples_with_vectors=int(keys.example_id.nunique()),
                                    knn_method=config.knn_method(n), gradient=config.gradient_method(n),
                                    perplexity=config.effective_perplexity(n))
        finally:
            bar.close()
        data = conform(EMBEDDINGS, pa.concat_tables(tables))
        rel = _maps_rel(run)
        import openTSNE

        meta = {"seed": seed, "sample": n_tokens, "config": asdict(config), "streams": fits,
                "opentsne": openTSNE.__version__}
        store.write_parquet(rel, with_metadata(data, {"vlatlas.run": run, META_KEY: json.dumps(meta)}))
        summary.path = store.url(rel)
    finally:
        cat.close()
    _REFERENCES.clear()
    summary.seconds = time.perf_counter() - t0
    return summary


def _maps_rel(run: str) -> str:
    return f"{partition_rel(EMBEDDINGS, {'run': run})}/{FILE_NAME}"


def maps_stamp(lake: str | Path | Store, run: str) -> int | None:
    """The modification time (ns) of a run's maps file, None without maps: a cache key that
    changes when ``vlatlas embed`` runs again."""
    store = open_store(lake)
    rel = _maps_rel(run)
    return store.mtime_ns(rel) if store.is_file(rel) else None


def fit_info(lake: str | Path | Store, run: str) -> dict | None:
    """The ``vlatlas.tsne`` metadata of a run's maps (None when the run has none)."""
    store = open_store(lake)
    rel = _maps_rel(run)
    if not store.is_file(rel):
        return None
    with store.fs.open_input_file(store.path(rel)) as f:
        meta = pq.read_schema(f).metadata or {}
    raw = meta.get(META_KEY.encode())
    return json.loads(raw) if raw else None


# -- placing new tokens -----------------------------------------------------------------------
_REFERENCES: OrderedDict = OrderedDict()
_MAX_REFERENCES = 16


def reference_map(cat: Catalog, run: str, stream: str, layer: int):
    """The finished map of ``(run, stream, layer)`` as an openTSNE ``TSNEEmbedding``, ready to ``transform``.

    Rebuilt from the lake: the stored coordinates, and the nearest-neighbour
    index of the sample's hidden vectors (read back from ``hidden_states``) with
    the fit's recorded metric and kNN method, from which ``transform`` computes
    the affinities of new tokens to the sample. Cached in this process (keyed
    by the maps file's modification time).

    Returns
    -------
    (embedding, offset, keys, config): the embedding (centred, as ``transform``
    wants it), the offset to add to its coordinates to return to the stored
    frame, the sample's (example_id, token_idx) in row order, and the fit's
    :class:`TSNEConfig`.
    """
    path = cat.store.url(_maps_rel(run))
    info = fit_info(cat.store, run)
    if info is None or stream not in info.get("streams", {}):
        raise EmbedError(f"run {run!r} has no t-SNE map of stream {stream!r}: add the maps with "
                         f"`vlatlas embed --lake {cat.root} --run {run}`")
    key = (path, maps_stamp(cat.store, run), run, stream, int(layer))
    if key in _REFERENCES:
        _REFERENCES.move_to_end(key)
        return _REFERENCES[key]
    d = queries.map_vectors(cat, run, stream, int(layer))
    if d.empty:
        raise EmbedError(f"run {run!r} has no map of stream {stream!r} at layer {layer}")
    known = {f.name for f in TSNEConfig.__dataclass_fields__.values()}
    cfg = TSNEConfig(**{k: v for k, v in info.get("config", {}).items() if k in known})
    aff = _placement_affinities(to_matrix(d.vec), cfg, int(info.get("seed", 0)))
    xy = d[["x", "y"]].to_numpy(np.float64)  # [tokens, 2]
    offset = (xy.max(0) + xy.min(0)) / 2  # transform() centres the map in place; we undo it on the way out
    # FFT gradients for placing: the map is fixed, so its interpolation grid is computed once
    # (Barnes-Hut would rebuild its tree at every iteration: ~6x slower here).
    emb = _tsne_embedding(xy - offset, aff, cfg, int(info.get("seed", 0)), gradient="fft")
    out = (emb, offset, d[["example_id", "token_idx"]].reset_index(drop=True), cfg)
    _REFERENCES[key] = out
    while len(_REFERENCES) > _MAX_REFERENCES:
        _REFERENCES.popitem(last=False)
    return out


def place(lake: str | Path, run: str, stream: str, layer: int, example_ids: Iterable[int], *,
          catalog: Catalog | None = None) -> pd.DataFrame:
    """Put every token of the given examples onto the finished map of ``(stream, layer)``.

    Tokens that are in the map's sample keep their stored coordinates; the
    others are placed with ``TSNEEmbedding.transform`` (each is initialised at
    the median position of its 25 nearest sampled neighbours in the hidden
    space and optimised against the fixed map, perplexity 5, 250 iterations),
    so they land where their neighbours are.

    Parameters
    ----------
    lake : the lake's root folder (ignored when ``catalog`` is given).
    run, stream, layer : the map.
    example_ids : the examples whose tokens to place.
    catalog : an open catalog to use (the app's), else one is opened.

    Returns
    -------
    DataFrame with example_id, token_idx, x, y, placed (False for sampled tokens).

    Raises
    ------
    EmbedError : when some of the examples have hidden states but no stored vectors
        (``--keep-hidden sample:N``); the message names the examples that have them.
    """
    cols = ["example_id", "token_idx", "x", "y", "placed"]
    ids = sorted({int(i) for i in example_ids})
    cat = catalog or _catalog(lake)
    try:
        emb, offset, keys, cfg = reference_map(cat, run, stream, layer)
        if not ids:
            return pd.DataFrame(columns=cols)
        new = queries.hidden_vectors(cat, run, stream, int(layer), example_ids=ids)
        have_hidden = set(queries.hidden_norm_examples(cat, run, stream, int(layer), ids).example_id.astype(int))
        missing = have_hidden - set(new.example_id.astype(int))
        if missing:
            raise EmbedError(no_vectors_message(cat, run, stream, missing))
        if new.empty:
            return pd.DataFrame(columns=cols)
        stored = queries.embedding_tokens(cat, run, stream, int(layer), ids)
        have = set(zip(stored.example_id, stored.token_idx))
        mask = np.array([(e, t) in have for e, t in zip(new.example_id, new.token_idx)], dtype=bool)
        out = new[["example_id", "token_idx"]].copy()
        out["x"], out["y"], out["placed"] = np.nan, np.nan, ~mask
        if have:
            s = stored.set_index(["example_id", "token_idx"])
            idx = pd.MultiIndex.from_frame(out.loc[mask, ["example_id", "token_idx"]])
            out.loc[mask, "x"] = s.x.reindex(idx).to_numpy(np.float64)
            out.loc[mask, "y"] = s.y.reindex(idx).to_numpy(np.float64)
        if (~mask).any():
            x = to_matrix(new.vec[~mask])
            pos = np.asarray(emb.transform(x, perplexity=min(cfg.place_perplexity, (len(emb) - 1) / 3),
                                           n_iter=cfg.place_n_iter), dtype=np.float64) + offset
            out.loc[~mask, "x"], out.loc[~mask, "y"] = pos[:, 0], pos[:, 1]
        return out.astype({"x": np.float64, "y": np.float64, "placed": bool}).reset_index(drop=True)
    finally:
        if catalog is None:
            cat.close()


def place_all(lake: str | Path, run: str, example_ids: Iterable[int]) -> pd.DataFrame:
    """:func:`place` on every map of a run (``vlatlas embed --place``): stream, layer, example_id,
    token_idx, x, y, placed."""
    info = fit_info(lake, run)
    if info is None:
        raise EmbedError(f"run {run!r} has no maps to place tokens on: add them with "
                         f"`vlatlas embed --lake {lake} --run {run}`")
    cat = _catalog(lake)
    try:
        known = set(queries.examples(cat, run).example_id.astype(int))
        missing = sorted(set(int(i) for i in example_ids) - known)
        if missing:
            raise EmbedError(f"run {run!r} has no example(s) {', '.join(map(str, missing))}")
        parts = [place(lake, run, stream, layer, example_ids, catalog=cat).assign(stream=stream, layer=layer)
                 for stream, d in info["streams"].items() for layer in d["layers"]]
    finally:
        cat.close()
    cols = ["stream", "layer", "example_id", "token_idx", "x", "y", "placed"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)
