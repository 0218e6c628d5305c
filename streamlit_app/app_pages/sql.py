"""SQL: read-only queries over the lake's views (the sandbox of ``vlatlas sql``), worked examples,
the result as a table and a quick chart, and downloads."""

import streamlit as st

from lake import queries
from lake.errors import QueryError, SandboxError
from lake.views import column_types
from lake.queries import example_sql
from lake.schema import TABLES
from streamlit_app import charts, export, state, views

COUNT, NONE = "(row count)", "(none)"

c = state.ctx()
st.title("SQL")
cat = state.catalog(c.lake)
st.caption(f"One read-only `SELECT` over the lake's views — the same sandbox as `vlatlas sql`: nothing else "
           f"can be read, nothing written; a query stops after {cat.timeout_s:g} s and returns at most "
           f"{cat.max_rows:,} rows. Conventions: `weight = A[query, key]` (query → key), layers and heads "
           f"0-based, `(stream, layer, head)` names a head.")
keep = c.capture.get("keep_attention", "all")
if views.is_pruned(keep):
    st.caption(f"⚠️ Run **{c.run}**'s `attention` rows are pruned weights (`{keep}`): "
               f"{views.keep_description(keep)}; a pair without a row was not stored (its weight is small, not "
               "necessarily 0), and a query row's weights sum to the stored share of its mass (its mean per head "
               "and example is the statistic `kept_mass` in `head_stats`).")

# -- worked examples, filled in with the current run, example and head ---------------------------
streams = c.streams.stream.tolist() or ["self"]
stream = state.get("stream") if state.get("stream") in streams else streams[0]
layer, head = state.ensure_head(c, stream)  # the selected head, or the run's most telling one
layer = layer if isinstance(layer, int) else 0
head = head if isinstance(head, int) else 0
ex_id = int(c.example["example_id"]) if c.example else 0
word = None  # the word "Where a word looks" follows: the selected one, else one naming a boxed object
if c.example:
    text_q = views.text_tokens(views.stream_tokens(state.q(queries.example_tokens, c.run, ex_id), stream)[0])
    chosen = [p for p in (state.get("tokens") or []) if p in set(text_q.text_pos.astype(int))]
    word = chosen[0] if chosen else views.object_word(text_q, c.example.get("boxes"))
worked = example_sql(c.run, stream=stream, layer=layer, head=head, stat=state.get("stat") or "t2i",
                     example_id=ex_id, text_pos=word)
st.markdown(f"**Worked examples** — click one to load it (run `{c.run}`, example #{ex_id}, "
            f"layer {layer}, head {head}, statistic `{state.get('stat') or 't2i'}`)")


def _load(sql: str | None) -> None:
    """A new query: its chart starts again from the defaults."""
    state.set_value("sql", sql)
    for k in ("sql_x", "sql_y", "sql_color", "sql_mark"):
        state.set_value(k, None)


# the examples over --explain tables and interventions only where the run has their rows (elsewhere they
# return none); a button keeps its key (its place in EXAMPLE_SQL) whichever are offered
has = state.q(queries.worked_rows, c.run)
offered = [(i, t, sql) for i, (t, sql) in enumerate(worked.items())
           if t not in queries.NEEDS or queries.NEEDS[t] in has]
cols = st.columns(4)
for n, (i, title, sql) in enumerate(offered):
    cols[n % 4].button(title, key=f"sql_example_{i}", on_click=_load, args=(sql,), width="stretch")
WHAT = queries.EXPLAIN_ROWS  # what each left-out example shows, and the --explain method that writes its rows
missing = [queries.NEEDS[t] for t in worked if t in queries.NEEDS and queries.NEEDS[t] not in has
           and queries.NEEDS[t] in WHAT]


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


parts = []
for found, why in ((False, "run `{run}` was extracted without {methods}"), (True, "{methods} found none in this run")):
    keys = [k for k in missing if (WHAT[k][1] in c.explained) == found]
    if keys:
        parts.append(_and([WHAT[k][0] for k in keys]) + " (" + why.format(
            run=c.run, methods=_and([f"`--explain {WHAT[k][1]}`" for k in keys])) + ")")
if parts:
    st.caption("Not offered, as they would return no rows: the worked examples on " + "; ".join(parts) + ".")
if "interventions" not in has:
    st.caption(f"The worked examples on the `interventions` table appear once run `{c.run}` has some: "
               f"`vlatlas intervene --lake {c.lake} --run {c.run} --kind heads` (or `knockout`, `regions`).")

with st.expander("Views and columns"):
    st.markdown("\n".join(
        f"- **{t.name}** — {t.doc}  \n  " + ", ".join(f"`{col}` {typ.lower()}" for col, typ in column_types(t).items())
        for t in TABLES.values()))

typed = state.bind("sql")
typed.update(on_change=lambda: _load(st.session_state["w_sql"]), args=())
st.text_area("Query", height=220, placeholder="SELECT * FROM runs", help="Ctrl+Enter runs it", **typed)
sql = (state.get("sql") or "").strip()
run_col, _ = st.columns([1, 5])
if run_col.button("Run again", disabled=not sql, help="run the query again (results are cached for 2 minutes)"):
    state.user_sql_clear(sql)
if not sql:
    st.info("Type a query (Ctrl+Enter runs it), or load one of the worked examples above.")
    st.stop()

try:
    res = state.user_sql(sql)
except (SandboxError, QueryError) as e:
    st.error(str(e))
    st.stop()
except Exception as e:  # noqa: BLE001 - anything else is a message too, never a traceback
    st.error(f"the query failed: {e}")
    st.stop()

df = res.df
st.caption(f"**{len(df):,}** row{'s' if len(df) != 1 else ''} · {df.shape[1]} column"
           f"{'s' if df.shape[1] != 1 else ''} · {res.elapsed_s * 1000:.0f} ms")
if res.truncated:
    st.warning(f"Truncated at {len(df):,} rows (the row limit): aggregate, filter or add a LIMIT to see the rest.")
st.dataframe(df, hide_index=True, width="stretch", height=min(38 + 35 * len(df), 420))
export.download_table(df, "query-result", key="sql_result")

# -- a quick chart of the result -------------------------------------------------------------------
st.subheader("Chart")
usable = charts.chartable_columns(df)
if df.empty or not usable:
    st.info("Nothing to chart: the result has no rows, or no columns of numbers, text or times.")
    st.stop()
dx, dy, dc = charts.quick_defaults(df)
state.choose("sql_x", usable, default=dx)
state.choose("sql_y", [*usable, COUNT], default=dy if dy is not None else COUNT)
state.choose("sql_color", [NONE, *usable], default=dc if dc is not None else NONE)
state.choose("sql_mark", list(charts.QUICK_MARKS), default="auto")
k1, k2, k3, k4 = st.columns(4)
k1.selectbox("x", usable, **state.bind("sql_x"))
k2.selectbox("y", [*usable, COUNT], **state.bind("sql_y"))
k3.selectbox("Colour", [NONE, *usable], **state.bind("sql_color"))
k4.selectbox("Mark", list(charts.QUICK_MARKS), **state.bind("sql_mark"))
x, y, color, mark = state.get("sql_x"), state.get("sql_y"), state.get("sql_color"), state.get("sql_mark")
y = None if y == COUNT else y
color = None if color == NONE else color
chart = charts.quick_chart(df, x, y, color, mark)
export.show_chart(chart, "sql-chart", key="sql_chart", width="content",
                  context=f"SQL · {y or 'count'} by {x}" + (f", colour {color}" if color else "")
                          + f" · {' '.join(sql.split())}")
if len(df) > charts.QUICK_MAX_ROWS:
    st.caption(f"The chart draws the first {charts.QUICK_MAX_ROWS:,} rows.")
