#!/usr/bin/env bash
# The release build: `cargo build --release --locked --bin portcullis`, with
# profile-guided optimisation from the profile kept in the repository
# (build/pgo/portcullis.profdata.gz, written by scripts/pgo-train.sh).
#
#   scripts/release-build.sh              # -> ${CARGO_TARGET_DIR:-target}/release/portcullis
#   scripts/release-build.sh --quiet      # extra arguments go to `cargo build`
#   PORTCULLIS_PGO=off scripts/release-build.sh   # the same build without the profile
#
# The profile tells LLVM which branches and functions the request path
# takes, so it lays out the hot path together, inlines along it and keeps
# cold code (errors, reloads, start-up) out of the way: fewer instruction
# cache misses a request. Both builds serving the same load at once
# (deploy/load/pair.sh): about 10% less CPU a request (README, Performance,
# stop 36).
#
# A profile only steers optimisation. Functions whose code changed since it
# was written no longer match theirs and are built as without it (LLVM's
# mismatch warnings are silenced), so a stale profile costs speed, never
# correctness, like build/link.order. The profile is LLVM's indexed format,
# which a newer LLVM reads and an older one cannot: with a toolchain whose
# LLVM is older than build/pgo/llvm-major, this builds without it and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=build/pgo/portcullis.profdata.gz
flags=()
if [ "${PORTCULLIS_PGO:-on}" = off ]; then
  echo "scripts/release-build.sh: PORTCULLIS_PGO=off, building without the profile" >&2
elif [ ! -s "$profile" ] || [ ! -s build/pgo/llvm-major ]; then
  echo "scripts/release-build.sh: no $profile, building without a profile" >&2
else
  want=$(tr -dc '0-9' < build/pgo/llvm-major)
  have=$("${RUSTC:-rustc}" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
  if [ -z "$have" ] || [ -z "$want" ] || [ "$have" -lt "$want" ]; then
    echo "scripts/release-build.sh: rustc's LLVM (${have:-unknown}) is older than the profile's ($want): building without it" >&2
  else
    target_dir=${CARGO_TARGET_DIR:-target}
    mkdir -p "$target_dir/pgo"
    # Unpacked next to the build, under a name that changes with the
    # profile's content, so cargo rebuilds when the profile changes (the
    # path is part of RUSTFLAGS) and never reads a half-written file.
    sum=$(sha256sum "$profile" | cut -c1-16)
    data=$(cd "$target_dir/pgo" && pwd)/portcullis-$sum.profdata
    if [ ! -s "$data" ]; then
      gzip -dc "$profile" > "$data.tmp"
      mv "$data.tmp" "$data"
    fi
    flags=(-Cprofile-use="$data" -Cllvm-args=-no-pgo-warn-mismatch)
  fi
fi
if [ ${#flags[@]} -gt 0 ]; then
  # Handed to cargo one flag per field (CARGO_ENCODED_RUSTFLAGS, fields
  # split by 0x1f), so a target directory whose path has a space still
  # works; flags the caller set come first (RUSTFLAGS is split on spaces,
  # as cargo splits it).
  sep=$'\x1f'
  enc=${CARGO_ENCODED_RUSTFLAGS:-}
  if [ -z "$enc" ] && [ -n "${RUSTFLAGS:-}" ]; then
    for f in $RUSTFLAGS; do enc=${enc:+$enc$sep}$f; done
  fi
  for f in "${flags[@]}"; do enc=${enc:+$enc$sep}$f; done
  unset RUSTFLAGS
  export CARGO_ENCODED_RUSTFLAGS=$enc
fi
exec cargo build --release --locked --bin portcullis "$@"
