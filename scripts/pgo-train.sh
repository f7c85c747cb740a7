#!/usr/bin/env bash
# Writes the release build's optimisation profile
# (build/pgo/portcullis.profdata.gz and build/pgo/llvm-major), which
# scripts/release-build.sh builds with. Run it after changes to the request
# path and commit both files; a stale profile costs speed, never
# correctness.
#
#   scripts/pgo-train.sh                   # about 15 minutes on 2 cores
#
# 1. builds an instrumented release binary (-Cprofile-generate) into
#    ${CARGO_TARGET_DIR:-target}/pgo-generate;
# 2. runs the load script (deploy/load/run.sh) against it once in every
#    mode, one token and 10k tokens over HTTP/1.1, h2, and a fixed rate
#    (nginx as the peer the script requires), so the counts are those of
#    the request path a deployment serves: TLS, the token cache, posture,
#    the decision cache, forwarding;
# 3. merges the counts with the toolchain's own llvm-profdata (rustup's
#    llvm-tools component: LLVM's profile format follows its version) into
#    a sparse profile: functions the load never ran are left out, so they
#    are optimised as without a profile rather than as cold.
#
# Needs what the load script needs (nginx, wrk, h2load, curl, jq: see
# deploy/load/README.md) and rustup. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { printf 'scripts/pgo-train.sh: %s\n' "$*" >&2; exit 1; }
command -v rustup >/dev/null 2>&1 || die "needs rustup (for the llvm-tools component)"
rustup component add llvm-tools >/dev/null
sysroot=$(rustc --print sysroot)
version=$(rustc -vV)
host=$(sed -n 's/^host: //p' <<<"$version")
llvm=$(sed -n 's/^LLVM version: \([0-9]*\).*/\1/p' <<<"$version")
profdata=$sysroot/lib/rustlib/$host/bin/llvm-profdata
[ -x "$profdata" ] || die "no llvm-profdata at $profdata"
[ -n "$llvm" ] || die "cannot read rustc's LLVM version"

target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd)
# The load run's counts (merged) and the build's own (never read): both
# start empty, so neither piles up over trainings.
raw=$target_dir/pgo-raw
build_counts=$target_dir/pgo-build-counts
rm -rf "$raw" "$build_counts"
mkdir -p "$raw"

echo "scripts/pgo-train.sh: building the instrumented binary" >&2
# RUSTFLAGS reach the build scripts and proc-macros too, which write their
# own counts while compiling (serde's derives, aws-lc's build): into a
# directory of their own, which is not merged. Not `--target`: it changes
# every crate's symbol hashes, and a profile is matched by symbol name, so
# it would not fit the release build (which has no `--target`).
RUSTFLAGS="-Cprofile-generate=$build_counts" \
  CARGO_TARGET_DIR="$target_dir/pgo-generate" \
  cargo build --release --locked --quiet --bin portcullis
bin=$target_dir/pgo-generate/release/portcullis

echo "scripts/pgo-train.sh: running the load script against it" >&2
# The counts of every run of the binary (the load script's own calls and
# the proxy under load; runs of one binary add into one file).
LLVM_PROFILE_FILE="$raw/portcullis-%m.profraw" \
  MODES="h1 h1-10k h2 rate" DURATION=8 WARMUP=2 ROUNDS=1 PEERS="nginx portcullis" \
  PORTCULLIS_BIN="$bin" deploy/load/run.sh >"$target_dir/pgo-train.log" 2>&1 \
  || die "the load script failed: see $target_dir/pgo-train.log"
compgen -G "$raw/*.profraw" >/dev/null || die "the instrumented binary wrote no counts into $raw"

mkdir -p build/pgo
"$profdata" merge --sparse -o "$target_dir/portcullis.profdata" "$raw"/*.profraw
gzip -9nc "$target_dir/portcullis.profdata" > build/pgo/portcullis.profdata.gz.tmp
mv build/pgo/portcullis.profdata.gz.tmp build/pgo/portcullis.profdata.gz
echo "$llvm" > build/pgo/llvm-major
echo "scripts/pgo-train.sh: wrote build/pgo/portcullis.profdata.gz (LLVM $llvm); commit it with build/pgo/llvm-major" >&2
