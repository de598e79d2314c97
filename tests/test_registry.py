"""Model variants as registered data: one table builds every tokenizer and DiT^DH the project uses."""
from __future__ import annotations

import pytest
import torch

from rectok_fast.models import registry
from rectok_fast.models.dit import DIT_PRESETS, dit_config
from rectok_fast.models.tokenizer import PRESETS


def test_every_variant_builds_and_remembers_itself():
    assert set(registry.names("tokenizer")) == set(PRESETS) >= {"rectok_BB", "rectok_BB_decft", "rectok_tiny",
                                                                 "rectok_tiny_decft", "rectok_demo", "rectok_demo_decft"}
    assert set(registry.names("dit")) == set(DIT_PRESETS) == {"ditdh_s", "ditdh_b", "ditdh_l", "ditdh_xl", "ditdh_tiny",
                                                                   "ditdh_demo"}
    for name in registry.names():
        with torch.device("meta"):
            m = registry.build_model(name)
        assert m.variant_spec == {"kind": registry.variant(name).kind, "variant": name, "overrides": {}}
    m = registry.build_model("ditdh_tiny", depth=1)
    assert m.variant_spec["overrides"] == {"depth": 1} and m.config.depth == 1 and m.config.hidden_size == 32


def test_decode_only_twins_are_derived_from_their_base():
    for base in ("rectok_BB", "rectok_tiny", "rectok_demo"):
        twin = registry.variant(registry.decode_only_name(base))
        assert twin.name == base + "_decft" and twin.base == base and twin.decode_only
        assert dict(twin.config) == {**registry.variant(base).config, **registry.DECODE_ONLY}
        assert registry.decode_only_name(twin.name) == twin.name
        with torch.device("meta"):
            t = registry.build_model(twin.name)
        assert not t.use_sem and t.gamma == 0.0 and t.config.mask_ratio == 0.0


def test_tiny_teachers_are_variant_data():
    """The stand-in teacher's architecture comes from the variant (its width from the variant's teacher dims)."""
    t = registry.build_teacher_for("rectok_tiny", None, img_size=32)
    d = registry.build_teacher_for("rectok_demo", None, img_size=32)
    assert len(t.model.blocks) == 1 and len(d.model.blocks) == 2
    assert t.model.embed_dim == d.model.embed_dim == registry.variant("rectok_tiny").config["teachers"]["dinov3"]
    assert dict(registry.variant("rectok_BB").teacher) == {}       # the official DINOv3 ViT-L


def test_changed_fields_and_unknown_names():
    assert registry.changed_fields("ditdh_xl", {"input_size": 16, "in_channels": 128, "num_classes": 10}) == {
        "num_classes": 10}
    assert registry.full_config("rectok_tiny_decft")["token_channels"] == 16
    assert dit_config("ditdh_tiny").head_hidden_size == 32
    with pytest.raises(ValueError, match="unknown dit variant 'rectok_BB'"):
        registry.variant("rectok_BB", "dit")
    with pytest.raises(ValueError, match="registered: .*ditdh_tiny"):
        registry.build_model("ditdh_huge")
