"""Train the demo model: a small ViLT for visual question answering on the shapes world.

``vlatlas demo train --out DIR`` trains from scratch on the CPU, deterministic
for a seed, and saves the model with ``save_pretrained`` together with its
word-level tokenizer and image processor, so that ``vlatlas extract --model
DIR`` loads it offline like any Hugging Face checkpoint. It then measures
accuracy per question type on freshly generated held-out scenes (another
seed) and writes a model card (``README.md``) and ``metrics.json`` beside it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.demo import shapes


@dataclass(frozen=True)
class TrainConfig:
    n_train: int = 30_000
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 500
    weight_decay: float = 0.01
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    seed: int = 0
    eval_seed: int = 1_000_001
    n_eval: int = 2_000
    max_text: int = 16
    threads: int = 2
    max_steps: int | None = None  # stop early (tests)


def build_processor(out: Path):
    from transformers import BertTokenizer, ViltImageProcessor, ViltProcessor

    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + shapes.VOCAB) + "\n")
        tok = BertTokenizer(vocab=str(vocab), do_lower_case=True)
    ip = ViltImageProcessor(size={"shortest_edge": shapes.SIZE}, size_divisor=shapes.CELL,
                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return ViltProcessor(image_processor=ip, tokenizer=tok)


def build_model(cfg: TrainConfig, vocab_size: int):
    from transformers import ViltConfig, ViltForQuestionAnswering

    mc = ViltConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden, image_size=shapes.SIZE,
        patch_size=shapes.CELL, max_position_embeddings=cfg.max_text, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=len(shapes.ANSWERS),
        id2label=dict(enumerate(shapes.ANSWERS)), label2id={a: i for i, a in enumerate(shapes.ANSWERS)},
        max_image_length=-1,
    )
    torch.manual_seed(cfg.seed)
    model = ViltForQuestionAnswering(mc)
    # Hugging Face starts ViLT's patch position embeddings and image [CLS] at zero; a small random
    # start (as ViT's) breaks the symmetry between patches from the first step.
    with torch.no_grad():
        model.vilt.embeddings.position_embeddings.normal_(0.0, 0.02)
        model.vilt.embeddings.cls_token.normal_(0.0, 0.02)
    return model


def encode(examples: list[dict], processor, max_text: int) -> dict[str, torch.Tensor]:
    """Tensors for a list of generated examples, as the processor would make them."""
    enc = processor.tokenizer([e["question"] for e in examples], padding="max_length", truncation=True,
                              max_length=max_text, return_tensors="pt")
    pix = np.stack([np.asarray(shapes.draw(e["objs"]), dtype=np.uint8) for e in examples])  # [n, H, W, 3]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixels": torch.from_numpy(pix).permute(0, 3, 1, 2).contiguous(),  # [n, 3, H, W] uint8
            "labels": torch.tensor([shapes.ANSWERS.index(e["answer"]) for e in examples])}


def _pixel_values(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - 0.5) / 0.5  # the image processor's rescale + normalise


@torch.no_grad()
def evaluate(model, data: dict[str, torch.Tensor], qtypes: list[str], batch_size: int = 256) -> dict:
    model.eval()
    preds = []
    for i in range(0, len(qtypes), batch_size):
        px = _pixel_values(data["pixels"][i:i + batch_size])
        out = model(input_ids=data["input_ids"][i:i + batch_size],
                    attention_mask=data["attention_mask"][i:i + batch_size], pixel_values=px,
                    pixel_mask=torch.ones(px.shape[0], px.shape[2], px.shape[3], dtype=torch.long))
        preds.append(out.logits.argmax(-1))
    ok = (torch.cat(preds) == data["labels"]).numpy()
    acc = {q: float(ok[[t == q for t in qtypes]].mean()) for q in shapes.QTYPES}
    acc["overall"] = float(ok.mean())
    return acc


def train(out: str | Path, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    processor = build_processor(out)
    train_ex = shapes.generate(cfg.n_train, cfg.seed)
    data = encode(train_ex, processor, cfg.max_text)
    eval_ex = shapes.generate(cfg.n_eval, cfg.eval_seed)
    eval_data = encode(eval_ex, processor, cfg.max_text)
    model = build_model(cfg, processor.tokenizer.vocab_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(cfg.n_train / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, history, step = [], [], 0
    mask = torch.ones(cfg.batch_size, shapes.SIZE, shapes.SIZE, dtype=torch.long)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(cfg.n_train, generator=gen)
        for i in range(0, cfg.n_train, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            logits = model(input_ids=data["input_ids"][idx], attention_mask=data["attention_mask"][idx],
                           pixel_values=_pixel_values(data["pixels"][idx]), pixel_mask=mask[: len(idx)]).logits
            loss = torch.nn.functional.cross_entropy(logits, data["labels"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        acc = evaluate(model, eval_data, [e["qtype"] for e in eval_ex])
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses[-steps_per_epoch:])), **acc})
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {history[-1]['loss']:.3f}  held-out accuracy "
            f"{acc['overall']:.3f}  ({time.perf_counter() - t0:.0f} s)")
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    seconds = time.perf_counter() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    metrics = {"config": asdict(cfg), "train_seconds": round(seconds, 1), "steps": step,
               "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
               "heldout_accuracy": history[-1] if history else {}, "history": history,
               "torch": torch.__version__}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(model_card(metrics))
    return metrics


def model_card(m: dict) -> str:
    c, acc = m["config"], m["heldout_accuracy"]
    rows = "\n".join(f"| {q} | {acc.get(q, float('nan')):.3f} |" for q in (*shapes.QTYPES, "overall"))
    return f"""# shapes-vilt: the VL-Atlas demo model

A ViLT (`ViltForQuestionAnswering`) trained from scratch by `vlatlas demo train`
on the synthetic "shapes" world of `pipeline/demo/shapes.py`. Random weights
in, nothing downloaded.

## Data
{c['n_train']:,} generated questions (seed {c['seed']}) over 64 x 64 scenes of 2 to 4
objects (circle, square, triangle; red, green, blue, yellow), each inside one
16-pixel cell of a 4 x 4 grid, so one ViLT patch holds at most one object.
Question types: color, shape, exist, count, relation (left of / above), in equal
shares. Answers: {', '.join(shapes.ANSWERS)}.

## Configuration
{c['layers']} layers x {c['heads']} heads x {c['hidden']} wide, 16-pixel patches, text of at most
{c['max_text']} tokens, a word-level vocabulary of {len(shapes.VOCAB)} words. AdamW (lr {c['lr']},
weight decay {c['weight_decay']}), {c['warmup_steps']} warm-up steps then cosine decay, batch
{c['batch_size']}, {c['epochs']} epochs ({m['steps']} steps), cross-entropy over the answers.

## Training
{m['train_seconds'] / 60:.1f} minutes on {c['threads']} CPU threads (torch {m['torch']}); loss
{m['first_loss']:.2f} -> {m['last_loss']:.3f}.

## Accuracy on {c['n_eval']:,} freshly generated held-out questions (seed {c['eval_seed']})
| question type | accuracy |
| --- | --- |
{rows}

Reproduce: `vlatlas demo train --out pipeline/demo/model` (deterministic for a seed).
"""
