#!/bin/sh
# Runs every fuzz target for SECONDS each (default 600), two at a time, with cargo-fuzz on
# the nightly toolchain (`cargo install cargo-fuzz`). Each target starts from its seeds
# (fuzz/seeds/T, valid files of its kind) and its corpus (fuzz/corpus/T, kept and minimised
# after the run); crashes land in fuzz/artifacts/T. Commit the corpora and reproducers: the
# stable test suite replays them (engine/tests/fuzz_corpora.rs, app/src/session_file.rs).
# Usage: fuzz/run.sh [SECONDS] [TARGET…]
set -eu
cd "$(dirname "$0")"
seconds=${1:-600}
[ $# -gt 0 ] && shift
targets=${*:-"gguf hf_config hf_safetensors chat_template prompt_sets adapter lens_files session"}
# The session target needs the app crate (the GUI stack): built only when it is asked for.
features=""
case " $targets " in *" session "*) features="--features session" ;; esac
cargo +nightly fuzz build -s none -O $features
run_one() {
  t=$1
  mkdir -p corpus/$t artifacts/$t
  # Inputs up to 512 KB (the GGUF and safetensors seeds are 150 and 360 KB); 5 s per input
  # and 2 GB of memory at most: a slow or greedy input is a finding too.
  # corpus-large/T: inputs over 20 KB kept out of git (the GGUF and safetensors targets').
  extra=""; [ -d corpus-large/$t ] && extra=corpus-large/$t
  cargo +nightly fuzz run -s none -O $features $t corpus/$t seeds/$t $extra -- \
    -max_total_time="$seconds" -max_len=524288 -timeout=5 -rss_limit_mb=2048 \
    -print_final_stats=1 >"artifacts/$t.log" 2>&1 || echo "$t: stopped with a finding, see fuzz/artifacts/$t"
  grep -E "stat::number_of_executed_units|cov:" "artifacts/$t.log" | tail -2 | sed "s/^/$t: /"
  # Keep the corpus small: only inputs that add coverage.
  cargo +nightly fuzz cmin -s none -O $features $t corpus/$t -- -max_len=524288 >/dev/null 2>&1 || true
}
set -- $targets
while [ $# -gt 0 ]; do
  run_one "$1" &
  if [ $# -gt 1 ]; then run_one "$2" & shift; fi
  shift
  wait
done
