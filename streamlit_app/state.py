"""The app's shared state: URL query parameters <-> session state, cached lake access.

Every selection lives in ``st.session_state`` under a *canonical* key that is
also its URL query parameter, so a view can be shared by its URL:

==========  =================================================================
``lake``    lake root (only in the URL when it differs from ``$VLATLAS_LAKE``)
``run``     run name
``ex``      example_id
``stream``  attention stream (``self``, ``vision``, ``text``, ``cross``, ``lm``)
``layer``   0-based layer
``head``    0-based head, or ``mean`` (mean over heads)
``stat``    head statistic (``t2i`` …)
``norm``    ``raw`` / ``z_example`` / ``z_dataset``
``scope``   head summary of the ``example`` or the mean over the ``filtered`` examples
``tokens``  selected query text tokens, by text_pos, e.g. ``1,2``
``patches`` selected query patches, by position, e.g. ``r1c2,r0c3`` (``t1r0c2``: row 0, column 2 of tile 1)
``tile``    the Attention page's image tokens of a tiled image: ``all`` (every tile on the original
            image), ``0`` (the base image) or ``1``.. (one crop or tile)
``nosink``  the Head summary leaves sink tokens out (``--explain sinks`` runs)
``stretch`` the Attention page colours each panel to its own largest value (default: 0 to 1)
``nospecial`` the Hidden states page leaves special tokens out of the nearest neighbours
``method``  the Attention page's method: ``attention``, ``value`` (value-weighted), ``rollout``,
            ``relevancy`` (the last three when the run was extracted with ``--explain``)
``q`` ``answer`` ``pred`` ``correct`` ``split`` ``mkey`` ``mval``
            the example filter (text search, answer, prediction, true/false,
            split, meta key and value)
``cmp_stat`` ``cmp_b_run`` ``cmp_test`` ``cmp_corr`` ``cmp_map`` ``cmp_head`` ``cmp_rank``
            the Compare page: statistic, run B (empty: B is a slice of this
            run), ``t``/``rank`` test, ``holm``/``bh`` correction, map colour
            ``diff``/``effect``, drilled head as ``layer,head``, heads ranked by
            ``diff`` (|B − A|) or ``effect`` (|effect size|)
``a_q`` … ``a_mval``, ``b_q`` … ``b_mval``
            the Compare page's filters of groups A and B (keys as above)
``sql``      the SQL page's query; ``sql_x`` ``sql_y`` ``sql_color`` ``sql_mark`` its quick chart
``expage``  the page of the Examples table (1-based)
``hlayer`` ``color`` ``tok`` ``nn``
            the Hidden states page: map layer (hidden-state layer, 0 = embeddings), point
            colour, selected token (token_idx in the selected example), neighbour scope
``intervention`` ``ivstream`` ``ivstat`` ``ivnorm``
            the Interventions page: the intervention shown (its key), the stream of its heads
            heatmap, the attention statistic beside it, the curves' score (``score`` or ``relative``)
==========  =================================================================

Each page declares its own keys, defaults and URL parsers in a :class:`PageState` (``ATTENTION``,
``COMPARE`` …; :data:`SHARED` for what every page shares), so a page's selections can be reset
without touching another page's, and no two pages can claim one key.

Widgets never own a canonical key (Streamlit deletes the state of widgets
that are not on the current page): :func:`bind` gives a widget its own key
``w_<name>``, seeded from the canonical value, and copies changes back.

The lake's default root comes from the environment variable ``VLATLAS_LAKE``,
read here and nowhere else.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd
import streamlit as st

from lake import queries
from lake.catalog import Catalog, open_catalog
from lake.queries import ExampleFilter
from pipeline.capture_config import ExplainSet
from streamlit_app import views

ENV_LAKE = "VLATLAS_LAKE"
PATCH_KEY = re.compile(r"^(?:t\d+)?r(\d+)c(\d+)$")  # views.patch_label: tile (when not the base image), row, column


# -- each page's keys ------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip() != ""]


def _patch_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if PATCH_KEY.match(x.strip())]


def _bool(s: str) -> bool | None:
    return {"true": True, "false": False}.get(s.strip().lower())


@dataclass(frozen=True)
class PageState:
    """One page's own selections: its canonical keys (each also a URL parameter) with their defaults
    and, where a URL value needs it, a parser. Every page declares its keys here, apart from the
    others'; :data:`SHARED` holds what every page shares (lake, run, example, head, the filter)."""

    page: str
    defaults: dict[str, object]
    parse: dict[str, object] = field(default_factory=dict)

    def reset(self) -> None:
        """Put this page's keys back to their defaults (the other pages' keys are left alone)."""
        for k, d in self.defaults.items():
            set_value(k, list(d) if isinstance(d, list) else d)


def _choice(options: tuple[str, ...]):
    """A URL parser that keeps a value among ``options`` and falls back to the first."""
    return lambda s: s if s in options else options[0]


FILTER_KEYS = ("q", "answer", "pred", "correct", "split", "mkey", "mval")
SHARED = PageState("every page", {
    "lake": None, "run": None, "ex": None, "stream": None, "layer": None, "head": None, "stat": "t2i",
    **{k: None for k in FILTER_KEYS},
}, {"ex": int, "layer": int, "head": lambda s: "mean" if s == "mean" else int(s), "correct": _bool})
EXAMPLES = PageState("Examples", {"expage": 1}, {"expage": lambda s: max(1, int(s))})
HEAD_SUMMARY = PageState("Head summary", {"norm": "raw", "scope": "filtered", "nosink": False}, {
    "norm": _choice(queries.NORMS), "scope": _choice(("filtered", "example")), "nosink": _bool})
# the query text tokens (text_pos), patches, method, colours, tile; BLIP-2's learned query tokens (their
# seq_pos) on its ``qformer_cross`` stream, and the Q-Former cross layer and head the composed view
# "LM token -> query tokens -> patches" goes through
ATTENTION = PageState("Attention", {"tokens": [], "patches": [], "method": "attention", "stretch": False,
                                    "tile": "all", "qtokens": [], "xlayer": None, "xhead": "mean"}, {
    "tokens": _int_list, "patches": _patch_list, "stretch": _bool, "tile": lambda s: "all" if s == "all" else int(s),
    "qtokens": _int_list, "xlayer": int, "xhead": lambda s: "mean" if s == "mean" else int(s)})
# the map's hidden-state layer, its points' colour, the selected token (token_idx in the selected
# example), the neighbours' scope, and whether special tokens are left out of the neighbours
HIDDEN_STATES = PageState("Hidden states", {"hlayer": 0, "color": "modality", "tok": None, "nn": "example",
                                            "nospecial": False}, {
    "hlayer": int, "tok": int, "color": _choice(("modality", "role", "example", "answer", "correct")),
    "nn": _choice(("example", "sample")), "nospecial": _bool})
# its own statistic, run B, test, correction, map colour, drilled head, ranking, and a filter per
# group (the example filter's keys prefixed a_ / b_)
COMPARE = PageState("Compare", {
    "cmp_stat": "t2i", "cmp_b_run": None, "cmp_test": "t", "cmp_corr": "holm", "cmp_map": "diff", "cmp_head": [],
    "cmp_rank": "diff", **{f"{g}_{k}": None for g in ("a", "b") for k in FILTER_KEYS},
}, {"a_correct": _bool, "b_correct": _bool, "cmp_head": _int_list, "cmp_test": _choice(("t", "rank")),
    "cmp_corr": _choice(("holm", "bh")), "cmp_map": _choice(("diff", "effect")),
    "cmp_rank": _choice(("diff", "effect"))})
# the query, the quick chart's x / y / colour columns and mark
SQL = PageState("SQL", {"sql": None, "sql_x": None, "sql_y": None, "sql_color": None, "sql_mark": "auto"})
# the probe shown, and the stream and layer of its confusion matrix
PROBES = PageState("Probes", {"probe": None, "pstream": None, "player": None}, {"player": int})
# the intervention shown, its heads' stream, the attention statistic beside their effects, and the
# regions curves' score: the mean score after, or relative to the score before
INTERVENTIONS = PageState("Interventions", {"intervention": None, "ivstream": None, "ivstat": None,
                                            "ivnorm": "score"}, {"ivnorm": _choice(("score", "relative"))})
PAGES = (SHARED, EXAMPLES, HEAD_SUMMARY, ATTENTION, HIDDEN_STATES, COMPARE, SQL, PROBES, INTERVENTIONS)

DEFAULTS: dict[str, object] = {}
PARSE: dict[str, object] = {}
for _p in PAGES:
    assert not set(_p.defaults) & set(DEFAULTS), f"{_p.page} reuses another page's key"
    DEFAULTS.update(_p.defaults)
    PARSE.update(_p.parse)
URL_KEYS = tuple(DEFAULTS)
ALWAYS_IN_URL = ("run", "ex")


def default_lake() -> str:
    """The lake root given by ``$VLATLAS_LAKE`` ("" when unset)."""
    return os.environ.get(ENV_LAKE, "").strip()


# -- URL <-> state ----------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def init() -> None:
    """Fill the canonical keys: from the URL on a session's first run, else keep them."""
    ss = st.session_state
    if ss.get("_url_loaded"):
        return
    for k, d in DEFAULTS.items():
        if k not in ss:
            ss[k] = list(d) if isinstance(d, list) else d
    for k in URL_KEYS:
        raw = st.query_params.get(k)
        if raw is None or raw == "":
            continue
        try:
            ss[k] = PARSE.get(k, str)(raw)
        except (TypeError, ValueError):
            pass  # a malformed parameter falls back to the default
    if not ss["lake"]:
        ss["lake"] = default_lake()
    ss["_url_loaded"] = True


def to_url() -> None:
    """Write the canonical keys into the URL's query parameters (defaults left out)."""
    ss = st.session_state
    want: dict[str, str] = {}
    for k in URL_KEYS:
        v = ss.get(k)
        if v is None or v == "" or v == []:
            continue
        if k == "lake" and v == default_lake():
            continue
        if k not in ALWAYS_IN_URL and k != "lake" and v == DEFAULTS[k]:
            continue
        want[k] = _fmt(v)
    have = {k: st.query_params.get(k) for k in st.query_params}
    if have != want:
        st.query_params.from_dict(want)


def _commit(name: str) -> None:
    st.session_state[name] = st.session_state[f"w_{name}"]


def bind(name: str) -> dict:
    """Widget kwargs (``key``, ``on_change``, ``args``) tying a widget to canonical key ``name``.

    Validate the canonical value against the widget's options before calling.
    """
    wk = f"w_{name}"
    st.session_state[wk] = st.session_state.get(name)
    return dict(key=wk, on_change=_commit, args=(name,))


def set_value(name: str, value) -> None:
    """Set a canonical key (from a callback or before its widget is drawn)."""
    st.session_state[name] = value


def get(name: str):
    return st.session_state.get(name, DEFAULTS.get(name))


def choose(name: str, options: list, default=None):
    """Keep canonical ``name`` among ``options`` (else ``default`` or the first); return it."""
    v = st.session_state.get(name)
    if v not in options:
        v = default if default in options else (options[0] if options else None)
        st.session_state[name] = v
    return v


def example_filter(prefix: str = "") -> ExampleFilter:
    """The example filter held in the canonical keys ``q`` … ``mval`` (with ``prefix``: ``a_q`` …)."""
    def g(k):
        return st.session_state.get(prefix + k)

    return ExampleFilter(text=g("q") or None, answer=g("answer"), prediction=g("pred"), correct=g("correct"),
                         split=g("split"), meta_key=g("mkey"), meta_value=g("mval"))


# -- cached lake access -------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def catalog(root: str) -> Catalog:
    """One DuckDB catalog per lake root, shared by every session."""
    return open_catalog(root)


@st.cache_data(show_spinner=False, ttl=120, max_entries=4096)
def _query(root: str, key: str, _fn, args: tuple, kwargs: tuple):
    # ``key`` (the function's module and qualified name) is what the cache hashes; ``_fn`` is not hashed.
    return _fn(catalog(root), *args, **dict(kwargs))


def q(fn, *args, **kwargs):
    """``fn(catalog, *args, **kwargs)`` on the current lake, cached: ``fn`` is a query function of
    :mod:`lake.queries` (the function itself, so a renamed or missing query fails at import time)."""
    if not callable(fn):
        raise TypeError(f"state.q takes a query function, not {fn!r}")
    key = f"{fn.__module__}.{fn.__qualname__}"
    return _query(st.session_state["lake"], key, fn, args, tuple(sorted(kwargs.items())))


@st.cache_data(show_spinner=False, ttl=120, max_entries=256)
def _user_sql(root: str, sql: str):
    return catalog(root).user_sql(sql)


def user_sql(sql: str):
    """``Catalog.user_sql(sql)`` on the current lake (the sandbox of ``vlatlas sql``), cached.

    Raises SandboxError / QueryError (never cached) when the query is refused or fails.
    """
    return _user_sql(st.session_state["lake"], sql)


def user_sql_clear(sql: str) -> None:
    """Forget the cached result of one query (so it runs again)."""
    _user_sql.clear(st.session_state["lake"], sql)


def reload_lake() -> None:
    """Forget cached results and re-scan the lake's files (new runs, new chunks)."""
    _query.clear()
    _user_sql.clear()
    root = st.session_state.get("lake")
    if root:
        try:
            catalog(root).refresh()
        except Exception:  # noqa: BLE001 - a broken lake is reported by the sidebar
            catalog.clear()


@st.cache_data(show_spinner=False, max_entries=256)
def stat_help() -> dict[str, str]:
    """The statistics' one-line definitions (``lake.schema.STAT_HELP``; the formulas are in ``pipeline.stats``)."""
    from lake.schema import STAT_HELP

    return dict(STAT_HELP)


# -- work done ahead, in the background -----------------------------------------------------------
MAX_TOOLTIP_IMAGES = 1500  # patch crops in the map's tooltips when its sample shows at most this many images
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlatlas-ahead")


@st.cache_resource(show_spinner=False, max_entries=16)
def _crops_job(root: str, run: str, stream: str, layer: int, stamp) -> Future:
    from streamlit_app import hidden

    return _BACKGROUND.submit(hidden.sample_crops, catalog(root), run, stream, layer, MAX_TOOLTIP_IMAGES)


def _first_maps(root: str, run: str) -> tuple[object, dict[str, int]]:
    """(the maps' stamp, {stream: its first mapped layer}) of a run; (None, {}) without maps."""
    from pipeline.embed import maps_stamp

    stamp = maps_stamp(root, run)
    if stamp is None:
        return None, {}
    m = q(queries.embedding_layers, run)
    return stamp, {str(s): int(g.layer.min()) for s, g in m.groupby("stream")}


def prefetch_map_crops(root: str, run: str) -> None:
    """Start cutting the patch crops of the run's map samples (the Hidden states page's tooltips: a
    second or more for a thousand images) in the background, so the page finds them ready."""
    try:
        stamp, first = _first_maps(root, run)
        for stream, layer in first.items():
            _crops_job(root, run, stream, layer, stamp)
    except Exception:  # noqa: BLE001 - the page computes them itself and reports what is wrong
        pass


def map_crops(run: str, stream: str) -> dict:
    """The patch crops of a stream's map sample (the same sample on every layer), from the job the
    sidebar started; {} when there are none or cutting them failed (the tooltips show row and column)."""
    root = st.session_state["lake"]
    stamp, first = _first_maps(root, run)
    if stream not in first:
        return {}
    try:
        return _crops_job(root, run, stream, first[stream], stamp).result()
    except Exception:  # noqa: BLE001 - tooltips without pictures, not a broken page
        return {}


# -- the shared context ---------------------------------------------------------------------
@dataclass
class Ctx:
    """What every page needs: the lake, the run and the selected example.

    ``example`` is None when the run has no examples (pages say so).
    """

    lake: str
    run: str
    info: dict
    capture: dict
    streams: pd.DataFrame
    flt: ExampleFilter
    n_examples: int
    n_filtered: int
    example: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def random_weights(self) -> bool:
        return bool(self.capture.get("random_weights"))

    @property
    def explained(self) -> tuple[str, ...]:
        """The ``--explain`` methods the run was extracted with (those this version knows)."""
        try:
            return ExplainSet.parse(self.capture.get("explain")).methods
        except ValueError:
            return ()

    def stream_shape(self, stream: str) -> tuple[int, int]:
        """(layers, heads) of a stream."""
        s = self.streams[self.streams.stream == stream]
        return (int(s.layers.iloc[0]), int(s.heads.iloc[0])) if len(s) else (0, 0)


def set_ctx(ctx: Ctx | None) -> None:
    st.session_state["_ctx"] = ctx


def ctx() -> Ctx | None:
    """The context the sidebar built for this script run (None when no lake/run is usable)."""
    return st.session_state.get("_ctx")


def pick_stream(c: Ctx, where=st) -> str | None:
    """A stream selectbox (disabled for a single-stream run); returns the stream."""
    streams = c.streams.stream.tolist()
    if not streams:
        return None
    choose("stream", streams)
    where.selectbox("Stream", streams, help="the attention sublayer the weights come from",
                    disabled=len(streams) < 2, **bind("stream"))
    return get("stream")


def ensure_head(c: Ctx, stream: str | None) -> tuple[int | None, int | str | None]:
    """The selected (layer, head); when none is chosen yet (a first view), the run's most telling head:
    its best grounding head when the run has boxes, else the head with the largest text -> image mass
    (:func:`lake.queries.first_view_head`), else layer 0, head 0."""
    if stream and (get("layer") is None or get("head") is None):
        d = q(queries.first_view_head, c.run, stream)
        layer, head = (int(d.layer.iloc[0]), int(d["head"].iloc[0])) if len(d) else (0, 0)
        if get("layer") is None:
            set_value("layer", layer)
        if get("head") is None:
            set_value("head", head)
    return get("layer"), get("head")


def patch_key(row, col) -> str:
    return f"r{int(row)}c{int(col)}"


# -- images ----------------------------------------------------------------------------------
@st.cache_data(show_spinner=False, max_entries=64)
def _thumbnails(root: str, image_ids: tuple[str, ...], longest: int) -> dict[str, str]:
    pngs = queries.images_png(catalog(root), list(image_ids))
    return {i: views.thumbnail_uri(p, longest) for i, p in zip(pngs.image_id, pngs.png)}


def thumbnails(image_ids, longest: int = 96) -> dict[str, str]:
    """``{image_id: data URI}`` of small thumbnails (images missing from the lake are left out)."""
    ids = tuple(sorted({i for i in image_ids if isinstance(i, str)}))
    return _thumbnails(st.session_state["lake"], ids, longest) if ids else {}


def image_bytes(image_id: str) -> bytes | None:
    """The stored PNG of an image, or None when it is not in the lake."""
    d = q(queries.image_png, image_id)
    return bytes(d.png.iloc[0]) if len(d) else None


def examples_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The Examples page's table: a thumbnail, the example's fields and its meta keys as columns."""
    return views.examples_table(rows, thumbnails(rows.image_id))


def require_examples(c: "Ctx", consequence: str) -> None:
    """Stop the page with a note when the run has no examples yet; ``consequence`` ends the sentence."""
    if not c.n_examples:
        st.info(f"Run **{c.run}** has no examples yet (status: {c.info.get('status')}), so {consequence}.")
        st.stop()
