"""Run by tests/test_train_bf16.py under the DeepSpeed launcher (2 gloo processes): for each ZeRO stage
and precision config (the repo's ds.json and tests/data/ds_bf16_params.json), train a small
Linear/Conv/RMSNorm model one step and record the dtypes DeepSpeed really uses: the module's
parameters and gradients, every gradient collective, the optimizer's parameters, and the fp32 master
the EMA reads. Prints one JSON line per config, prefixed with PROBE (rank 0)."""
from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.RMSNorm(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.head(self.norm(h))


def main():
    import deepspeed
    import deepspeed.comm as dcomm
    from rectok_fast.training.engine import build_engine, load_ds_config
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dcomm.get_rank()
    cdb = dcomm.comm.cdb
    seen = []
    for name in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce", "all_reduce_coalesced"):
        orig = getattr(cdb, name)

        def wrapped(*a, _orig=orig, **k):
            for t in list(a) + list(k.values()):
                if torch.is_tensor(t) and t.is_floating_point() and t.numel() > 1:
                    seen.append(str(t.dtype))
            return _orig(*a, **k)
        setattr(cdb, name, wrapped)
    # the bf16-section configs first: DeepSpeed keeps a process-global "autocast initialised" flag
    runs = [(f, s) for f in ("tests/data/ds_bf16_params.json", "ds.json") for s in (0, 1, 2, 3)]
    # the control: DeepSpeed's own lower-precision list (Linear/Conv) reduces those gradients in bf16
    runs.append(("ds.json+linear_conv_bf16_comm", 2))
    for path, stage in runs:
        cfg = load_ds_config(os.path.join(ROOT, path.split("+")[0]))
        if "+" in path:
            cfg["torch_autocast"]["lower_precision_safe_modules"] = ["torch.nn.modules.linear.Linear",
                                                                     "torch.nn.modules.conv.Conv2d"]
        cfg["zero_optimization"] = {"stage": stage}
        torch.manual_seed(0)
        eng = build_engine(Net(), 1e-2, 0.05, 1.0, torch.device("cpu"), cfg, True, 2, name=f"{path}:{stage}")
        x = torch.randn(2, 3, 6, 6) + rank
        out = eng.call(x)
        grads = set()
        hooks = [p.register_hook(lambda g: grads.add(str(g.dtype))) for p in eng.module.parameters()]
        seen.clear()
        eng.backward(out.float().square().mean())
        grads = sorted(grads)
        for h in hooks:
            h.remove()
        eng.step()
        with eng.master_named_parameters() as params:
            master = sorted({str(v.dtype) for _, v, _ in params})
            weight = next(v for n, v, _ in params if n == "head.weight").clone()
        row = {"config": path, "stage": stage, "precision": eng.precision, "out": str(out.dtype),
               "params": sorted({str(p.dtype) for p in eng.module.parameters()}), "grads": grads,
               "grad_collectives": sorted(set(seen)), "master": master,
               "master_is_bf16_representable": bool(torch.equal(weight, weight.bfloat16().float()))}
        if rank == 0:
            print("PROBE " + json.dumps(row), flush=True)
    # leave the process group before the interpreter exits: a gloo worker thread still alive at exit was
    # seen to abort a rank ("terminate called without an active exception", rc -6) after all its output
    dcomm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
