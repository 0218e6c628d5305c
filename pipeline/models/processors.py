"""Processors assembled without torchvision.

Some families' processors hold a video processor, which transformers builds only with torchvision
(Qwen-VL, LLaVA-OneVision, InternVL, Pixtral, SmolVLM). :func:`processor_or` tries ``AutoProcessor``
first and otherwise assembles the family's stand-in here from the checkpoint's tokenizer, (PIL) image
processor and ``processor_config.json``: images only, the same inputs as the family's own processor
(each family's tests check it against transformers' class).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

IMG, IMG_BREAK, IMG_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"  # Pixtral's image token and row markers


def first_line(e: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing)."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def processor_or(model_id: str, revision: str | None, fallback):
    """``AutoProcessor`` when it builds a processor with an image processor and a tokenizer; else
    ``fallback.from_pretrained(model_id, revision)``: without torchvision a family whose processor
    holds a video processor (Qwen-VL, LLaVA-OneVision) cannot build it, and the fallback assembles one
    from the checkpoint's tokenizer and PIL image processor."""
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(model_id, revision=revision)
        if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
            return proc
        why = f"AutoProcessor gave a {type(proc).__name__}"
    except Exception as e:  # noqa: BLE001 - e.g. the video processor needs torchvision
        why = first_line(e)
    try:
        return fallback.from_pretrained(model_id, revision)
    except Exception as e:  # noqa: BLE001
        raise NotImplementedError(f"cannot build a processor for {model_id!r}: AutoProcessor failed ({why}), and "
                                  f"so did a tokenizer + image processor ({first_line(e)})") from None


IMAGE_HOLD = "<|vlatlas_placeholder|>"  # stands for one image token while prompts are expanded


class AssembledProcessor:
    """A family's processor assembled from its image processor and tokenizer where transformers cannot
    build its own without torchvision (:func:`processor_or`): the two, the chat template, and each
    prompt's image placeholder (``image_token``) expanded into the image tokens its image gets."""

    image_token: str

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize)

    def expand(self, texts: list[str], n_images: int, expansion) -> list[str]:
        """``texts`` with the ``i``-th ``image_token`` (counted over all prompts) replaced by
        ``expansion(i)``, a text in which :data:`IMAGE_HOLD` stands for one image token; there must be
        ``n_images`` placeholders."""
        out, i = [], 0
        for t in texts:
            while self.image_token in t:
                t = t.replace(self.image_token, expansion(i), 1)
                i += 1
            out.append(t.replace(IMAGE_HOLD, self.image_token))
        if i != n_images:
            raise ValueError(f"{i} {self.image_token} in the prompts for {n_images} images")
        return out


def chat_template_of(model_id: str, revision: str | None) -> str | None:
    """The processor's chat template (``chat_template.jinja``, or ``chat_template.json``), if any."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(model_id, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path:
            text = open(path, encoding="utf-8").read()
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def read_json(model_id: str, name: str, revision: str | None):
    from transformers.utils import cached_file

    path = cached_file(model_id, name, revision=revision, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return None if not path else open(path, encoding="utf-8").read()


def processor_settings(model_id: str, revision: str | None) -> tuple[dict[str, Any], str | None]:
    """A checkpoint's ``processor_config.json`` settings, and its chat template (the settings', else
    :func:`chat_template_of`)."""
    settings = json.loads(read_json(model_id, "processor_config.json", revision) or "{}")
    template = settings.get("chat_template")
    return settings, chat_template_of(model_id, revision) if template is None else template


class QwenImageTextProcessor(AssembledProcessor):
    """What ``Qwen2VLProcessor`` does for images and text, from a tokenizer and an image processor.

    ``__call__(images=, text=)`` runs the image processor on the images (``pixel_values``: every
    image's patches, concatenated; ``image_grid_thw``), expands the ``i``-th ``<|image_pad|>`` of
    the prompts to ``prod(image_grid_thw[i]) / merge_size^2`` copies, tokenizes, and adds
    ``mm_token_type_ids`` (1 on image tokens, 2 on video tokens, 0 elsewhere).
    """

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, chat_template)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None) -> "QwenImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        ip = AutoImageProcessor.from_pretrained(model_id, revision=revision)
        return cls(ip, tok, chat_template_of(model_id, revision))

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kw):
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        if images is not None:
            out.update(self.image_processor(images=images, return_tensors=return_tensors))
            grid = out["image_grid_thw"]
            merge = int(self.image_processor.merge_size)
            texts = self.expand(texts, len(grid), lambda i: IMAGE_HOLD * int(grid[i].prod() // merge ** 2))
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kw)
        ids = enc["input_ids"]
        mm = torch.zeros_like(ids)
        mm[ids == self.image_token_id] = 1
        mm[ids == self.video_token_id] = 2
        return {**enc, "mm_token_type_ids": mm, **out}


class PixtralImageTextProcessor(AssembledProcessor):
    """What ``PixtralProcessor`` does for images and text, from a tokenizer and an image processor: the
    image processor run with ``patch_size = patch_size * spatial_merge_size``, the ``i``-th ``[IMG]`` of the
    prompts expanded to ``h / P`` rows of ``w / P`` ``[IMG]`` closed by ``[IMG_BREAK]`` (the last by
    ``[IMG_END]``), ``(h, w) = image_sizes[i]``, ``P = patch_size * spatial_merge_size``."""

    def __init__(self, image_processor, tokenizer, patch_size: int, spatial_merge_size: int,
                 chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, chat_template)
        self.patch_size = int(patch_size)
        self.spatial_merge_size = int(spatial_merge_size)
        self.image_token, self.image_break_token, self.image_end_token = IMG, IMG_BREAK, IMG_END

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None) -> "PixtralImageTextProcessor":
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        ip = AutoImageProcessor.from_pretrained(model_id, revision=revision)
        cfg = json.loads(read_json(model_id, "processor_config.json", revision) or "{}")
        mc = AutoConfig.from_pretrained(model_id, revision=revision)
        ps = cfg.get("patch_size") or mc.vision_config.patch_size
        m = cfg.get("spatial_merge_size") or getattr(mc, "spatial_merge_size", 1)
        return cls(ip, tok, ps, m, chat_template_of(model_id, revision))

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kw):
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        if images is not None:
            P = self.patch_size * self.spatial_merge_size
            out.update(self.image_processor(images=images, patch_size={"height": P, "width": P},
                                            return_tensors=return_tensors))
            sizes = out["image_sizes"]

            def rows_of(i: int) -> str:  # rows of [IMG] closed by [IMG_BREAK], the last by [IMG_END]
                h, w = (int(x) for x in sizes[i])
                rows = [IMAGE_HOLD * (w // P) + self.image_break_token] * (h // P)
                return "".join(rows)[:-len(self.image_break_token)] + self.image_end_token

            texts = self.expand(texts, len(sizes), rows_of)
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kw)
        return {**enc, **out}


class OnevisionImageTextProcessor(AssembledProcessor):
    """What ``LlavaOnevisionProcessor`` does for one image per prompt, from a tokenizer and an image
    processor (no video processor: transformers builds one only with torchvision).

    ``__call__(images=, text=)`` runs the image processor (``pixel_values`` ``[image, crop, 3, s, s]``,
    ``image_sizes``, ``batch_num_images``), expands the ``i``-th ``<image>`` of the prompts to the
    number of features ``LlavaOnevisionProcessor._get_number_of_features`` (transformers' own method,
    borrowed) gives for image ``i`` (one fewer with ``vision_feature_select_strategy="default"``), and
    tokenizes.
    """

    def __init__(self, image_processor, tokenizer, num_image_tokens: int, vision_feature_select_strategy: str,
                 vision_aspect_ratio: str = "anyres_max_9", chat_template: str | None = None,
                 image_token: str = "<image>"):
        from transformers import LlavaOnevisionProcessor

        super().__init__(image_processor, tokenizer, chat_template)
        self.num_image_tokens = int(num_image_tokens)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self._count = LlavaOnevisionProcessor._get_number_of_features
        self._get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features.__get__(self)

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None) -> "OnevisionImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        settings, template = processor_settings(model_id, revision)
        if settings.get("num_image_tokens") is None:
            raise ValueError("processor_config.json gives no num_image_tokens")
        keep = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token")
        return cls(AutoImageProcessor.from_pretrained(model_id, revision=revision),
                   AutoTokenizer.from_pretrained(model_id, revision=revision), chat_template=template,
                   **{k: settings[k] for k in keep if settings.get(k) is not None})

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kw):
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        if images is not None:
            out.update(self.image_processor(images=images, return_tensors=return_tensors))
            sizes, (h, w) = out["image_sizes"], out["pixel_values"].shape[-2:]

            def tokens_of(i: int) -> str:
                H, W = (int(x) for x in sizes[i].tolist())
                n = self._count(self, H, W, int(h), int(w)) - (self.vision_feature_select_strategy == "default")
                return IMAGE_HOLD * n

            texts = self.expand(texts, len(sizes), tokens_of)
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kw)
        return {**enc, **out}


class InternVLImageTextProcessor(AssembledProcessor):
    """What ``InternVLProcessor`` does for images and text, from a tokenizer and an image processor (no video
    processor: transformers builds InternVL's only with torchvision).

    ``__call__(images=, text=)`` runs the image processor with ``crop_to_patches=True`` (``pixel_values``: every
    image's crops, concatenated; ``num_patches`` per image), replaces the ``i``-th ``<IMG_CONTEXT>`` of the
    prompts by ``<img>`` + ``image_seq_length * num_patches[i]`` ``<IMG_CONTEXT>`` + ``</img>`` and tokenizes.
    """

    def __init__(self, image_processor, tokenizer, image_seq_length: int = 256, chat_template: str | None = None):
        super().__init__(image_processor, tokenizer, chat_template)
        self.image_seq_length = int(image_seq_length)
        self.start_image_token = getattr(tokenizer, "start_image_token", None) or "<img>"
        self.end_image_token = getattr(tokenizer, "end_image_token", None) or "</img>"
        self.image_token = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None) -> "InternVLImageTextProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        settings, template = processor_settings(model_id, revision)
        kw = {"image_seq_length": settings["image_seq_length"]} if "image_seq_length" in settings else {}
        return cls(AutoImageProcessor.from_pretrained(model_id, revision=revision),
                   AutoTokenizer.from_pretrained(model_id, revision=revision), chat_template=template, **kw)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kw):
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, Any] = {}
        if images is not None:
            got = self.image_processor(images=images, crop_to_patches=True, return_tensors=return_tensors)
            counts = [int(n) for n in np.asarray(got["num_patches"]).reshape(-1)]
            out["pixel_values"] = got["pixel_values"]
            texts = self.expand(texts, len(counts), lambda i: self.start_image_token
                                + IMAGE_HOLD * (self.image_seq_length * counts[i]) + self.end_image_token)
        enc = self.tokenizer(texts, return_tensors=return_tensors, padding=padding, **kw)
        return {**enc, **out}


class SmolVLMImageTextProcessor:
    """What ``SmolVLMProcessor`` does for images, from the checkpoint's tokenizer, (PIL) image processor and
    ``processor_config.json`` (``image_seq_len``, chat template): transformers' ``Idefics3Processor``, whose
    image prompt (``<fake_token_around_image><row_R_col_C><image>...``, ``<global-img>``) is SmolVLM's
    (``processing_smolvlm.get_image_prompt_string``; ``tests/models/test_idefics3.py`` checks it)."""

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer, Idefics3Processor

        settings, template = processor_settings(model_id, revision)
        if settings.get("image_seq_len") is None:
            raise ValueError("processor_config.json gives no image_seq_len")
        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        ip = AutoImageProcessor.from_pretrained(model_id, revision=revision)
        for name, default in (("fake_image_token", "<fake_token_around_image>"), ("image_token", "<image>"),
                              ("global_image_token", "<global-img>")):
            if getattr(tok, name, default) != default:
                raise ValueError(f"the tokenizer's {name} is {getattr(tok, name)!r}, not {default!r}")
        return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=int(settings["image_seq_len"]),
                                 chat_template=template)
