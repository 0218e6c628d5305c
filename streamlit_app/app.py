"""VL-Atlas web app: ``streamlit run streamlit_app/app.py`` (or ``vlatlas app --lake DIR``).

The frame of every page: the sidebar picks the lake, the run and the example
(filtered on the Examples page); the pages under ``app_pages/`` draw the views.
Selections live in the URL's query parameters (see ``state.py``).
"""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `streamlit run streamlit_app/app.py` from anywhere
    sys.path.insert(0, str(HERE.parent))

import streamlit as st  # noqa: E402

from lake import queries  # noqa: E402
from lake.errors import LakeError  # noqa: E402
from lake.queries import parse_json  # noqa: E402
from streamlit_app import state  # noqa: E402

MAX_PICK = 1000  # examples offered by the sidebar picker; the Examples page finds the rest

# The tab's icon is a file of the app's own: a ":material/…:" icon there is fetched by the browser from a
# font CDN, a request leaving the machine (and failing offline).
st.set_page_config(page_title="VL-Atlas", page_icon=str(HERE / "icon.png"), layout="wide")
state.init()
# Pills (the Attention page's query tokens) wrap onto further lines: by default their row scrolls
# sideways with no visible scrollbar, so tokens past the column's edge could not be reached.
# The main block starts nearer the top than Streamlit's default (6 rem), so a page's first charts are
# in view at 1400x900.
st.html("<style>[data-testid='stButtonGroup'] > div:has(> button) {flex-wrap: wrap; overflow-x: visible;"
        " row-gap: 0.4rem;} [data-testid='stMainBlockContainer'] {padding-top: 2.5rem;}</style>")
page = st.navigation([
    st.Page(HERE / "app_pages" / "examples.py", title="Examples", icon=":material/table_rows:", default=True),
    st.Page(HERE / "app_pages" / "head_summary.py", title="Head summary", icon=":material/grid_on:"),
    st.Page(HERE / "app_pages" / "attention.py", title="Attention", icon=":material/visibility:"),
    st.Page(HERE / "app_pages" / "hidden_states.py", title="Hidden states", icon=":material/scatter_plot:"),
    st.Page(HERE / "app_pages" / "compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page(HERE / "app_pages" / "probes.py", title="Probes", icon=":material/psychology:"),
    st.Page(HERE / "app_pages" / "interventions.py", title="Interventions", icon=":material/content_cut:"),
    st.Page(HERE / "app_pages" / "sql.py", title="SQL", icon=":material/database:"),
])


@st.cache_resource(show_spinner=False)
def _warm_up() -> threading.Thread:
    """Import in the background, once per server, what later pages need beyond the first one: altair
    (the charts), and openTSNE, scipy and scikit-learn for the Hidden states page's placements (each a
    second or two on a small CPU), so that a page's first visit does not wait for them. Not torch: the
    app imports it only when a live example runs."""
    def work() -> None:
        for name in ("streamlit_app.charts", "openTSNE.affinity", "sklearn.neighbors"):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the page imports it itself and reports what is missing
                pass

    t = threading.Thread(target=work, name="vlatlas-warm-up", daemon=True)
    t.start()
    return t


_warm_up()


def _short(text, n: int = 48) -> str:
    text = str(text or "")
    return text if len(text) <= n else text[: n - 1] + "…"


def sidebar() -> tuple[state.Ctx | None, tuple[str, str] | None]:
    """Draw the sidebar; return the context, or a (level, message) saying why there is none."""
    ss = st.session_state
    with st.sidebar:
        st.markdown("## :material/travel_explore: VL-Atlas")
        st.text_input("Lake", placeholder="/path/to/lake", help=f"the lake's root folder, or an object-store URI such as s3://bucket/prefix (default: ${state.ENV_LAKE})",
                      **state.bind("lake"))
        root = (ss["lake"] or "").strip()
        if not root:
            return None, ("info", f"Choose a lake: type its folder in the sidebar, or start the app with "
                                  f"`{state.ENV_LAKE}=/path/to/lake`. Build one with `vlatlas demo` or "
                                  "`vlatlas extract --model … --data … --lake DIR --run NAME`.")
        try:
            state.catalog(root)
            runs = state.q(queries.list_runs)
        except LakeError as e:
            return None, ("error", str(e))
        except Exception as e:  # noqa: BLE001 - any unreadable lake is a message, not a traceback
            return None, ("error", f"Could not read the lake at {root}: {e}")
        if runs.empty:
            return None, ("info", f"The lake at {root} has no runs yet: add one with "
                                  f"`vlatlas extract --lake {root} --run NAME …`.")
        names = runs.run.tolist()
        status = dict(zip(runs.run, runs.status))
        state.choose("run", names)
        st.selectbox("Run", names, format_func=lambda r: r if status.get(r) == "complete" else f"{r} ({status.get(r)})",
                     **state.bind("run"))
        run = ss["run"]
        info = state.q(queries.run_info, run).iloc[0].to_dict()
        st.caption(f"**{info.get('model')}** · {info.get('model_family')} · {info.get('dtype')} · "
                   f"{info.get('status')}")
        flt = state.example_filter()
        n_all = state.q(queries.count_examples, run)
        n_f = n_all if flt.is_empty() else state.q(queries.count_examples, run, flt)
        example = None
        if n_all:
            opts = state.q(queries.examples, run, flt, limit=MAX_PICK)
            if opts.empty:
                opts = state.q(queries.examples, run, None, limit=MAX_PICK)
            ids = [int(i) for i in opts.example_id]
            labels = dict(zip(ids, opts.text))
            cur = ss.get("ex")
            if cur not in ids:
                row = state.q(queries.example, run, cur) if isinstance(cur, int) else None
                if row is not None and len(row):  # chosen elsewhere (URL, Examples page): keep it
                    ids, labels[cur] = [cur, *ids], row.text.iloc[0]
                else:
                    ss["ex"] = ids[0]
            st.selectbox("Example", ids, format_func=lambda i: f"#{i} · {_short(labels.get(i))}",
                         **state.bind("ex"))
            if not flt.is_empty():
                st.caption(f"Filter: {flt.describe()} — {n_f} of {n_all} examples")
            example = state.q(queries.example, run, ss["ex"]).iloc[0].to_dict()
        st.button("↻ Reload lake", on_click=state.reload_lake, help="pick up runs and chunks written since")
    c = state.Ctx(lake=root, run=run, info=info, capture=parse_json(info.get("capture")),
                  streams=state.q(queries.run_streams, run), flt=flt, n_examples=n_all, n_filtered=n_f, example=example)
    return c, None


ctx, problem = sidebar()
state.set_ctx(ctx)
if ctx is not None:
    state.prefetch_map_crops(ctx.lake, ctx.run)
state.to_url()
if ctx is None:
    st.title("VL-Atlas")
    level, message = problem
    (st.error if level == "error" else st.info)(message)
    st.stop()
if ctx.random_weights:
    st.warning("⚠️ This run's model has **random weights** (its capture config says `random_weights: true`): "
               "the attention shown here is not learned behaviour.")
try:
    page.run()
finally:
    state.to_url()
