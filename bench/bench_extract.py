"""Cost of ``vlatlas extract`` against the plain loop a user would write, and against a bare forward.

``make bench-extract`` (or ``python bench/bench_extract.py``) builds, for each family (vilt, clip,
siglip, blip, llava) and size (``base`` by default), a random-weight model from a config (nothing is
downloaded; processors are built as the tests build them), writes a manifest of ``n`` scenes
(384 x 384 px at base size, so that ViLT-B/32 sees its full 12 x 12 grid: 12 layers x 12 heads x ~185
tokens), and measures on that same manifest, in one run, side by side:

* ``plain``: the loop a user would write, as a script of its own (written next to the models as
  ``plain.py``): for each batch of the manifest, ``PIL.Image.open(...).convert("RGB")`` each image,
  call the model's processor (``AutoProcessor`` on the model folder) on texts + images, and run
  ``model(**inputs)`` under ``torch.no_grad()`` with the model loaded by ``from_pretrained(dir)``
  (its default attention implementation, no ``output_attentions``), same batches, device and
  dtype. LLaVA: one forward over the prompt (``"<image> question"``, or the chat template), no
  generation; BLIP VQA: the forward with one decoder start token (as ``bare``).
* ``bare``: the model's own forward alone, timed in-process after loading and encoding (the
  adapter's model: eager attention, ``output_attentions=False``, no hooks; for LLaVA the
  teacher-forced pass over prompt + greedy answer, generated before the clock starts), after one
  untimed warm-up batch; reported as examples per second.
* ``stats``: ``vlatlas extract ... --keep-attention none --keep-hidden none`` (statistics only);
* ``topk:8``: ``--keep-attention topk:8 --keep-hidden none``;
* ``default``: ``vlatlas extract`` with no capture options (``budget:8:0.9:2``, ``sample:256``);
* ``all``: ``--keep-attention all --keep-hidden all``, on the manifest's first ``--all-n`` rows
  (``--limit``; every weight of a ViLT-B example is ~4 M rows, so a full manifest would need GBs of
  memory and disk), against a second ``plain`` run on the same rows.

``plain`` and every extraction mode are timed as WHOLE PROCESSES from outside: the wall time of a
fresh Python process, from ``fork`` to its exit (interpreter start, imports, model and processor
loading, which both sides pay, and the work). Extraction runs the CLI (``pipeline.cli``, what
``vlatlas`` runs) with its defaults (input workers, chunking) into a fresh lake per mode and run.
Time x = mode's seconds / plain's seconds. Peak MB = the process's peak resident memory
(``ru_maxrss`` from ``wait4`` on that one child: the largest of the process and its reaped input
workers, not their sum). MB/ex = bytes of every Parquet file the run wrote (all tables, thumbnails
included) / examples. On CUDA, ``torch.cuda.max_memory_allocated`` of each process is reported too.
``run s`` (JSON and targets only) is the time extraction reports itself, i.e. without interpreter
start and imports. With ``--repeats R`` every measurement runs R times, interleaved, and the
median is reported.

Targets (ViLT-B base row): on a CPU, statistics only <= 1.25 x plain's time and the default capture
<= 1.6 x; on a GPU, statistics only >= 0.5 of plain's throughput and the default capture >= 100
examples/s (whole process; use a large ``--n`` there).

Lake size: after the ViLT default run (or with ``--lake-size [LAKE]`` on its own, from an existing
lake or a fresh default-capture ViLT lake) the bytes per stored row are measured from the Parquet
files (attention rows; hidden-state rows without their vector = the files' bytes minus the ``vec``
column's; head_stats rows) and projected to MB per example under the default capture, at the
policy's worst case: layers x heads x query tokens x (K + C) attention rows, (layers + 1) x tokens
norm rows, vectors of 256 sampled examples out of a 10,000-example run amortised (256 / 10,000 x
tokens x (layers + 1) x width x 2 bytes), and layers x heads x statistics head_stats rows; for
(a) the ViLT-B shape (12 x 12 x 185 tokens, 768 wide; target 2 MB) and (b) a 7B LVLM shape
(32 x 32 x 600 tokens, 4096 wide; target 20 MB).

Sizes: ``tiny`` = the tests' configs (tests/tiny.py, tests/models/test_dual.py, tests/models/test_blip.py,
tests/models/test_llava.py). ``base`` = ViT-B-like towers (hidden 768, 12 layers, 12 heads, MLP 3072):
ViLT-B/32 on 384 px (text 40), CLIP-B/32 and SigLIP-B/16 on 224 px (text 64), BLIP-B/16 on 224 px
(VQA head; text encoder and decoder BERT-base sized), LLaVA with a CLIP-B/16 224 px tower and a
Llama language model of GPT-2/base size (hidden 768, 12 layers, 12 heads, MLP 3072). Vocabularies
are the tests' word lists (a few dozen tokens), so embedding tables and LM heads are small.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/bench_extract.py` from the repo root
    sys.path.insert(0, str(ROOT))

FAMILIES = ("vilt", "clip", "siglip", "blip", "llava")
SIZES = ("tiny", "base")
# extraction modes: name -> capture options of `vlatlas extract` ([] = its defaults)
EXTRACT_MODES = {
    "stats": ["--keep-attention", "none", "--keep-hidden", "none"],
    "topk:8": ["--keep-attention", "topk:8", "--keep-hidden", "none"],
    "default": [],
    "all": ["--keep-attention", "all", "--keep-hidden", "all"],
    # the default capture plus one --explain method each (pipeline/explain.py), and all three
    "+value": ["--explain", "value"],
    "+rollout": ["--explain", "rollout"],
    "+sinks": ["--explain", "sinks"],
    "+explain": ["--explain", "rollout,value,sinks"],
    "+lens": ["--explain", "lens"],  # decoder LVLMs only (llava); skipped for the other families
    "+relevancy": ["--explain", "relevancy"],  # not blip (skipped)
}
EXPLAIN_MODES = ("+value", "+rollout", "+sinks", "+explain", "+lens", "+relevancy")
MODES = ("plain", "bare", *EXTRACT_MODES)
DEFAULT_MODES = tuple(m for m in MODES if m not in EXPLAIN_MODES)  # --modes +value,... to cost --explain
# examples per family when --n is not given: (device kind, size) -> {family: n}. On a CPU the whole
# base-size run of the five families takes well under 15 minutes on 2 cores; on a GPU the
# manifests are large enough for the whole-process rate to approach the steady one.
DEFAULT_N = {
    ("cpu", "tiny"): dict.fromkeys(FAMILIES, 32),
    ("cpu", "base"): {"vilt": 64, "clip": 48, "siglip": 16, "blip": 8, "llava": 8},
    ("cuda", "tiny"): dict.fromkeys(FAMILIES, 256),
    ("cuda", "base"): {"vilt": 2048, "clip": 2048, "siglip": 1024, "blip": 1024, "llava": 512},
}
DEFAULT_ALL_N = {"cpu": 8, "cuda": 64}
TARGETS_CPU = {"stats": 1.25, "default": 1.6}  # time x plain, at most
TARGETS_CUDA = {"stats": 0.5, "default": 100.0}  # throughput / plain's, at least; examples/s, at least
B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


# -- building models -----------------------------------------------------------------------
def build(family: str, size: str, out: Path) -> Path:
    """Save a random-weight model of ``family`` at ``size`` with its processor to ``out``."""
    import torch
    import transformers as tf

    from tests.models import test_blip, test_dual, test_llava
    from tests.tiny import make_tiny_vilt, write_vocab

    tf.utils.logging.disable_progress_bar()  # "Writing model shards" bars
    out.mkdir(parents=True, exist_ok=True)
    if size == "tiny":
        if family == "vilt":
            return make_tiny_vilt(out)
        if family in ("clip", "siglip"):
            return test_dual.make_tiny_dual(out, family)
        if family == "blip":
            return test_blip.make_tiny_blip(out, "vqa")
        return test_llava.make_tiny_llava(out)

    torch.manual_seed(0)
    if family == "vilt":
        return make_tiny_vilt(out, layers=12, heads=12, hidden=768, intermediate=3072, image_size=384,
                              patch_size=32, max_text=40)
    if family in ("clip", "siglip"):
        img, ps, max_text = 224, (32 if family == "clip" else 16), 64
        vision = dict(image_size=img, patch_size=ps, **B)
        if family == "clip":
            vocab, merges = test_dual._bpe()
            tok = tf.CLIPTokenizer(vocab=vocab, merges=merges)
            ip = tf.CLIPImageProcessor(size={"shortest_edge": img}, crop_size={"height": img, "width": img})
            proc = tf.CLIPProcessor(image_processor=ip, tokenizer=tok)
            text = dict(B, hidden_size=512, intermediate_size=2048, num_attention_heads=8, vocab_size=len(vocab),
                        max_position_embeddings=max_text, bos_token_id=0, eos_token_id=1, pad_token_id=1)
            cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)
            model = tf.CLIPModel(cfg).eval()
        else:
            tok = test_dual._siglip_tokenizer()
            ip = tf.SiglipImageProcessor(size={"height": img, "width": img})
            proc = tf.SiglipProcessor(image_processor=ip, tokenizer=tok)
            text = dict(B, vocab_size=len(tok), max_position_embeddings=max_text, pad_token_id=1, eos_token_id=1)
            cfg = tf.SiglipConfig(text_config=text, vision_config=vision)
            model = tf.SiglipModel(cfg).eval()
    elif family == "blip":
        img, max_text = 224, 40
        vocab = write_vocab(out / "vocab_src.txt")
        tok = tf.BertTokenizer(vocab=str(vocab), do_lower_case=True)
        ip = tf.BlipImageProcessor(size={"height": img, "width": img})
        proc = tf.BlipProcessor(image_processor=ip, tokenizer=tok)
        text = dict(B, vocab_size=tok.vocab_size, max_position_embeddings=max_text, encoder_hidden_size=768,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
        cfg = tf.BlipConfig(text_config=text, vision_config=dict(image_size=img, patch_size=16, **B),
                            projection_dim=256, image_text_hidden_size=256)
        model = tf.BlipForQuestionAnswering(cfg).eval()
        vocab.unlink()
    else:  # llava
        img, ps, image_id = 224, 16, test_llava.IMAGE_ID
        tok, vocab = test_llava.llava_tokenizer()
        ip = tf.CLIPImageProcessor(size={"shortest_edge": img}, crop_size={"height": img, "width": img})
        proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=ps,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
        vision = dict(model_type="clip_vision_model", image_size=img, patch_size=ps, **B)
        text = dict(B, model_type="llama", vocab_size=len(vocab), num_key_value_heads=12,
                    max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3)
        cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             image_seq_length=(img // ps) ** 2)
        model = tf.LlavaForConditionalGeneration(cfg).eval()
        model.generation_config.eos_token_id = 2
        model.generation_config.pad_token_id = 3
    cfg.vlatlas_random_weights = True
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


# -- the plain loop (a script of its own, run as a whole process) -----------------------------
PLAIN = r'''"""The loop a user would write: PIL -> processor -> forward, no attention weights returned."""
import argparse
import json
from pathlib import Path

import torch
import transformers
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--device", default="cpu")
ap.add_argument("--dtype", default="float32")
ap.add_argument("--limit", type=int, default=None)
a = ap.parse_args()

dtype = getattr(torch, a.dtype)
config = transformers.AutoConfig.from_pretrained(a.model)
model_class = getattr(transformers, config.architectures[0])
model = model_class.from_pretrained(a.model, dtype=dtype).to(a.device).eval()
processor = transformers.AutoProcessor.from_pretrained(a.model)

root = Path(a.data).parent
rows = [json.loads(line) for line in open(a.data) if line.strip()][:a.limit]
kw = dict(padding=True)
if config.model_type == "siglip":  # SigLIP was trained on text padded to its full length
    kw = dict(padding="max_length", truncation=True, max_length=config.text_config.max_position_embeddings)
elif config.model_type == "llava":
    processor.tokenizer.padding_side = "left"

predictions = []
for i in range(0, len(rows), a.batch_size):
    batch = rows[i:i + a.batch_size]
    images = [Image.open(root / r["image"]).convert("RGB") for r in batch]
    texts = [r["text"] for r in batch]
    if config.model_type == "llava":
        if getattr(processor, "chat_template", None):
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                add_generation_prompt=True, tokenize=False) for t in texts]
        else:
            texts = [f"{processor.image_token} {t}" for t in texts]
    inputs = processor(images=images, text=texts, return_tensors="pt", **kw)
    inputs = {k: v.to(a.device, dtype) if v.is_floating_point() else v.to(a.device) for k, v in inputs.items()}
    with torch.no_grad():
        if config.model_type == "blip":  # BLIP VQA's forward needs decoder input: one start token
            start = torch.full((len(batch), 1), model.decoder_start_token_id, device=a.device)
            out = model(**inputs, decoder_input_ids=start)
        else:
            out = model(**inputs)
    predictions += out[0].reshape(len(batch), -1).argmax(-1).tolist()
print(f"{len(predictions)} examples")
'''

# Runs a script (path) or module (name) as __main__; on CUDA it records the process's
# torch.cuda.max_memory_allocated into $VLATLAS_BENCH_CUDA_MEM at exit.
WRAP = r'''
import atexit, os, runpy, sys
def _cuda_mem():
    path = os.environ.get("VLATLAS_BENCH_CUDA_MEM")
    torch = sys.modules.get("torch")
    if path and torch is not None and torch.cuda.is_initialized():
        with open(path, "w") as f:
            f.write(str(torch.cuda.max_memory_allocated()))
atexit.register(_cuda_mem)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
'''


def run_process(argv: list[str], work: Path, cuda: bool) -> dict:
    """Run ``python -c WRAP argv`` as a fresh process; its wall time, peak RSS and CUDA peak."""
    out, err, mem = work / "proc.out", work / "proc.err", work / "proc.cuda"
    mem.unlink(missing_ok=True)
    env = dict(os.environ)
    if cuda:
        env["VLATLAS_BENCH_CUDA_MEM"] = str(mem)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(out, "w") as fo, open(err, "w") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", WRAP, *argv], stdout=fo, stderr=fe, cwd=ROOT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed (exit {p.returncode}):\n{err.read_text()[-3000:]}")
    peak_kb = usage.ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"seconds": seconds, "peak_mb": peak_kb / 1024, "stdout": out.read_text(),
            "cuda_mb": int(mem.read_text()) / 2**20 if mem.exists() else None}


def lake_bytes(lake: Path) -> int:
    return sum(p.stat().st_size for p in lake.rglob("*.parquet"))


# -- bare forward (in-process timing, fresh subprocess) -------------------------------------------
def _rss_kb() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _bare_forward(adapter, inputs):
    """The model's own forward pass: same inputs as extraction's, no attention weights, no hooks."""
    import torch

    m = adapter.model
    with torch.no_grad():
        if adapter.family == "vilt":
            return m(**inputs, output_attentions=False, output_hidden_states=False, return_dict=True)
        if adapter.family in ("clip", "siglip"):
            from pipeline.models.dual import REAL_MASK
            return m(**{k: v for k, v in inputs.items() if k != REAL_MASK}, output_attentions=False,
                     return_dict=True)
        if adapter.family == "blip":
            kw = adapter._model_inputs(inputs)
            if adapter.head == "vqa":
                start = torch.full((kw["input_ids"].shape[0], 1), m.decoder_start_token_id, dtype=torch.long,
                                   device=kw["input_ids"].device)
                return m(**kw, decoder_input_ids=start, output_attentions=False, return_dict=True)
            return m(**kw, use_itm_head=True, output_attentions=False, return_dict=True)
        # llava: teacher-forced pass over prompt + the answer prepare() generated
        return m(**adapter._model_inputs(inputs), use_cache=False, output_attentions=False, return_dict=True)


def bare_child(spec: dict) -> dict:
    """Load the adapter, encode every batch, one warm-up batch, then time the forward passes alone."""
    import torch

    from pipeline.data import load_image, read_manifest
    from pipeline.models import load_adapter

    cuda = spec["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    adapter = load_adapter(spec["model"], device=spec["device"], dtype=spec["dtype"])
    rows, _ = read_manifest(spec["manifest"])
    bs = spec["batch_size"]
    batches = []
    for i in range(0, len(rows), bs):
        pics = [load_image(r.image_path).image for r in rows[i:i + bs]]
        inputs, _ = adapter.encode([r.text for r in rows[i:i + bs]], pics)
        inputs = {k: (v.to(spec["device"]) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if hasattr(adapter, "prepare"):
            inputs = adapter.prepare(inputs)  # LLaVA: the greedy answer, before any clock
        batches.append(inputs)
    sync()
    base_kb = _rss_kb()
    torch.manual_seed(0)
    _bare_forward(adapter, batches[0])  # warm-up, untimed
    sync()
    t0 = time.perf_counter()
    for inputs in batches:
        torch.manual_seed(0)
        _bare_forward(adapter, inputs)
    sync()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "examples": len(rows), "base_mb": base_kb / 1024}


def measure_bare(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"bare forward {spec['model']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- lake size: bytes per stored row, projected MB per example -----------------------------------
def row_bytes(lake: Path) -> dict:
    """Bytes per row of ``attention``, of ``hidden_states`` without the vector, and of ``head_stats``,
    measured from a lake's Parquet files (every run in it)."""
    import pyarrow.parquet as pq

    out = {}
    for table in ("attention", "hidden_states", "head_stats"):
        files = sorted((lake / table).rglob("*.parquet"))
        size = sum(p.stat().st_size for p in files)
        rows = vec = 0
        for p in files:
            md = pq.ParquetFile(p).metadata
            rows += md.num_rows
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    if col.path_in_schema.split(".")[0] == "vec":
                        vec += col.total_compressed_size
        out[table] = {"bytes": size, "rows": rows, "vec_bytes": vec}
    for table, key in (("attention", "attention"), ("hidden_states", "norm"), ("head_stats", "head_stats")):
        t = out[table]
        out[f"per_{key}_row"] = (t["bytes"] - t["vec_bytes"]) / t["rows"] if t["rows"] else float("nan")
    return out


def project(rb: dict, layers: int, heads: int, tokens: int, width: int, run_examples: int = 10_000) -> dict:
    """MB per example of the default capture for a model of that shape, at the policy's worst case."""
    from lake.schema import STATS
    from pipeline.capture_config import Capture

    cap = Capture()
    pol, sample = cap.attention, cap.hidden.sample()
    attn = layers * heads * tokens * (pol.k + (pol.c or 0)) * rb["per_attention_row"]
    norms = tokens * (layers + 1) * rb["per_norm_row"]
    vectors = min(sample, run_examples) / run_examples * tokens * (layers + 1) * width * 2
    stats = layers * heads * len(STATS) * rb["per_head_stats_row"]
    mb = {k: v / 1e6 for k, v in dict(attention=attn, norms=norms, vectors=vectors, head_stats=stats).items()}
    mb["total"] = sum(mb.values())
    return mb


PROJECTIONS = (  # label, (layers, heads, tokens, width), target MB per example
    ("ViLT-B (12 x 12 x 185 tokens, 768 wide)", (12, 12, 185, 768), 2.0),
    ("7B LVLM (32 x 32 x 600 tokens, 4096 wide)", (32, 32, 600, 4096), 20.0),
)


def print_projection(rb: dict, source: str) -> list[dict]:
    from pipeline.capture_config import DEFAULT_KEEP_ATTENTION, DEFAULT_KEEP_HIDDEN

    print(f"\n### lake size under the default capture ({DEFAULT_KEEP_ATTENTION}, {DEFAULT_KEEP_HIDDEN})\n")
    print(f"measured on {source}: {rb['per_attention_row']:.2f} bytes / attention row "
          f"({rb['attention']['rows']:,} rows), {rb['per_norm_row']:.2f} bytes / hidden-state row without its "
          f"vector ({rb['hidden_states']['rows']:,} rows), {rb['per_head_stats_row']:.2f} bytes / head_stats row.")
    print("projection per example at the policy's worst case (every query row keeps K + C weights); "
          "vectors: 256 of a 10,000-example run, 2 bytes per element (float32 holding float16-rounded values "
          "with BYTE_STREAM_SPLIT takes 0.97x the bytes of float16: bench/bench_lake_types.py).\n")
    print("| shape | attention MB | norms MB | vectors MB | head_stats MB | total MB/ex | target | |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    out = []
    for label, shape, target in PROJECTIONS:
        mb = project(rb, *shape)
        ok = mb["total"] <= target
        print(f"| {label} | {mb['attention']:.3f} | {mb['norms']:.3f} | {mb['vectors']:.3f} | "
              f"{mb['head_stats']:.3f} | {mb['total']:.2f} | <= {target:g} | {'PASS' if ok else 'MISS'} |")
        out.append(dict(shape=label, target_mb=target, passed=ok, **mb))
    return out


# -- main --------------------------------------------------------------------------------------
def parse_n(text: str | None) -> dict[str, int] | int | None:
    """``--n 8`` (every family) or ``--n vilt=64,llava=8`` (the others keep their default)."""
    if not text:
        return None
    if "=" not in text:
        return int(text)
    return {k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}


def n_for(a, family: str, size: str) -> int:
    kind = "cuda" if a.device.startswith("cuda") else "cpu"
    if isinstance(a.n, int):
        return a.n
    if isinstance(a.n, dict) and family in a.n:
        return a.n[family]
    return DEFAULT_N[(kind, size)][family]


def extract_argv(model: Path, manifest: Path, lake: Path, a, options: list[str], limit: int | None) -> list[str]:
    argv = ["pipeline.cli", "extract", "--model", str(model), "--data", str(manifest), "--lake", str(lake),
            "--run", "bench", "--batch-size", str(a.batch_size), "--device", a.device, "--dtype", a.dtype,
            "--quiet", *options]
    if a.workers is not None:
        argv += ["--workers", str(a.workers)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return argv


def plain_argv(plain: Path, model: Path, manifest: Path, a, limit: int | None) -> list[str]:
    argv = [str(plain), "--model", str(model), "--data", str(manifest), "--batch-size", str(a.batch_size),
            "--device", a.device, "--dtype", a.dtype]
    return argv + (["--limit", str(limit)] if limit is not None else [])


def median_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in runs if r.get(k) is not None]
            out[k] = statistics.median(vals) if vals else None
    out["repeats"] = len(runs)
    return out


def bench_family(family: str, size: str, a, work: Path, plain: Path, manifests: dict, modes: list[str]) -> dict:
    cuda = a.device.startswith("cuda")
    n = n_for(a, family, size)
    if n not in manifests.setdefault(size, {}):
        from tests.tiny import make_manifest

        px = (384, 384) if size == "base" else (96, 96)  # ViLT-B/32 on 384 px: 12 x 12 patches
        manifests[size][n] = make_manifest(work / f"data-{size}-{n}", n=n, sizes=(px,))
    manifest = manifests[size][n]
    all_n = min(a.all_n, n)
    t0 = time.perf_counter()
    model = build(family, size, work / f"model-{family}-{size}")
    res = {"family": family, "size": size, "n": n, "all_n": all_n, "build_s": time.perf_counter() - t0}
    runs: dict[str, list[dict]] = {}
    for rep in range(a.repeats):
        for mode in modes:
            if (mode == "+lens" and family != "llava") or (mode == "+relevancy" and family == "blip"):
                continue
            tag = f"{family}/{size}/{mode}" + (f" #{rep + 1}" if a.repeats > 1 else "")
            print(f"  .. {tag}", file=sys.stderr, flush=True)
            if mode == "bare":
                r = measure_bare(dict(model=str(model), manifest=str(manifest), batch_size=a.batch_size,
                                      device=a.device, dtype=a.dtype))
                r["rate"] = r["examples"] / r["seconds"]
                runs.setdefault(mode, []).append(r)
                continue
            limit = all_n if mode == "all" and all_n < n else None
            if mode == "plain" or (mode == "all" and "plain" in modes and limit is not None):
                key = "plain" if mode == "plain" else "plain@all"
                r = run_process(plain_argv(plain, model, manifest, a, limit), work, cuda)
                r.pop("stdout")
                runs.setdefault(key, []).append(r)
                if mode == "plain":
                    continue
            lake = work / f"lake-{family}-{size}-{mode.replace(':', '')}"
            shutil.rmtree(lake, ignore_errors=True)
            r = run_process(extract_argv(model, manifest, lake, a, EXTRACT_MODES[mode], limit), work, cuda)
            m = re.search(r"extracted (\d+) examples .* in ([\d.]+) s", r.pop("stdout"))
            r["examples"] = int(m.group(1)) if m else (limit or n)
            r["run_s"] = float(m.group(2)) if m else None
            r["mb_per_ex"] = lake_bytes(lake) / 1e6 / max(r["examples"], 1)
            if mode == "default" and family == "vilt" and rep == 0:
                res["row_bytes"] = row_bytes(lake)
            runs.setdefault(mode, []).append(r)
            if not a.keep:
                shutil.rmtree(lake, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(model, ignore_errors=True)
    res["modes"] = {k: median_of(v) for k, v in runs.items()}
    plain_s = res["modes"].get("plain", {}).get("seconds")
    plain_all_s = res["modes"].get("plain@all", {}).get("seconds", plain_s)
    for mode, r in res["modes"].items():
        if mode in EXTRACT_MODES:
            ref = plain_all_s if mode == "all" else plain_s
            r["time_x"] = r["seconds"] / ref if ref else None
            r["rate"] = r["examples"] / r["seconds"]
    return res


def fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def print_table(results: list[dict], a, modes: list[str]) -> None:
    cuda = a.device.startswith("cuda")
    ext = [m for m in modes if m in EXTRACT_MODES]
    all_ns = {r["all_n"] for r in results if r["all_n"] < r["n"]}
    cols = ["family", "size", "n", "plain s", "plain peak MB", "bare ex/s"]
    for m in ext:
        label = m + (f" (first {'/'.join(map(str, sorted(all_ns)))})" if m == "all" and all_ns else "")
        cols += [f"{label} s", "x", "MB/ex", "peak MB"] + (["cuda MB"] if cuda else [])
    print(f"\n### {a.device} ({a.dtype}, batch {a.batch_size})\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
    for r in results:
        md = r["modes"]
        p, b = md.get("plain", {}), md.get("bare", {})
        cells = [r["family"], r["size"], str(r["n"]), fmt(p.get("seconds"), ".1f"), fmt(p.get("peak_mb"), ".0f"),
                 fmt(b.get("rate"), ".1f")]
        for m in ext:
            x = md.get(m, {})
            cells += [fmt(x.get("seconds"), ".1f"), fmt(x.get("time_x")), fmt(x.get("mb_per_ex"), ".3f"),
                      fmt(x.get("peak_mb"), ".0f")] + ([fmt(x.get("cuda_mb"), ".0f")] if cuda else [])
        print("| " + " | ".join(cells) + " |")
    print(f"\nseconds: whole process (interpreter start, imports, model load, work), median of {a.repeats}; "
          "x: / plain's seconds on the same rows" + (" (for `all`: a plain run on its first rows)" if all_ns else "")
          + "; MB/ex: Parquet bytes written / examples; peak MB: peak RSS of the process (largest of it and "
          "its input workers); bare ex/s: the forward alone, in-process, after load and encoding."
          + (" cuda MB: torch.cuda.max_memory_allocated of the process." if cuda else "")
          + (" With n <= 256 the default capture (sample:256) stores every example's hidden vectors, so its "
             "MB/ex is above a large run's (see the projection below)." if "default" in ext else ""))


def print_targets(results: list[dict], a) -> list[dict]:
    row = next((r for r in results if r["family"] == "vilt" and r["size"] == "base"), None)
    print("\n### targets (ViLT-B, base)\n")
    if row is None or "plain" not in row["modes"]:
        print("not measured (needs family vilt, size base and the plain mode)")
        return []
    md, n, plain = row["modes"], row["n"], row["modes"]["plain"]
    out = []

    def line(name, value, target, ok, unit, extra=""):
        out.append({"target": name, "value": value, "limit": target, "passed": ok})
        print(f"- {name}: {value:.2f}{unit} vs {'<=' if unit == ' x' else '>='} {target:g}{unit} "
              f"-> {'PASS' if ok else 'MISS'}{extra}")

    for mode in ("stats", "default"):
        if mode not in md:
            print(f"- {mode}: not measured")
            continue
        r = md[mode]
        run = f" (extract's own timer, from before loading: {n / r['run_s']:.2f} ex/s)" if r.get("run_s") else ""
        if not a.device.startswith("cuda"):
            line(f"{mode} time / plain's (n={n})", r["time_x"], TARGETS_CPU[mode], r["time_x"] <= TARGETS_CPU[mode],
                 " x", f"; {r['seconds']:.1f} s vs {plain['seconds']:.1f} s{run}")
        elif mode == "stats":
            tp = plain["seconds"] / r["seconds"]
            line(f"stats throughput / plain's (n={n})", tp, TARGETS_CUDA[mode], tp >= TARGETS_CUDA[mode], "",
                 f"; {r['rate']:.1f} vs {n / plain['seconds']:.1f} ex/s{run}")
        else:
            line(f"default examples/s, whole process (n={n})", r["rate"], TARGETS_CUDA[mode],
                 r["rate"] >= TARGETS_CUDA[mode], " ex/s", run)
    return out


def lake_size_only(a, work: Path) -> None:
    if a.lake_size:
        print_projection(row_bytes(Path(a.lake_size)), a.lake_size)
        return
    size = [s for s in a.sizes.split(",") if s][-1]
    n = n_for(a, "vilt", size)
    from tests.tiny import make_manifest

    px = (384, 384) if size == "base" else (96, 96)
    manifest = make_manifest(work / f"data-{size}-{n}", n=n, sizes=(px,))
    model = build("vilt", size, work / f"model-vilt-{size}")
    lake = work / "lake-vilt-default"
    run_process(extract_argv(model, manifest, lake, a, [], None), work, a.device.startswith("cuda"))
    print_projection(row_bytes(lake), f"a default-capture lake of ViLT ({size}, {n} examples)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all five)")
    ap.add_argument("--sizes", default="base", help="comma-separated: tiny, base (default: base)")
    ap.add_argument("--n", type=parse_n, default=None,
                    help="examples per family: N for all, or vilt=64,llava=8 (default: per family and device, "
                         f"CPU base {DEFAULT_N[('cpu', 'base')]})")
    ap.add_argument("--all-n", type=int, default=None,
                    help="rows the `all` mode extracts (first rows of the manifest; default "
                         f"{DEFAULT_ALL_N['cpu']} on CPU, {DEFAULT_ALL_N['cuda']} on CUDA; 0 = skip `all`)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"comma-separated subset of {','.join(MODES)} (default {','.join(DEFAULT_MODES)})")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="extraction's --workers (default: its own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--repeats", type=int, default=1, help="runs of every measurement; the median is reported")
    ap.add_argument("--lake-size", nargs="?", const="", default=None, metavar="LAKE",
                    help="only project the lake size per example under the default capture, from LAKE's "
                         "Parquet files or (no LAKE) from a fresh default-capture ViLT lake")
    ap.add_argument("--json", default=None, help="also write every result to this JSON file")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary folder, deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep models and lakes in the work folder")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(bare_child(json.loads(a.child))))
        return

    import torch

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    if a.all_n is None:
        a.all_n = DEFAULT_ALL_N["cuda" if cuda else "cpu"]
    modes = [m for m in a.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        sys.exit(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    if a.all_n <= 0 and "all" in modes:
        modes.remove("all")
    if a.repeats < 1:
        sys.exit("--repeats must be at least 1")
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="vlatlas-bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        if a.lake_size is not None:
            lake_size_only(a, work)
            return
        plain = work / "plain.py"
        plain.write_text(PLAIN)
        families = [f for f in a.families.split(",") if f]
        sizes = [s for s in a.sizes.split(",") if s]
        dev = (torch.cuda.get_device_name() if cuda
               else f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        print(f"extraction vs the plain loop: device {a.device} ({dev}), dtype {a.dtype}, batch {a.batch_size}, "
              f"torch {torch.__version__}, modes {','.join(modes)}", flush=True)
        results, manifests = [], {}
        for size in sizes:
            for family in families:
                r = bench_family(family, size, a, work, plain, manifests, modes)
                results.append(r)
                md = r["modes"]
                print(f"  {family} {size}: n={r['n']}, built in {r['build_s']:.0f} s; " + ", ".join(
                    f"{m} {md[m]['seconds']:.1f} s" + (f" ({md[m]['time_x']:.2f} x)" if md[m].get('time_x') else "")
                    for m in md if m != "bare"), file=sys.stderr, flush=True)
        print_table(results, a, modes)
        targets = print_targets(results, a)
        proj = []
        rb = next((r["row_bytes"] for r in results if "row_bytes" in r), None)
        if rb is not None:
            src = next(r for r in results if "row_bytes" in r)
            proj = print_projection(rb, f"the ViLT {src['size']} default-capture lake ({src['n']} examples)")
        print(f"\nbench took {time.perf_counter() - t_start:.0f} s")
        if a.json:
            Path(a.json).write_text(json.dumps({"device": a.device, "dtype": a.dtype, "batch_size": a.batch_size,
                                                "results": results, "targets": targets, "projection": proj},
                                               indent=1, default=str))
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
