"""Triton cosine_distill_loss (kernels/cosine_distill.py) against the reference and an fp64 oracle.

Semantics: pred (B, M, D) predicts the target rows target[b, ids[b, m]] of target (B, N, D) (the
semantic decoder projects only the masked tokens); without ids pred and target are both (B, N, D).
Covers the loss and dL/dpred for fp32 and bf16, all tokens and ids with M = 0, M = N (a
permutation), random M, duplicate ids, int32 and strided ids, zero rows and rows below the
F.normalize eps, streamed (multi-chunk) rows, strided pred/target views, the backward seed,
out-of-range ids, the tokenizer's masked mode end to end, and input errors. Launcher outputs start
as NaN (poison_outputs).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rectok_fast.kernels.cosine_distill as cos_mod
from _kernel_checks import via_custom_op, as64, check, kernel_device, leaf, poison_outputs  # noqa: F401
from rectok_fast import ops
from rectok_fast.kernels.cosine_distill import cosine_distill_loss as fused_cos
from rectok_fast.ops import reference

DTYPES = [torch.float32, torch.bfloat16]


def _oracle(pred, target, ids):
    """fp64, written independently of the reference: gather rows, normalize with the eps clamp, 1 - cos."""
    if ids is not None and ids.shape[1] == 0:
        return (pred * 0.0).sum()                     # nothing masked: zero loss, still tied to pred
    if ids is not None:
        b = torch.arange(pred.shape[0], device=pred.device)[:, None]
        target = target[b, ids]
    p = pred / pred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    f = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (1 - (p * f).sum(-1)).mean()


def _run_case(pred, target, ids, via="direct", seed=1.7):
    dtype = pred.dtype
    if via == "direct":
        loss_f = fused_cos(pred, target, ids)
    else:
        with ops.use_backend("fused"):
            loss_f = ops.cosine_distill_loss(pred, target, ids)
    loss_r = reference.cosine_distill_loss(pred, target, ids)
    p64, t64 = as64([pred, target])
    loss_o = _oracle(p64, t64, ids)
    assert loss_f.dtype == torch.float32 and loss_f.shape == ()
    check("loss", loss_f, loss_r, loss_o, dtype, atol_rel=1e-6)
    g_f = torch.autograd.grad(loss_f * seed, pred)[0]
    g_r = torch.autograd.grad(loss_r * seed, pred)[0]
    g_o = torch.autograd.grad(loss_o * seed, p64)[0]
    assert g_f.dtype == pred.dtype
    check("grad_pred", g_f, g_r, g_o, dtype)
    return loss_f, g_f


def _inputs(B, N, D, dtype, dev, ids=None):
    """pred (B, M, D) correlated with its target rows (cos far from 0); M = N without ids."""
    target = torch.randn(B, N, D, device=dev)
    if ids is None:
        pred = torch.randn(B, N, D, device=dev) + 0.5 * target
    else:
        picked = target[torch.arange(B, device=dev)[:, None], ids.long()]
        pred = torch.randn(*ids.shape, D, device=dev) + 0.5 * picked
    return leaf(pred.to(dtype)), target.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 13, 100), (2, 7, 33)])
@pytest.mark.parametrize("ids_kind", ["none", "random", "all"])
@pytest.mark.parametrize("via", ["direct", "ops", "customop"])
def test_forward_and_grad(device, dtype, shape, ids_kind, via, monkeypatch):
    via = via_custom_op(via, monkeypatch)
    dev = kernel_device(device)
    B, N, D = shape
    if ids_kind == "none":
        ids = None
    elif ids_kind == "all":                                            # M = N, a permutation per sample
        ids = torch.stack([torch.randperm(N, device=dev) for _ in range(B)])
    else:                                                              # ~40% masked, as the tokenizer
        m = max(1, int(0.4 * N))
        ids = torch.stack([torch.randperm(N, device=dev)[:m] for _ in range(B)])
    pred, target = _inputs(B, N, D, dtype, dev, ids)
    _, g = _run_case(pred, target, ids, via)
    assert (g != 0).all(dim=-1).any(dim=-1).all()                      # every sample's rows get a gradient


@pytest.mark.parametrize("via", ["direct", "ops", "customop"])
def test_empty_ids_gives_zero_loss_and_grad(device, via, monkeypatch):
    via = via_custom_op(via, monkeypatch)
    dev = kernel_device(device)
    ids = torch.empty(2, 0, dtype=torch.long, device=dev)
    pred, target = _inputs(2, 5, 7, torch.bfloat16, dev, ids)
    loss, g = _run_case(pred, target, ids, via)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert g.shape == pred.shape and (g == 0).all()


def test_duplicate_and_int32_and_strided_ids(device):
    """Duplicated ids read the same target row for several predictions."""
    dev = kernel_device(device)
    ids = torch.tensor([[1, 1, 4, 8], [2, 2, 2, 0], [7, 3, 5, 3]], device=dev)
    pred, target = _inputs(3, 9, 20, torch.float32, dev, ids)
    _run_case(pred, target, ids)
    _run_case(pred, target, ids.int())
    ids_t = ids.t().contiguous().t()                                   # (B, M) with strides (1, B)
    assert not ids_t.is_contiguous()
    _run_case(pred, target, ids_t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_and_zero_rows(device, dtype):
    """Rows with |p| below F.normalize's eps (and exactly zero) follow the reference's exact gradient."""
    dev = kernel_device(device)
    pred, target = _inputs(2, 6, 10, torch.float32, dev)
    with torch.no_grad():
        pred[0, 1] = 0.0
        pred[1, 2] *= 1e-14                           # |p| ~ 3e-14 < 1e-12: divided by eps, no projection
        pred[1, 4] *= 1e-9                            # small but above eps: projection term kept
        target[0, 3] = 0.0
    _run_case(leaf(pred.to(dtype)), target.to(dtype), None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_rows(device, dtype, monkeypatch):
    """Rows longer than one block are streamed in chunks along D (forward sums, backward pass)."""
    dev = kernel_device(device)
    monkeypatch.setattr(cos_mod, "MAX_BLOCK_D", 32)
    pred, target = _inputs(2, 5, 100, dtype, dev)
    _run_case(pred, target, None)
    ids = torch.tensor([[0, 3], [4, 4]], device=dev)
    _run_case(*_inputs(2, 5, 100, dtype, dev, ids), ids)


def test_loss_sum_in_last_program(device, monkeypatch):
    """The forward's last program adds every partial (here in several SUM_BLOCK passes), writes the loss
    bitwise the same on a repeat, and leaves the shared ticket counter at zero for the next launch."""
    from rectok_fast.kernels import _launch
    dev = kernel_device(device)
    monkeypatch.setattr(cos_mod, "SUM_BLOCK_MAX", 2)
    monkeypatch.setattr(cos_mod, "FWD_TILE", 32)      # 2 rows of D = 16 per program: 7 programs for 14 rows
    pred, target = _inputs(2, 7, 16, torch.float32, dev)
    _run_case(pred, target, None)
    first = cos_mod.cosine_fwd(pred.detach(), target, None)[0]
    again = cos_mod.cosine_fwd(pred.detach(), target, None)[0]
    assert torch.equal(first, again)
    assert int(_launch.ticket_counter(first.device)) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype):
    dev = kernel_device(device)
    B, N, D = 2, 11, 24
    pred = leaf(torch.randn(B, D, N, device=dev).to(dtype)).transpose(1, 2)     # channel stride != 1
    teacher = torch.randn(B, N + 5, D, device=dev).to(dtype)
    target = teacher[:, 5:]                                                     # drop CLS + registers: strided rows
    assert not pred.is_contiguous() and not target.is_contiguous()
    _run_case(pred, target, None)
    picked = leaf(torch.randn(B, 8, D, device=dev).to(dtype))[:, ::2]          # every other row of a bigger tensor
    assert not picked.is_contiguous()
    _run_case(picked, target, torch.tensor([[10, 0, 5, 5], [1, 2, 3, 9]], device=dev))


def test_target_gets_no_gradient(device):
    dev = kernel_device(device)
    pred, target = _inputs(2, 4, 8, torch.float32, dev)
    target.requires_grad_(True)
    fused_cos(pred, target).backward()
    assert target.grad is None and pred.grad is not None


def test_backward_seed_is_read(device):
    dev = kernel_device(device)
    pred, target = _inputs(2, 3, 16, torch.float32, dev)
    loss = fused_cos(pred, target)
    g1 = torch.autograd.grad(loss, pred, retain_graph=True)[0]
    g3 = torch.autograd.grad(loss * -3.0, pred)[0]
    torch.testing.assert_close(g3, -3.0 * g1)


def test_matches_official_formula(device):
    """Same value as the official SemLoss formulation on bf16 inputs (normalize, 1 - dot, mean)."""
    dev = kernel_device(device)
    pred, target = _inputs(2, 8, 32, torch.bfloat16, dev)
    official = (1 - (F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)).mean()
    torch.testing.assert_close(fused_cos(pred, target), official, rtol=1e-5, atol=1e-6)


def test_input_errors(device):
    dev = kernel_device(device)
    pred = torch.randn(2, 5, 4, device=dev)
    for fn in (fused_cos, reference.cosine_distill_loss):      # one contract for both paths
        with pytest.raises(ValueError, match="same shape"):
            fn(pred, torch.randn(2, 5, 3, device=dev))
        with pytest.raises(ValueError, match="must both be"):
            fn(pred[0], pred[0])
        with pytest.raises(ValueError, match=r"ids must be \(B, M\)"):
            fn(pred, pred, torch.zeros(3, 5, dtype=torch.long, device=dev))
        with pytest.raises(ValueError, match=r"ids must be \(B, M\)"):
            fn(pred, pred, torch.zeros(2, 4, dtype=torch.long, device=dev))   # one id per pred row
        with pytest.raises(TypeError, match="integer"):
            fn(pred, pred, torch.zeros(2, 5, device=dev))
        with pytest.raises(ValueError, match="target"):
            fn(pred[:, :2], torch.randn(2, 7, 3, device=dev), torch.zeros(2, 2, dtype=torch.long, device=dev))
    with pytest.raises(TypeError, match="dtype"):
        fused_cos(pred.long(), pred.long())


@pytest.mark.parametrize("bad", [[[0, 7], [1, 2]], [[0, 1], [-1, 2]]])
@pytest.mark.parametrize("impl", ["fused", "reference", "ops"])
def test_out_of_range_ids_are_a_clear_error(device, bad, impl):
    """CPU: an IndexError naming the range. (CUDA: a device-side assert, see registry.check_ids_range.)"""
    dev = kernel_device(device)
    if dev.type != "cpu":
        pytest.skip("on CUDA the check is a device-side assert, which would poison the test process")
    pred, target = torch.randn(2, 2, 4, device=dev), torch.randn(2, 7, 4, device=dev)
    ids = torch.tensor(bad, device=dev)
    with pytest.raises(IndexError, match=r"\[0, 7\)"):
        if impl == "fused":
            fused_cos(pred, target, ids)
        elif impl == "reference":
            reference.cosine_distill_loss(pred, target, ids)
        else:
            with ops.use_backend("fused"):
                ops.cosine_distill_loss(pred, target, ids)


def test_out_of_range_ids_never_touch_memory(device):
    """Unchecked (inside a compiled graph) bad ids give a NaN loss and NaN gradient rows, no OOB access."""
    dev = kernel_device(device)
    ids = torch.tensor([[0, 5], [1, -2]], device=dev)
    pred = torch.randn(2, 2, 8, device=dev)
    target = torch.randn(2, 5, 8, device=dev)
    loss, stats = cos_mod.cosine_fwd(pred, target, ids)
    assert torch.isnan(loss)
    assert torch.isnan(stats[:, [1, 3]]).all() and torch.isfinite(stats[:, [0, 2]]).all()
    g = cos_mod.cosine_bwd(pred, target, ids, stats, torch.tensor(1.0, device=dev))
    assert torch.isnan(g[0, 1]).all() and torch.isfinite(g[0, 0]).all()


def test_masked_mode_projects_only_the_picked_tokens(device):
    """The tokenizer's 'reconstruction' mode: the semantic decoder gathers hidden states at the masked
    ids before its output projection; loss and every parameter gradient equal projecting all tokens
    and scoring the masked rows (the official formulation)."""
    from types import SimpleNamespace

    from rectok_fast.losses import RecTokLoss
    from rectok_fast.models.tokenizer import TransformerSemDecoder, gather_tokens

    dev = kernel_device(device)
    torch.manual_seed(3)
    dec = TransformerSemDecoder(64, 16, "tiny", 16, 24).to(dev)
    z = torch.randn(2, 16, 16, device=dev)
    ids = torch.stack([torch.randperm(16, device=dev)[:6] for _ in range(2)])
    target = torch.randn(2, 16, 24, device=dev)
    loss_fn = RecTokLoss(None, None, sem_target="reconstruction")
    results = []
    for picked in (True, False):
        dec.zero_grad()
        pred = dec(z, None, ids if picked else None)
        assert pred.shape == ((2, 6, 24) if picked else (2, 16, 24))
        out = SimpleNamespace(sem_pred={"t": pred}, sem_target={"t": target}, ids_masked=ids,
                              sem_mode="reconstruction", sem_picked=picked, recon=target)
        with ops.use_backend("fused"):
            loss = loss_fn.sem_loss(out)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in dec.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2)
    assert sum(g is not None for g in g1) > 5
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    full = dec(z)
    torch.testing.assert_close(dec(z, None, ids), gather_tokens(full, ids), rtol=1e-5, atol=1e-6)


def test_tokenizer_reconstruction_mode_hands_the_loss_only_masked_rows():
    """RecTok in 'reconstruction' mode: sem_pred is (B, N - L, Dt) at ids_masked (flagged sem_picked),
    the teacher features are used as they are (no copy), and the loss runs on them."""
    import random

    from rectok_fast.losses import RecTokLoss
    from rectok_fast.models.tokenizer import build_tokenizer

    class StandIn(torch.nn.Module):          # teacher stand-in: fixed random features, no grad
        def forward(self, images):
            with torch.no_grad():
                return torch.randn(images.shape[0], 16, 64)

    torch.manual_seed(0)
    random.seed(0)
    tok = build_tokenizer("rectok_tiny", mask_ratio=0.4, mask_ratio_min=0.3, sem_target="reconstruction").train()
    teacher = StandIn()
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(o))
    tok.attach_teacher("dinov3", teacher)
    out = tok(torch.rand(2, 3, 64, 64) * 2 - 1)
    m = out.ids_masked.shape[1]
    assert m > 0 and out.sem_picked
    assert out.sem_pred["dinov3"].shape == (2, m, 64) and out.sem_target["dinov3"].shape == (2, 16, 64)
    assert out.sem_target["dinov3"] is seen[0]
    loss = RecTokLoss(None, None).sem_loss(out)
    loss.backward()
    assert torch.isfinite(loss) and tok.sem_decoders["dinov3"].out.weight.grad is not None
