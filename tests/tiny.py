"""Tiny models and manifests for tests: random weights from small configs, nothing downloaded (and a free
loopback port for the servers tests start)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WORDS = ["what", "color", "is", "the", "circle", "square", "triangle", "red", "green", "blue",
         "left", "of", "a", "there", "how", "many", "shape", "?", "yes", "no"]
ANSWERS = ["red", "green", "blue", "yes", "no", "circle", "square"]


def free_port() -> int:
    """A TCP port free on the loopback interface (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return path


def word_tokenizer(vocab: dict[str, int], special: tuple[str, ...] = (), bos: str | None = None, **kwargs):
    """A word-level fast tokenizer over ``vocab`` (whitespace-split words, ``<unk>`` for any other), built
    from nothing on disk: ``special`` are added special tokens (never split), ``bos`` (a piece of
    ``vocab``) is put before every text, and ``kwargs`` go to ``PreTrainedTokenizerFast`` (its bos, eos
    and pad tokens, ``padding_side``, ``extra_special_tokens`` …)."""
    import transformers as tf
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    if bos is not None:
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", **kwargs)


def make_tiny_vilt(out: Path, *, layers: int = 2, heads: int = 2, hidden: int = 32, image_size: int = 64,
                   patch_size: int = 16, max_text: int = 16, head: str = "vqa", seed: int = 0,
                   intermediate: int | None = None) -> Path:
    """Save a random-weight ViLT with its processor (tokenizer + image processor) to ``out``."""
    import torch
    from transformers import (BertTokenizer, ViltConfig, ViltForImageAndTextRetrieval,
                              ViltForQuestionAnswering, ViltImageProcessor, ViltModel, ViltProcessor)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab_src.txt")
    tok = BertTokenizer(vocab=str(vocab), do_lower_case=True)
    ip = ViltImageProcessor(size={"shortest_edge": image_size}, size_divisor=patch_size)
    proc = ViltProcessor(image_processor=ip, tokenizer=tok)
    cfg = ViltConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate or 2 * hidden,
        image_size=image_size, patch_size=patch_size, vocab_size=tok.vocab_size,
        max_position_embeddings=max_text, num_labels=len(ANSWERS),
        id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)},
    )
    cfg.vlatlas_random_weights = True
    torch.manual_seed(seed)
    cls = {"vqa": ViltForQuestionAnswering, "retrieval": ViltForImageAndTextRetrieval, "base": ViltModel}[head]
    model = cls(cfg).eval()
    # HF initialises ViLT's patch position embeddings and image [CLS] to zeros; a trained
    # model's are not, and tests of patch positions are only meaningful when they differ.
    # Likewise, HF's small init gives near-uniform attention (every weight ~1/n), under which
    # a wrongly permuted attention matrix would still look right; larger query/key weights
    # give peaked, distinct rows.
    base = model if head == "base" else model.vilt
    with torch.no_grad():
        base.embeddings.position_embeddings.normal_(0.0, 0.5)
        base.embeddings.cls_token.normal_(0.0, 0.5)
        for block in base.encoder.layer:
            block.attention.attention.query.weight.normal_(0.0, 0.25)
            block.attention.attention.key.weight.normal_(0.0, 0.25)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    vocab.unlink()
    return out


def make_sink_vilt(out: Path) -> Path:
    """A 512-wide tiny ViLT whose ``[CLS]`` embedding has one huge dimension (5): the token is an
    attention sink by construction (``|h_5| / rms(h)`` about 22.6 > 20 after the embedding's layer
    norm; the ratio can only reach 20 in a model wider than 400)."""
    import torch
    from transformers import AutoTokenizer, ViltForQuestionAnswering

    make_tiny_vilt(out, hidden=512, heads=2, layers=2)
    model = ViltForQuestionAnswering.from_pretrained(out)
    cls_id = AutoTokenizer.from_pretrained(out).cls_token_id
    with torch.no_grad():
        model.vilt.embeddings.text_embeddings.word_embeddings.weight[cls_id, 5] = 1e4
    model.save_pretrained(out)
    return out


def draw_scene(path: Path, size: tuple[int, int], shapes: list[tuple[str, str, tuple[int, int, int, int]]],
               mode: str = "RGB") -> None:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for kind, color, box in shapes:
        if kind == "circle":
            d.ellipse(box, fill=color)
        elif kind == "square":
            d.rectangle(box, fill=color)
        else:
            x0, y0, x1, y1 = box
            d.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=color)
    img.convert(mode).save(path)


def make_manifest(out: Path, n: int = 6, *, seed: int = 0, sizes=((64, 64), (96, 64), (64, 80))) -> Path:
    """JSONL manifest of ``n`` small scenes with a boxed circle and a question about it."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        x0, y0 = int(rng.integers(0, w - 24)), int(rng.integers(0, h - 24))
        box = (x0, y0, x0 + 20, y0 + 20)
        color = ["red", "green", "blue"][i % 3]
        draw_scene(out / "images" / f"{i}.png", (w, h), [("circle", color, box)])
        rows.append({"id": f"q{i}", "image": f"images/{i}.png", "text": "what color is the circle ?",
                     "answer": color, "split": "val" if i % 2 else "train",
                     "boxes": [{"label": "circle", "box": list(box)}], "qtype": "color"})
    path = out / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB image of uniform noise: every patch differs from every other."""
    w, h = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_manifest(out: Path, rows: list[dict], name: str = "manifest.jsonl") -> Path:
    """Write ``rows`` as a JSONL manifest in ``out``; an ``image`` given as a PIL image is
    saved as PNG under ``out/images`` and replaced by its relative path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(rows):
        r = dict(r)
        if isinstance(r.get("image"), Image.Image):
            rel = f"images/{r.get('id', i)}.png"
            r["image"].save(out / rel)
            r["image"] = rel
        lines.append(json.dumps(r) + "\n")
    path = out / name
    path.write_text("".join(lines))
    return path


def noise_scene_rows(scenes, box=None) -> list[dict]:
    """Manifest rows of ``scenes`` (``(size (w, h), text, answer)`` each): example ``i`` an image of noise
    seeded ``i``; example 0's circle boxed at ``box`` (none when None). The family tests' examples."""
    rows = [{"id": f"s{i}", "image": noise_image(size, seed=i), "text": t, "answer": a}
            for i, (size, t, a) in enumerate(scenes)]
    if box is not None:
        rows[0]["boxes"] = [{"label": "circle", "box": list(box)}]
    return rows


def png(img: Image.Image) -> bytes:
    """An image as the bytes of a PNG file (what an upload carries)."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (a lake): size and modification time, to tell that nothing changed."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}
