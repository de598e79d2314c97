"""Frozen teachers: HF DINOv3 -> timm conversion, loading from local files, official preprocessing."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rectok_fast.models.teacher import (build_teacher, convert_hf_dinov3_to_timm, dinov3_preprocess,
                                        to_uint8_levels)

SMALL = dict(arch="vit_small_patch16_dinov3_qkvb", embed_dim=64, depth=2, num_heads=2)


def small_teacher(weights=None, **kw):
    args = dict(SMALL, **kw)
    with pytest.warns(UserWarning, match="RANDOM") if weights is None else _null():
        return build_teacher("dinov3", weights, img_size=64, **args)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def timm_to_hf(state: dict) -> dict:
    """Independent inverse mapping (the HF DINOv3ViTModel layout from the key listing)."""
    hf = {"embeddings.cls_token": state["cls_token"], "embeddings.register_tokens": state["reg_token"],
          "embeddings.mask_token": torch.zeros_like(state["cls_token"]),
          "embeddings.patch_embeddings.weight": state["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.bias": state["patch_embed.proj.bias"],
          "norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"]}
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        p, o = f"blocks.{i}.", f"layer.{i}."
        q, k, v = state[p + "attn.qkv.weight"].chunk(3, 0)
        hf.update({o + "norm1.weight": state[p + "norm1.weight"], o + "norm1.bias": state[p + "norm1.bias"],
                   o + "attention.q_proj.weight": q, o + "attention.k_proj.weight": k,
                   o + "attention.v_proj.weight": v,
                   o + "attention.q_proj.bias": state[p + "attn.q_bias"],
                   o + "attention.v_proj.bias": state[p + "attn.v_bias"],
                   o + "attention.o_proj.weight": state[p + "attn.proj.weight"],
                   o + "attention.o_proj.bias": state[p + "attn.proj.bias"],
                   o + "layer_scale1.lambda1": state[p + "gamma_1"], o + "layer_scale2.lambda1": state[p + "gamma_2"],
                   o + "norm2.weight": state[p + "norm2.weight"], o + "norm2.bias": state[p + "norm2.bias"],
                   o + "mlp.up_proj.weight": state[p + "mlp.fc1.weight"], o + "mlp.up_proj.bias": state[p + "mlp.fc1.bias"],
                   o + "mlp.down_proj.weight": state[p + "mlp.fc2.weight"],
                   o + "mlp.down_proj.bias": state[p + "mlp.fc2.bias"]})
        i += 1
    return hf


@pytest.fixture(scope="module")
def source_teacher():
    torch.manual_seed(0)
    t = small_teacher()
    with torch.no_grad():   # non-trivial biases / layer scales so a wrong mapping shows
        for name, p in t.model.named_parameters():
            if "bias" in name or "gamma" in name:
                p.normal_(0, 0.1)
    return t


def test_teacher_is_frozen_and_shapes(source_teacher):
    t = source_teacher
    assert all(not p.requires_grad for p in t.parameters()) and not t.training
    t.train()
    assert not t.training and not t.model.training
    x = torch.rand(2, 3, 64, 64, requires_grad=True) * 2 - 1
    f = t(x)
    assert f.shape == (2, 16, 64) and not f.requires_grad
    assert t.num_prefix_tokens == 5   # CLS + 4 registers dropped


def test_hf_conversion_roundtrip(source_teacher, tmp_path):
    state = source_teacher.model.state_dict()
    hf = timm_to_hf(state)
    conv = convert_hf_dinov3_to_timm(hf)
    assert set(conv) == set(state)
    for k in state:
        assert torch.equal(conv[k], state[k]), k
    # also from an official stage-1 RecTok checkpoint prefix
    conv2 = convert_hf_dinov3_to_timm({f"sem_foundation_models.dinov3.{k}": v for k, v in hf.items()}
                                      | {"encoder.ln_pre.weight": torch.ones(3)})
    assert set(conv2) == set(state)
    with pytest.raises(KeyError, match="unrecognised"):
        convert_hf_dinov3_to_timm(hf | {"layer.0.attention.weird": torch.zeros(1)})


def test_load_from_hf_directory_gives_same_features(source_teacher, tmp_path):
    from safetensors.torch import save_file
    hf = {k: v.contiguous() for k, v in timm_to_hf(source_teacher.model.state_dict()).items()}
    save_file(hf, str(tmp_path / "model.safetensors"))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 224, "width": 224}, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    loaded = build_teacher("dinov3", str(tmp_path), img_size=64, **SMALL)
    assert not loaded.random_weights
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded(x), source_teacher(x))
    # timm-format file works too
    torch.save({"model_state_dict": source_teacher.model.state_dict()}, tmp_path / "timm.pth")
    loaded2 = build_teacher("dinov3", str(tmp_path / "timm.pth"), img_size=64, **SMALL)
    torch.testing.assert_close(loaded2(x), source_teacher(x))


def test_wrong_weights_error(tmp_path):
    torch.save({"blocks.0.foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="missing"):
        build_teacher("dinov3", str(tmp_path / "bad.pth"), img_size=64, **SMALL)
    with pytest.raises(FileNotFoundError):
        build_teacher("dinov3", str(tmp_path / "nope.pth"), img_size=64, **SMALL)


def test_dinov3_preprocess_formula():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    x[0, 0, 0, 0] = 1.0
    x[0, 0, 0, 1] = -1.0
    lv = to_uint8_levels(x)
    assert lv[0, 0, 0, 0] == 255 and lv[0, 0, 0, 1] == 0
    torch.testing.assert_close(lv, torch.floor((x + 1) / 2 * 255))   # truncation, not rounding
    y = dinov3_preprocess(x, 64)
    ref = F.interpolate(lv / 255, size=224, mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = F.interpolate((ref - m) / s, size=64, mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_meta_vit_large_structure():
    with torch.device("meta"):
        with pytest.warns(UserWarning):
            t = build_teacher("dinov3", None, img_size=256)
    assert t.embed_dim == 1024 and len(t.model.blocks) == 24 and t.num_prefix_tokens == 5
    assert sum(p.numel() for p in t.parameters()) == pytest.approx(303.1e6, rel=0.01)
