#!/usr/bin/env bash
# One GPU session's benchmarks, each under its own time limit, results packed after each part
# (a part that runs out of time still leaves the others' results):
#   scripts/gpu_benches.sh OUT_DIR [MINILM_DIR [DATA_DIR]]
# (DATA_DIR: a copy of ../shared/data with asap-sas/, which does not travel to a GPU machine by itself)
# 1. bench/gpu_step.py   (issue 5)  2. bench/small_step.py (issue 7)
# 3. bert-cls on ASAP-SAS 1, 2, 10 (the scoring baseline; needs a MiniLM folder)
# 4. bench/scale.py --gpu (offload vs resident)
set -uo pipefail
out=$1; minilm=${2:-}
[ -n "${3:-}" ] && export ZOFT_DATA_DIR=$3
work=/tmp/zoft-benches; mkdir -p "$work"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
pack() { tar czf "$out/benches.tgz" --exclude='*.safetensors' -C "$work" . 2>/dev/null; }   # no weights: size limit
part() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) $(date +%T)"
         timeout "$limit" "$@" 2>&1 | tee "$work/$name.log" | grep -v "it/s\]" | tail -40; pack; }

part gpu_step ${T_GPU_STEP:-170} python bench/gpu_step.py --out "$work/gpu_step" --shapes ${GPU_STEP_SHAPES:-125m,1.3b,13b}
# torch.compile of the 30-layer model takes minutes: 80 s was not enough on an H100
part small_step ${T_SMALL:-240} python bench/small_step.py --out "$work/small_step"
if [ -n "$minilm" ]; then
  declare -A n_train=([1]=1472 [2]=1078 [10]=1440)
  for s in 1 2 10; do
    part bert-cls-$s ${T_BERT:-40} python -m zoft train method=bert-cls encoder="$minilm" model=tiny-llama task=asap-$s \
      n_train=${n_train[$s]} n_dev=200 n_eval=1000 max_length=512 batch_size=16 eval_batch_size=64 steps=300 lr=5e-5 \
      eval_every=100 device=cuda progress=false output_dir="$work/asap/asap-$s/bert-cls"
  done
fi
part scale ${T_SCALE:-100} python bench/scale.py --gpu --out "$work/scale" --shapes ${SCALE_SHAPES:-1.3b,6.7b} --budget-s 60
