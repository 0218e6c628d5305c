"""Cost of extraction against a bare forward pass of the same model on the same batch.

``make bench-extract`` (or ``python bench/bench_extract.py``) builds, for each family (vilt, clip,
siglip, blip, llava) and each size, a random-weight model from a config (nothing is downloaded;
processors are built as the tests build them) and measures on a manifest of small scenes:

* ``bare``: the model's own forward pass over the manifest's batches, eager attention,
  ``output_attentions=False``, no hooks (for LLaVA the same teacher-forced pass over prompt +
  answer; the greedy answer is generated before the clock starts);
* ``extract all``: :func:`pipeline.extract.extract` into a temporary lake with the default
  capture (all attention, all hidden states);
* ``extract topk``: the same with ``--keep-attention topk:8 --keep-hidden none``.

Extraction's time is everything ``extract`` does: reading images, encoding, the hooked pass,
statistics, flattening and writing Parquet, and the family's prediction (BLIP VQA and LLaVA
``generate`` their answer greedily, which the bare pass does not).

Each measurement runs in a FRESH subprocess: it imports, loads the model (``load_adapter``),
encodes the batches, records its resident memory and resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``; where that is not possible the peak includes loading, flagged ``*``),
then runs one untimed bare forward pass as warm-up and the timed measurement. Peak memory =
``ru_maxrss`` at the end minus the RSS after load (the warm-up's activations count in every mode).
On CUDA (``--device cuda``) ``torch.cuda.max_memory_allocated`` (reset after load; it includes
the weights) is reported too. Ratios are extraction / bare.

Sizes: ``tiny`` = the tests' configs (tests/tiny.py, tests/test_dual.py, tests/test_blip.py,
tests/test_llava.py). ``base`` = ViT-B-like towers (hidden 768, 12 layers, 12 heads, MLP 3072):
ViLT-B/32 on 384 px (text 40), CLIP-B/32 and SigLIP-B/16 on 224 px (text 64), BLIP-B/16 on 224 px
(VQA head; text encoder and decoder BERT-base sized), LLaVA with a CLIP-B/16 224 px tower and a
Llama language model of GPT-2/base size (hidden 768, 12 layers, 12 heads, MLP 3072). Vocabularies
are the tests' word lists (a few dozen tokens), so embedding tables and LM heads are small.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
MODES = {  # name -> (keep_attention, keep_hidden); None = bare forward
    "bare": None,
    "extract all": ("all", "all"),
    "extract topk:8": ("topk:8", "none"),
}
B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


# -- building models -----------------------------------------------------------------------
def build(family: str, size: str, out: Path) -> Path:
    """Save a random-weight model of ``family`` at ``size`` with its processor to ``out``."""
    import torch
    import transformers as tf

    from tests import test_blip, test_dual, test_llava
    from tests.tiny import make_tiny_vilt, write_vocab

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


# -- one measurement (runs in a fresh subprocess) --------------------------------------------
def _rss_kb() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM), which ru_maxrss reads
        return True
    except OSError:
        return False


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


def child(spec: dict) -> dict:
    import torch

    from pipeline.data import load_image, read_manifest
    from pipeline.extract import extract
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
        if hasattr(adapter, "prepare"):
            inputs = adapter.prepare(inputs)  # LLaVA: the greedy answer, before any clock
        batches.append(inputs)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_kb = _rss_kb()  # after imports, model load and encoding; before any forward pass
    reset = _reset_peak()
    torch.manual_seed(0)
    _bare_forward(adapter, batches[0])  # warm-up, untimed (its activations count in both peaks)
    sync()
    t0 = time.perf_counter()
    if spec["keep"] is None:
        for inputs in batches:
            torch.manual_seed(0)
            _bare_forward(adapter, inputs)
    else:
        ka, kh = spec["keep"]
        extract(spec["model"], spec["manifest"], spec["lake"], "bench", batch_size=bs, device=spec["device"],
                dtype=spec["dtype"], keep_attention=ka, keep_hidden=kh, progress=False, adapter=adapter)
    sync()
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "examples": len(rows), "peak_mb": max(peak_kb - base_kb, 0) / 1024,
            "base_mb": base_kb / 1024, "peak_reset": reset,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def measure(spec: dict) -> dict:
    """Run ``child(spec)`` in a fresh interpreter and return its result."""
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"measurement {spec['family']}/{spec['size']}/{spec['mode']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--examples", type=int, default=8, help="manifest rows for the tiny models (default 8)")
    ap.add_argument("--base-examples", type=int, default=4, help="manifest rows for the base models (default 4)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--out", default=None, help="work folder (default: a temporary folder, deleted at the end)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return

    import torch

    from tests.tiny import make_manifest

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="vlatlas-bench-extract-"))
    families = [f for f in a.families.split(",") if f]
    sizes = [s for s in a.sizes.split(",") if s]
    cuda = a.device.startswith("cuda")
    print(f"extraction vs bare forward: device {a.device}, dtype {a.dtype}, batch {a.batch_size}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    head = (f"{'family':<7} {'size':<5} {'mode':<15} {'ex':>3} {'ex/s':>8} {'peak MB':>9} "
            f"{'time x':>7} {'mem x':>7}" + (f" {'cuda MB':>9} {'cuda x':>7}" if cuda else ""))
    print(head)
    print("-" * len(head))
    results = []
    try:
        for size in sizes:
            n = a.examples if size == "tiny" else a.base_examples
            # square scenes: every family sees one full grid (ViLT-B/32 on 384 px: 12 x 12 patches)
            manifest = make_manifest(work / f"data-{size}", n=n, sizes=((96, 96),))
            for family in families:
                t0 = time.perf_counter()
                model = build(family, size, work / f"model-{family}-{size}")
                build_s = time.perf_counter() - t0
                bare = None
                for mode, keep in MODES.items():
                    lake = work / f"lake-{family}-{size}-{mode.split()[-1].replace(':', '')}"
                    spec = dict(family=family, size=size, mode=mode, model=str(model), manifest=str(manifest),
                                lake=str(lake), keep=keep, batch_size=a.batch_size, device=a.device,
                                dtype=a.dtype)
                    r = measure(spec)
                    shutil.rmtree(lake, ignore_errors=True)
                    r.update(family=family, size=size, mode=mode)
                    if keep is None:
                        bare = r
                    rate = r["examples"] / r["seconds"]
                    tx = r["seconds"] / bare["seconds"]
                    mx = r["peak_mb"] / bare["peak_mb"] if bare["peak_mb"] > 0 else float("nan")
                    r.update(rate=rate, time_ratio=tx, mem_ratio=mx)
                    line = (f"{family:<7} {size:<5} {mode:<15} {r['examples']:>3} {rate:>8.2f} "
                            f"{r['peak_mb']:>8.0f}{'' if r['peak_reset'] else '*'} {tx:>7.2f} {mx:>7.2f}")
                    if cuda:
                        cx = r["cuda_peak_mb"] / bare["cuda_peak_mb"] if bare["cuda_peak_mb"] else float("nan")
                        line += f" {r['cuda_peak_mb']:>9.0f} {cx:>7.2f}"
                    print(line, flush=True)
                    results.append(r)
                shutil.rmtree(model, ignore_errors=True)
                print(f"{'':<7} ({family} {size}: model built in {build_s:.0f} s; resident after load "
                      f"{bare['base_mb']:.0f} MB)", flush=True)
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)
    print("\nex/s: examples per second of the whole measurement; peak MB: peak RSS above the RSS after "
          "import, load and encoding\n(* = the peak could not be reset and includes loading); "
          "time x / mem x: this mode / bare.")


if __name__ == "__main__":
    main()
