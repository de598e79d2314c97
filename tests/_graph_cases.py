"""Whole-graph checks, run as a script in a fresh process by tests/test_compile_graphs.py
(a fresh process: dynamo caches, the backend's announcements and the capabilities are per process).

    python tests/_graph_cases.py {dit,tokenizer} {explain,fullgraph,both} [BACKEND_NAME]

``explain`` prints one JSON line {"graphs": .., "breaks": .., "reasons": [..]} from
``torch._dynamo.explain`` on the model's training forward; ``fullgraph`` compiles forward + loss +
backward with ``torch.compile(fullgraph=True, backend="aot_eager")`` and prints one JSON line with the
largest difference to eager.
The models are tiny versions of the real ones (same ops, same code paths).
"""
from __future__ import annotations

import json
import random
import sys
import warnings

import torch


def dit_case():
    from rectok_fast.models.dit import build_dit
    model = build_dit("ditdh_s", input_size=4, in_channels=8, depth=2, head_hidden_size=64, head_num_heads=2,
                      num_classes=10).train()
    with torch.no_grad():        # the official init zeroes every adaLN output: make the ops matter
        for p in model.parameters():
            if p.dim() and not p.abs().sum():
                p.normal_(0, 0.02)
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 3])

    def step(m, x, t, y):
        return m(x, t, y).float().square().mean()
    return model, (x, t, y), step


def tokenizer_case(sem_target: str = "reconstruction"):
    from rectok_fast.losses import RecTokLoss
    from rectok_fast.models.teacher import build_teacher
    from rectok_fast.models.tokenizer import build_tokenizer
    tok = build_tokenizer("rectok_tiny", mask_ratio=0.4, mask_ratio_min=0.3, sem_target=sem_target).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # random teacher weights (said loudly), fine for a graph check
        teacher = build_teacher("dinov3", None, img_size=64, arch="vit_small_patch16_dinov3", embed_dim=64, depth=1,
                                num_heads=2)
    tok.attach_teacher("dinov3", teacher)
    loss = RecTokLoss(None, None, perceptual_weight=0.0)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    len_keep = tok.encoder.draw_len_keep()   # host-side draw, outside the graph (see Encoder.draw_len_keep)

    def step(m, images, len_keep):
        out = m(images, len_keep)
        return out.recon.float().square().mean() + loss.kl_loss(out.kl) * 1e-6 + loss.sem_loss(out)
    return tok, (images, len_keep), step


def main(argv) -> None:
    which, mode = argv[0], argv[1]
    from rectok_fast import ops
    if len(argv) > 2:
        ops.set_backend(argv[2])
    torch.manual_seed(0)
    random.seed(0)
    model, args, step = dit_case() if which == "dit" else tokenizer_case()
    if mode in ("explain", "both"):
        ex = torch._dynamo.explain(model)(*args)
        print(json.dumps(dict(graphs=ex.graph_count, breaks=ex.graph_break_count,
                              reasons=sorted({str(b.reason).splitlines()[0][:200] for b in ex.break_reasons}),
                              impls={op: ops.implementation_for(op, "cpu", torch.float32) for op in ops.registry.NAMES})))
        torch._dynamo.reset()
    if mode == "explain":
        return
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(1)
        for p in params:
            p.grad = None
        value = fn(model, *args)
        value.backward()
        results.append((value.detach(), [p.grad.clone() if p.grad is not None else None for p in params]))
    (v0, g0), (v1, g1) = results
    assert all((a is None) == (b is None) for a, b in zip(g0, g1)), "compiled step lost or added gradients"
    diff = max([float((v0 - v1).abs())] + [float((a - b).abs().max()) for a, b in zip(g0, g1) if a is not None])
    print(json.dumps(dict(value=float(v0), max_diff=diff, grads=sum(g is not None for g in g0))))


if __name__ == "__main__":
    main(sys.argv[1:])
