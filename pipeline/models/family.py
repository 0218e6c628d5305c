"""A model family as a declaration: :class:`FamilySpec`.

A family module holds one frozen ``FamilySpec`` and a small adapter class that points at it and
adds only what is particular to the family: how its image tokens map onto the processor's grid
(``DecoderAdapter.image_tokens``) and, where its tower's batch is not the examples, how many crops
or patches each example puts in it (``DecoderAdapter.tower_batch``). Everything else (generation
under the checkpoint's config, the teacher-forced captured pass, the token table's text rows, the
hook points) is shared code driven by the declaration (``decoder.py``, ``towers.py``).

What a declaration names:

- ``classes``: ``config.model_type`` -> the transformers class that loads it;
- ``streams``: each stream's native module paths (``hooks.stream_hook_points``), in token-table
  order; ``lm`` the language model module (its ``inputs_embeds`` are the ``lm`` stream's hidden
  state 0) and ``lm_norm`` its final norm (``--explain lens``);
- ``image_token`` (the config attribute holding the image placeholder's id) and ``markers``: token
  pieces (or ``config.`` attributes holding ids) -> their role in the token table;
- generation defaults: ``max_new_tokens`` when the checkpoint sets no length, ``padding_side``,
  ``suppress`` (more placeholders never to generate) and ``answer_inputs`` (model inputs that the
  appended answer extends, with the value its tokens take, or :data:`LAST`: the prompt's last
  position's, as ``generate`` extends Mllama's ``cross_attention_mask``);
- ``tower``: the tower kind, one of :data:`TOWER_KINDS`, which also picks the strategy that hooks
  the tower (``DecoderAdapter.make_tower``);
- ``cross`` and ``key_sets``: streams whose keys are another stream's tokens, or a key set spanning
  consecutive streams' tokens (``BatchLayout.keys``).

Declaring the next families (issue 19's three), without new base classes:

- *Cross-attention in the decoder* (Llama 3.2 Vision, ``MllamaForConditionalGeneration``): a third
  stream ``lm_cross`` in ``streams`` with the ``cross_attn`` module paths of the decoder's cross
  layers, declared a cross stream by ``cross = {"lm_cross": "vision"}`` (``BatchLayout.keys``: its
  rows are ``lm`` tokens, its columns ``vision`` tokens; the tower strategy hooks it,
  ``Tower.cross_points``, and ``base.cross_layout`` lays it out); ``image_in_lm = False`` (the image
  token is a marker: no image features in the ``lm`` sequence); the ``lm`` and ``lm_cross`` streams
  are some of the decoder's layers (``hooks.StreamShape``: ``{layer}`` formats with each stream layer's
  slot); tower kind ``tiles`` (``towers.TiledTower``: an image's padded tiles in one tower sequence).
- *A perceiver resampler* (Idefics2): tower kind ``query_tokens`` (its learned latents are the image
  tokens, as BLIP-2's queries: role ``query``, no patch), and a ``perceiver`` stream whose rows are the
  latents and whose keys are ``concat(patches, latents)``: a key set spanning the ``vision`` and
  ``perceiver`` tokens (``key_sets = {"perceiver_keys": ("vision", "perceiver")}``,
  ``cross = {"perceiver": "perceiver_keys"}``); ``image_tokens`` maps ``lm`` image token ``k`` to latent
  ``k`` and gives the latents' columns (``ImageTokens.more``) and the key set's order
  (``ImageTokens.orders``).
- *Tiles and pixel shuffle* (Aya Vision): tower kind ``pixel_shuffle`` (crops, each folded by the
  model's own ``pixel_shuffle``), its ``image_tokens`` as InternVL's, from the same shared pieces
  (``geometry.tiled_crops``, ``towers.shuffled_blocks``, ``tokens.shuffled_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_NEW_TOKENS = 16  # new tokens when the checkpoint's generation config sets no length

# plain: one token per patch (LLaVA, PaliGemma); packed: every image of a batch in one tower sequence
# (Qwen-VL, Pixtral); crops: the tower's batch is crops (LLaVA-NeXT); pooled: blocks of patches
# averaged into one token (Gemma 3); pixel_shuffle: crops whose patch blocks fold into one token
# (InternVL, Idefics3); query_tokens: learned queries read the image (BLIP-2); tiles: an image's tiles,
# each padded, in one tower sequence (Mllama)
TOWER_KINDS = ("plain", "packed", "crops", "pooled", "pixel_shuffle", "query_tokens", "tiles")
LAST = "last"  # an answer_inputs value: each answer token takes the prompt's last position's value



def decoder_paths(root: str) -> dict[str, str]:
    """A decoder language model's module paths (``root.layers.{layer}.self_attn`` with ``v_proj`` and
    ``o_proj``)."""
    at = f"{root}.layers.{{layer}}.self_attn"
    return {"attention": at, "hidden": f"{root}.layers.{{layer}}", "value": f"{at}.v_proj", "out": f"{at}.o_proj",
            "layers": f"{root}.layers"}


LM_PATHS = decoder_paths("model.language_model")


def encoder_paths(root: str, layers: str = "encoder.layers", attention: str = "self_attn",
                  out: str = "out_proj", hidden_0: str | None = "embeddings") -> dict[str, str]:
    """A vision tower's module paths (a CLIP or SigLIP encoder: ``root.encoder.layers.{layer}.self_attn``
    with ``v_proj`` and ``out_proj``)."""
    at = f"{root}.{layers}.{{layer}}.{attention}"
    paths = {"attention": at, "hidden": f"{root}.{layers}.{{layer}}", "value": f"{at}.v_proj",
             "out": f"{at}.{out}", "layers": f"{root}.{layers}"}
    if hidden_0 is not None:
        paths["hidden_0"] = f"{root}.{hidden_0}"
    return paths


@dataclass(frozen=True)
class FamilySpec:
    """One model family, declared (see the module docstring)."""

    name: str  # the family's name in the lake; "" = the checkpoint's config.model_type
    classes: dict[str, str]  # config.model_type -> transformers class
    streams: dict[str, dict[str, str]]  # stream -> module paths (hooks.stream_hook_points), token-table order
    tower: str = "plain"  # one of TOWER_KINDS
    lm: str = "model.language_model"  # the language model (a pre-hook reads its inputs_embeds)
    lm_norm: str = "model.language_model.norm"  # its final norm (--explain lens)
    image_token: str = "image_token_id"  # the config attribute with the image placeholder's id
    markers: dict[str, str] = field(default_factory=dict)  # token piece or "config.<attr>" -> role
    prompt: str = "{image} {text}"  # the prompt without a chat template ({image}: the placeholder)
    chat_template: bool = True  # the processor's chat template, when it has one, makes the prompt
    suppress: tuple[str, ...] = ()  # config attributes of more ids never to generate (besides the image's)
    answer_inputs: dict[str, int | str] = field(default_factory=dict)  # model input -> its value on answer tokens
    image_in_lm: bool = True  # the image's features replace the image tokens (False: a marker, cross-attention)
    drop_inputs: tuple[str, ...] = ()  # processor outputs that are no model input
    nested_images: bool = False  # the processor takes [[image], ...] (one list of images per prompt)
    image_check: bool = False  # run the image processor on each image alone first (it refuses some)
    max_new_tokens: int = MAX_NEW_TOKENS
    padding_side: str = "left"  # generation pads on the left
    cross: dict[str, str] = field(default_factory=dict)  # cross stream -> the stream (or key set) its keys are
    # key set -> the consecutive streams whose tokens it spans (a perceiver's keys: patches, then latents)
    key_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    eager_parts: tuple[str, ...] = ("text_config", "vision_config")

    def __post_init__(self):
        if self.tower not in TOWER_KINDS:
            raise ValueError(f"tower kind {self.tower!r} is not one of {', '.join(TOWER_KINDS)}")

    def architecture(self, model_type: str) -> str | None:
        return self.classes.get(model_type)
