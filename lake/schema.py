"""The lake's contract: every table, its pyarrow schema, partition keys and meaning.

Each table is declared once here. The writer validates every batch against
these schemas, the catalog builds one DuckDB view per table from them, and
``tests/lake/test_schema.py`` pins the full list so that a change to the contract is
a visible diff.

Conventions (see docs/DESIGN.md): ``weight = A[query, key]``; layers and heads are
0-based; in ``attention`` ``layer`` is the block index, in ``hidden_states``
``layer`` 0 is the embedding output and ``l + 1`` the output of block ``l``;
``patch_row`` 0 is the top row, ``patch_col`` 0 the left column; boxes are
pixels of the original image, x to the right, y down.

Every engine reads every table correctly: stored weights and vectors are rounded to
float16 precision (that is all the precision they carry) but written as float32, since a
Parquet FLOAT16 column cannot be opened by Spark, is summed in float16 by polars (wrong
totals, no error) and has no aggregate kernels in pyarrow. With dictionary encoding for
weights and BYTE_STREAM_SPLIT for vectors (``lake/writer.py``) this costs little or nothing
in bytes (``bench/bench_lake_types.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# 2: attention.weight and hidden_states.vec are float32 holding float16-rounded values (1 wrote
# Parquet FLOAT16, which Spark cannot read, polars sums in float16 and pyarrow cannot aggregate).
# 3: tokens.tile (null for text; 0 the base image, 1.. crops or tiles of a tiling family). Files
# written before lack it; the catalog's view gives their rows the column's default (Table.added):
# tile 0 for image tokens, since every family then had one image.
SCHEMA_VERSION = 3


@dataclass(frozen=True)
class Table:
    """One lake table.

    Parameters
    ----------
    name : folder name under the lake root and DuckDB view name.
    schema : columns stored in the Parquet files (partition keys excluded).
    partition : hive partition keys, outermost first; they come back as
        columns through the views.
    doc : what a row means.
    added : ``(column, SQL expression)`` for each column added to the table after lakes were
        written (see SCHEMA_VERSION): files written before lack it, and the catalog's view gives
        their rows this value, computed from their other columns.
    """

    name: str
    schema: pa.Schema
    partition: tuple[str, ...]
    doc: str
    added: tuple[tuple[str, str], ...] = ()

    @property
    def partition_types(self) -> dict[str, pa.DataType]:
        return {k: PARTITION_TYPES[k] for k in self.partition}

    @property
    def columns(self) -> list[str]:
        """Every column a view of this table shows, partition keys first."""
        return list(self.partition) + [f.name for f in self.schema]


PARTITION_TYPES: dict[str, pa.DataType] = {
    "run": pa.string(),
    "stream": pa.string(),
    "layer": pa.int32(),
    "module": pa.string(),  # a module's name as the model names it (activations)
}

RUNS = Table(
    "runs",
    pa.schema(
        [
            ("run", pa.string()),
            ("model", pa.string()),
            ("model_family", pa.string()),
            ("revision", pa.string()),
            ("dtype", pa.string()),
            ("attn_implementation", pa.string()),
            ("streams", pa.string()),  # JSON {stream: {layers, heads, hidden_size}}
            ("manifest", pa.string()),
            ("n_examples", pa.int64()),
            ("capture", pa.string()),  # JSON of pipeline.capture_config.Capture
            ("status", pa.string()),  # running / complete
            ("created_at", pa.timestamp("us", tz="UTC")),
            ("software_version", pa.string()),
        ]
    ),
    (),
    "One row per run: one model over one manifest with one capture configuration.",
)

EXAMPLES = Table(
    "examples",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("source_id", pa.string()),
            ("split", pa.string()),
            ("text", pa.string()),
            ("answer", pa.string()),
            ("prediction", pa.string()),
            ("correct", pa.bool_()),
            ("image_id", pa.string()),
            ("image_width", pa.int32()),
            ("image_height", pa.int32()),
            ("grid_h", pa.int32()),
            ("grid_w", pa.int32()),
            ("n_tokens", pa.int32()),
            ("boxes", pa.string()),  # JSON, as in the manifest
            ("meta", pa.string()),  # JSON
        ]
    ),
    ("run",),
    "One row per example that was extracted; example_id is its 0-based row in the manifest.",
)

TOKENS = Table(
    "tokens",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("token_idx", pa.int32()),
            ("stream", pa.string()),
            ("modality", pa.string()),  # text / image
            ("role", pa.string()),  # cls, sep, pad, bos, word, patch, image_cls, generated
            ("token", pa.string()),  # word piece; null for patches
            ("seq_pos", pa.int32()),
            ("text_pos", pa.int32()),
            ("patch_row", pa.int32()),
            ("patch_col", pa.int32()),
            ("x0", pa.float32()),
            ("y0", pa.float32()),
            ("x1", pa.float32()),
            ("y1", pa.float32()),
            ("tile", pa.int16()),  # null for text; 0 the base image, 1.. crops or tiles
        ]
    ),
    ("run",),
    "The token table: every token of every stream of an example in one index space.",
    added=(("tile", "CASE WHEN modality = 'image' THEN 0 END"),),  # schema version 3
)

ATTENTION = Table(
    "attention",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("head", pa.int16()),
            ("query_idx", pa.int32()),
            ("key_idx", pa.int32()),
            ("weight", pa.float32()),  # rounded to float16 precision
        ]
    ),
    ("run", "stream", "layer"),
    "weight = A[query, key] of one head; query_idx and key_idx index the token table. "
    "Possibly pruned: see the run's capture config and the kept_mass statistic.",
)

HEAD_STATS = Table(
    "head_stats",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("stream", pa.string()),
            ("layer", pa.int32()),
            ("head", pa.int16()),
            ("stat", pa.string()),
            ("value", pa.float32()),  # null where the statistic has no rows to average
        ]
    ),
    ("run",),
    "Per-example head statistics, computed on the full attention before pruning.",
)

HIDDEN_STATES = Table(
    "hidden_states",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("token_idx", pa.int32()),
            ("norm", pa.float32()),  # L2 norm of the float32 vector
            ("vec", pa.list_(pa.float32())),  # rounded to float16 precision; null outside the sample
        ]
    ),
    ("run", "stream", "layer"),
    "Hidden state of each token; layer 0 is the embedding output, l + 1 the output of block l.",
)

EMBEDDINGS = Table(
    "embeddings",
    pa.schema(
        [
            ("stream", pa.string()),
            ("layer", pa.int32()),
            ("example_id", pa.int64()),
            ("token_idx", pa.int32()),
            ("method", pa.string()),
            ("x", pa.float32()),
            ("y", pa.float32()),
        ]
    ),
    ("run",),
    "2-D maps (openTSNE) of hidden states, one per stream and layer, aligned across layers.",
)

IMAGES = Table(
    "images",
    pa.schema(
        [
            ("image_id", pa.string()),  # sha256 of the file
            ("png", pa.binary()),  # longest side <= 512
            ("width", pa.int32()),  # of the original image
            ("height", pa.int32()),
        ]
    ),
    (),
    "Images by content hash, shared across runs, stored as PNG thumbnails.",
)

ERRORS = Table(
    "errors",
    pa.schema(
        [
            ("source_id", pa.string()),
            ("stage", pa.string()),
            ("message", pa.string()),
        ]
    ),
    ("run",),
    "Rows that were skipped (or altered, e.g. truncated) and why.",
)

RELEVANCY = Table(
    "relevancy",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("target", pa.int32()),  # token_idx of what is explained; null: the model's prediction
            ("method", pa.string()),  # rollout, relevancy, ...
            ("stream", pa.string()),
            ("layer", pa.int32()),  # the method's value after this block; null when it spans all layers
            ("token_idx", pa.int32()),
            ("value", pa.float32()),
        ]
    ),
    ("run",),
    "How much each token explains a target (--explain): attention rollout after every block, for "
    "text (and generated) queries over image keys; target is the query's token_idx.",
)

VALUE_NORMS = Table(
    "value_norms",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("head", pa.int16()),
            ("token_idx", pa.int32()),  # the key token
            ("norm", pa.float32()),  # ||W_O^h (W_V^h x_j + b_V^h)||
        ]
    ),
    ("run", "stream", "layer"),
    "--explain value: the norm of what each key token sends through each head (Kobayashi et al. "
    "2020); a stored weight a times this norm is its contribution norm ||a f(x)||.",
)

SINKS = Table(
    "sinks",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("token_idx", pa.int32()),
            ("dim", pa.int32()),  # the hidden dimension with the massive activation
            ("ratio", pa.float32()),  # |h_dim| / rms(h)
        ]
    ),
    ("run", "stream", "layer"),
    "--explain sinks: tokens whose hidden state (layer as in hidden_states) has a massive activation "
    "(|h_d| / rms(h) >= 20 in some dimension d; Kang et al. 2025).",
)

LENS = Table(
    "lens",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("layer", pa.int32()),  # hidden-state layer, as in hidden_states
            ("token_idx", pa.int32()),
            ("rank", pa.int16()),  # 0 = most likely
            ("vocab_id", pa.int32()),
            ("piece", pa.string()),
            ("prob", pa.float32()),
        ]
    ),
    ("run", "stream"),
    "--explain lens (decoder LVLMs): the logit lens, softmax(lm_head(norm(h))) of every token's hidden "
    "state at every layer, its top vocabulary items (the next token each layer would predict).",
)

ACTIVATIONS = Table(
    "activations",
    pa.schema(
        [
            ("example_id", pa.int64()),
            ("token_idx", pa.int32()),
            ("layer", pa.int32()),  # the stream's block holding the module (attention's layer); null outside the blocks
            ("norm", pa.float32()),  # L2 norm of the float32 vector
            ("vec", pa.list_(pa.float32())),  # rounded to float16 precision; null outside the --keep-hidden sample
        ]
    ),
    ("run", "stream", "module"),
    "--capture-modules: the output of each captured module (named as the model names it; a tuple output's "
    "first tensor) at each token of its stream, laid out like hidden_states.",
)

PROBES = Table(
    "probes",
    pa.schema(
        [
            ("probe", pa.string()),  # "<target> <selector> <source>": one probe's rows; running it again replaces them
            ("stream", pa.string()),
            ("layer", pa.int32()),  # hidden-state layer (source hidden) or the module's layer
            ("source", pa.string()),  # "hidden" or a module name
            ("target", pa.string()),  # "answer" or a manifest column (examples.meta)
            ("selector", pa.string()),  # image-in-box, word, last, mean-image
            ("metric", pa.string()),  # "accuracy" (a categorical target) or "r2" (a number)
            ("value", pa.float64()),  # the metric, k-fold cross-validated, folds grouped by example
            ("control", pa.float64()),  # the same probe on labels permuted across examples (mean over permutations)
            ("selectivity", pa.float64()),  # value - control
            ("p_value", pa.float64()),  # permutation test: (1 + #{permuted >= value}) / (1 + permutations)
            ("permutations", pa.int32()),
            ("folds", pa.int16()),
            ("n", pa.int32()),  # examples
            ("n_vectors", pa.int32()),  # feature vectors (a selector may take several tokens of one example)
            ("confusion", pa.string()),  # JSON {"labels": [...], "counts": [[true x predicted]]}, out of fold; null for r2
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    ),
    ("run",),
    "vlatlas probe: a linear probe's cross-validated score at each stream and layer, beside a control "
    "task on permuted labels, with its selectivity and permutation p-value.",
)

INTERVENTIONS = Table(
    "interventions",
    pa.schema(
        [
            ("intervention", pa.string()),  # the key of one `vlatlas intervene` (kind and options); rerunning it resumes
            ("example_id", pa.int64()),
            ("kind", pa.string()),  # heads, knockout, regions
            ("method", pa.string()),  # heads: mean/zero; knockout: "text->image" ...; regions: box or an explanation
            ("stream", pa.string()),  # null where it does not apply (regions)
            ("layer", pa.int32()),  # heads: the head's layer; knockout: the window's first layer
            ("head", pa.int32()),
            ("spec", pa.string()),  # JSON: the token sets, layer window, region or fraction, curve
            ("fraction", pa.float64()),  # regions: share of the image tokens removed (deletion) or kept (insertion)
            ("metric", pa.string()),  # what metric_* measure: logprob, class_logit, match_logit, rank_logit, similarity
            ("metric_before", pa.float64()),  # the model's own score of its original answer
            ("metric_after", pa.float64()),  # the same score under the intervention (estimated: first-order)
            ("answer_after", pa.string()),  # greedy answer or class under the intervention; null for a bare score
            ("changed", pa.bool_()),  # answer_after differs from the original answer; null for a bare score
            ("estimated", pa.bool_()),  # attribution patching (--estimate): metric_after is a first-order estimate
        ]
    ),
    ("run",),
    "vlatlas intervene: the model's score of its own answer before and after an intervention (a head "
    "ablated, attention edges knocked out in a window of layers, image regions removed), per example.",
)

TABLES: dict[str, Table] = {
    t.name: t
    for t in (RUNS, EXAMPLES, TOKENS, ATTENTION, HEAD_STATS, HIDDEN_STATES, EMBEDDINGS, IMAGES, ERRORS,
              RELEVANCY, VALUE_NORMS, SINKS, LENS, ACTIVATIONS, PROBES, INTERVENTIONS)
}

# Head statistics (docs/DESIGN.md). The formulas live in pipeline/stats.py.
STATS: tuple[str, ...] = (
    "t2i",
    "t2t",
    "i2t",
    "i2i",
    "i2i_noself",
    "entropy",
    "sink",
    "max",
    "img_entropy",
    "grounding",
    "pointing",
    "boxed_img_mass",
    "kept_mass",
)

# Statistics that only runs with --explain have (pipeline/explain.py): value-weighted variants
# (the same sums over the row a_ij n_h(j) renormalised), the mass on sink tokens, and statistics
# with the sink tokens left out of the keys (rows renormalised over the other keys).
EXPLAIN_STATS: dict[str, tuple[str, ...]] = {
    "value": ("t2i_norm", "t2t_norm", "i2t_norm", "i2i_norm", "sink_norm"),
    "sinks": ("sink_mass", "t2i_nosink", "t2t_nosink", "i2t_nosink", "i2i_nosink", "entropy_nosink",
              "grounding_nosink", "pointing_nosink"),
}

# One line per statistic: what it measures (the app's help text; the formulas are pipeline/stats.py's).
STAT_HELP: dict[str, str] = {
    "t2i": "mass that text queries put on image keys",
    "t2t": "mass that text queries put on text keys",
    "i2t": "mass that image queries put on text keys",
    "i2i": "mass that image queries put on image keys",
    "i2i_noself": "mass that image queries put on image keys other than themselves",
    "entropy": "row entropy divided by log(number of keys)",
    "sink": "mass on special tokens (cls, sep, bos, eos, image_cls, image_newline, and the image and turn "
            "markers: vision_start, vision_end, im_start, im_end, img_break, img_end, inst, inst_end, "
            "image_boundary, tile_marker, global_marker)",
    "max": "largest weight in the row",
    "img_entropy": "entropy of a text query's attention renormalised over image patches, "
    "divided by log(number of patches)",
    "boxed_img_mass": "for words with a ground-truth box: mass on image patches (how much they look "
    "at the image at all)",
    "grounding": "for words with a ground-truth box that put at least 1% of their attention on the "
    "image: mass on patches inside the box, renormalised over image patches (rows under 1% are "
    "left out: their image attention is noise)",
    "pointing": "for words with a ground-truth box that put at least 1% of their attention on the "
    "image: 1 when the patch with the most attention lies inside the box, else 0 (the pointing game)",
    "kept_mass": "share of the row's mass kept in the attention table",
    # --explain value (pipeline/explain.py): the same sums over the row a_ij * ||f_h(x_j)||, renormalised
    "t2i_norm": "value-weighted t2i: share of text queries' contribution norm ||a f(x)|| that comes from image keys",
    "t2t_norm": "value-weighted t2t: share of text queries' contribution norm that comes from text keys",
    "i2t_norm": "value-weighted i2t: share of image queries' contribution norm that comes from text keys",
    "i2i_norm": "value-weighted i2i: share of image queries' contribution norm that comes from image keys",
    "sink_norm": "value-weighted sink: share of the contribution norm that comes from special tokens",
    # --explain sinks
    "sink_mass": "mass on sink tokens (a massive activation, |h_d| / rms(h) >= 20, in this layer's input)",
    "t2i_nosink": "t2i with the sink tokens left out of every row (renormalised)",
    "t2t_nosink": "t2t with the sink tokens left out of every row (renormalised)",
    "i2t_nosink": "i2t with the sink tokens left out of every row (renormalised)",
    "i2i_nosink": "i2i with the sink tokens left out of every row (renormalised)",
    "entropy_nosink": "entropy with the sink tokens left out of every row (renormalised)",
    "grounding_nosink": "grounding with the sink tokens left out of every row (renormalised)",
    "pointing_nosink": "pointing with the sink tokens left out of every row (renormalised)",
}

# Every stream a family writes (docs/DESIGN.md, Conventions); cross streams name their queries and keys there.
STREAMS = ("self", "vision", "text", "cross", "lm", "qformer", "qformer_cross", "lm_cross", "perceiver")
# Roles of the tokens that carry no content of their own (the ``sink`` statistic's keys): the
# tokenizer's markers, an image's [CLS], LLaVA-NeXT's learned row-closing ``image_newline`` (it
# stands for no image region of its own), and the Qwen-VL chat template's turn and image markers.
ROLES_SPECIAL = ("cls", "sep", "bos", "eos", "image_cls", "image_newline", "vision_start", "vision_end",
                 "im_start", "im_end", "img_break", "img_end", "inst", "inst_end", "image_boundary",
                 "tile_marker", "global_marker")


def table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown lake table {name!r}; the tables are {', '.join(TABLES)}") from None
