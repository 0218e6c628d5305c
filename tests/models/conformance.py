"""The conformance suite: the checks every family passes, in the spirit of transformers' ``ModelTesterMixin``.

Each family's test file says how to build its tiny model and what is particular to it; the checks that
apply to every family live here and run over every family from ``tests/models/test_conformance.py``:

- :func:`check_token_table`: the lake's token table against the model's own inputs (the input id at
  each text token's ``seq_pos``, image tokens exactly where the model's image token id stands, the
  generated tokens after the prompt, the number of patches per stream against the processor's grid);
- :func:`check_attention`: the stored weights (read back from the lake's Parquet through DuckDB)
  against the model's own ``output_attentions`` (eager), every stored row summing to 1 over the keys
  its query may see and holding nothing on a key the model masks;
- :func:`check_statistic`: one head statistic in ``head_stats`` against a hand computation from the
  model's attention and the token table;
- :func:`check_answer`: the stored prediction against the model's own answer (``model.generate``,
  greedy, for the generating families);
- :func:`check_pages`: every app page under Streamlit's ``AppTest`` with no exception
  (``tests.app.test_app.check_every_page``);
- :func:`check_modules`: ``--capture-modules`` on the block of each stream's last layer (the path the
  family declares): the stored ``activations`` against a forward hook this suite registers on the model
  alone while it runs the case's ``reference`` (a tower run crop by crop or packed, named in
  ``FamilyCase.crops``: its output for the example alone, crops or packed patches laid one after another
  here).

A family joins the suite in a few lines. Its test file defines a :class:`FamilyCase` per variant and
lists them in a module-level ``CASES``; ``tests/models/test_conformance.py`` names the module in
``FAMILY_MODULES``. A case names

- ``make_model(dir) -> model dir``: the tiny-model builder (random weights from a config);
- ``rows(model dir) -> manifest rows``: the examples (``tests.tiny.write_manifest`` rows; the model is
  there for answers that depend on it);
- ``load(model dir) -> (model, processor)``: the model alone, ``attn_implementation="eager"``;
- ``reference(subject, ex) -> Reference``: what the model alone makes of example ``ex``: its input
  ids, its greedy continuation, its attention per stream in ``seq_pos`` order, the processor's patch
  count per stream and its answer (the family's own helpers compute these, never pipeline code);

and, where they differ from the defaults, the run name, the extraction settings, the image token id,
the statistic to check, the example the pages open and the checks that do not apply (``skip``, each
with its reason in a comment). :func:`subject` builds a case's lake ONCE per test session; the
family's own fixture calls it too, so the suite and the family file share one lake.

Adding a family (Llama 3.2 Vision, say) is, in its test file::

    def conformance_reference(s: conf.Subject, ex: int) -> conf.Reference:
        enc, gen = reference(s.model, s.proc, s.images[ex], s.texts[ex])  # the family's own helper
        o = teacher_forced(s.model, enc, gen)                             # output_attentions=True
        return conf.Reference(ids=enc["input_ids"][0].tolist(), generated=gen,
                              attentions={"lm": [x[0].numpy() for x in o.attentions]},
                              patches={"vision": n_patches},
                              prediction=s.proc.tokenizer.decode(gen, skip_special_tokens=True).strip())

    CASES = [conf.FamilyCase(id="mllama", family="mllama", run="mllama", make_model=make_tiny,
                             rows=scene_rows, load=load, reference=conformance_reference,
                             image_token=IMAGE_ID, streams=("lm", "lm_cross", "vision"),
                             cross=(("lm_cross", "lm", "vision"),))]

and ``"test_mllama"`` in ``FAMILY_MODULES`` of ``tests/models/test_conformance.py``. A stream whose queries and
keys are tokens of two streams (a cross-attention) is given ``[head, query, key]`` with the queries'
``seq_pos`` in one and the keys' in the other, and named in ``cross`` with those two streams; a stream
whose keys are the tokens of several streams (Idefics2's perceiver: its latents attend over the vision
tokens then themselves) names those streams, in the order of the reference's key axis, in
``key_streams``; a tower run crop by crop is given through
:func:`block_diagonal`; ViLT-like encoders that append image embeddings after the text give
:data:`EMBEDDED` at those positions of ``ids``.

Extraction is called in one place only (:func:`build_lake`); the family files import ``extract`` from
here for the other lakes they build.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from pipeline.extraction.run import extract  # the one extraction entry point the suite uses

CHECKS = ("token_table", "attention", "statistic", "answer", "pages", "modules")
EMBEDDED = -1  # Reference.ids at a position that holds an image embedding, not a token id


@dataclass(repr=False)
class Reference:
    """What the model alone makes of one example (computed by the family's test file).

    ids : the model's input ids over the text stream's sequence (the prompt; for an encoder the text), with
        :data:`EMBEDDED` at the positions where the model takes image embeddings instead of ids (ViLT
        appends them after the text).
    generated : the model's greedy continuation (token ids after the prompt), () for an encoder.
    attentions : ``{stream: [layer] -> array [head, query, key]}`` in the stream's ``seq_pos`` order
        (the model's own ``output_attentions``, eager); streams left out are not checked here.
    patches : ``{stream: number of patch tokens}`` from the processor's grid.
    prediction : the model's own answer (decoded greedy generation, top label …), None for none.
    """

    ids: list[int]
    generated: list[int] = field(default_factory=list)
    attentions: dict[str, list[np.ndarray]] = field(default_factory=dict)
    patches: dict[str, int] = field(default_factory=dict)
    prediction: str | None = None


@dataclass(repr=False)
class Subject:
    """A built case: the tiny model, its manifest's images and texts, its lake and the reference model."""

    case: "FamilyCase"
    mdir: Path
    data: Path
    lake: Path
    model: Any
    proc: Any
    images: list
    texts: list[str]
    rows: list[dict]
    _refs: dict = field(default_factory=dict)
    _tables: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Subject({self.case.id})"

    def ref(self, ex: int) -> Reference:
        """The case's reference for example ``ex``, computed once."""
        if ex not in self._refs:
            self._refs[ex] = self.case.reference(self, ex)
        return self._refs[ex]


@dataclass(frozen=True)
class FamilyCase:
    """One family variant for the conformance suite (see the module docstring).

    id : pytest id, unique over all cases.
    family : the ``model_family`` the runs row records.
    make_model, rows, load, reference : the family's builders (module docstring).
    run : the lake's run name.
    extract : keyword arguments of the extraction (batch size, capture policy).
    text_stream : the stream whose token table carries the text ids.
    image_token : the model's image token id in ``ids`` (None: the text holds no image tokens).
    statistic : ``(stream, layer, head, stat)`` checked by hand; stat is ``t2i`` or ``entropy``.
    page_example, page_column : the example the pages open and the Examples table column compared.
    hidden : the streams the lake's hidden states hold, when not ``streams``.
    row_atol : how far a stored row's sum may be from 1 (the weights are stored rounded).
    key_streams : ``{stream: (key stream, ...)}`` for a stream whose keys span several streams: the
        reference's key axis holds those streams' tokens one stream after the other, each in ``seq_pos``
        order (a stream left out has its keys' ``seq_pos`` as the key axis).
    cross : ``(stream, query stream, key stream)`` of each cross-attention stream whose queries and keys are
        tokens of two other streams (Mllama's ``lm_cross``: lm tokens over vision tokens). When given, every
        stored row's query and key are checked to be tokens of those streams (of the stream itself for the
        others), and the statistic of a cross stream reads its queries and keys from them.
    crops : streams of a tower whose batch is not the examples: run on one example, its modules output
        that example's crops ``[crop, n, dim]`` or its packed patches ``[(1,) patches, dim]``, which
        :func:`check_modules` lays one after another (``seq_pos = crop * n + patch``, as
        :func:`block_diagonal` lays the attention).
    positions : ``(subject, ex, seq_pos) -> the model's sequence positions`` of those tokens, where the model
        does not keep the token table's order (ViLT draws its patch order); None: ``seq_pos`` itself.
    skip : checks that do not apply to this case.
    """

    id: str
    family: str
    make_model: Callable[[Path], Path]
    rows: Callable[[Path], list[dict]]
    load: Callable[[Path], tuple]
    reference: Callable[[Subject, int], Reference]
    run: str = "conf"
    extract: dict = field(default_factory=lambda: dict(batch_size=2, keep_attention="all", keep_hidden="all"))
    text_stream: str = "lm"
    image_token: int | None = None
    statistic: tuple[str, int, int, str] = ("lm", 1, 1, "t2i")
    streams: tuple[str, ...] = ("lm", "vision")
    hidden: tuple[str, ...] | None = None
    page_example: int = 1
    page_column: str = "prediction"
    row_atol: float = 1e-3
    key_streams: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cross: tuple[tuple[str, str, str], ...] = ()
    crops: tuple[str, ...] = ()
    positions: Callable[[Subject, int, np.ndarray], np.ndarray] | None = None
    skip: frozenset[str] = frozenset()

    def applies(self, check: str) -> bool:
        return check not in self.skip

    def sides(self, stream: str) -> tuple[str, str]:
        """The streams holding ``stream``'s query and key tokens (itself, twice, unless a declared cross)."""
        return next(((q, k) for c, q, k in self.cross if c == stream), (stream, stream))


_SUBJECTS: dict[str, Subject] = {}


def built(lake: Path) -> Subject:
    """The subject built into ``lake`` (a family file's tests reuse the suite's cached references)."""
    return next(s for s in _SUBJECTS.values() if s.lake == Path(lake))


def build_lake(mdir: Path, manifest: Path, lake: Path, case: FamilyCase, **more) -> Path:
    """Run the extraction of ``case`` into ``lake`` (the one place the suite calls the pipeline), capturing
    the last block of each stream (:func:`check_modules`); ``more``: other options."""
    opts = {**case.extract, **more}
    if "capture_modules" not in opts:
        blocks = last_blocks(mdir)
        opts["capture_modules"] = ",".join(blocks.values()) or None
    extract(str(mdir), manifest, lake, case.run, progress=False, **opts)
    return lake


def last_blocks(mdir: Path) -> dict[str, str]:
    """``{stream: the module name of its last layer's block}``, as the family declares it (the adapter's
    stream paths); streams whose blocks no path names are left out. Read once per model."""
    from pipeline.models import load_adapter
    from pipeline.models.hooks import layer_slots

    if Path(mdir) not in _BLOCKS:
        a = load_adapter(str(mdir))
        _BLOCKS[Path(mdir)] = {s: p["hidden"].format(layer=layer_slots(a.configs[s])[-1]) for s, p in a.paths.items()
                               if "{layer}" in p.get("hidden", "")}
    return _BLOCKS[Path(mdir)]


_BLOCKS: dict[Path, dict[str, str]] = {}


def subject(case: FamilyCase, tmp_path_factory) -> Subject:
    """``case`` built once per test session: its tiny model, manifest, lake and reference model."""
    if case.id not in _SUBJECTS:
        from PIL import Image

        from tests.tiny import write_manifest

        tmp = tmp_path_factory.mktemp(f"conf-{case.id}")
        mdir = case.make_model(tmp / "model")
        rows = case.rows(mdir)
        manifest = write_manifest(tmp / "data", rows)
        written = [json.loads(line) for line in manifest.read_text().splitlines()]
        lake = build_lake(mdir, manifest, tmp / "lake", case)
        model, proc = case.load(mdir)
        images = [Image.open(tmp / "data" / r["image"]).convert("RGB") for r in written]
        _SUBJECTS[case.id] = Subject(case, mdir, tmp / "data", lake, model, proc, images,
                                     [r["text"] for r in written], written)
    return _SUBJECTS[case.id]


def raw(root: Path, sql: str, params=None):
    """``sql`` run by DuckDB straight over the lake's Parquet files (``{tokens}``, ``{attention}`` …
    become ``read_parquet(...)``), not through the app's catalog or queries."""
    import duckdb

    tables = ("runs", "examples", "tokens", "attention", "head_stats", "hidden_states", "activations")
    files = {t: f"read_parquet('{(Path(root) / t).as_posix()}/**/*.parquet', hive_partitioning = true)"
             for t in tables}
    con = duckdb.connect()
    try:
        return con.execute(sql.format(**files), params or {}).df()
    finally:
        con.close()


def block_diagonal(blocks: np.ndarray) -> np.ndarray:
    """A tower's attention over several crops, ``[crop, head, n, n]``, as one ``[head, crop * n, crop * n]``
    matrix in ``seq_pos`` order (crop after crop): crops never see each other."""
    c, h, n, _ = blocks.shape
    out = np.zeros((h, c * n, c * n), blocks.dtype)
    for k in range(c):
        out[:, k * n:(k + 1) * n, k * n:(k + 1) * n] = blocks[k]
    return out


def _table(s: Subject, name: str, sql: str):
    """One query over the case's lake, run once per session (the checks then read it many times)."""
    if name not in s._tables:
        s._tables[name] = raw(s.lake, sql, {"run": s.case.run})
    return s._tables[name]


def tokens(s: Subject, ex: int):
    """Example ``ex``'s token table, all streams, in ``token_idx`` order."""
    t = _table(s, "tokens", "SELECT * FROM {tokens} WHERE run = $run ORDER BY example_id, token_idx")
    return t[t.example_id == ex].reset_index(drop=True)


def memo(fn):
    """``fn`` computed once per distinct arguments in a session (models, images and encodings by identity,
    strings, numbers and id lists by value): the suite and a family's own tests share the model's
    reference outputs instead of running generate again. The arguments are held, so no id is reused."""
    import functools

    def key(x):
        if x is None or isinstance(x, (str, int, float, bool)):
            return x
        if isinstance(x, (list, tuple)):
            return tuple(key(i) for i in x)
        return ("id", id(x))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        k = (fn.__code__.co_filename, fn.__qualname__, key(args), tuple(sorted((n, key(v)) for n, v in kwargs.items())))
        if k not in _MEMO:
            _MEMO[k] = (args, kwargs, fn(*args, **kwargs))
        return _MEMO[k][2]
    return wrapper


_MEMO: dict = {}


# -- the checks ---------------------------------------------------------------------------------


def check_token_table(s: Subject) -> None:
    """Every example's text stream against the model's own inputs: each prompt token's text is the
    tokenizer's piece for the input id at its ``seq_pos``; image tokens stand exactly where the
    model's image token id does; generated tokens follow the prompt, one per generated id; every
    stream has the processor's number of patches."""
    case = s.case
    for ex in range(len(s.rows)):
        ref = s.ref(ex)
        t = tokens(s, ex)
        assert list(t.token_idx) == list(range(len(t))), ex
        lm = t[t.stream == case.text_stream]
        P, gen = len(ref.ids), list(ref.generated)
        assert sorted(lm.seq_pos) == list(range(P + len(gen))), ex  # every input, nothing else
        pieces = [None if i == EMBEDDED else s.proc.tokenizer.convert_ids_to_tokens(i) for i in ref.ids + gen]
        txt = lm[lm.modality == "text"]
        assert list(txt.token) == [pieces[p] for p in txt.seq_pos], ex
        img = lm[lm.modality == "image"]
        if case.image_token is not None:
            assert sorted(img.seq_pos) == [p for p, i in enumerate(ref.ids) if i == case.image_token], ex
        else:
            assert not len(img), ex
        gl = lm[lm.role == "generated"]
        assert list(gl.seq_pos) == list(range(P, P + len(gen))), ex
        for stream, n in ref.patches.items():
            assert ((t.stream == stream) & (t.role == "patch")).sum() == n, (ex, stream)


def stored_attention(s: Subject, ex: int, stream: str, layer: int):
    """The stored weights of one (example, stream, layer), with the query's and key's ``seq_pos``."""
    a = _table(s, "attention", "SELECT a.example_id, a.stream, a.layer, a.head, q.seq_pos AS q, k.seq_pos AS k, "
               "q.stream AS q_stream, k.stream AS key_stream, a.weight FROM {attention} a "
               "JOIN {tokens} q ON q.run = a.run AND q.example_id = a.example_id AND q.token_idx = a.query_idx "
               "JOIN {tokens} k ON k.run = a.run AND k.example_id = a.example_id AND k.token_idx = a.key_idx "
               "WHERE a.run = $run")
    if "by" not in s._tables:
        s._tables["by"] = {k: g.reset_index(drop=True) for k, g in a.groupby(["example_id", "stream", "layer"])}
    return s._tables["by"].get((ex, stream, layer), a.iloc[:0])


def key_axis(s: Subject, ex: int, stream: str, a) -> np.ndarray:
    """The stored keys' places on the reference's key axis: their ``seq_pos``, or for a stream whose keys
    span several streams (``FamilyCase.key_streams``) the tokens of the earlier key streams before them."""
    order = s.case.key_streams.get(stream)
    if order is None:
        return a.k.to_numpy()
    assert set(a.key_stream) <= set(order), (ex, stream, sorted(set(a.key_stream)))
    counts = tokens(s, ex).stream.value_counts()
    offset = dict(zip(order, np.cumsum([0] + [int(counts.get(o, 0)) for o in order[:-1]])))
    return a.k.to_numpy() + a.key_stream.map(offset).to_numpy(np.int64)


def check_attention(s: Subject) -> None:
    """The stored weights of every stream the reference gives = the model's own (eager); every stored
    row sums to 1 over the keys its query may see, and a key the model masks holds no weight."""
    checked, case = 0, s.case
    for ex in range(len(s.rows)):
        for stream, layers in s.ref(ex).attentions.items():
            for layer, own in enumerate(layers):  # own: [head, query, key] in seq_pos order
                a = stored_attention(s, ex, stream, layer)
                assert len(a), (ex, stream, layer)
                if case.cross:  # the queries and keys are the declared streams' tokens
                    assert (set(a.q_stream), set(a.key_stream)) == tuple({x} for x in case.sides(stream)), (ex, stream)
                h, q, k = a["head"].to_numpy(), a.q.to_numpy(), key_axis(s, ex, stream, a)
                np.testing.assert_allclose(a.weight.to_numpy(np.float32), own[h, q, k], atol=2e-3,
                                           err_msg=f"{s.case.id} ex {ex} {stream} layer {layer}")
                sums = a.groupby(["head", "q"]).weight.sum()
                np.testing.assert_allclose(sums.to_numpy(np.float64), 1.0, atol=case.row_atol)
                assert len(sums) == own.shape[0] * own.shape[1]  # every query's row is stored
                masked = own[h, q, k] == 0  # keys the model does not let the query see
                assert np.abs(a.weight.to_numpy()[masked]).max(initial=0) < 1e-6
                kept = np.zeros(own.shape, bool)
                kept[h, q, k] = True
                assert kept[own > 0].all()  # every key the query sees is stored (keep_attention "all")
                checked += 1
    assert checked, "the reference gives no stream's attention"


def check_statistic(s: Subject) -> None:
    """One head's statistic of each example, by hand from the model's own attention and the token
    table: ``t2i`` = mean over text queries of the mass on image keys; ``entropy`` = mean over the
    queries of ``-sum_k A log A / log(n_keys)``. A cross stream's queries and keys are the tokens of the
    streams it declares (``FamilyCase.cross``)."""
    stream, layer, head, stat = s.case.statistic
    for ex in range(len(s.rows)):
        A = s.ref(ex).attentions[stream][layer][head].astype(np.float64)  # [query, key], seq_pos order
        t = tokens(s, ex)
        qs, ks = s.case.sides(stream)
        tq, tk = (t[t.stream == x].sort_values("seq_pos") for x in (qs, ks))
        assert list(tq.seq_pos) == list(range(A.shape[0]))
        assert list(tk.seq_pos) == list(range(A.shape[1]))
        if stat == "t2i":
            text, image = (tq.modality == "text").to_numpy(), (tk.modality == "image").to_numpy()
            want = A[text][:, image].sum(1).mean()
        elif stat == "entropy":
            want = (-(A * np.log(np.clip(A, 1e-30, None))).sum(1) / math.log(A.shape[1])).mean()
        else:
            raise ValueError(f"no hand computation for {stat!r}")
        got = raw(s.lake, "SELECT value FROM {head_stats} WHERE run = $run AND example_id = $ex AND stream = $stream "
                  "AND layer = $layer AND head = $head AND stat = $stat",
                  {"run": s.case.run, "ex": ex, "stream": stream, "layer": layer, "head": head, "stat": stat})
        assert len(got) == 1 and got.value.iloc[0] == _approx(want), (ex, stat)


def _approx(x: float):
    import pytest

    return pytest.approx(x, abs=2e-4)


def check_answer(s: Subject) -> None:
    """Every stored prediction is the model's own answer, and ``correct`` says whether it is the
    manifest's answer; the runs row names the family and its streams."""
    ex = raw(s.lake, "SELECT example_id, answer, prediction, correct FROM {examples} WHERE run = $run "
             "ORDER BY example_id", {"run": s.case.run})
    assert list(ex.example_id) == list(range(len(s.rows)))
    for row in ex.itertuples():
        assert row.prediction == s.ref(row.example_id).prediction, row.example_id
        if pd.isna(row.answer):
            assert pd.isna(row.correct)
        else:  # compared as words, case and spacing aside
            assert bool(row.correct) == (row.prediction.lower().split() == row.answer.lower().split())
    runs = raw(s.lake, "SELECT model_family, streams FROM {runs} WHERE run = $run", {"run": s.case.run})
    assert list(runs.model_family) == [s.case.family]
    assert set(json.loads(runs.streams.iloc[0])) == set(s.case.streams)


def check_pages(s: Subject, monkeypatch) -> None:
    """Every app page renders with no exception on the case's lake and offers the lake's own streams
    (read from the Parquet files)."""
    from tests.app.test_app import check_every_page

    run = s.case.run
    att = sorted(raw(s.lake, "SELECT DISTINCT stream FROM {attention} WHERE run = $run", {"run": run}).stream)
    hid = sorted(raw(s.lake, "SELECT DISTINCT stream FROM {hidden_states} WHERE run = $run", {"run": run}).stream)
    assert att == sorted(s.case.streams)
    assert hid == sorted(s.case.hidden if s.case.hidden is not None else s.case.streams)
    examples = raw(s.lake, f"SELECT example_id, text, {s.case.page_column} FROM {{examples}} WHERE run = $run "
                   "ORDER BY example_id", {"run": run})
    check_every_page(s.lake, monkeypatch, run, s.case.page_example, att, hid, examples, column=s.case.page_column)


def _hooked_reference(s: Subject, ex: int, lengths: dict[str, int], flat: frozenset[str] = frozenset()
                      ) -> dict[str, np.ndarray]:
    """Each module's own output while the case's ``reference`` runs example ``ex`` again (the memoised
    helpers set aside, so the model really runs), as ``[seq, dim]``: of its calls with one sequence, the
    first of the example's length (``lengths[module]``: its stream's tokens in the lake), which is the
    example's teacher-forced (or only) pass -- a reference that runs every example runs ``ex`` = 0 first;
    a generation's first step, when it has that length, holds the same prompt. A module in ``flat`` (a
    tower run crop by crop or packed) has every call's rows one after another: the example's crops
    ``[crop, n, dim]`` become ``[crop * n, dim]``, its packed patches ``[(1,) patches, dim]`` stay."""
    import torch

    mods = dict(s.model.named_modules())
    calls: dict[str, list] = {n: [] for n in lengths}

    def keep(name):
        def fn(module, args, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            if name in flat and torch.is_tensor(t) and t.dim() in (2, 3):
                calls[name].append(t.detach().float().reshape(-1, t.shape[-1]).numpy())
            elif torch.is_tensor(t) and t.dim() == 3 and t.shape[0] == 1:
                calls[name].append(t[0].detach().float().numpy())
        return fn

    handles = [mods[n].register_forward_hook(keep(n)) for n in lengths]
    saved = dict(_MEMO)
    _MEMO.clear()
    try:
        s.case.reference(s, ex)
    finally:
        _MEMO.clear()
        _MEMO.update(saved)
        for h in handles:
            h.remove()
    out = {}
    for n, c in calls.items():
        fit = [x for x in c if x.shape[0] == lengths[n]]
        assert fit, f"{s.case.id}: the reference never ran {n} on example {ex} alone ({[x.shape for x in c]})"
        out[n] = fit[0]
    return out


def check_modules(s: Subject) -> None:
    """The activations of each stream's last block (captured in the case's lake) = the block's own output
    in the reference pass, at every token of example 0 of that stream (norms; vectors to float16
    precision), with the block's stream and layer; a tower's (``FamilyCase.crops``) at every example
    too, each cut from the batch's crops or packed sequence where the others' come before it."""
    case = s.case
    kept = last_blocks(s.mdir)
    got = raw(s.lake, "SELECT a.stream, a.module, a.layer, a.example_id, a.norm, a.vec, t.seq_pos, t.stream AS ts "
              "FROM {activations} a JOIN {tokens} t ON t.run = a.run AND t.example_id = a.example_id "
              "AND t.token_idx = a.token_idx WHERE a.run = $run", {"run": case.run})
    assert sorted(set(got[got.example_id == 0].module)) == sorted(kept.values()), case.id
    layers = json.loads(raw(s.lake, "SELECT streams FROM {runs} WHERE run = $run", {"run": case.run}).streams.iloc[0])
    towers = {st: m for st, m in kept.items() if st in case.crops}
    for ex in range(len(s.rows) if towers else 1):
        streams = kept if ex == 0 else towers
        t = tokens(s, ex)
        own = _hooked_reference(s, ex, {m: int((t.stream == st).sum()) for st, m in streams.items()},
                                frozenset(towers.values()))
        for stream, name in streams.items():
            rows = got[(got.module == name) & (got.example_id == ex)]
            n_tokens = (t.stream == stream).sum()
            assert len(rows) == n_tokens and set(rows.stream) == {stream} and set(rows.ts) == {stream}, \
                (case.id, ex, name)
            assert set(rows.layer) == {layers[stream]["layers"] - 1}, (case.id, name)
            at = rows.seq_pos.to_numpy() if case.positions is None else case.positions(s, ex, rows.seq_pos.to_numpy())
            want = own[name][at]  # [token, dim]
            np.testing.assert_allclose(rows.norm.to_numpy(np.float64), np.linalg.norm(want, axis=1), rtol=5e-3,
                                       atol=5e-3, err_msg=f"{case.id} ex {ex} {name}")
            vec = [np.asarray(v, np.float32) for v in rows.vec if isinstance(v, (list, np.ndarray))]
            assert len(vec) == len(rows), (case.id, ex, name)  # keep_hidden all: every vector
            np.testing.assert_allclose(np.stack(vec), want, rtol=5e-3, atol=5e-3, err_msg=f"{case.id} ex {ex} {name}")


def check_probe_tokens(s: Subject) -> None:
    """`vlatlas probe` reads every family's lake: in each stream with stored vectors, the ``last`` selector
    picks one token per example, and in a decoder's stream it is the prompt's last position by the model's
    own input ids (the token before the first generated one); ``mean-image`` picks the stream's image tokens;
    and the vectors a probe reads there are the stored ones."""
    from lake.catalog import Catalog
    from lake.queries import probes as pq
    from pipeline.probe import features, select_tokens

    run = s.case.run
    cat = Catalog(s.lake)
    try:
        ex = pq.probe_examples(cat, run)
        layers = pq.hidden_vector_layers(cat, run)
        streams = sorted(set(layers.stream))
        assert streams, s.case.id
        for stream in streams:
            tok = pq.probe_tokens(cat, run, stream)
            t0 = tok[tok.example_id == 0]
            last = select_tokens(tok, ex, "last")
            if (t0.modality == "text").any():
                picked = last[last.example_id == 0]
                assert len(picked) == 1, (s.case.id, stream)
                seq = int(t0.set_index("token_idx").seq_pos[int(picked.token_idx.iloc[0])])
                if (t0.role == "generated").any():  # a decoder: the prompt is the model's own input ids
                    assert seq == len(s.ref(0).ids) - 1, (s.case.id, stream, seq)
                    assert seq + 1 == int(t0[t0.role == "generated"].seq_pos.min()), (s.case.id, stream)
            image = select_tokens(tok, ex, "mean-image")
            assert sorted(image[image.example_id == 0].token_idx) == sorted(t0[t0.modality == "image"].token_idx)
            if len(last):  # the vectors at the picked tokens are the stored ones, one per example
                layer = int(layers[layers.stream == stream].layer.max())
                vecs = pq.selected_vectors(cat, run, "hidden_states", stream,
                                           (last.example_id.tolist(), last.token_idx.tolist()), layer=layer)
                x, groups = features(vecs, "last")
                stored = raw(s.lake, "SELECT example_id, token_idx, vec FROM {hidden_states} WHERE run = $run AND "
                             "stream = $stream AND layer = $layer", {"run": run, "stream": stream, "layer": layer})
                want = stored.merge(last, on=["example_id", "token_idx"]).sort_values("example_id")
                assert list(groups) == want.example_id.tolist(), (s.case.id, stream)
                np.testing.assert_allclose(x, np.stack([np.asarray(v, np.float32) for v in want.vec]), rtol=1e-6)
    finally:
        cat.close()
