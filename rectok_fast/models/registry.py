"""Named model variants as data: every tokenizer and DiT^DH the project builds, from one table.

A variant is a name plus the config fields that differ from the model's defaults (official
``rectok_BB`` / DiT^DH-XL). The trainer, the sampler, the demo and the tests all build from here:

    build_model("rectok_tiny_decft", img_size=32)     # any variant, with config overrides
    variant("rectok_tiny").teacher                      # timm kwargs of its stand-in teacher

Decode-only twins (``<name>_decft``: no teacher, no semantic decoder, no flow noise, no masking; the
stage-2 / DiT tokenizer layout) are derived from their base by :data:`DECODE_ONLY`, written once.
Models built from a variant remember ``model.variant_spec = {"kind", "variant", "overrides"}``, which is what
self-describing checkpoints store (:func:`rectok_fast.checkpoint.build_from_checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

KINDS = ("tokenizer", "dit")

#: the decode-only layout: stage 2 (decoder fine-tuning) and the DiT's frozen tokenizer
DECODE_ONLY = MappingProxyType(dict(teachers={}, gamma=0.0, mask_ratio=0.0, mask_ratio_type="fix"))
DECODE_ONLY_SUFFIX = "_decft"


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str                                   # 'tokenizer' or 'dit'
    config: MappingProxyType                    # config fields that differ from the model defaults
    description: str = ""
    #: tokenizer variants: timm kwargs of the teacher ARCHITECTURE (a small stand-in for tiny variants;
    #: its embed_dim is the width in ``config['teachers']``). Empty = the official foundation model.
    teacher: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    base: str | None = None                     # decode-only twins: the stage-1 variant they come from

    @property
    def decode_only(self) -> bool:
        return self.base is not None


_REGISTRY: dict[str, Variant] = {}


def register(name: str, kind: str, config: dict, description: str = "", teacher: dict | None = None,
             decode_only_twin: bool = False) -> Variant:
    """Add a variant (and, for tokenizers, its ``_decft`` twin)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if name in _REGISTRY:
        raise ValueError(f"variant {name!r} is already registered")
    v = Variant(name, kind, MappingProxyType(dict(config)), description, MappingProxyType(dict(teacher or {})))
    _REGISTRY[name] = v
    if decode_only_twin:
        twin = name + DECODE_ONLY_SUFFIX
        _REGISTRY[twin] = Variant(twin, kind, MappingProxyType({**config, **DECODE_ONLY}),
                                  f"{name}, decode-only (stage 2 / DiT tokenizer)", MappingProxyType({}), base=name)
    return v


# ---- tokenizers (rectok_fast.models.tokenizer.TokenizerConfig fields) -----------------------------
register("rectok_BB", "tokenizer", {}, "official: encoder base + decoder base, C = 128, DINOv3 ViT-L teacher",
         decode_only_twin=True)
# tests: 64 px (4x4 tokens), tiny everything, a 1-block 64-wide stand-in teacher
register("rectok_tiny", "tokenizer",
         dict(img_size=64, encoder_size="tiny", decoder_size="tiny", token_channels=16, teachers={"dinov3": 64}),
         "tests: tiny encoder/decoder, 16 channels, 1-block stand-in teacher",
         teacher=dict(depth=1, num_heads=2), decode_only_twin=True)
# the CPU demo (train.py --preset demo, demo.py): the tiny sizes on 8-px patches (8x8 tokens of 32
# channels at 64 px, 6x compression) so a few minutes of CPU training give recognisable reconstructions;
# a 2-block stand-in teacher on the same 8-px grid
register("rectok_demo", "tokenizer",
         dict(img_size=64, patch_size=8, encoder_size="tiny", decoder_size="tiny", token_channels=32,
              teachers={"dinov3": 64}, sem_dec_type="mlp", mask_ratio=0.0, mask_ratio_type="fix"),
         "CPU demo: tiny encoder/decoder at 64 px, 8-px patches, 32 channels, MLP semantic decoder, "
         "no masking (as the official MLP runs), 2-block stand-in teacher",
         teacher=dict(depth=2, num_heads=2, patch_size=8), decode_only_twin=True)

# ---- DiT^DH (rectok_fast.models.dit.DiTConfig fields); all share the 2 x 2048 DDT head -----------
register("ditdh_s", "dit", dict(hidden_size=384, depth=12, num_heads=6), "DiT^DH-S (the AutoGuidance guide)")
register("ditdh_b", "dit", dict(hidden_size=768, depth=12, num_heads=12), "DiT^DH-B")
register("ditdh_l", "dit", dict(hidden_size=1024, depth=24, num_heads=16), "DiT^DH-L")
register("ditdh_xl", "dit", dict(hidden_size=1152, depth=28, num_heads=16), "DiT^DH-XL (the official generator)")
# tests and the demo: on the tiny tokenizer's 4x4x16 latents, 10 classes
register("ditdh_tiny", "dit", dict(input_size=4, in_channels=16, num_classes=10, hidden_size=32, depth=2, num_heads=2,
                                   head_hidden_size=32, head_depth=1, head_num_heads=2),
         "tests: 2 blocks of width 32 + a 1-block DDT head")
# the demo: on rectok_demo's 8x8x32 latents (64 px), 10 classes
register("ditdh_demo", "dit", dict(input_size=8, in_channels=32, num_classes=10, hidden_size=64, depth=3, num_heads=2,
                                   head_hidden_size=64, head_depth=1, head_num_heads=2),
         "demo: 3 blocks of width 64 + a 1-block DDT head on rectok_demo latents")


# ---- lookups ---------------------------------------------------------------------------------------
def names(kind: str | None = None) -> list[str]:
    return sorted(n for n, v in _REGISTRY.items() if kind is None or v.kind == kind)


def variant(name: str, kind: str | None = None) -> Variant:
    v = _REGISTRY.get(name)
    if v is None or (kind is not None and v.kind != kind):
        what = f"{kind} " if kind else ""
        raise ValueError(f"unknown {what}variant {name!r}; registered: {', '.join(names(kind))}")
    return v


def decode_only_name(name: str) -> str:
    """The decode-only twin of a tokenizer variant (itself if it already is one)."""
    v = variant(name, "tokenizer")
    return v.name if v.decode_only else v.name + DECODE_ONLY_SUFFIX


def configs(kind: str) -> dict[str, dict]:
    """{name: config fields} of one kind (the models' PRESETS tables)."""
    return {n: dict(v.config) for n, v in _REGISTRY.items() if v.kind == kind}


def full_config(name: str) -> dict:
    """Every config field of a variant: the model's defaults updated by the variant's own fields."""
    from dataclasses import MISSING, fields
    v = variant(name)
    if v.kind == "tokenizer":
        from rectok_fast.models.tokenizer import TokenizerConfig as C
    else:
        from rectok_fast.models.dit import DiTConfig as C
    out = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(C)}
    out.update(v.config)
    return out


def changed_fields(name: str, wanted: dict) -> dict:
    """The entries of ``wanted`` that differ from the variant's config (the overrides to record)."""
    full = full_config(name)
    return {k: val for k, val in wanted.items() if full.get(k) != val}


def build_tokenizer(name: str, **overrides):
    from rectok_fast.models import tokenizer as T
    variant(name, "tokenizer")
    return T.build_tokenizer(name, **overrides)


def build_dit(name: str, **overrides):
    from rectok_fast.models import dit as D
    variant(name, "dit")
    return D.build_dit(name, **overrides)


def build_model(name: str, **overrides):
    """Any registered variant with config overrides (build under ``torch.device('meta')`` for shapes only)."""
    v = variant(name)
    return build_tokenizer(name, **overrides) if v.kind == "tokenizer" else build_dit(name, **overrides)


def build_teacher_for(name: str, weights: str | None, img_size: int, kind: str = "dinov3"):
    """The frozen teacher of tokenizer variant ``name``: its stand-in architecture (tiny variants) or
    the official foundation model, loaded from ``weights`` (None: random, loudly)."""
    from rectok_fast.models.teacher import build_teacher
    v = variant(name, "tokenizer")
    arch = dict(v.teacher)
    if arch:
        arch["embed_dim"] = int(v.config["teachers"][kind])
    return build_teacher(kind, weights, img_size=img_size, **arch)
