"""Hidden states: the t-SNE map of a layer, a token's path through the layers, its nearest neighbours
of the other modality, and per-layer norms and text-image similarity.

A run extracted with ``--keep-hidden sample:N`` (the default) stores the norm of every token but the
vectors of N sampled examples only: for an example without vectors the page shows what needs only
norms, and in place of the map, the path and the neighbours a note with a picker of the examples
that have vectors."""

import pandas as pd
import streamlit as st

from lake import queries
from lake.schema import ROLES_SPECIAL
from pipeline.embed import maps_stamp
from streamlit_app import charts, export, hidden, state

MAX_NORM_EXAMPLES = 2000  # the run-wide norms average over at most this many examples
MAX_COS_EXAMPLES = 200  # the run-wide text-image similarity (every text x image pair) over at most this many
N_NEIGHBOURS = 10
MAX_VECTOR_PICK = 1000  # examples with vectors offered when the selected one has none

c = state.ctx()
st.title("Hidden states")
state.require_examples(c, "no hidden states to show")
hl = state.q(queries.hidden_layers, c.run)
if hl.empty:
    keep = c.capture.get("keep_hidden", "?")
    st.info(f"Run **{c.run}** stores no hidden states (it was extracted with `--keep-hidden {keep}`). "
            f"Extract the model again with `--keep-hidden sample:N` (the default, `sample:256`: norms of every "
            f"token, vectors of N examples) or `--keep-hidden all` under another run name to see them.")
    st.stop()
ex = c.example
ex_id = int(ex["example_id"])


# -- cached work that is not a query: placing the example on a map, patch crops ------------------
@st.cache_data(show_spinner=False, max_entries=256)
def placed(root: str, run: str, stream: str, layer: int, example_id: int, stamp) -> pd.DataFrame:
    """The example's tokens on the map of ``layer`` (sampled ones where stored, the rest placed)."""
    from pipeline.embed import place

    return place(root, run, stream, layer, [example_id], catalog=state.catalog(root))


def example_crops(tokens: pd.DataFrame) -> pd.Series:
    """Patch crops of the selected example's tokens (None where there is no box or no image)."""
    png = state.image_bytes(ex["image_id"]) if ex.get("has_image") else None
    if png is None or tokens.empty:
        return pd.Series([None] * len(tokens), index=tokens.index, dtype=object)
    t = tokens.assign(image_id=ex["image_id"])
    size = (int(ex["image_width"] or 1), int(ex["image_height"] or 1))
    return hidden.patch_crops(t, {ex["image_id"]: png}, {ex["image_id"]: size})


# -- controls ----------------------------------------------------------------------------------
streams = sorted(hl.stream.unique().tolist())
k1, k2, k3, k4 = st.columns([1.2, 4, 1.6, 2.2])
state.choose("stream", streams)
k1.selectbox("Stream", streams, disabled=len(streams) < 2, help="the stream whose hidden states are shown",
             **state.bind("stream"))
stream = state.get("stream")
vec_ids = [int(i) for i in state.q(queries.hidden_vector_examples, c.run, stream).example_id]
has_vec = ex_id in set(vec_ids)  # the map, the path and the neighbours need the example's vectors
layers = sorted(int(x) for x in hl[hl.stream == stream].layer)
state.choose("hlayer", layers, default=layers[0])
if len(layers) > 1:
    k2.select_slider("Layer (hidden state)", layers, help="0 is the embedding output, l + 1 the output of block l",
                     **state.bind("hlayer"))
else:
    k2.caption(f"Hidden-state layer {layers[0]} (the only one stored)")
layer = int(state.get("hlayer"))
colors = list(hidden.COLOR_BY)
state.choose("color", colors)
k3.selectbox("Colour by", colors, **state.bind("color"))
state.choose("nn", list(hidden.NN_SCOPES))
k4.radio("Neighbours among", list(hidden.NN_SCOPES), horizontal=True, **state.bind("nn"), disabled=not has_vec,
         format_func=lambda s: "this example" if s == "example" else "the map's sample",
         help="where the nearest tokens of the other modality are looked for (cosine similarity of the full "
              "hidden vectors at this layer, not distances on the map)")
color, nn_scope = state.get("color"), state.get("nn")

# the selected example's tokens at this layer, and the selected token
eh = state.q(queries.example_hidden, c.run, stream, ex_id)
tok_table = state.q(queries.example_tokens, c.run, ex_id)
cur = eh[eh.layer == layer].drop(columns=["modality", "role"]).merge(tok_table, on="token_idx", how="left")
if cur.empty:
    st.info(f"Example #{ex_id} has no hidden states at layer {layer} of stream `{stream}`.")
    st.stop()
cur["label"] = hidden.token_labels(cur)
cur_ids = cur.token_idx.astype(int).tolist()
labels = dict(zip(cur_ids, cur.label))
roles = dict(zip(cur_ids, cur.role))
first_word = next((int(t) for t, r in zip(cur.token_idx, cur.role) if r == "word"), cur_ids[0])
# A token index means another token in another example: when the example changes, keep the same
# word (or patch position) if this example has it, else start from its first word.
held = st.session_state.get("_tok_of")  # (example, token piece, patch row, patch col, tile) of the selected token
if held is not None and held[0] != ex_id and state.get("tok") is not None:
    same = cur[(cur.token == held[1]) if held[1] is not None
               else (cur.patch_row == held[2]) & (cur.patch_col == held[3])
               & (cur.tile.fillna(0) == (0 if pd.isna(held[4]) else held[4]))]
    state.set_value("tok", int(same.token_idx.iloc[0]) if len(same) else first_word)
state.choose("tok", cur_ids, default=first_word)
tok = int(state.get("tok"))
trow = cur[cur.token_idx == tok].iloc[0]
st.session_state["_tok_of"] = (ex_id, trow.token if pd.notna(trow.token) else None,
                               trow.get("patch_row"), trow.get("patch_col"), trow.get("tile"))

maps = state.q(queries.embedding_layers, c.run, stream)
map_layers = sorted(int(x) for x in maps.layer)
stamp = maps_stamp(c.lake, c.run)


def _pick_vector_example() -> None:
    v = st.session_state.get("w_vec_ex")
    if v is not None:
        state.set_value("ex", int(v))


def no_vectors_note() -> None:
    """In place of the map, the token's path and its neighbours: why the example has none, and a picker of
    the examples whose vectors are stored."""
    keep = str(c.capture.get("keep_hidden", "?"))
    n = keep.partition(":")[2] if keep.lower().startswith("sample:") else None
    how = (f"for a sample of {n} examples" if n else "for some examples") + f" (`--keep-hidden {keep}`)"
    st.info(f"Example #{ex_id} has no stored hidden vectors: run **{c.run}** keeps the norm of every token but "
            f"the vectors only {how}, and {len(vec_ids)} of its {c.n_examples} examples have them. The map, the "
            f"token's path through the layers and its nearest tokens need vectors; the norms on the right do not."
            + (" Pick an example with vectors:" if vec_ids else ""))
    if not vec_ids:
        return
    shown = vec_ids[:MAX_VECTOR_PICK]
    texts = dict(zip(*[state.q(queries.examples_by_id, c.run, shown)[k] for k in ("example_id", "text")]))
    st.session_state["w_vec_ex"] = None
    st.selectbox("Example with hidden vectors", shown, index=None, key="w_vec_ex", on_change=_pick_vector_example,
                 placeholder=f"one of the {len(vec_ids)} examples with vectors",
                 format_func=lambda i: f"#{i} · {texts.get(i, '')}")


def _pick_token() -> None:
    sel = st.session_state["hmap_chart"].selection.get("tok") or []
    if sel and "example_id" in sel[0] and "token_idx" in sel[0]:
        state.set_value("ex", int(sel[0]["example_id"]))
        state.set_value("tok", int(sel[0]["token_idx"]))


left, right = st.columns([3, 2], gap="large")
with left:
    st.selectbox(f"Token of example #{ex_id}", cur_ids, help="or click a point on the map",
                 format_func=lambda t: f"{t} · {labels.get(t)} ({roles.get(t)})", **state.bind("tok"))
    if not has_vec:
        no_vectors_note()
    elif not map_layers:
        st.info(f"Run **{c.run}** has no maps of its hidden states yet. Add them (a few seconds to a minute; "
                f"a seeded sample of tokens from all examples, one t-SNE map per layer, aligned across layers), "
                f"then press ↻ Reload lake:")
        st.code(f"vlatlas embed --lake {c.lake} --run {c.run}", language="bash")
    elif layer not in map_layers:
        st.info(f"Stream `{stream}` has maps of layers {', '.join(map(str, map_layers))}, not of layer {layer}.")
    else:
        pts = state.q(queries.embedding_map, c.run, stream, layer)
        with st.spinner(f"Placing example #{ex_id} on the map…"):
            mine = placed(c.lake, c.run, stream, layer, ex_id, stamp)
        crops = state.map_crops(c.run, stream)  # cut in the background since the run was chosen
        pts = pts[pts.example_id != ex_id].copy()
        pts["group"] = "sample"
        pts["image"] = [crops.get((int(e), int(t))) for e, t in zip(pts.example_id, pts.token_idx)]
        me = mine.merge(tok_table, on=["token_idx"], how="left")
        me["group"] = ["this example (placed)" if p else "this example (sampled)" for p in me.placed]
        for col in ("text", "answer", "prediction", "correct", "image_id"):
            me[col] = ex.get(col)
        me["image"] = example_crops(me).to_numpy()
        allp = hidden.map_points(pd.concat([pts, me.drop(columns=["placed"])], ignore_index=True), color)
        allp["correct_text"] = allp.correct.map({True: "correct", False: "wrong"}).fillna("—")
        allp["answer"] = allp.answer.astype(object).where(allp.answer.notna(), None)
        # the selected token's path: its stored positions when it is in the sample, else placed on every map
        path = state.q(queries.embedding_path, c.run, stream, ex_id, tok)
        if len(path) < len(map_layers):
            with st.spinner(f"Placing example #{ex_id} on the maps of every layer…"):
                rows = []
                for lay in map_layers:
                    pl = placed(c.lake, c.run, stream, lay, ex_id, stamp)
                    r = pl[pl.token_idx == tok]
                    if len(r):
                        rows.append(dict(layer=lay, x=float(r.x.iloc[0]), y=float(r.y.iloc[0])))
                path = pd.DataFrame(rows, columns=["layer", "x", "y"])
        field, title = hidden.COLOR_BY[color]
        cols = ["x", "y", "color", "label", "group", "example_id", "token_idx", "role", "modality", "text",
                "answer", "correct_text", "image"]
        chart = charts.hidden_map(allp[cols], color_field=field, color_title=title, path=path, layer=layer,
                                  width=490)  # the left column is about 530 px wide at 1400 px
        export.show_chart(chart, f"hidden-map-{c.run}-{stream}-L{layer}", allp[cols[:-1]], key="hmap_chart",
                          on_select=_pick_token, selection_mode="tok", width="content",
                          context=f"Hidden states, t-SNE map · run {c.run} · stream {stream} · hidden-state layer "
                                  f"{layer} · coloured by {title} · example #{ex_id}, token {labels.get(tok)}")
        n_sample = int(maps[maps.layer == layer].n.iloc[0])
        st.caption(f"t-SNE map of stream `{stream}`, hidden-state layer **{layer}**: {n_sample} tokens sampled "
                   f"from all examples (the same tokens on every layer's map; each map starts from the previous "
                   f"layer's, so a token moves only as much as its neighbourhood changed). Example #{ex_id}'s "
                   f"tokens are outlined ({int(mine.placed.sum())} of {len(mine)} placed onto the finished map "
                   f"with openTSNE's `transform`). The red line is **{labels.get(tok)}**'s path through layers "
                   f"{', '.join(map(str, path.layer))}. Hover a point for its token (a patch shows its crop); "
                   f"click one to select it; scroll to zoom.")

    if has_vec:
        # nearest neighbours of the other modality, in the hidden space
        qvec = trow.vec
        qmod = trow.modality
        other = "image" if qmod == "text" else "text"
        if nn_scope == "sample" and layer in map_layers:
            cands = state.q(queries.map_vectors, c.run, stream, layer)
            where = f"the {len(cands)} tokens of the map's sample (all examples)"
        else:
            cands = cur.assign(example_id=ex_id)[["example_id", "token_idx", "modality", "role", "token",
                                                  "patch_row", "patch_col", "tile", "vec"]]
            where = f"the tokens of example #{ex_id}" + (" (this layer has no map, so no sample)"
                                                         if nn_scope == "sample" else "")
        state.choose("nospecial", [False, True], default=False)
        st.toggle("Leave special tokens out", help="leave [CLS], [SEP], the image [CLS] and the like out of the "
                  "neighbours: they gather the whole sequence, so they are near everything", **state.bind("nospecial"))
        if state.get("nospecial") and "role" in cands.columns:
            cands = cands[~cands.role.isin(list(ROLES_SPECIAL) + ["pad"])]
        nn = hidden.nearest_other_modality(cands, qvec, qmod, N_NEIGHBOURS, exclude=(ex_id, tok))
        st.subheader(f"Nearest {other} tokens to “{labels.get(tok)}”")
        if nn.empty:
            st.info(f"No {other} tokens among {where}.")
        else:
            nn["token"] = hidden.token_labels(nn)
            if nn_scope == "sample" and layer in map_layers:
                info = state.q(queries.embedding_map, c.run, stream, layer)
                boxes = nn[["example_id", "token_idx"]].merge(info, on=["example_id", "token_idx"], how="left")
                ids = boxes.image_id.dropna().unique().tolist()
                pngs = state.q(queries.images_png, ids) if ids else pd.DataFrame(columns=["image_id", "png"])
                sizes = {i: (int(w), int(h)) for i, w, h in zip(boxes.image_id, boxes.image_width,
                                                                 boxes.image_height) if isinstance(i, str)}
                nn["crop"] = hidden.patch_crops(boxes, {i: bytes(p) for i, p in zip(pngs.image_id, pngs.png)},
                                                sizes).to_numpy()
            else:
                nn["crop"] = example_crops(nn.merge(tok_table[["token_idx", "x0", "y0", "x1", "y1"]],
                                                    on="token_idx", how="left")).to_numpy()
            show = nn[["rank", "cosine", "token", "crop", "example_id", "token_idx", "role"]]
            st.dataframe(show, hide_index=True, width="stretch",
                         column_config={"crop": st.column_config.ImageColumn("patch"),
                                        "cosine": st.column_config.NumberColumn(format="%.4f")})
            st.caption(f"cos(h, h′) = h·h′ / (|h| |h′|) of the full hidden vectors at layer {layer}, between "
                       f"**{labels.get(tok)}** ({qmod}) and the {other} tokens among {where}.")

with right:
    st.subheader(f"“{labels.get(tok)}”")
    st.caption(f"example #{ex_id} · token {tok} · {trow.modality} · {trow.role} · |h| = {float(trow.norm):.3f} "
               f"at layer {layer}")
    if pd.notna(trow.get("x0")):
        crop = example_crops(cur[cur.token_idx == tok])
        if crop.iloc[0]:
            st.image(crop.iloc[0], caption=f"{labels.get(tok)} of example #{ex_id}", width=96)
    if "lens" in c.explained:
        lw = state.q(queries.lens_words, c.run, stream, ex_id, tok)
        st.markdown(f"**Logit lens of “{labels.get(tok)}”**")
        if lw.empty:
            st.info(f"No logit lens for this token: the lens covers the language model's tokens (stream `lm`), "
                    f"and this is stream `{stream}`.")
        else:
            grid = lw.assign(cell=[f"{p} ({q:.2f})" for p, q in zip(lw.piece, lw.prob)]).pivot(
                index="layer", columns="rank", values="cell")
            grid.columns = [f"#{int(r) + 1}" for r in grid.columns]
            st.dataframe(grid, width="stretch")
            st.caption("The **logit lens**: this token's hidden state at each layer (0 = embeddings) put through "
                       "the language model's final norm and unembedding, its most likely vocabulary items with "
                       "their probabilities: what the model would read out of the token at that depth (for an "
                       "image token, the words the language model sees in that patch).")
    else:  # say why there is none, rather than nothing: decoder runs with --explain lens show one here
        decoder = "lm" in set(c.streams.stream)
        st.caption(f"**Logit lens**: none for run **{c.run}**: "
                   + (f"its model ({c.info.get('model_family')}) has no language model (no `lm` stream) whose "
                      "head could read its hidden states out as words; the lens is for decoder LVLMs (LLaVA, Qwen2-VL, …) "
                      "extracted with `--explain lens`." if not decoder else
                      "it was extracted without `--explain lens`; extract it again with `--explain lens` "
                      "(and `--keep-hidden`) to see what each layer's hidden state would read out as words."))
    flt_label = "all examples" if c.flt.is_empty() else f"filtered examples ({c.flt.describe()})"
    norm_all = state.q(queries.hidden_norms, c.run, stream, flt=c.flt, max_examples=MAX_NORM_EXAMPLES)
    n_norm = int(norm_all.n_examples.max()) if len(norm_all) else 0
    norm_label = flt_label if n_norm < MAX_NORM_EXAMPLES else f"{n_norm} of the {flt_label}"
    norms = hidden.profile(state.q(queries.hidden_norms, c.run, stream, example_id=ex_id), norm_all, "norm",
                           f"example #{ex_id}", norm_label)
    export.show_chart(charts.layer_profile(norms, value="norm", value_title="mean |h|", color="modality",
                                           dash="scope", layer=layer, description="hidden-norms"),
                      f"hidden-norms-{c.run}-{stream}", key="hnorm_chart", width="content",
                      context=f"Mean hidden-state norm per layer · run {c.run} · stream {stream} · "
                              f"example #{ex_id} and {norm_label}")
    st.caption("Mean L2 norm of the hidden states of each modality's tokens per layer, for the selected example "
               f"(solid) and over the tokens of {norm_label} (dashed"
               + (", a fixed sample" if n_norm >= MAX_NORM_EXAMPLES else "") + ").")
    cos_all = state.q(queries.text_image_cosine, c.run, stream, flt=c.flt, max_examples=MAX_COS_EXAMPLES)
    n_cos = int(cos_all.n_examples.max()) if len(cos_all) else 0
    cos_one = state.q(queries.text_image_cosine, c.run, stream, example_id=ex_id) if has_vec else cos_all.iloc[:0]
    if cos_one.empty and cos_all.empty:
        st.info("No text-image similarity to show: it needs hidden vectors, and "
                + (f"none of the {flt_label} has them." if vec_ids else f"run **{c.run}** stores none."))
    else:
        cos = hidden.profile(cos_one, cos_all, "cosine", f"example #{ex_id}", f"mean of {n_cos} examples")
        export.show_chart(charts.layer_profile(cos, value="cosine", value_title="mean cos(text, image)",
                                               color="scope", layer=layer, description="text-image-cosine"),
                          f"text-image-cosine-{c.run}-{stream}", key="hcos_chart", width="content",
                          context=f"Mean text–image cosine similarity per layer · run {c.run} · stream {stream} · "
                                  f"example #{ex_id} and {n_cos} examples")
        vec_label = flt_label if len(vec_ids) >= c.n_examples else f"{flt_label} with stored hidden vectors"
        st.caption("Mean cosine similarity between every text token and every image token of an example (special "
                   "tokens included), per layer: "
                   + ("the selected example, and " if has_vec else
                      f"example #{ex_id} has no stored vectors, so only ")
                   + f"the mean over {n_cos} examples ("
                   + (f"a fixed sample of {MAX_COS_EXAMPLES} of the {vec_label}" if n_cos >= MAX_COS_EXAMPLES
                      else vec_label)
                   + "). Rising similarity means the two modalities' representations draw together.")
