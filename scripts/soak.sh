#!/usr/bin/env bash
# Soak runs: walcast's crash, race, simulation and fuzz tests at scale. Not
# part of scripts/test.sh (hours on a small machine); run it by hand or on a
# schedule:
#
#   bash scripts/soak.sh [kills] [race] [sim] [fuzz]     (default: all four)
#
#   kills  crates/walcast/tests/it/soak.rs: SOAK_PUBLISHER_KILLS (100) kill -9s
#          of a publisher under load and SOAK_REPLICA_KILLS (100) kill -9s of
#          a replica mid catch-up, each followed by a consistency check
#   race   SOAK_PUBLISHERS (8) publishers racing on one prefix on moto,
#          SOAK_RACE_ROUNDS (3) times: exactly one keeps publishing
#   sim    the deterministic simulation (crates/walcast-core/tests/sim.rs)
#          over SIM_SEEDS (100000) seeds (the test profile is optimized)
#   fuzz   every cargo-fuzz target in fuzz/ for FUZZ_RUNS (10000000)
#          executions each (FUZZ_TARGETS: a subset, space-separated);
#          installs cargo-fuzz when missing; uses the nightly toolchain when
#          rustup has one, else the stable one with RUSTC_BOOTSTRAP=1.
#          Inputs that crash a target are copied to fuzz/crashers/<target>/,
#          where `cargo test -p walcast-core --test fuzz_corpus` replays them.
#
# Figures go to target/soak/<UTC time>/summary.txt (and each step's log
# beside it). Exits non-zero when any step failed; every step runs anyway.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
steps=("$@")
((${#steps[@]})) || steps=(kills race sim fuzz)
out="$ROOT/target/soak/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
summary="$out/summary.txt"
say() { printf 'soak: %s\n' "$*" | tee -a "$summary"; }
failed=0

run_step() {
  local name=$1; shift
  local log="$out/$name.log" start=$SECONDS rc
  say "$name: $* (log: $log)"
  "$@" >"$log" 2>&1
  rc=$?
  grep -h '^soak:' "$log" | tee -a "$summary"
  if ((rc == 0)); then
    say "$name: ok in $((SECONDS - start)) s"
  else
    say "$name: FAILED (exit $rc) after $((SECONDS - start)) s; tail of the log:"
    tail -40 "$log" | sed 's/^/    /' | tee -a "$summary"
    failed=1
  fi
}

# test_bin ARGS...: builds a test target (cargo test --no-run ARGS) and prints
# its executable, so a long run does not hold cargo's build lock.
test_bin() {
  cargo test --no-run --message-format=json "$@" 2>"$out/build.log" |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}

for step in "${steps[@]}"; do
  case $step in
    kills)
      bin=$(test_bin -p walcast --test it)
      [[ -x $bin ]] || { say "kills: building the soak tests failed (see $out/build.log)"; failed=1; continue; }
      run_step kills "$bin" --ignored --nocapture --test-threads=1 soak::soak_publisher_kill9 soak::soak_replica_kill9
      ;;
    race)
      bash scripts/e2e-deps.sh >"$out/e2e-deps.log" 2>&1 || { say "race: installing moto failed (see $out/e2e-deps.log)"; failed=1; continue; }
      bin=$(test_bin -p walcast --test it)
      [[ -x $bin ]] || { say "race: building the soak tests failed (see $out/build.log)"; failed=1; continue; }
      run_step race "$bin" --ignored --nocapture --test-threads=1 soak::soak_racing_publishers_moto
      ;;
    sim)
      seeds=${SIM_SEEDS:-100000}
      bin=$(test_bin -p walcast-core --test sim)
      [[ -x $bin ]] || { say "sim: building the simulation failed (see $out/build.log)"; failed=1; continue; }
      SIM_SEEDS=$seeds run_step sim "$bin" --nocapture
      grep -h '^simulation:' "$out/sim.log" | head -1 | sed "s/^/soak: /" | tee -a "$summary"
      ;;
    fuzz)
      runs=${FUZZ_RUNS:-10000000}
      targets=${FUZZ_TARGETS:-$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^walcast-fuzz$' | tr '\n' ' ')}
      if ! cargo fuzz --version >/dev/null 2>&1; then
        say "fuzz: installing cargo-fuzz (cargo install cargo-fuzz)"
        cargo install cargo-fuzz >"$out/cargo-fuzz-install.log" 2>&1 ||
          { say "fuzz: cargo install cargo-fuzz failed (see $out/cargo-fuzz-install.log)"; failed=1; continue; }
      fi
      toolchain=()
      if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then toolchain=(+nightly); else export RUSTC_BOOTSTRAP=1; fi
      for t in $targets; do
        scratch="$out/fuzz-corpus/$t"
        mkdir -p "$scratch" "$out/fuzz-artifacts/$t"
        # A scratch corpus first (new inputs land there, not in fuzz/corpus).
        run_step "fuzz-$t" cargo "${toolchain[@]}" fuzz run "$t" "$scratch" "fuzz/corpus/$t" -- \
          -runs="$runs" -rss_limit_mb=2048 -artifact_prefix="$out/fuzz-artifacts/$t/" -print_final_stats=1
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/fuzz-$t.log" | tail -1)
        say "fuzz-$t: ${execs:-?} executions (asked: $runs)"
        for a in "$out/fuzz-artifacts/$t"/crash-* "$out/fuzz-artifacts/$t"/oom-* "$out/fuzz-artifacts/$t"/timeout-*; do
          [[ -f $a ]] || continue
          mkdir -p "fuzz/crashers/$t"
          cp "$a" "fuzz/crashers/$t/"
          say "fuzz-$t: CRASHER $(basename "$a") copied to fuzz/crashers/$t/ (replayed by the fuzz_corpus test)"
          failed=1
        done
      done
      ;;
    *) say "unknown step $step (kills, race, sim, fuzz)"; exit 2 ;;
  esac
done
say "summary: $summary"
exit "$failed"
