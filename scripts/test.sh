#!/usr/bin/env bash
# Tandem's test suite on a machine with a Rust toolchain: installs what the
# tests need and is missing (PostgreSQL's server binaries, which the
# PostgreSQL tests start themselves with initdb + pg_ctl in temp dirs), then
# runs every test. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
  echo "tandem tests: cargo not found; install a Rust toolchain (https://rustup.rs)" >&2
  exit 1
}

have_postgres() {
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
if ! have_postgres; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "== installing PostgreSQL's server binaries (initdb not found)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  elif command -v brew >/dev/null 2>&1; then
    echo "== installing PostgreSQL (initdb not found)"
    brew install postgresql
  fi
  have_postgres || {
    echo "tandem tests: PostgreSQL's server binaries (initdb, pg_ctl) are missing;" \
      "install PostgreSQL and run this again" >&2
    exit 1
  }
fi

echo "== cargo test --workspace"
cargo test --workspace "$@"
