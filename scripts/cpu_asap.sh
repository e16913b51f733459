#!/usr/bin/env bash
# The ASAP-SAS table on a CPU: the MiniLM baseline (bert-cls) beside the recommended scorer
# (configs/scoring.yaml), per set, with wall time; zero-shot too with ZERO_SHOT=1 (slow on a CPU:
# the rubric prompt is ~500 tokens a response).
#
#   scripts/cpu_asap.sh OUT_DIR [SET ...]          # sets default 1 2 10
#   SCORER_ARGS="mode=lora lr=1e-4" scripts/cpu_asap.sh OUT 1     # try a variant of the recipe
#   EXTRA="model=tiny-llama steps=2 n_eval=16" scripts/cpu_asap.sh OUT 10   # smoke test: every run gets EXTRA
#   PYTHON=.venv/bin/python scripts/cpu_asap.sh OUT          # the interpreter for zoft and the summary
#
# A run folder that already holds eval.json is kept (rerun the script to finish a table after a
# kill); RERUN=1 trains every run again.
#
# Both scorers train on the train split less 100 dev responses (n_train=-1) and report on the
# whole public test split. Each run is its own `zoft train`, so one failure does not stop the rest.
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
  # shellcheck disable=SC2086  # EXTRA is a list of key=value overrides
  "$@" ${EXTRA:-} output_dir="$dir" overwrite_output_dir=true progress=false || echo "$dir FAILED"
  [ -d "$dir" ] && echo $((SECONDS - start)) > "$dir/wall_seconds"
}

for s in $sets; do
  data="task=asap-$s n_train=-1 n_dev=100 n_eval=1000"
  if [ "${ZERO_SHOT:-0}" = 1 ]; then
    timed "$out/asap-$s/zero-shot" $zoft train method=zero-shot $data max_length=512 compute_dtype=bf16
  fi
  # the study's BERT-class baseline as the README's GPU table ran it: 300 AdamW steps of batch 16 at lr 5e-5
  timed "$out/asap-$s/bert-cls" $zoft train method=bert-cls $data max_length=128 batch_size=16 \
      steps=300 lr=5e-5 eval_every=100
  # shellcheck disable=SC2086  # SCORER_ARGS is a list of key=value overrides
  timed "$out/asap-$s/scorer" $zoft train "$here/configs/scoring.yaml" $data ${SCORER_ARGS:-}
done

$python - "$out" $sets <<'EOF'
import json, sys
from pathlib import Path
from zoft.tasks import load_task

out, sets = Path(sys.argv[1]), sys.argv[2:]
print("| set | human QWK | run | QWK | acc % | wall s |\n|---|---|---|---|---|---|")
for s in sets:
    human = load_task(f"asap-{s}").human_qwk
    for run in sorted((out / f"asap-{s}").iterdir()):
        if (run / "eval.json").is_file():
            r = json.loads((run / "eval.json").read_text())
            wall = (run / "wall_seconds").read_text().strip() if (run / "wall_seconds").is_file() else ""
            print(f"| {s} | {human:.3f} | {run.name} | {r['eval']['qwk']:.3f} | {100 * r['eval']['acc']:.1f} | {wall} |")
EOF
