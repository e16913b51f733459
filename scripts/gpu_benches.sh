#!/usr/bin/env bash
# One GPU session's owed benchmarks, most important first, each under its own time limit; the
# results are packed after each part (a part that runs out of time leaves the others' results):
#   scripts/gpu_benches.sh OUT_DIR [MINILM_DIR [DATA_DIR [SMOLLM2_GGUF]]]
# DATA_DIR: a copy of ../shared/data (sst2/, rte/, asap-sas/), which does not travel by itself.
# SMOLLM2_GGUF: the SmolLM2-135M-Instruct GGUF (the GPU image lacks the `gguf` package: install
# its wheel on PYTHONPATH first); without it the convergence part is skipped.
#   1. bench/gpu_step.py      (issue 5: 125M..30B, reference / fused / fast math / 4-pass / Rademacher)
#   2. bench/drift.py         (issue 5: 1000 lr=0 steps, bf16 and fp32, torch vs triton, an OPT-13B layer)
#   3. bench/scale.py --gpu   (issue 6: resident vs offload (1 stream) vs offload (2 streams), to 30B)
#   4. bench/small_step.py    (issue 7: eager/compiled x per-tensor/flat; compiling takes minutes)
#   5. bench/convergence.py   (issue 7: SST-2 and RTE, every optimizer, the real model)
#   6. bert-cls on ASAP-SAS 1, 2, 10 (issue 4's scoring baseline; needs a MiniLM folder)
# Limits (seconds) default to a 30-minute session: 180 + 120 + 300 + 300 + 480 + 120 = 25 min.
set -uo pipefail
out=$1; minilm=${2:-}; gguf=${4:-}
[ -n "${3:-}" ] && export ZOFT_DATA_DIR=$3
work=/tmp/zoft-benches; mkdir -p "$work"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
pack() { tar czf "$out/benches.tgz" --exclude='*.safetensors' -C "$work" . 2>/dev/null; }   # no weights: size limit
part() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) $(date +%T)"
         timeout "$limit" "$@" 2>&1 | tee "$work/$name.log" | grep -v "it/s\]" | tail -40; pack; }

part gpu_step ${T_GPU_STEP:-180} python bench/gpu_step.py --out "$work/gpu_step" --shapes ${GPU_STEP_SHAPES:-125m,1.3b,13b,30b}
part drift ${T_DRIFT:-120} python bench/drift.py --weights random --backends torch,triton \
  --dtypes float32,bfloat16 --steps 1000 --out "$work/drift"
part scale ${T_SCALE:-300} python bench/scale.py --gpu --out "$work/scale" \
  --shapes ${SCALE_SHAPES:-1.3b,6.7b,13b,30b} --budget-s ${SCALE_BUDGET:-240}
part small_step ${T_SMALL:-300} python bench/small_step.py --out "$work/small_step"
if [ -n "$gguf" ]; then
  # SST-2, seed 0, 10k forwards (5k MeZO steps: the reference point) per method first;
  # the time limit stops new runs, and a rerun with the same OUT resumes (more seeds, RTE)
  part convergence ${T_CONV:-480} python bench/convergence.py --model "$gguf" --out "$work/convergence" \
    --tasks ${CONV_TASKS:-sst2} --seeds ${CONV_SEEDS:-0} --budget ${CONV_BUDGET:-10000} --eval-every 1000 \
    --time-limit ${CONV_TIME_LIMIT:-420}
fi
if [ -n "$minilm" ]; then
  declare -A n_train=([1]=1472 [2]=1078 [10]=1440)
  for s in 1 2 10; do
    part bert-cls-$s ${T_BERT:-40} python -m zoft train method=bert-cls encoder="$minilm" model=tiny-llama task=asap-$s \
      n_train=${n_train[$s]} n_dev=200 n_eval=1000 max_length=512 batch_size=16 eval_batch_size=64 steps=300 lr=5e-5 \
      eval_every=100 device=cuda progress=false output_dir="$work/asap/asap-$s/bert-cls"
  done
fi
