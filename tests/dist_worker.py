"""Run by tests/test_distributed.py under torchrun: MeZO runs, one per mode given on the command line.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py OUT_DIR data direction

Each run trains the same tiny random Llama as the single-process reference in the test.
"""
import sys

from zoft import api
from zoft.models import tiny_random_model

SMALL = dict(task="sst2", n_train=32, n_dev=16, n_eval=16, batch_size=8, eval_batch_size=16, max_length=48,
             progress=False, method="mezo", model="tiny-llama", lr=1e-3, steps=4, eval_every=4, load_best=False,
             dist_timeout=60, compute_dtype="fp32")   # fp32: g is compared within a few fp32 ulps

if __name__ == "__main__":
    out = sys.argv[1]
    for mode in sys.argv[2:]:
        extra = {"n_directions": 1} if mode == "direction" else {}
        api.train({**SMALL, **extra, "parallel": mode, "output_dir": f"{out}/{mode}"},
                  loaded=tiny_random_model("causal", seed=0))
