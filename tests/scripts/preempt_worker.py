"""Two-process worker for tests/test_preemption.py (launched by the DeepSpeed launcher, gloo, CPU).

Each rank installs the PreemptionHandler, writes its pid, then runs "steps" (a short sleep each) and
asks ``should_stop()`` at every step boundary. The test signals ONE rank; both must stop at the same
step and exit with EXIT_PREEMPTED, each recording what it saw."""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist  # noqa: E402

from rectok_fast.training.preemption import EXIT_PREEMPTED, PreemptionHandler  # noqa: E402


def main():
    out = sys.argv[-1]          # the DeepSpeed launcher puts --local_rank=N first
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    handler = PreemptionHandler().install()
    with open(os.path.join(out, f"pid_{rank}.tmp"), "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(os.path.join(out, f"pid_{rank}.tmp"), os.path.join(out, f"pid_{rank}"))
    for step in range(1, 3000):
        time.sleep(0.02)                      # "the step"
        if handler.should_stop():
            with open(os.path.join(out, f"stopped_{rank}.json"), "w") as fh:
                json.dump({"step": step, "signalled_here": handler.requested, "signal": handler.signal_name}, fh)
            dist.destroy_process_group()
            sys.exit(EXIT_PREEMPTED)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
