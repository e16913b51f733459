#!/usr/bin/env bash
# The ASAP-SAS table on a CPU: the recommended scorer (configs/scoring.yaml, an ensemble) per set,
# with each of its members on its own beside it: bert-cls on MiniLM-L6 (the study's BERT-class
# baseline, with the baseline's own recipe) and lm-cls on Gemma-3-270M, and wall time; zero-shot
# too with ZERO_SHOT=1, and the study's prompt-based LLM rows with LORA=1: SmolLM2 on the rubric
# prompt (max_length=512, the item's header shared), FT-LoRA (300 AdamW steps, lr 3e-4) and MeZO-LoRA
# (lr=auto, ε 1e-2, MEZO_STEPS steps, default 500); LP=1 adds the linear probe on the same prompt's
# features. BASELINE=1 adds the study's BERT-class baseline alone (bert-cls on MiniLM-L6, 300 AdamW
# steps of batch 16 at lr 5e-5, argmax: the README's baseline column). SCORER=0 leaves the
# recommended scorer out.
#
#   scripts/cpu_asap.sh OUT_DIR [SET ...]          # sets default 1 2 10
#   SCORER_ARGS="steps=200" scripts/cpu_asap.sh OUT 1     # try a variant of the recipe
#   SCORER_CONFIG=configs/scoring-smollm2.yaml scripts/cpu_asap.sh OUT   # the SmolLM2 scorer (faster, weaker)
#   EXTRA="model=tiny-llama steps=2 n_eval=16" scripts/cpu_asap.sh OUT 10   # smoke test: every run gets EXTRA
#   PYTHON=.venv/bin/python scripts/cpu_asap.sh OUT          # the interpreter for zoft and the summary
#
# A run folder that already holds eval.json is kept, and one a kill cut short is resumed
# (`zoft train --resume`: an ensemble keeps its finished members), so rerunning the script after a
# kill finishes the table; RERUN=1 trains every run again.
#
# Every run trains on the train split less 100 dev responses (n_train=-1) and reports on the
# whole public test split. Each set is its own `zoft train`, so one failure does not stop the rest.
set -uo pipefail
out=$1; shift
sets=${*:-1 2 10}
python=${PYTHON:-python}
zoft=${ZOFT:-$python -m zoft}
here=$(cd "$(dirname "$0")/.." && pwd)

timed() {   # timed NAME CMD...: run, then record the wall seconds beside the run's eval.json
  local dir=$1; shift
  if [ -f "$dir/eval.json" ] && [ "${RERUN:-0}" != 1 ]; then   # finished before: keep it (RERUN=1 redoes it)
    echo "$dir: done before, kept"; return
  fi
  local start=$SECONDS
  if [ -f "$dir/config.yaml" ] && [ "${RERUN:-0}" != 1 ]; then   # killed before: go on from its checkpoints
    $zoft train --resume "$dir" progress=false || echo "$dir FAILED"
    [ -d "$dir" ] && echo "$((SECONDS - start)) (resumed)" > "$dir/wall_seconds"; return
  fi
  # shellcheck disable=SC2086  # EXTRA is a list of key=value overrides
  "$@" ${EXTRA:-} output_dir="$dir" overwrite_output_dir=true progress=false || echo "$dir FAILED"
  [ -d "$dir" ] && echo $((SECONDS - start)) > "$dir/wall_seconds"
}

for s in $sets; do
  data="task=asap-$s n_train=-1 n_dev=100 n_eval=1000"
  if [ "${BASELINE:-0}" = 1 ]; then
    timed "$out/asap-$s/bert-cls" $zoft train method=bert-cls $data max_length=128 batch_size=16 \
        steps=300 lr=5e-5 eval_every=100
  fi
  if [ "${ZERO_SHOT:-0}" = 1 ]; then
    timed "$out/asap-$s/zero-shot" $zoft train method=zero-shot $data max_length=512 compute_dtype=bf16
  fi
  if [ "${LORA:-0}" = 1 ]; then   # the rubric prompt: each response runs on its item's shared header
    prompt="$data max_length=512 mode=lora batch_size=16 eval_batch_size=32 eval_every=100"
    timed "$out/asap-$s/ft-lora" $zoft train method=ft $prompt compute_dtype=bf16 steps=300 lr=3e-4
    # compute_dtype left to auto: fp32 for MeZO-LoRA, whose loss differences bf16 rounds away (bench/eps_sweep.py)
    timed "$out/asap-$s/mezo-lora" $zoft train method=mezo $prompt steps="${MEZO_STEPS:-500}" lr=auto eps=1e-2
  fi
  if [ "${LP:-0}" = 1 ]; then
    timed "$out/asap-$s/lp" $zoft train method=lp $data max_length=512 compute_dtype=bf16 eval_batch_size=16
  fi
  if [ "${SCORER:-1}" = 1 ]; then
    # shellcheck disable=SC2086  # SCORER_ARGS is a list of key=value overrides
    timed "$out/asap-$s/scorer" $zoft train "${SCORER_CONFIG:-$here/configs/scoring.yaml}" $data ${SCORER_ARGS:-}
  fi
done

$python - "$out" $sets <<'EOF'
import json, sys
from pathlib import Path
from zoft.tasks import load_task

out, sets = Path(sys.argv[1]), sys.argv[2:]
print("| set | human QWK | run | QWK | acc % | seconds |\n|---|---|---|---|---|---|")
for s in sets:
    human = load_task(f"asap-{s}").human_qwk
    for run in sorted((out / f"asap-{s}").iterdir()):
        if not (run / "eval.json").is_file():
            continue
        r = json.loads((run / "eval.json").read_text())
        for m in r.get("members", []):   # an ensemble: each member alone, with its training seconds
            print(f"| {s} | {human:.3f} | {run.name}: member {m['name']} ({m['model']}) | {m['eval']['qwk']:.3f} "
                  f"| {100 * m['eval']['acc']:.1f} | {m['train_seconds']} (training) |")
        wall = (run / "wall_seconds").read_text().strip() if (run / "wall_seconds").is_file() else ""
        print(f"| {s} | {human:.3f} | {run.name} | {r['eval']['qwk']:.3f} | {100 * r['eval']['acc']:.1f} | {wall} (all) |")
EOF
