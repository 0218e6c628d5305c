"""Attention of one example at one (stream, layer, head): text → image, image → image, image → text, text → text."""

import time

import pandas as pd
import streamlit as st

from lake import queries
from streamlit_app import charts, export, state, views

DISPLAY_W = 400  # fits a half-width column at 1400 px with the sidebar open (about 438 px)
METHOD_LABEL = {"attention": "attention", "value": "value-weighted", "rollout": "rollout", "relevancy": "relevancy"}
# What a panel's numbers are under each method: the noun of its sentences ("put only 0.0002 of their
# value-weighted attention on the text"), its legends' title, and the cell's formula in its captions.
METHOD_NOUN = {"attention": "attention", "value": "value-weighted attention", "rollout": "rollout",
               "relevancy": "relevancy"}
METHOD_QUANTITY = {"attention": "weight", "value": "value-weighted share", "rollout": "rollout",
                   "relevancy": "relevancy"}
METHOD_CELL = {"attention": "`A[query, key]`",
               "value": "`V[query, key] = A[query, key]·‖f(key)‖ / Σₖ A[query, k]·‖f(k)‖`",
               "rollout": "`R[query, key]`, the rollout", "relevancy": "the relevancy of the key to the query"}
METHOD_HELP = {
    "attention": "the stored weights, `A[query, key]`",
    "value": "each weight times the norm of what its key sends through the head, `a·‖f(x)‖` (Kobayashi et al. "
             "2020), as a share of the query row's total: how much of the row's output comes from each key",
    "rollout": "attention rollout up to this layer (Abnar and Zuidema 2020): the heads' mean plus the residual "
               "identity, multiplied through the layers; heads are combined, so the head choice does not apply. "
               "Stored for text queries over image patches",
    "relevancy": "gradient-weighted relevancy (Chefer et al. 2021) of the model's output to every token, over all "
                 "layers and heads (the layer and head choices do not apply): of the prediction, or of each "
                 "generated token",
}

c = state.ctx()
st.title("Attention")
state.require_examples(c, "no attention to show")
ex = c.example
ex_id = int(ex["example_id"])

t1, t2, t3, t4 = st.columns([1.2, 1.5, 4, 1])
stream = state.pick_stream(c, t1)
n_layers, n_heads = c.stream_shape(stream) if stream else (0, 0)
if not n_layers or not n_heads:
    st.info(f"Run **{c.run}** declares no layers or heads for stream `{stream}`.")
    st.stop()
first_layer, first_head = state.ensure_head(c, stream)  # a first view opens on the run's most telling head
state.choose("layer", list(range(n_layers)), default=first_layer if first_layer in range(n_layers) else 0)
heads = [*range(n_heads), "mean"]
state.choose("head", heads, default=first_head if first_head in heads else 0)
t2.selectbox("Head", heads, format_func=lambda h: "mean over heads" if h == "mean" else f"head {h}",
             **state.bind("head"))
if n_layers > 1:
    t3.slider("Layer", 0, n_layers - 1, **state.bind("layer"))
state.choose("play", [False, True], default=False)


def _play() -> None:
    state.set_value("play", st.session_state["w_play"])
    if st.session_state["w_play"] and state.get("layer") >= n_layers - 1:
        state.set_value("layer", 0)


st.session_state["w_play"] = state.get("play")
t4.toggle("Play", key="w_play", on_change=_play, disabled=n_layers < 2, help="step through the layers")
layer, head = int(state.get("layer")), state.get("head")
head_text = "mean over heads" if head == "mean" else f"head {head}"

explained = [m for m in ("value", "rollout", "relevancy") if m in c.explained]
methods = ["attention", *explained]
state.choose("method", methods, default="attention")
if len(methods) > 1:
    st.segmented_control("Method", methods, format_func=METHOD_LABEL.get,
                         help="what the views show; the run was extracted with `--explain "
                              f"{c.capture.get('explain')}`", **state.bind("method"))
method = state.get("method") if state.get("method") in methods else "attention"
# What the views show, by method: rollout combines the heads up to the layer, relevancy every layer and
# head, so neither is "layer 3 · head 3". The download file names and the exports' titles say it.
shown = {"attention": f"attention · layer {layer} · {head_text}",
         "value": f"value-weighted · layer {layer} · {head_text}",
         "rollout": f"rollout through layer {layer} (heads combined)",
         "relevancy": "relevancy (all layers and heads)"}[method]
view_name = {"attention": f"attention-{c.run}-ex{ex_id}-{stream}-L{layer}-H{head}",
             "value": f"value-weighted-{c.run}-ex{ex_id}-{stream}-L{layer}-H{head}",
             "rollout": f"rollout-{c.run}-ex{ex_id}-{stream}-L{layer}",
             "relevancy": f"relevancy-{c.run}-ex{ex_id}-{stream}"}[method]  # download file names
about = f"{shown} · run {c.run} · example #{ex_id} · stream {stream}"  # exports' titles
tokens = state.q(queries.example_tokens, c.run, ex_id)
block = state.q(queries.method_block, c.run, ex_id, stream, layer, None if head == "mean" else int(head), n_heads, method)
keep = c.capture.get("keep_attention", "all")
pruned = views.is_pruned(keep) and method in ("attention", "value")
predicted = method == "relevancy" and bool((block.query_idx == -1).any())  # an encoder's prediction explained
# Colour scales are absolute (0 to 1: a weight's share of its row) unless stretched to the panel's largest
# value; relevancy has no fixed top, so it is always stretched.
state.choose("stretch", [False, True], default=False)


def _first_view() -> None:
    """This page's own selections back to their defaults, and the run's most telling head again."""
    state.ATTENTION.reset()
    state.set_value("layer", None)
    state.set_value("head", None)


o1, o2 = st.columns([1, 3])
o1.toggle("Stretch colours", disabled=method == "relevancy", **state.bind("stretch"),
          help="colour each panel from 0 to its own largest value instead of from 0 to 1: small differences "
               "show, but a panel whose queries hardly look at its keys then paints noise")
o2.button("Back to the first view", on_click=_first_view,
          help="the run's best grounding head (or largest text → image head) and a word naming a boxed object (or "
               "the content word that puts the most mass on the image); query tokens, patches, method and colours "
               "as they start")
stretch = bool(state.get("stretch")) or method == "relevancy"
VMAX = None if stretch else 1.0
NEGLIGIBLE = 0.01  # a panel's mass below which it is called negligible


def mass_text(mass: float) -> tuple[str, str]:
    """A panel's mass as its caption gives it, and what to say after it. A mass is at most 1, but the
    stored weights are rounded to float16 precision (``lake/schema.py``), so a row that puts all its mass
    on the panel's keys can sum to 1.0002: shown as 1, with the stored sum in a note."""
    if mass > 1.0 and method != "relevancy":
        return "1.0000", (f" (the stored weights, rounded to float16 precision, sum to {mass:.4f}; a mass is at "
                          "most 1)")
    return f"{mass:.4f}", ""


def panel_mass(mass: float, what: str) -> tuple[str, str, str]:
    """A panel's scale note (:func:`scale_note`, ``what`` its keys) and its mass as shown
    (:func:`mass_text`): ``(note, mass, rounding)``."""
    return (scale_note(mass, what), *mass_text(mass))


def scale_note(mass: float, what: str) -> str:
    """The caption's words on the colour scale, and a warning when the panel's mass is negligible."""
    if method == "relevancy":
        return "colour scaled to the panel's largest value (relevancy has no fixed top)"
    if mass < NEGLIGIBLE:
        st.info(f"The selected queries put only {mass:.4f} of their {METHOD_NOUN[method]} on {what}: negligible. "
                "On the absolute scale this shows as nearly nothing"
                + (", and stretched colours would paint noise." if not stretch else
                   "; the stretched colours below magnify noise."))
    return ("colour scaled to this panel's largest value (stretched)" if stretch
            else "colour on the absolute scale 0 to 1")
if method == "rollout":
    where = (f"**rollout through layer {layer}** of {n_layers} (the {n_heads} heads combined, layers 0 to {layer}) · "
             "read text query → key, `R[query, key]`")
elif method == "relevancy":
    where = f"**relevancy** over all {n_layers} layers and {n_heads} heads · read target → token"
else:
    cell = "`weight = A[query, key]`" if method == "attention" else METHOD_CELL[method]
    letter = "A" if method == "attention" else "V"
    where = (f"layer **{layer}** of {n_layers} · **{head_text}** of {n_heads} · {METHOD_NOUN[method]} read query → key, "
             f"{cell}" + (f"; mean over heads = Σₕ {letter}ₕ[query, key] / heads, pruned weights counting as 0"
                            if head == "mean" else ""))
st.caption(f"Example **#{ex_id}** — “{ex['text']}” · stream `{stream}` · {where}"
           + (f" · stored weights pruned (`{keep}`): missing weights show as 0" if pruned else ""))
if method != "attention":
    st.caption(f"**Method: {METHOD_LABEL[method]}** — {METHOD_HELP[method]}.")
if pruned:
    with st.expander(f"Pruned weights (`{keep}`): what is stored"):
        st.markdown(f"This run stores pruned attention weights (`{keep}`): {views.keep_description(keep)}. "
                    "Weights that were not stored show as 0, so a row's weights can sum to less than 1; the stored "
                    "share of the selected rows' mass is under **Stored mass** below.")
if block.empty:
    if method == "attention":
        st.info(f"No attention weights are stored for example #{ex_id} at stream `{stream}`, layer {layer} "
                f"(capture keeps `{keep}`). The Head summary page still has its statistics.")
    else:
        st.info(f"No {METHOD_LABEL[method]} values are stored for example #{ex_id} at stream `{stream}`"
                + ("" if method == "relevancy" else f", layer {layer}") + ": choose another stream or method.")
    st.stop()

qt, kt = views.stream_tokens(tokens, stream)
text_q, text_k = views.text_tokens(qt), views.text_tokens(kt)
patch_q, patch_k = views.patch_tokens(qt), views.patch_tokens(kt)
png = state.image_bytes(ex["image_id"]) if ex.get("has_image") else None
width, height = views.image_size(ex, patch_k)
# A tiled image (LLaVA-NeXT, Idefics3 …: the base image, tile 0, and crops or tiles 1..): every tile's
# outline on the image, and a choice between all tiles on the original image and one tile's tokens.
tile, outlines, tile_note = "all", None, ""
if len(views.tiles(patch_k)) > 1:
    tile_opts = ["all", *views.tiles(patch_k)]
    state.choose("tile", tile_opts, default="all")
    st.columns([1, 2])[0].selectbox(
        "Image tokens of", tile_opts, format_func=views.tile_label, **state.bind("tile"),
        help="this image was cut into tiles besides the base image: show the image tokens of every tile on the "
             "original image (summed where tiles overlap), or of one tile")
    tile = state.get("tile")
    outlines = views.tile_boxes(patch_k, tile)
    patch_q, patch_k = views.of_tile(patch_q, tile), views.of_tile(patch_k, tile)
    tile_note = (" **All tiles on the original image**: each tile's tokens (tiles outlined) sit at their boxes, and "
                 "where tiles overlap (the base image lies under every tile) a pixel shows the **sum** of the "
                 "weights of the image tokens that cover it, the attention reaching that spot through any tile; "
                 "the colour scale then goes up to that sum." if tile == "all" else
                 f" Image tokens of the **{views.tile_label(tile)}** only (solid outline); the masses are over its "
                 "patches.")

# BLIP-2 / InstructBLIP: the LM's image tokens are learned query tokens with no patch; the Q-Former's
# cross-attention (stream qformer_cross) is how they reach the patches.
crossed = stream == "qformer_cross"  # the query tokens over the patches
composable = (stream == "lm" and method == "attention" and "qformer_cross" in c.streams.stream.tolist()
              and not views.query_tokens(qt).empty)  # LM token -> query tokens -> patches


def image_chart(patches, description, select=False):
    vmax = VMAX
    if vmax is None and tile == "all" and outlines is not None:  # the legend tops where the summed heat does
        dh = max(1, round(DISPLAY_W * height / max(width, 1)))
        vmax = float(views.heat(patches, width, height, (DISPLAY_W, dh)).max()) or None
    jpeg, dw, dh = views.overlay(png, patches, width, height, DISPLAY_W, vmax=vmax)
    return charts.image_map(views.data_uri(jpeg), width, height, (dw, dh), patches,
                            weight_title=METHOD_QUANTITY[method],
                            vmax=vmax, select=select, description=description, outlines=outlines)


# The panels' titles, which the notes of the methods that fill only some of them point at.
LEFT_TITLE = ("Prediction → image" if predicted else "Text → query tokens → image" if composable
              else "Query tokens → image" if crossed else "Text → image")
TEXT_TITLE = "Prediction → text" if predicted else "Image → text"


def not_here(view: str) -> bool:
    """Whether ``view`` has nothing under the method (and say so, naming the panels that have it)."""
    if method == "rollout" and view != "text-image":
        st.info(f"Rollout is stored for text queries over image patches: see **{LEFT_TITLE}**.")
        return True
    if method == "relevancy" and (view in ("image-image", "image-text") or (predicted and view == "text-text")):
        st.info(f"Relevancy explains the model's output, not a patch or word query: see **{LEFT_TITLE}** and "
                f"**{TEXT_TITLE}**." if predicted else
                f"Relevancy is stored for the generated tokens' rows: see **{LEFT_TITLE}** and **Text → text**.")
        return True
    return False


sel_text: list[int] = []
sel_patch: list[int] = []
left, right = st.columns(2, gap="large")
def pick_text_tokens() -> tuple[list[int], dict[int, str]]:
    """The query text tokens' pills: (their token_idx, labels by text position)."""
    pos = [int(p) for p in text_q.text_pos]
    labels = {int(t.text_pos): views.token_label(t) for t in text_q.itertuples()}
    # a word naming a boxed object; else the content word (no "is", "the", special token or punctuation) that
    # puts the most mass on the image here; else the first word
    first_word = views.object_word(text_q, ex.get("boxes"))
    if first_word is None:
        first_word = views.content_word(text_q, views.image_mass(block, text_q, patch_k))
    if first_word is None:
        first_word = next((int(t.text_pos) for t in text_q.itertuples() if t.role == "word"), pos[0])
    valid = [p for p in (state.get("tokens") or []) if p in pos]
    state.set_value("tokens", valid or [first_word])
    generated = bool((text_q.role == "generated").any())
    st.pills("Query text tokens", pos, selection_mode="multi", format_func=labels.get,
             help="✦ marks the tokens the model generated (its answer): pick them for generated word → "
                  "image, question words for question word → image" if generated else None,
             **state.bind("tokens"))
    return text_q[text_q.text_pos.isin(state.get("tokens") or [])].token_idx.astype(int).tolist(), labels


def composed_view() -> tuple[list[int], pd.DataFrame]:
    """LM token -> query tokens -> patches: (the selected text tokens, what they put on each query token)."""
    sel, labels = pick_text_tokens()
    n_x, h_x = c.stream_shape("qformer_cross")
    state.choose("xlayer", list(range(n_x)), default=n_x - 1)
    state.choose("xhead", [*range(h_x), "mean"], default="mean")
    x1, x2 = st.columns(2)
    x1.selectbox("Q-Former cross layer", list(range(n_x)), **state.bind("xlayer"),
                 help="the Q-Former layer with cross-attention the queries reach the patches through (the last "
                      "is the one whose output the LM reads)")
    x2.selectbox("Q-Former head", [*range(h_x), "mean"], **state.bind("xhead"),
                 format_func=lambda h: "mean over heads" if h == "mean" else f"head {h}")
    xlayer, xhead = int(state.get("xlayer")), state.get("xhead")
    xhead_text = "mean over heads" if xhead == "mean" else f"head {xhead}"
    cross = state.q(queries.method_block, c.run, ex_id, "qformer_cross", xlayer,
                    None if xhead == "mean" else int(xhead), h_x, "attention")
    to_q = views.mean_rows(block, sel, views.query_tokens(qt))  # a[k]: the LM's attention on query token k
    patches = views.patch_tokens(tokens[tokens.stream == "vision"])
    comp = views.compose_through_queries(to_q, views.query_tokens(tokens[tokens.stream == "qformer"]), cross,
                                         patches)
    words = ", ".join(labels.get(p, str(p)) for p in state.get("tokens") or [])
    export.show_chart(image_chart(comp, "composed"), f"{view_name}-composed-X{xlayer}-H{xhead}", key="ti_chart",
                      width="content", context=f"LM token → query tokens → patches (composed) · {about} · "
                      f"Q-Former cross layer {xlayer}, {xhead_text} · query tokens {words}")
    if png is None:
        st.info("This example's image is not in the lake: the heatmap is drawn on a grey canvas.")
    q_mass, mass = float(to_q.weight.sum()), float(comp.weight.sum())
    note = scale_note(mass, "the image patches through the query tokens")
    (q_shown, q_round), (shown_mass, rounding) = mass_text(q_mass), mass_text(mass)
    st.caption(f"**Composed, not an attention the model computes**: `c[p] = Σₖ A[t, qₖ] · C[k, p]`, the LM's "
               f"attention from the selected token(s) `t` (layer {layer}, {head_text}, averaged over the "
               f"{len(sel)} selected) to each learned query token `qₖ`, times that query's Q-Former "
               f"cross-attention `C` to patch `p` (cross layer {xlayer}, {xhead_text}), summed over the queries. "
               f"Mass on the query tokens **{q_shown}**{q_round}; through them on the patches **{shown_mass}**{rounding} (the "
               f"rest of each query's cross-attention goes to the vision [CLS]); largest patch "
               f"{comp.weight.max():.4f}; {note}.")
    return sel, to_q


def query_tokens_view() -> None:
    """The learned query tokens over the patches (stream qformer_cross)."""
    qq = views.query_tokens(qt)
    pos = qq.seq_pos.astype(int).tolist()
    valid = [p for p in (state.get("qtokens") or []) if p in pos]
    state.set_value("qtokens", valid or pos)
    st.pills("Query tokens", pos, selection_mode="multi", format_func=lambda p: f"q{p}",
             help="the Q-Former's learned query tokens: the LM reads query k's output as its image token k",
             **state.bind("qtokens"))
    chosen = state.get("qtokens") or []
    sel = qq[qq.seq_pos.isin(chosen)].token_idx.astype(int).tolist()
    qi = views.mean_rows(block, sel, patch_k)
    export.show_chart(image_chart(qi, "query-image"), f"{view_name}-query-image", key="ti_chart",
                      width="content", context=f"Query tokens → image · {about} · query tokens "
                      f"{', '.join(f'q{p}' for p in chosen)}")
    note, qi_mass, rounding = panel_mass(float(qi.weight.sum()), "the image patches")
    st.caption(f"**query tokens → image**: the Q-Former's {METHOD_NOUN[method].replace('attention', 'cross-attention')} "
               f"from the selected learned query token(s) (query) to each image patch (key), averaged over the "
               f"{len(sel)} selected: **mass {qi_mass}**{rounding} (the rest goes to the vision [CLS]), largest patch "
               f"{qi.weight.max():.4f}; "
               f"{note}. On the `lm` stream the LM's own query tokens lead here: see its composed view.")


to_queries = None  # what the selected LM tokens put on each query token (composed view)
with left:
    st.subheader(LEFT_TITLE)
    if composable:
        sel_text, to_queries = composed_view()
    elif crossed:
        query_tokens_view()
    elif predicted:
        ti = views.mean_rows(block, [-1], patch_k)
        if patch_k.empty:
            st.info(f"Stream `{stream}` has no image tokens.")
        else:
            export.show_chart(image_chart(ti, "text-image"), f"{view_name}-prediction-image", key="ti_chart",
                              width="content", context=f"Prediction → image · {about}")
            st.caption("**relevancy of the prediction** to each image patch (the model's output: its answer, "
                       f"or its image–text score); colour scaled to the largest value ({ti.weight.max():.3g}).")
    elif text_q.empty or patch_k.empty:
        st.info(f"Stream `{stream}` has no text queries or no image keys.")
    else:
        sel_text, labels = pick_text_tokens()
        ti = views.mean_rows(block, sel_text, patch_k)
        export.show_chart(image_chart(ti, "text-image"), f"{view_name}-text-image", key="ti_chart",
                          width="content", context=f"Text → image · {about} · query "
                          f"tokens {', '.join(labels.get(p, str(p)) for p in state.get('tokens') or [])}")
        if png is None:
            st.info("This example's image is not in the lake: the heatmap is drawn on a grey canvas.")
        note, ti_mass, rounding = panel_mass(float(ti.weight.sum()), "the image patches")
        st.caption(f"**text → image**: {METHOD_NOUN[method]} from the selected text token(s) (query) to each image "
                   f"patch (key), averaged over the {len(sel_text)} selected queries: **text → image mass "
                   f"{ti_mass}**{rounding}, largest patch {ti.weight.max():.4f}. Patch values sit at their (row, "
                   f"col) on the grid and are interpolated bilinearly; {note}." + tile_note)

with right:
    if not crossed:
        st.subheader("Text → query tokens" if composable else "Image → image")
    if crossed:
        st.info("Stream `qformer_cross` has one kind of query, the Q-Former's learned query tokens, and one kind "
                "of key, the image: its view is on the left. The queries' attention among themselves is stream "
                "`qformer`; the LM's attention to them, followed on to the patches, is stream `lm`.")
    elif composable:
        strip = to_queries.assign(token=[views.query_label(t) for t in to_queries.itertuples()])
        export.show_chart(charts.token_strip(strip, weight_title=METHOD_QUANTITY[method], width=DISPLAY_W, vmax=VMAX,
                                             description="text-queries"),
                          f"{view_name}-text-queries", key="tq_chart", width="content",
                          context=f"Text → query tokens · {about}")
        tq_mass, rounding = mass_text(float(to_queries.weight.sum()))
        st.caption(f"**text → query tokens**: the LM's attention from the selected token(s) to each learned query "
                   f"token `qₖ` (the image tokens the LM reads; they have no patch), the first factor of the composed "
                   f"view: **mass {tq_mass}**{rounding}. Stream `qformer_cross` shows where each query looks.")
    elif not_here("image-image"):
        sel_patch = []
    elif patch_q.empty or patch_k.empty:
        st.info(f"Stream `{stream}` has no image-patch queries.")
        sel_patch = []
    else:
        keys = {views.patch_label(t): int(t.token_idx) for t in patch_q.itertuples()}
        centre = views.patch_label(patch_q.iloc[((patch_q.patch_row - patch_q.patch_row.median()).abs()
                                                 + (patch_q.patch_col - patch_q.patch_col.median()).abs()).argmin()])
        valid = [p for p in (state.get("patches") or []) if p in keys]
        state.set_value("patches", valid or [centre])
        sel_patch = [keys[p] for p in state.get("patches")]

        def _pick_patches() -> None:
            sel = st.session_state["ii_chart"].selection
            ids = [int(p["token_idx"]) for p in (sel.get("patch") or []) if "token_idx" in p]
            if not ids and sel.get("box"):
                ids = views.patches_in_box(patch_q, sel["box"])
            names = {v: k for k, v in keys.items()}
            if ids:
                state.set_value("patches", [names[i] for i in ids if i in names])

        ii = views.mean_rows(block, sel_patch, patch_k)
        ii["selected"] = ii.token_idx.isin(sel_patch)
        export.show_chart(image_chart(ii, "image-image", select=True), f"{view_name}-image-image",
                          key="ii_chart", width="content", on_select=_pick_patches,
                          selection_mode=["patch", "box"], context=f"Image → image · "
                          f"{about} · query patches {', '.join(state.get('patches'))}")
        note, ii_mass, rounding = panel_mass(float(ii.weight.sum()), "the image patches")
        st.caption(f"**image → image**: {METHOD_NOUN[method]} from the selected patch(es) "
                   f"{', '.join(state.get('patches'))} (query, outlined) to every patch (key): **image → image mass "
                   f"{ii_mass}**{rounding}; {note}. Click a patch to choose it, shift-click to add, or drag a box."
                   + tile_note)
    if not (composable or crossed):
        st.subheader(TEXT_TITLE)
    if composable or crossed:
        pass
    elif predicted and not text_k.empty:
        it = views.mean_rows(block, [-1], text_k)
        export.show_chart(charts.token_strip(it, weight_title="relevancy", width=DISPLAY_W, description="image-text"),
                          f"{view_name}-prediction-text", key="it_chart", width="content",
                          context=f"Prediction → text · {about}")
        st.caption("**relevancy of the prediction** to each text token.")
    elif method in ("rollout", "relevancy"):
        not_here("image-text")
    elif not sel_patch or text_k.empty:
        st.info(f"Stream `{stream}` has no image queries or no text keys.")
    else:
        it = views.mean_rows(block, sel_patch, text_k)
        note, it_mass, rounding = panel_mass(float(it.weight.sum()), "the text")
        export.show_chart(charts.token_strip(it, weight_title=METHOD_QUANTITY[method], width=DISPLAY_W, vmax=VMAX,
                                             description="image-text"),
                          f"{view_name}-image-text", key="it_chart", width="content",
                          context=f"Image → text · {about} · query patches "
                                  f"{', '.join(state.get('patches') or [])}")
        st.caption(f"**image → text**: each text token (key) coloured by the {METHOD_NOUN[method]} the selected "
                   f"patch(es) (query) put on it: **image → text mass {it_mass}**{rounding}; {note}.")

if not crossed:
    st.subheader("Text → text")
if crossed or not_here("text-text"):
    pass
elif text_q.empty or text_k.empty:
    st.info(f"Stream `{stream}` has no text queries or no text keys.")
else:
    tt = views.matrix(block, text_q, text_k)
    export.show_chart(charts.token_matrix(tt, weight_title=METHOD_QUANTITY[method], vmax=VMAX,
                                          description="text-text"),
                      f"{view_name}-text-text", key="tt_chart", width="content",
                      context=f"Text → text · {about}")
    # the panel's mass as the other panels give theirs: each query row's sum over the text keys, averaged over
    # the rows shown (relevancy: over the target rows it has)
    rows = tt[tt.query_idx.isin(block.query_idx)] if method == "relevancy" else tt
    row_sums = rows.groupby("query_idx").weight.sum()
    tt_mass = float(row_sums.mean()) if len(row_sums) else 0.0
    note, shown_mass, rounding = panel_mass(tt_mass, "the text (Text → text, every text query)")
    rest = [w for w, on in (("image keys", bool((kt.modality == "image").any())),
                            ("the weights that were not stored", pruned)) if on]
    values = {"attention": "weights", "value": "value-weighted shares"}.get(method, "values")
    st.caption(f"**text → text**: row = query token, column = key token, colour = {METHOD_CELL[method]}: "
               f"**text → text mass {shown_mass}**{rounding} (each query row's sum over the text keys, averaged over "
               f"the {len(row_sums)} rows), largest cell {tt.weight.max():.4f}; {note}. "
               + (f"A row's {values} over text keys need not sum to 1: the rest of its mass goes to {' and to '.join(rest)}."
                  if rest else "Each row sums to 1 over its text keys (this stream has no image keys).")
               + (" Rows marked ✦ are generated tokens: generated word → question word." if
                  (text_q.role == "generated").any() else ""))


def kept_mass_stat() -> float | None:
    """The head's ``kept_mass`` statistic for this example (the mean over heads for ``mean``)."""
    m = state.q(queries.head_stat_matrix, c.run, stream, "kept_mass", ex_id)
    m = m[(m.layer == layer) & m.value.notna()]
    if head != "mean":
        m = m[m["head"] == int(head)]
    return float(m.value.mean()) if len(m) else None


if pruned and method == "attention":
    st.subheader("Stored mass")
    rows = views.row_mass(block, qt[qt.token_idx.isin(sel_text + sel_patch)])
    rows = rows.assign(query=[views.patch_label(t) if t.role == "patch" and pd.notna(t.patch_row)
                              else views.token_label(t) for t in rows.itertuples()])
    stat = kept_mass_stat()
    m1, m2 = st.columns([1, 3])
    m1.metric(f"kept_mass, {head_text}", "—" if stat is None else f"{stat:.3f}",
              help="this head's statistic for this example: the mean over all its query rows of the share of "
                   "the row's attention mass that is stored")
    if rows.empty:
        m2.info("Select query tokens or patches above to see the stored share of their rows.")
    else:
        m2.dataframe(rows[["query", "token_idx", "modality", "mass"]].rename(columns={"mass": "stored mass"}),
                     hide_index=True, width="stretch",
                     column_config={"stored mass": st.column_config.NumberColumn(format="%.4f")})
    st.caption("**Stored mass** of a query row = Σ over keys of its stored weights, the share of the row's "
               "attention (which sums to 1) that the lake keeps: stored weights are the true weights, so this is "
               "exact" + (" (here averaged over heads)" if head == "mean" else "") + f". The **kept_mass** "
               f"statistic is its mean over every query row of example #{ex_id} at layer {layer}, computed at "
               "extraction from the full attention.")

with st.expander("Token table (modality, role, positions)"):
    st.dataframe(qt, hide_index=True, width="stretch")

if state.get("play"):
    time.sleep(0.8)
    if layer + 1 >= n_layers:
        state.set_value("play", False)
    else:
        state.set_value("layer", layer + 1)
    st.rerun()
