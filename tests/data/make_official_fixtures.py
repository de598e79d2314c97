"""Regenerate the golden parity fixtures from an OFFICIAL RecTok checkout (github.com/Shi-qingyu/RecTok,
commit ee87aaf; files used: models/{rectok,DDT,layers,gaussian,model_utils,ema}.py, utils/{losses,misc,
builders,train_utils}.py, transport/, main_{reconstruction,diffusion}.py, run_train_{tokenizer,diffusion}.sh).

    python tests/data/make_official_fixtures.py --official-dir /path/to/RecTok [--only parity|train_step] [--check]

No official code is copied into this repository: the official modules are imported from
``--official-dir``. Third-party packages the official files import but that these runs never use
(transformers, diffusers, torchdiffeq, requests, wandb, rich) are replaced by inert stubs when they are
not installed, and ``utils.foundation_models`` always by a fake teacher factory.

Forward parity (``--only parity``): for each model it builds a small config with a fixed seed,
RANDOMIZES every parameter (the official init zeroes the adaLN and final layers and sets all norm weights
to 1, which would hide whole terms), runs the official forward passes in fp32 on CPU and writes ONE file
per model under tests/data/:

  official_rectok_parity.pt  tokenizer (encoder 2x64, pixel decoder 2x48, semantic decoder 1x32,
                             32 px, patch 8, C = 8, teacher width 24)
  official_ditdh_parity.pt   DiT^DH (4x4x8 latents, encoder 2x32, DDT head 1x48, 10 classes) plus an
                             equal-width variant (s_projector = Identity)

Each file holds: 'ours' (how tests/test_official_parity.py builds our model: preset + overrides, and
the extra SIZE_DICT entries the tiny widths need), 'official_config', the official 'state_dict',
the 'inputs', the official 'outputs', and provenance. Load with ``torch.load(weights_only=True)``.
``--check`` also runs our implementation against the freshly computed forward outputs and prints max
errors (the training steps are checked by their test).

Training steps (``--only train_step``; checked by tests/test_official_train_step.py): the official loops
``train_one_epoch_tokenizer`` (epoch 150: discriminator on) and ``train_one_epoch_generator`` run for
TWO steps on small randomized official models, with the official argument parsers fed the flags of the
official launch scripts, the official builders (loss module, AdamW groups, GradScaler), LR schedule,
clipping and ``SimpleEMAModel``. Frozen nets are narrow random stand-ins built in-process (VGG16-layout
LPIPS trunk and heads, a torchvision ConvNeXt, a patch-convolution teacher behind a stand-in image
processor) and a small PatchGAN (ndf 4); their weights are stored. Every random draw the official code
makes is recorded (torch.rand / randn / randn_like, random.uniform) for replay. lr, weight decay, EMA rate
(and the tokenizer clip) are raised/lowered so each moves the parameters beyond the test tolerance
('fixture_overrides'; the official values are kept in 'official_args'). Only CUDA-bound scaffolding is
patched (metric logger, torch.cuda.synchronize, Module.cuda); autocast and GradScaler disable themselves
on CPU, so the steps are fp32.

  official_train_step_tokenizer.pt  RecTok 32 px, patch 8, C = 8, encoder/decoder 2x32, semantic 1x16,
                                    batch 3: 'steps' (every loss term, grad norms, lr), 'draws',
                                    'init_state', 'loss_init_state', 'teacher', 'params_after',
                                    'ema_after', 'discriminator_after' (with BatchNorm statistics)
  official_train_step_dit.pt        DiT^DH on 8x8x96 latents (time shift 1.22), encoder 2x16, head 1x24,
                                    batch 3, epoch 100 (linear LR decay), latents tokenized online by a
                                    decode-only RecTok (64 px, patch 8, 1x16 / 1x16) with per-channel
                                    statistics: 'steps' (loss, grad norm, lr), 'draws', 'images_u8',
                                    'labels', 'tokenizer_state', 'latent_mean/std', 'init_state',
                                    'params_after', 'ema_after'
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


def _stub_missing(*names: str) -> None:
    """Inert stubs for the packages (and their submodules) that are not installed."""
    missing = {n.split(".")[0] for n in names
               if n.split(".")[0] not in sys.modules and importlib.util.find_spec(n.split(".")[0]) is None}
    for name in names:
        if name.split(".")[0] in missing and name not in sys.modules:
            sys.modules[name] = _inert_module(name)


def import_official(official_dir: str):
    """Import models.rectok and models.DDT from the official checkout."""
    import timm  # noqa: F401  (real third-party packages first, before any stub exists)
    official_dir = os.path.abspath(official_dir)
    for rel in ("models/rectok.py", "models/DDT.py", "models/layers.py", "models/gaussian.py"):
        if not os.path.isfile(os.path.join(official_dir, rel)):
            raise SystemExit(f"{official_dir} is not an official RecTok checkout (no {rel})")
    sys.path.insert(0, official_dir)
    _stub_missing("transformers", "diffusers", "diffusers.models", "torchdiffeq")
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
# training steps: the official loop (utils/train_utils.py) run for TWO steps per stage
#
# Two steps, not one: with Adam's bias correction the first update is ~lr * sign(g) whatever betas and
# clipping are, so only a second step can expose a wrong beta, a wrong clip or a wrong moment update.

STEP_TOK_SIZES = {
    "step_enc": {"width": 32, "layers": 2, "heads": 2},
    "step_dec": {"width": 32, "layers": 2, "heads": 2},
    "step_sem": {"width": 16, "layers": 1, "heads": 1},
}
STEP_TOK = dict(img_size=32, patch_size=8, token_channels=8, teacher_dim=24, batch=3, epoch=150)
# narrow stand-ins for the frozen perceptual nets (same layer layout as VGG16 / torchvision ConvNeXt)
STEP_VGG_CFG = [8, 8, "M", 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, "M", 16, 16, 16, "M"]
STEP_VGG_CHANNELS = (8, 16, 16, 16, 16)
STEP_CONVNEXT = ((8, 16, 1), (16, 32, 1), (32, None, 1))
STEP_CONVNEXT_CLASSES = 64
STEP_DISC = dict(ndf=4, n_layers=3)
# 8 x 8 x 96 latents: h*w*C > 4096, so the official time shift is active (sqrt(6144 / 4096) = 1.22)
STEP_DIT = dict(official=dict(img_size=128, tokenizer_patch_size=16, token_channels=96, hidden_size=[16, 24],
                              depth=[2, 1], num_heads=[2, 2], num_classes=10),
                ours=dict(input_size=8, in_channels=96, hidden_size=16, depth=2, num_heads=2, head_hidden_size=24,
                          head_depth=1, head_num_heads=2, num_classes=10),
                batch=3, epoch=100)
# the DiT stage tokenizes online (train_one_epoch_generator: tokenizer.tokenize(imgs, sampling=True)): a
# decode-only official RecTok (gamma 0, mask ratio 0, no teacher, as builders.create_generation_model) at
# 64 px / patch 8 -> the 8 x 8 x 96 latents, with per-channel latent statistics (RecTok.reset_stats)
STEP_DIT_TOK_SIZES = {"step_tok_enc": {"width": 16, "layers": 1, "heads": 1},
                      "step_tok_dec": {"width": 16, "layers": 1, "heads": 1}}
STEP_DIT_TOK = dict(img_size=64, patch_size=8, vit_enc_model_size="step_tok_enc", vit_dec_model_size="step_tok_dec",
                    token_channels=96, gamma=0.0, mask_ratio=0.0)
# Hyper-parameters changed from the official scripts so that every ingredient moves the parameters by far
# more than the comparison tolerance (official values: tokenizer lr = blr * global_batch / 256 ~ 4e-4,
# weight decay 1e-4 and EMA 0.999 would move parameters by < 1e-7 in two steps; the DiT EMA 0.9995 too; the
# official tokenizer clip 3.0 would not clip these small models' gradient norms of ~1.3, the DiT's 1.0 does).
# The official values themselves are stored under 'official_args' (tests compare our stage defaults).
STEP_TOK_OVERRIDES = dict(lr=4e-3, weight_decay=0.5, ema_rate=0.9, grad_clip=0.5)
STEP_DIT_OVERRIDES = dict(weight_decay=0.5, ema_rate=0.9)


def _script_args(official_dir: str, script: str, parser) -> argparse.Namespace:
    """Parse the official launch script's flags with the official parser (variables substituted)."""
    import re
    import shlex
    text = open(os.path.join(official_dir, script)).read().replace("\\\n", " ")
    env = {}
    for m in re.finditer(r'^(\w+)=("[^"]*"|\S*)', text, flags=re.M):
        env[m.group(1)] = m.group(2).strip('"')
    cmd = text[text.index("torchrun"):]
    cmd = cmd[cmd.index(".py") + 3:]
    for _ in range(3):
        cmd = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), "UNSET"), cmd)
    args, _ = parser.parse_known_args(shlex.split(cmd))
    return args


class DrawRecorder:
    """Records every random draw the official code makes (torch.rand / randn / randn_like and Python's
    random.uniform), in order, as (kind, flat values). The test replays them into our code."""

    def __init__(self):
        self.draws = []

    def _wrap(self, fn, kind):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            self.draws.append({"kind": kind, "values": out.detach().clone().reshape(-1).float()})
            return out
        return wrapped

    def __enter__(self):
        self._saved = (torch.rand, torch.randn, torch.randn_like, random.uniform)
        torch.rand = self._wrap(torch.rand, "uniform")
        torch.randn = self._wrap(torch.randn, "normal")
        torch.randn_like = self._wrap(torch.randn_like, "normal")
        py_uniform = random.uniform

        def uniform(a, b):
            v = py_uniform(a, b)
            self.draws.append({"kind": "py_uniform", "values": torch.tensor([a, b, v], dtype=torch.float64)})
            return v
        random.uniform = uniform
        return self

    def __exit__(self, *exc):
        torch.rand, torch.randn, torch.randn_like, random.uniform = self._saved
        return False


class _RecordingMetricLogger:
    """Replaces utils.logger.MetricLogger inside the official loops: yields the batches, keeps every
    ``update(**values)`` (lr, grad norms, losses) and moves nothing to CUDA."""
    records: list = []

    def __init__(self, *a, **k):
        self.meters = {}

    def add_meter(self, name, meter):
        pass

    def log_every(self, iterable, print_freq, header=None, **k):
        yield from iterable

    def update(self, **values):
        _RecordingMetricLogger.records.append({k: float(v) for k, v in values.items()})

    def synchronize_between_processes(self):
        pass


class _OfficialOnCPU:
    """The official loops are CUDA-only in three scaffolding spots that do not touch the numerics:
    the metric logger (prefetches to CUDA), torch.cuda.synchronize and Module.cuda() in the builders.
    Autocast("cuda") and GradScaler("cuda") disable themselves on CPU tensors (fp32, unscaled)."""

    def __init__(self, OT):
        self.OT = OT

    def __enter__(self):
        self._saved = (self.OT.MetricLogger, torch.cuda.synchronize, nn.Module.cuda)
        self.OT.MetricLogger = _RecordingMetricLogger
        _RecordingMetricLogger.records = []
        torch.cuda.synchronize = lambda *a, **k: None
        nn.Module.cuda = lambda self, *a, **k: self
        return self

    def __exit__(self, *exc):
        self.OT.MetricLogger, torch.cuda.synchronize, nn.Module.cuda = self._saved
        return False


def import_official_training(official_dir: str):
    """models.rectok / models.DDT plus the official training code: utils.{losses,misc,builders,train_utils},
    models.ema and the two main_*.py argument parsers. Logging / download packages the steps never use
    (requests, wandb, rich) become inert stubs when missing."""
    OR, OD = import_official(official_dir)
    _stub_missing("requests", "wandb", "rich", "rich.logging")
    mods = types.SimpleNamespace(R=OR, D=OD)
    mods.L = importlib.import_module("utils.losses")
    mods.M = importlib.import_module("utils.misc")
    mods.B = importlib.import_module("utils.builders")
    mods.T = importlib.import_module("utils.train_utils")
    mods.E = importlib.import_module("models.ema")
    mods.main_rec = importlib.import_module("main_reconstruction")
    mods.main_diff = importlib.import_module("main_diffusion")
    return mods


def _init_module_(module: nn.Module, gen: torch.Generator) -> None:
    """Deterministic non-trivial values for the frozen nets and the discriminator (module-type aware)."""
    with torch.no_grad():
        for m in module.modules():
            own = dict(m.named_parameters(recurse=False))
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = own["weight"]
                w.copy_(torch.randn(w.shape, generator=gen) / w[0].numel() ** 0.5)
                if own.get("bias") is not None:
                    own["bias"].copy_(0.05 * torch.randn(own["bias"].shape, generator=gen))
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) or "LayerNorm" in type(m).__name__:
                own["weight"].copy_(1 + 0.2 * torch.randn(own["weight"].shape, generator=gen))
                own["bias"].copy_(0.05 * torch.randn(own["bias"].shape, generator=gen))
            elif "layer_scale" in own:   # torchvision CNBlock
                own["layer_scale"].copy_(0.5 + 0.1 * torch.randn(own["layer_scale"].shape, generator=gen))


def _tiny_vgg_features() -> nn.Sequential:
    from torchvision.models.vgg import make_layers
    return make_layers(STEP_VGG_CFG, batch_norm=False)


def _tiny_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(*c) for c in STEP_CONVNEXT], stochastic_depth_prob=0.0,
                    num_classes=STEP_CONVNEXT_CLASSES)


class _TeacherConv(nn.Module):
    """Frozen stand-in teacher: one patch convolution over the processor's pixel values, returned as
    HF-style last_hidden_state with a CLS slot and no register tokens."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=dim, num_register_tokens=0)
        self.num_features = dim
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, pixel_values=None, **_):
        t = self.proj(pixel_values).flatten(2).transpose(1, 2)
        return types.SimpleNamespace(last_hidden_state=torch.cat([t.mean(1, keepdim=True), t], dim=1))


def _teacher_processor(x_uint8, return_tensors="pt"):
    """Stand-in for the HF DINOv3 image processor (rescale 1/255, ImageNet normalize; no resize)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return _Inputs(pixel_values=(x_uint8.float() / 255.0 - mean) / std)


def _plain(args: argparse.Namespace) -> dict:
    """The script's settings (numbers, strings, flags; run names with shell leftovers dropped)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and "$" not in str(v)}


def _params_of(model: nn.Module, drop_prefix=()) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith(drop_prefix)}


def _official_loss_module(mods, args):
    """utils.builders.create_loss_module(args), its pretrained nets built narrow and random (no download)."""
    OL = mods.L
    saved_models, saved_load = OL.models, OL.LPIPS.load_from_pretrained
    OL.models = types.SimpleNamespace(vgg16=lambda *a, **k: types.SimpleNamespace(features=_tiny_vgg_features()),
                                      convnext_small=lambda *a, **k: _tiny_convnext())
    OL.LPIPS.load_from_pretrained = lambda self, *a, **k: None
    try:
        with _OfficialOnCPU(mods.T):
            return mods.B.create_loss_module(args)
    finally:
        OL.models, OL.LPIPS.load_from_pretrained = saved_models, saved_load


def _effective_loss_weights(loss_fn) -> dict:
    """The weights the official loss module really uses (e.g. discriminator_weight is never forwarded by
    create_loss_module, so the class default applies, not the script's 0.5)."""
    p = loss_fn.perceptual_loss
    return dict(reconstruction_weight=float(loss_fn.reconstruction_weight),
                perceptual_weight=float(loss_fn.perceptual_weight), kl_weight=float(loss_fn.kl_weight),
                sem_weight=float(loss_fn.sem_weight),
                discriminator_weight=float(loss_fn.discriminator_weight),
                discriminator_start_epoch=float(loss_fn.discriminator_start_epoch),
                reconstruction_loss=loss_fn.reconstruction_loss, sem_loss_type=loss_fn.sem_loss.sem_loss_type,
                lpips_weight=float(p.loss_weight_lpips), convnext_weight=float(p.loss_weight_convnext),
                logvar=float(loss_fn.logvar))


def tokenizer_train_step_fixture(mods, official_dir: str) -> dict:
    OR, OL, OB, OT, OE = mods.R, mods.L, mods.B, mods.T, mods.E
    official_args = _script_args(official_dir, "run_train_tokenizer.sh", mods.main_rec.get_args_parser())
    args = argparse.Namespace(**vars(official_args))
    img, patch, c, tdim, b = (STEP_TOK[k] for k in ("img_size", "patch_size", "token_channels", "teacher_dim", "batch"))
    for k, v in STEP_TOK_OVERRIDES.items():
        setattr(args, k, v)
    args.batch_size, args.world_size, args.log_dir = b, 1, "/nonexistent"
    args.warmup_epochs = int(getattr(args, "warmup_rate", 0) * args.epochs)   # as train_utils.setup
    # model (official RecTok at a small size; teacher = a frozen patch convolution)
    OR.SIZE_DICT.update(STEP_TOK_SIZES)
    OR.create_foundation_model = lambda name: (_TeacherConv(tdim, patch), _teacher_processor)
    model_config = dict(img_size=img, patch_size=patch, vit_enc_model_size="step_enc", vit_dec_model_size="step_dec",
                        vit_sem_model_size="step_sem", token_channels=c,
                        foundation_model_type=args.foundation_model_type,
                        sem_dec_type=args.sem_dec_type, sem_input_type=args.sem_input_type, sem_target=args.sem_target,
                        mask_ratio=args.mask_ratio, mask_ratio_min=args.mask_ratio_min,
                        mask_ratio_type=args.mask_ratio_type, gamma=args.gamma, noise_schedule=args.noise_schedule)
    torch.manual_seed(0)
    model = OR.RecTok(**model_config)
    gen = torch.Generator().manual_seed(11)
    randomize_parameters(model, gen)
    init_state = _clone_sd(model)
    ema = OE.SimpleEMAModel(model, decay=args.ema_rate)          # builders.create_reconstruction_model
    # loss module from the official builder; its pretrained nets become narrow random ones
    with _OfficialOnCPU(OT):
        optimizer, loss_scaler = OB.create_optimizer_and_scaler(args, model)
    loss_fn = _official_loss_module(mods, args)
    lp = loss_fn.perceptual_loss.lpips
    lp.chns = list(STEP_VGG_CHANNELS)
    for k, ch in enumerate(STEP_VGG_CHANNELS):
        setattr(lp, f"lin{k}", OL.NetLinLayer(ch, use_dropout=True))
    loss_fn.discriminator = OL.NLayerDiscriminator(**STEP_DISC)
    _init_module_(loss_fn.perceptual_loss, gen)
    with torch.no_grad():   # LPIPS heads are non-negative, as the real ones
        for k in range(5):
            w = getattr(lp, f"lin{k}").model[1].weight
            w.copy_(torch.rand(w.shape, generator=gen) / w.shape[1])
    loss_fn.perceptual_loss.requires_grad_(False)
    _init_module_(loss_fn.discriminator, gen)
    loss_init_state = _clone_sd(loss_fn)
    with _OfficialOnCPU(OT):
        d_optimizer, d_loss_scaler = OB.create_optimizer_and_scaler(args, loss_fn)
    # stage 2 (decoder fine-tuning): only its script's values and its loss weights are recorded
    decft_args = _script_args(official_dir, "run_decoder_finetune_tokenizer.sh", mods.main_rec.get_args_parser())
    decft_weights = _effective_loss_weights(_official_loss_module(mods, decft_args))

    batches = [torch.rand(b, 3, img, img, generator=gen) * 2 - 1 for _ in range(2)]
    losses = []

    def record(module, a, kw, out):
        total, logs = out
        item = {k: float(v) for k, v in logs.items()}
        if kw.get("mode") == "generator":
            item["total_loss"] = float(total)
        losses.append(dict(mode=kw.get("mode"), terms=item))
    hook = loss_fn.register_forward_hook(record, with_kwargs=True)
    _seeded(5)
    with _OfficialOnCPU(OT), DrawRecorder() as rec:
        OT.train_one_epoch_tokenizer(args, model, [{"img": x} for x in batches], optimizer, loss_scaler, None,
                                     STEP_TOK["epoch"], ema, loss_fn, d_optimizer, d_loss_scaler)
        logs = list(_RecordingMetricLogger.records)
    hook.remove()
    gen_losses = [l["terms"] for l in losses if l["mode"] == "generator"]
    disc_losses = [l["terms"] for l in losses if l["mode"] == "discriminator"]
    assert len(gen_losses) == 2 and len(disc_losses) == 2 and len(logs) == 2, (len(losses), len(logs))
    teacher_prefix = "sem_foundation_models."
    steps = [dict(generator=g, discriminator=d, lr=l["lr"], grad_norm=l["grad_norm"],
                  discriminator_grad_norm=l["discriminator_grad_norm"])
             for g, d, l in zip(gen_losses, disc_losses, logs)]
    print("tokenizer train step:", [(round(s["grad_norm"], 4), round(s["discriminator_grad_norm"], 4), s["lr"])
                                   for s in steps], f"{len(rec.draws)} draws")
    ours = dict(preset="rectok_BB", size_dict=STEP_TOK_SIZES,
                overrides=dict(img_size=img, patch_size=patch, encoder_size="step_enc", decoder_size="step_dec",
                               sem_size="step_sem", token_channels=c, teachers={"dinov3": tdim},
                               sem_dec_type=args.sem_dec_type, sem_input_type=args.sem_input_type,
                               sem_target=args.sem_target, mask_ratio=args.mask_ratio,
                               mask_ratio_min=args.mask_ratio_min, mask_ratio_type=args.mask_ratio_type,
                               gamma=args.gamma, noise_schedule=args.noise_schedule))
    return dict(
        ours=ours, official_config=model_config,
        official_args=_plain(official_args), official_loss_weights=_effective_loss_weights(loss_fn),
        official_args_decoder_ft=_plain(decft_args), official_loss_weights_decoder_ft=decft_weights,
        fixture_overrides=dict(STEP_TOK_OVERRIDES), epoch=STEP_TOK["epoch"], steps_per_epoch=len(batches),
        hparams=dict(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs,
                     weight_decay=args.weight_decay, betas=(args.beta1, args.beta2), grad_clip=args.grad_clip,
                     ema_rate=args.ema_rate, disc_start_epoch=args.discriminator_start_epoch),
        perceptual=dict(vgg_cfg=[str(v) for v in STEP_VGG_CFG], vgg_channels=list(STEP_VGG_CHANNELS),
                        convnext=[list(c) for c in STEP_CONVNEXT], convnext_classes=STEP_CONVNEXT_CLASSES,
                        disc=dict(STEP_DISC)),
        init_state=init_state, loss_init_state=loss_init_state,
        teacher={k[len(teacher_prefix + "dinov3."):]: v for k, v in init_state.items() if k.startswith(teacher_prefix)},
        batches=batches, draws=rec.draws, steps=steps,
        params_after=_params_of(model, (teacher_prefix,)),
        ema_after={k: v.detach().clone() for k, v in ema.ema_params.items() if not k.startswith(teacher_prefix)},
        discriminator_after=_clone_sd(loss_fn.discriminator),
        provenance=dict(official_commit=OFFICIAL_COMMIT, torch=str(torch.__version__),
                        note="utils/train_utils.py train_one_epoch_tokenizer, 2 steps at epoch 150 (GAN on), "
                             "fp32 CPU, model parameters randomized, narrow random perceptual nets and teacher"))


def dit_train_step_fixture(mods, official_dir: str) -> dict:
    OD, OB, OT, OE = mods.D, mods.B, mods.T, mods.E
    official_args = _script_args(official_dir, "run_train_diffusion.sh", mods.main_diff.get_args_parser())
    args = argparse.Namespace(**vars(official_args))
    for k, v in STEP_DIT_OVERRIDES.items():
        setattr(args, k, v)
    b = STEP_DIT["batch"]
    args.batch_size, args.world_size, args.log_dir = b, 1, "/nonexistent"
    assert args.tokenizer and not args.use_cached_tokens   # the script's online tokenization
    torch.manual_seed(0)
    model = OD.DiTwDDTHead(**STEP_DIT["official"])
    gen = torch.Generator().manual_seed(12)
    randomize_parameters(model, gen, skip=("pos_embed", "t_embedder.W"))
    init_state = _clone_sd(model)
    mods.R.SIZE_DICT.update(STEP_DIT_TOK_SIZES)
    tokenizer = mods.R.RecTok(**STEP_DIT_TOK)
    randomize_parameters(tokenizer, gen)
    tokenizer.eval().requires_grad_(False)
    c = STEP_DIT_TOK["token_channels"]
    latent_mean, latent_std = 0.2 * torch.randn(c, generator=gen), 0.5 + torch.rand(c, generator=gen)
    tokenizer.reset_stats(latent_mean, latent_std)
    ema = OE.SimpleEMAModel(model, decay=args.ema_rate)          # builders.create_generation_model
    with _OfficialOnCPU(OT):
        optimizer, loss_scaler = OB.create_optimizer_and_scaler(args, model)
    ncls, img = STEP_DIT["official"]["num_classes"], STEP_DIT_TOK["img_size"]
    # images as the official loader makes them: uint8 -> ToTensor -> Normalize(0.5, 0.5)
    images_u8 = [torch.randint(0, 256, (b, 3, img, img), generator=gen, dtype=torch.uint8) for _ in range(2)]
    labels = [torch.randint(0, ncls, (b,), generator=gen) for _ in range(2)]
    batches = [dict(img=(u8.float() / 255 - 0.5) / 0.5, label=y) for u8, y in zip(images_u8, labels)]
    # a seed whose label-dropout draws drop at least one label over the two steps
    seed = next(sd for sd in range(1000) if _drops_a_label(b, model.input_size ** 2, c, sd))
    losses = []
    hook = model.register_forward_hook(lambda m, a, out: losses.append(float(out)))
    _seeded(seed)
    with _OfficialOnCPU(OT), DrawRecorder() as rec:
        OT.train_one_epoch_generator(args, model, batches, optimizer, loss_scaler, None, STEP_DIT["epoch"], ema,
                                     tokenizer)
        logs = list(_RecordingMetricLogger.records)
    hook.remove()
    assert len(losses) == 2 and len(logs) == 2
    drops = [d["values"] for d in rec.draws if d["kind"] == "uniform"][1::2]
    assert any((v < 0.1).any() for v in drops), "the seed search mispredicted the label-dropout draws"
    steps = [dict(loss=l, lr=g["lr"], grad_norm=g["grad_norm"]) for l, g in zip(losses, logs)]
    print("dit train step:", [(round(x["loss"], 5), round(x["grad_norm"], 4), x["lr"]) for x in steps],
          f"{len(rec.draws)} draws, time shift {model.transport.time_dist_shift:.4f}")
    return dict(
        ours=dict(preset="ditdh_s", overrides=dict(STEP_DIT["ours"]), tokenizer_preset="rectok_BB_decft",
                  tokenizer_size_dict=STEP_DIT_TOK_SIZES,
                  tokenizer_overrides=dict(img_size=img, patch_size=STEP_DIT_TOK["patch_size"],
                                           encoder_size="step_tok_enc", decoder_size="step_tok_dec",
                                           token_channels=c)),
        official_config=dict(STEP_DIT["official"]), official_tokenizer_config=dict(STEP_DIT_TOK),
        official_args=_plain(official_args),
        fixture_overrides=dict(STEP_DIT_OVERRIDES), epoch=STEP_DIT["epoch"], steps_per_epoch=len(batches),
        hparams=dict(lr=args.lr, min_lr=args.min_lr, warmup_start_epoch=args.warmup_start_epoch,
                     warmup_end_epoch=args.warmup_end_epoch, weight_decay=args.weight_decay,
                     betas=(args.beta1, args.beta2), grad_clip=args.grad_clip, ema_rate=args.ema_rate,
                     time_dist_shift=float(model.transport.time_dist_shift)),
        init_state=init_state, tokenizer_state=_clone_sd(tokenizer), latent_mean=latent_mean, latent_std=latent_std,
        images_u8=images_u8, labels=labels, draws=rec.draws, steps=steps, seed=seed,
        params_after=_params_of(model), ema_after={k: v.detach().clone() for k, v in ema.ema_params.items()},
        provenance=dict(official_commit=OFFICIAL_COMMIT, torch=str(torch.__version__),
                        note="utils/train_utils.py train_one_epoch_generator with online tokenization, 2 steps at "
                             "epoch 100 (linear LR decay), fp32 CPU, parameters randomized"))


def _drops_a_label(batch: int, tokens: int, channels: int, seed: int) -> bool:
    """Whether ``seed`` makes the official draw sequence (posterior eps, x0, t, then label dropout, per
    step) drop a label. x0 is ``randn_like`` of the rearranged (non-contiguous) latents, which draws
    differently from a contiguous randn: mimic the layout."""
    _seeded(seed)
    side = int(tokens ** 0.5)
    hits = False
    for _ in range(2):
        torch.randn(batch, tokens, channels)
        torch.randn_like(torch.empty(batch, tokens, channels).transpose(1, 2).unflatten(2, (side, side)))
        torch.rand(batch)
        hits |= bool((torch.rand(batch) < 0.1).any())
    return hits


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
    ap.add_argument("--only", choices=("all", "parity", "train_step"), default="all",
                    help="parity: the forward fixtures; train_step: the official training-step fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic, and fast enough for these sizes
    outputs = []
    if args.only in ("all", "parity"):
        OR, OD = import_official(args.official_dir)
        tok = tokenizer_fixture(OR)
        dit = dit_fixture(OD)
        outputs += [("official_rectok_parity.pt", tok), ("official_ditdh_parity.pt", dit)]
    if args.only in ("all", "train_step"):
        mods = import_official_training(args.official_dir)
        outputs += [("official_train_step_tokenizer.pt", tokenizer_train_step_fixture(mods, args.official_dir)),
                    ("official_train_step_dit.pt", dit_train_step_fixture(mods, args.official_dir))]
    for name, obj in outputs:
        path = os.path.join(args.out_dir, name)
        torch.save(obj, path)
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    if args.check and args.only in ("all", "parity"):
        check_ours(tok, dit)


if __name__ == "__main__":
    main()
