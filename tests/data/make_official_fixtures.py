"""Regenerate the golden parity fixtures from an OFFICIAL RecTok checkout (github.com/Shi-qingyu/RecTok,
commit ee87aaf; files used: models/{rectok,DDT,layers,gaussian,model_utils}.py).

    python tests/data/make_official_fixtures.py --official-dir /path/to/RecTok [--check]

No official code is copied into this repository: the official modules are imported from
``--official-dir``. Third-party packages the official files import but that the parity runs never use
(transformers, diffusers, torchdiffeq; the ``transport`` package's ODE sampler) are replaced by inert
stubs when they are not installed, and ``utils.foundation_models`` always by a fake teacher factory.

For each model it builds a small config with a fixed seed, RANDOMIZES every parameter (the official
init zeroes the adaLN and final layers and sets all norm weights to 1, which would hide whole terms),
runs the official forward passes in fp32 on CPU and writes ONE file per model under tests/data/:

  official_rectok_parity.pt  tokenizer (encoder 2x64, pixel decoder 2x48, semantic decoder 1x32,
                             32 px, patch 8, C = 8, teacher width 24)
  official_ditdh_parity.pt   DiT^DH (4x4x8 latents, encoder 2x32, DDT head 1x48, 10 classes) plus an
                             equal-width variant (s_projector = Identity)

Each file holds: 'ours' (how tests/test_official_parity.py builds our model: preset + overrides, and
the extra SIZE_DICT entries the tiny widths need), 'official_config', the official 'state_dict',
the 'inputs', the official 'outputs', and provenance. Load with ``torch.load(weights_only=True)``.
``--check`` also runs our implementation against the freshly computed outputs and prints max errors.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import random
import sys
import types

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL_COMMIT = "ee87aaf"

# Tokenizer widths far below the official SIZE_DICT entries, so the fixture stays < 2 MB. Both the
# official SIZE_DICT and ours get these extra names; the model code is unchanged.
TOK_SIZES = {
    "parity_enc": {"width": 64, "layers": 2, "heads": 4},   # head_dim 16
    "parity_dec": {"width": 48, "layers": 2, "heads": 2},   # head_dim 24
    "parity_sem": {"width": 32, "layers": 1, "heads": 2},   # head_dim 16
}
TOK = dict(img_size=32, patch_size=8, token_channels=8, teacher_dim=24)
DIT_CASES = {
    # name: (official DiTwDDTHead kwargs, our build_dit overrides)
    "proj": (dict(img_size=64, tokenizer_patch_size=16, token_channels=8, hidden_size=[32, 48], depth=[2, 1],
                  num_heads=[2, 2], num_classes=10),
             dict(input_size=4, in_channels=8, hidden_size=32, depth=2, num_heads=2, head_hidden_size=48,
                  head_depth=1, head_num_heads=2, num_classes=10)),
    "same_width": (dict(img_size=64, tokenizer_patch_size=16, token_channels=8, hidden_size=[32, 32],
                        depth=[1, 1], num_heads=[2, 4], num_classes=5),
                   dict(input_size=4, in_channels=8, hidden_size=32, depth=1, num_heads=2, head_hidden_size=32,
                        head_depth=1, head_num_heads=4, num_classes=5)),
}


# ----------------------------------------------------------------------------------------------------
# importing the official code


def _inert_module(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)

    class _Unavailable:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            raise RuntimeError(f"{name} is a stub in the parity-fixture generator")

        @classmethod
        def from_pretrained(cls, *a, **k):
            raise RuntimeError(f"{name} is a stub in the parity-fixture generator")

    def __getattr__(attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return _Unavailable

    mod.__getattr__ = __getattr__
    mod.__path__ = []
    return mod


class FakeTeacher(nn.Module):
    """Stands in for the frozen DINOv3 (never part of what we compare; its features only feed the loss).
    It owns one parameter so the official state dict carries a ``sem_foundation_models.*`` key, which
    our loader must drop (RecTok.official_ignored_prefixes)."""

    def __init__(self, dim: int, n_tokens: int):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=dim, num_register_tokens=0)
        self.num_features = dim
        self.n_tokens = n_tokens
        self.stub_weight = nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values=None, **_):
        feats = torch.zeros(pixel_values.shape[0], 1 + self.n_tokens, self.config.hidden_size)
        return types.SimpleNamespace(last_hidden_state=feats)


class _Inputs(dict):
    def to(self, *a, **k):
        return self


def _fake_transforms(x, return_tensors="pt"):
    return _Inputs(pixel_values=x.float())


def import_official(official_dir: str):
    """Import models.rectok and models.DDT from the official checkout."""
    import timm  # noqa: F401  (real third-party packages first, before any stub exists)
    official_dir = os.path.abspath(official_dir)
    for rel in ("models/rectok.py", "models/DDT.py", "models/layers.py", "models/gaussian.py"):
        if not os.path.isfile(os.path.join(official_dir, rel)):
            raise SystemExit(f"{official_dir} is not an official RecTok checkout (no {rel})")
    sys.path.insert(0, official_dir)
    for name in ("transformers", "diffusers", "torchdiffeq"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _inert_module(name)
    try:
        importlib.import_module("transport")
    except Exception:  # the ODE sampler is never used here
        stub = types.ModuleType("transport")
        stub.create_transport = lambda **k: None
        stub.Sampler = type("Sampler", (), {"__init__": lambda self, t: None,
                                            "sample_ode": lambda self, **k: None})
        sys.modules["transport"] = stub
    if "utils" not in sys.modules:
        utils = types.ModuleType("utils")
        utils.__path__ = [os.path.join(official_dir, "utils")]
        sys.modules["utils"] = utils
    fm = types.ModuleType("utils.foundation_models")
    fm.create_foundation_model = lambda name: (_ for _ in ()).throw(RuntimeError("set per model below"))
    sys.modules["utils.foundation_models"] = fm
    rectok = importlib.import_module("models.rectok")
    ddt = importlib.import_module("models.DDT")
    return rectok, ddt


# ----------------------------------------------------------------------------------------------------
# helpers


def randomize_parameters(model: nn.Module, gen: torch.Generator, skip=()) -> None:
    """Every parameter to a non-trivial value: norm weights 1 + 0.2 n, vectors 0.05 n, matrices n/sqrt(fan_in)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def _seeded(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def _clone_sd(model: nn.Module) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_fixture(OR) -> dict:
    OR.SIZE_DICT.update(TOK_SIZES)
    img, patch, c, tdim = TOK["img_size"], TOK["patch_size"], TOK["token_channels"], TOK["teacher_dim"]
    n = (img // patch) ** 2
    OR.create_foundation_model = lambda name: (FakeTeacher(tdim, n), _fake_transforms)
    official_config = dict(img_size=img, patch_size=patch, vit_enc_model_size="parity_enc",
                           vit_dec_model_size="parity_dec", vit_sem_model_size="parity_sem", token_channels=c,
                           foundation_model_type="dinov3", sem_dec_type="transformer", sem_input_type="noisy",
                           sem_target="rec+align", mask_ratio=0.4, mask_ratio_min=-0.1, mask_ratio_type="random",
                           gamma=1.0, noise_schedule="shift")
    torch.manual_seed(0)
    model = OR.RecTok(**official_config)
    gen = torch.Generator().manual_seed(1)
    randomize_parameters(model, gen)
    model.eval()
    b = 2
    x = torch.rand(b, 3, img, img, generator=gen) * 2 - 1
    z_grid = torch.randn(b, c, img // patch, img // patch, generator=gen)
    z_tokens = z_grid.flatten(2).transpose(1, 2).contiguous()
    # decoder inputs with explicit MAE indices (no RNG inside the decoders)
    len_keep = 11
    ids_shuffle = torch.argsort(torch.rand(b, n, generator=gen), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    z_visible = torch.randn(b, len_keep, c, generator=gen)
    sem = model.sem_decoders["dinov3"]

    out = {}
    with torch.no_grad():
        out["moments"] = model.encoder(x)["z"]
        out["tokenize"] = model.tokenize(x)
        out["detokenize"] = model.detokenize(z_grid)
        out["decoder_full"] = model.decoder(z_tokens)
        out["decoder_masked"] = model.decoder(z_visible, ids_restore=ids_restore)
        out["sem_decoder_full"] = sem(z_tokens)
        out["sem_decoder_masked"] = sem(z_visible, ids_restore=ids_restore)
    out["reconstruct"] = model.reconstruct(x).clone()

    # training path: same seeds -> same mask ratio (python random), mask noise, posterior eps, tau, flow eps
    model.train()
    train_cases, seen_full, seen_masked = [], False, False
    for seed in range(100):
        random.seed(seed)
        full = max(0.0, random.uniform(-0.1, 0.4)) == 0.0
        if (full and seen_full) or (not full and seen_masked):
            continue
        seen_full |= full
        seen_masked |= not full
        train_cases.append((seed, "shift"))
        if seen_full and seen_masked:
            break
    train_cases += [(train_cases[0][0] + 1000, "lognorm"), (train_cases[0][0] + 2000, "uniform")]
    train_out = []
    for seed, schedule in train_cases:
        model.noise_schedule = schedule
        _seeded(seed)
        with torch.no_grad():
            recon, rd = model(x)
        ids = rd["ids_restore"]
        train_out.append(dict(seed=seed, noise_schedule=schedule, recon=recon,
                              kl=rd["posteriors"].kl(), sem_pred=rd["pred_sem_features"][0],
                              ids_restore=ids if ids is not None else torch.arange(n).expand(b, n).clone()))
    model.noise_schedule = official_config["noise_schedule"]
    model.eval()

    ropes = {"encoder": model.encoder.rope_tensor, "decoder": model.decoder.rope_tensor, "sem": sem.rope_tensor}
    ours = dict(preset="rectok_BB", size_dict=TOK_SIZES,
                overrides=dict(img_size=img, patch_size=patch, encoder_size="parity_enc", decoder_size="parity_dec",
                               sem_size="parity_sem", token_channels=c, teachers={"dinov3": tdim},
                               sem_dec_type="transformer", sem_input_type="noisy", sem_target="rec+align",
                               mask_ratio=0.4, mask_ratio_min=-0.1, mask_ratio_type="random", gamma=1.0,
                               noise_schedule="shift"))
    return dict(ours=ours, official_config=official_config, state_dict=_clone_sd(model),
                inputs=dict(x=x, z_grid=z_grid, z_tokens=z_tokens, z_visible=z_visible, ids_restore=ids_restore),
                outputs={k: v.detach().clone() for k, v in out.items()}, train=train_out,
                rope_tables={k: v.clone() for k, v in ropes.items()},
                provenance=dict(official_commit=OFFICIAL_COMMIT, torch=str(torch.__version__),
                                note="official RecTok (models/rectok.py), fp32 CPU, parameters randomized"))


# ----------------------------------------------------------------------------------------------------
# DiT


def dit_fixture(OD) -> dict:
    cases = {}
    for k, (official_config, overrides) in DIT_CASES.items():
        torch.manual_seed(0)
        model = OD.DiTwDDTHead(**official_config)
        gen = torch.Generator().manual_seed(2)
        randomize_parameters(model, gen, skip=("pos_embed", "t_embedder.W"))  # fixed table / N(0,1) draw
        b, ncls = 4, official_config["num_classes"]
        s = model.input_size
        x = torch.randn(b, official_config["token_channels"], s, s, generator=gen)
        t = torch.rand(b, generator=gen)
        y = torch.randint(0, ncls, (b,), generator=gen)
        y[-1] = ncls  # the null (CFG) label
        model.eval()
        with torch.no_grad():
            v_eval = model.net(x, t, y)
        # training mode: label dropout draws torch.rand(B) first; pick a seed that drops >= 1 label
        seed = next(sd for sd in range(1000)
                    if (torch.rand(b, generator=torch.Generator().manual_seed(sd)) < 0.1).any())
        model.train()
        torch.manual_seed(seed)
        with torch.no_grad():
            v_train = model.net(x, t, y)
        model.eval()
        cases[k] = dict(ours=dict(preset="ditdh_s", overrides=overrides), official_config=official_config,
                        state_dict=_clone_sd(model), inputs=dict(x=x, t=t, y=y),
                        outputs=dict(eval=v_eval, train=v_train), train_seed=seed)
    return dict(cases=cases, provenance=dict(official_commit=OFFICIAL_COMMIT, torch=str(torch.__version__),
                                             note="official DiTwDDTHead.net (models/DDT.py), fp32 CPU, "
                                                  "parameters randomized"))


# ----------------------------------------------------------------------------------------------------
# optional comparison with our implementation


def _err(a, b) -> str:
    d = (a.double() - b.double()).abs().max().item()
    return f"max_abs={d:.3e} rel={d / max(b.abs().max().item(), 1e-30):.3e}"


def check_ours(tok: dict, dit: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from rectok_fast.checkpoint import load_official_checkpoint
    from rectok_fast.models import tokenizer as T
    from rectok_fast.models.dit import build_dit

    T.SIZE_DICT.update(tok["ours"]["size_dict"])
    m = T.build_tokenizer(tok["ours"]["preset"], **tok["ours"]["overrides"])
    load_official_checkpoint({"model": tok["state_dict"]}, m, which="model")
    m.eval()
    i, o = tok["inputs"], tok["outputs"]
    with torch.no_grad():
        got = dict(moments=m.encode_moments(i["x"]), tokenize=m.tokenize(i["x"]), detokenize=m.detokenize(i["z_grid"]),
                   decoder_full=m.decoder(i["z_tokens"]), decoder_masked=m.decoder(i["z_visible"], i["ids_restore"]),
                   sem_decoder_full=m.sem_decoders["dinov3"](i["z_tokens"]),
                   sem_decoder_masked=m.sem_decoders["dinov3"](i["z_visible"], i["ids_restore"]))
    got["reconstruct"] = m.reconstruct(i["x"])
    for k, v in got.items():
        print(f"tokenizer {k:20s} {_err(v, o[k])}")
    class ZeroTeacher(nn.Module):  # our stand-in for the teacher (its features feed only the loss)
        embed_dim = tok["ours"]["overrides"]["teachers"]["dinov3"]

        def forward(self, images):
            return torch.zeros(images.shape[0], m.seq_h * m.seq_w, self.embed_dim)

    m.attach_teacher("dinov3", ZeroTeacher())
    m.train()
    for case in tok["train"]:
        m.noise_schedule = case["noise_schedule"]
        _seeded(case["seed"])
        with torch.no_grad():
            out = m(i["x"])
        print(f"tokenizer train seed={case['seed']} {case['noise_schedule']:8s} L={out.z.shape[1]:2d} "
              f"recon {_err(out.recon, case['recon'])} kl {_err(out.kl, case['kl'])} "
              f"sem {_err(out.sem_pred['dinov3'], case['sem_pred'])}")
    for k, case in dit["cases"].items():
        d = build_dit(case["ours"]["preset"], **case["ours"]["overrides"])
        load_official_checkpoint({"model": case["state_dict"]}, d, which="model")
        d.eval()
        with torch.no_grad():
            print(f"dit {k:10s} eval  {_err(d(**case['inputs']), case['outputs']['eval'])}")
            d.train()
            torch.manual_seed(case["train_seed"])
            print(f"dit {k:10s} train {_err(d(**case['inputs']), case['outputs']['train'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-dir", required=True, help="checkout of github.com/Shi-qingyu/RecTok")
    ap.add_argument("--out-dir", default=HERE)
    ap.add_argument("--check", action="store_true", help="also compare our implementation and print errors")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic, and fast enough for these sizes
    OR, OD = import_official(args.official_dir)
    tok = tokenizer_fixture(OR)
    dit = dit_fixture(OD)
    for name, obj in (("official_rectok_parity.pt", tok), ("official_ditdh_parity.pt", dit)):
        path = os.path.join(args.out_dir, name)
        torch.save(obj, path)
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    if args.check:
        check_ours(tok, dit)


if __name__ == "__main__":
    main()
