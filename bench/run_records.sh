#!/usr/bin/env bash
# The real-size records of bench/README.md, one process at a time (never two at once on a 2-core machine),
# each with its peers, the load average before each run kept beside its record.
#   LLAMA_BENCH=/work/llama-build/bin/llama-bench THREADS=2 bash bench/run_records.sh [axiom|genesis|...]
# REMEASURE=1: measure the kernel choice and the compiled step again first (a machine busy at the first load).
# Records: bench/results/<model>-<dtype>-<quantize>-t<threads>.json, uptime lines in bench/results/uptime.txt.
set -u
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
OUT=bench/results
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one record
  local name=$1; shift
  echo "$(date -u +%H:%M:%S) $name: $(uptime)" | tee -a "$OUT/uptime.txt"
  python -m chatapp bench "$@" --threads "$THREADS" ${REMEASURE:+--remeasure} --json "$OUT/$name-t$THREADS.json" 2>&1 | grep -v "^\[bench"
}
want=${1:-all}
if [[ $want == all || $want == demos ]]; then  # time outside the model on the demos: one thread, short runs
  for m in axiom-tiny byrne-tiny genesis-tiny odinnext-tiny huginn-tiny; do
    echo "$(date -u +%H:%M:%S) $m quick: $(uptime)" | tee -a "$OUT/uptime.txt"
    python -m chatapp bench "$m" --quick --threads 1 --json "$OUT/$m-quick.json" 2>/dev/null | grep decode
  done
fi
if [[ $want == all || $want == axiom ]]; then
  for q in ${QUANTS:-none int8 int4}; do
    run "axiom-bfloat16-$q" axiom --dtype bfloat16 --quantize "$q" ${LLAMA_BENCH:+--llama-bench "$LLAMA_BENCH"}
  done
fi
[[ $want == all || $want == genesis ]] && run genesis-bfloat16-none genesis --dtype bfloat16
[[ $want == all || $want == genesis ]] && run genesis-float32-none genesis --dtype float32
[[ $want == all || $want == odinnext ]] && run odinnext-bfloat16-none odinnext --dtype bfloat16
[[ $want == all || $want == byrne ]] && run byrne-float32-none-quick byrne --quick
# Huginn at the issue's 4 recurrence steps (the card's default, 32, reads the core block 32 times a token).
[[ $want == all || $want == huginn ]] && run huginn-bfloat16-int4-steps4-quick huginn --quick --quantize int4 --control num_steps=4
[[ $want == all || $want == huginn ]] && run huginn-bfloat16-none-steps4-quick huginn --quick --control num_steps=4
exit 0
