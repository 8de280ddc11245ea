#!/usr/bin/env bash
# Fuzz smoke test for CI: builds every target once, then runs each for N seconds (default
# 30; the first argument overrides) on a copy of its seed corpus in a temporary directory,
# so the tree stays clean. Prints one line per target with libFuzzer's final counts, and
# exits non-zero if any target crashed (its input is hexdumped and its log tail printed;
# the reproducer stays in fuzz/artifacts/<target>/, which git ignores).
#
# Needs cargo-fuzz. Uses the nightly toolchain when rustup has one; otherwise the default
# toolchain with RUSTC_BOOTSTRAP=1 (its standard library ships the ASan runtime).
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-30}"
if rustup run nightly rustc --version >/dev/null 2>&1; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

"${fuzz[@]}" build
mapfile -t targets < <("${fuzz[@]}" list)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failed=()
for target in "${targets[@]}"; do
  corpus="$work/$target"
  mkdir -p "$corpus"
  if [ -d "corpus/$target" ]; then
    cp -R "corpus/$target/." "$corpus/"
  fi
  log="$work/$target.log"
  artifacts="artifacts/$target"
  mkdir -p "$artifacts"
  before="$(ls "$artifacts" | wc -l)"
  status=ok
  if ! "${fuzz[@]}" run "$target" "$corpus" -- \
    -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    status=FAILED
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
  cov="$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1 || true)"
  done_line="$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$log" | tail -n 1 || true)"
  printf '%-16s %-6s execs=%s exec/s=%s %s (%s)\n' "$target" "$status" \
    "${execs:-?}" "${rate:-?}" "${cov:-cov: ?}" "${done_line:-no Done line}"
  if [ "$status" != ok ]; then
    failed+=("$target")
    echo "---- $target: last lines of the libFuzzer log"
    tail -n 60 "$log"
    after="$(ls "$artifacts" | wc -l)"
    if [ "$after" -gt "$before" ]; then
      newest="$(ls -t "$artifacts" | head -n 1)"
      echo "---- $target: reproducer fuzz/$artifacts/$newest"
      od -A x -t x1z -v "$artifacts/$newest" | head -n 64
    fi
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz smoke: ${#failed[@]} target(s) failed: ${failed[*]}"
  exit 1
fi
echo "fuzz smoke: ${#targets[@]} targets ran ${secs}s each, no crash"
