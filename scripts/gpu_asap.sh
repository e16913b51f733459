#!/usr/bin/env bash
# The ASAP-SAS table of the scoring study on a GPU: zero-shot, MeZO-LoRA and FT-LoRA with
# SmolLM2-135M-Instruct (bf16 base, fp32 LoRA weights as peft keeps them), per science set.
# Each method is its own `zoft train`, so one that fails (e.g. diverges) does not stop the rest.
#
#   scripts/gpu_asap.sh MODEL OUT_DIR [SET ...]      # MODEL: smollm2-135m or a .gguf path; sets default 1 2 10
#
# Train on the train split (all of it but 200 held-out dev responses), report on the whole test split.
set -uo pipefail
model=$1; out=$2; shift 2
sets=${*:-1 2 10}
zoft=${ZOFT:-python -m zoft}
declare -A n_train=([1]=1472 [2]=1078 [10]=1440)   # train rows minus the 200 dev rows

common="model=$model device=${DEVICE:-cuda} dtype=${DTYPE:-bf16} max_length=512 n_dev=200 n_eval=1000
        batch_size=16 eval_batch_size=64 progress=false"
for s in $sets; do
  data="task=asap-$s n_train=${n_train[$s]}"
  $zoft train method=zero-shot $data $common output_dir="$out/asap-$s/zero-shot" \
      || echo "asap-$s zero-shot FAILED"
  $zoft train method=mezo mode=lora $data $common steps=${MEZO_STEPS:-1000} lr=${MEZO_LR:-2e-3} eps=1e-2 \
      eval_every=200 output_dir="$out/asap-$s/mezo-lora" || echo "asap-$s mezo-lora FAILED"
  $zoft train method=ft mode=lora $data $common steps=${FT_STEPS:-300} lr=${FT_LR:-3e-4} \
      eval_every=50 output_dir="$out/asap-$s/ft-lora" || echo "asap-$s ft-lora FAILED"
done
