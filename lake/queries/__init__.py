"""Named, parameterised queries over the lake's views: every SQL the app and the CLI run.

Each function takes a :class:`lake.catalog.Catalog` (anything with
``df(sql, params) -> pandas.DataFrame``) and returns a DataFrame. Values are
always bound as named parameters (DuckDB's ``$run``, with a dict ``{"run": ...}``), so
a name used twice is bound once; the SQL text is assembled only from constant fragments
chosen by Python code, never from user input.

One module per subject: ``runs``, ``examples`` (with tokens and images), ``stats`` (head
statistics), ``attention`` (one example's weights and the explanation methods), ``hidden``
(hidden states and maps), ``probes`` (what ``vlatlas probe`` reads, and its table), ``interventions`` (what ``vlatlas intervene`` ranks
image tokens by, and its table), ``groups`` (the Compare page's two groups), ``sql_examples`` (the SQL
page's worked examples) and ``filters`` (the example filter they share). Everything public is
importable from ``lake.queries`` itself.

Conventions (docs/DESIGN.md): ``weight = A[query, key]``; layers and heads are
0-based; ``(stream, layer, head)`` names a head.
"""

from __future__ import annotations

from lake.queries.filters import (
    ExampleFilter,
)
from lake.queries.runs import (
    list_runs,
    run_info,
    parse_json,
    run_capture,
    run_streams,
    run_errors,
    runs_same_manifest,
)
from lake.queries.examples import (
    EXAMPLE_COLUMNS,
    count_examples,
    examples,
    example,
    distinct_values,
    meta_keys,
    meta_values,
    example_tokens,
    image_png,
    images_png,
    accuracy_by,
    examples_by_id,
)
from lake.queries.stats import (
    NORMS,
    NORM_LABELS,
    stats_available,
    head_stat_matrix,
    head_stat_dataset,
    top_examples,
    head_means,
    layer_means,
    stat_by_correctness,
    pointing_chance,
    first_view_head,
)
from lake.queries.groups import (
    compare_sizes,
    compare_moments,
    compare_values,
    paired_sizes,
    paired_moments,
    paired_values,
)
from lake.queries.sql_examples import (
    EXAMPLE_SQL,
    EXPLAIN_ROWS,
    NEEDS,
    explain_rows,
    worked_rows,
    sql_literal,
    example_sql,
)
from lake.queries.attention import (
    n_heads,
    attention_block,
    METHODS,
    method_block,
    lens_words,
    attention_layers,
)
from lake.queries.hidden import (
    hidden_layers,
    hidden_vector_examples,
    hidden_token_keys,
    hidden_vectors,
    hidden_norm_examples,
    example_hidden,
    embedding_layers,
    embedding_map,
    embedding_tokens,
    embedding_path,
    map_vectors,
    hidden_norms,
    text_image_cosine,
)
from lake.queries.probes import (
    SIGNIFICANT,
    probe_rows,
    probe_keys,
    stored_modules,
)
from lake.queries.interventions import (
    intervention_keys,
    intervention_methods,
    head_effects,
    knockout_effects,
    region_curves,
    box_effects,
    example_changes,
    example_intervened,
    has_interventions,
)

__all__ = [
    "ExampleFilter",
    "list_runs",
    "run_info",
    "parse_json",
    "run_capture",
    "run_streams",
    "run_errors",
    "runs_same_manifest",
    "EXAMPLE_COLUMNS",
    "count_examples",
    "examples",
    "example",
    "distinct_values",
    "meta_keys",
    "meta_values",
    "example_tokens",
    "image_png",
    "images_png",
    "accuracy_by",
    "examples_by_id",
    "NORMS",
    "NORM_LABELS",
    "stats_available",
    "head_stat_matrix",
    "head_stat_dataset",
    "top_examples",
    "head_means",
    "layer_means",
    "stat_by_correctness",
    "pointing_chance",
    "first_view_head",
    "compare_sizes",
    "compare_moments",
    "compare_values",
    "paired_sizes",
    "paired_moments",
    "paired_values",
    "EXAMPLE_SQL",
    "EXPLAIN_ROWS",
    "NEEDS",
    "explain_rows",
    "worked_rows",
    "sql_literal",
    "example_sql",
    "n_heads",
    "attention_block",
    "METHODS",
    "method_block",
    "lens_words",
    "attention_layers",
    "hidden_layers",
    "hidden_vector_examples",
    "hidden_token_keys",
    "hidden_vectors",
    "hidden_norm_examples",
    "example_hidden",
    "embedding_layers",
    "embedding_map",
    "embedding_tokens",
    "embedding_path",
    "map_vectors",
    "hidden_norms",
    "text_image_cosine",
    "SIGNIFICANT",
    "probe_rows",
    "probe_keys",
    "stored_modules",
    "intervention_keys",
    "intervention_methods",
    "head_effects",
    "knockout_effects",
    "region_curves",
    "box_effects",
    "example_changes",
    "example_intervened",
    "has_interventions",
]
