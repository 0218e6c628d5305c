"""Model adapters, one module per family: a declaration (``family.FamilySpec``) and an adapter class that
implements ``base.Adapter`` (the protocol the pipeline calls) with the family's own image-token mapping."""

from __future__ import annotations

from pathlib import Path

import torch

# config.model_type -> (family, adapter module, class)
FAMILIES = {
    "vilt": ("vilt", "pipeline.models.vilt", "ViltAdapter"),
    "clip": ("clip", "pipeline.models.dual", "DualEncoderAdapter"),
    "siglip": ("siglip", "pipeline.models.dual", "DualEncoderAdapter"),
    "llava": ("llava", "pipeline.models.llava", "LlavaAdapter"),
    "blip": ("blip", "pipeline.models.blip", "BlipAdapter"),
    "llava_next": ("llava_next", "pipeline.models.llava_next", "LlavaNextAdapter"),
    "llava_onevision": ("llava_onevision", "pipeline.models.llava_next", "LlavaOnevisionAdapter"),
    "paligemma": ("paligemma", "pipeline.models.paligemma", "PaliGemmaAdapter"),
    "gemma3": ("gemma3", "pipeline.models.gemma3", "Gemma3Adapter"),
    **{t: (t, "pipeline.models.qwen2vl", "QwenVLAdapter") for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")},
    "mistral3": ("mistral3", "pipeline.models.mistral3", "Mistral3Adapter"),
    "blip-2": ("blip2", "pipeline.models.blip2", "Blip2Adapter"),
    "instructblip": ("instructblip", "pipeline.models.blip2", "InstructBlipAdapter"),
    **{t: (t, "pipeline.models.idefics3", "Idefics3Adapter") for t in ("idefics3", "smolvlm")},
    "internvl": ("internvl", "pipeline.models.internvl", "InternVLAdapter"),
    "idefics2": ("idefics2", "pipeline.models.idefics2", "Idefics2Adapter"),
    "aya_vision": ("aya_vision", "pipeline.models.aya_vision", "AyaVisionAdapter"),
    "mllama": ("mllama", "pipeline.models.mllama", "MllamaAdapter"),
}

def families_with(capability: str) -> list[str]:
    """The families whose adapter class has ``capability`` (an optional method such as ``lens``, see
    ``base.Adapter``), in :data:`FAMILIES` order."""
    import importlib

    out = []
    for family, module, cls in FAMILIES.values():
        try:
            klass = getattr(importlib.import_module(module), cls)
        except ImportError:  # an adapter whose module cannot be imported here offers nothing
            continue
        if hasattr(klass, capability) and family not in out:
            out.append(family)
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """A model could not be loaded; the message says why and what to do."""


def load_adapter(model_id: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None):
    """Load ``model_id`` (a Hugging Face id or a local folder) with its family's adapter."""
    import importlib

    from transformers import AutoConfig

    from pipeline.models.base import conform

    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was asked for, but torch sees no CUDA device here; use --device cpu")
    path = Path(model_id).expanduser()
    if not path.exists() and (path.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1):
        # A Hugging Face id is "name" or "owner/name"; this is a local path that is not there,
        # and asking the Hub about it only gives a confusing "Repo id must be ..." error.
        raise ModelLoadError(f"model folder {model_id!r} does not exist; give a folder holding the model's "
                             "config.json (e.g. from save_pretrained) or a Hugging Face model id")
    try:
        config = AutoConfig.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError) as e:
        where = "local folder" if Path(model_id).exists() else "model id"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load a model config from {where} {model_id!r}: {first}") from None
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ModelLoadError(
            f"model {model_id!r} is of type {config.model_type!r}, which VL-Atlas has no adapter for; "
            f"supported: {', '.join(sorted(FAMILIES))}. See the README, 'Adding a model family'."
        )
    _, module, cls = family
    adapter_cls = getattr(importlib.import_module(module), cls)
    try:
        adapter = adapter_cls.load(model_id, device=device, dtype=DTYPES[dtype], revision=revision)
    except NotImplementedError as e:
        raise ModelLoadError(str(e)) from None
    return conform(adapter)
