#!/usr/bin/env bash
# Tandem's test suite on a machine with a Rust toolchain: installs what the
# tests need and is missing (PostgreSQL's server binaries, which the
# PostgreSQL tests start themselves with initdb + pg_ctl in temp dirs), then
# runs every test. Extra arguments go to `cargo test`. Last, the Python
# example (examples/python/run.sh: a participant and a client in another
# language against the `tandem` binary that cargo test built; it installs
# python3-venv when missing and grpcio from PyPI); SKIP_PYTHON_EXAMPLE=1
# skips it.
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

# The web console is tested in a real browser (tests/tests/console_browser.rs):
# headless Chromium driven over WebDriver by chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "== installing chromium and chromium-driver (the console's browser test)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
  command -v chromedriver >/dev/null 2>&1 || {
    echo "tandem tests: chromium and chromedriver are missing (the console's browser test);" \
      "install them (Debian: chromium chromium-driver) and run this again" >&2
    exit 1
  }
fi

echo "== cargo test --workspace"
cargo test --workspace "$@"

if [ "${SKIP_PYTHON_EXAMPLE:-0}" != 1 ]; then
  # cargo test --workspace built target/debug/tandem; a filtered run may not have.
  tandem_bin="${CARGO_TARGET_DIR:-target}/debug/tandem"
  if [ ! -x "$tandem_bin" ]; then
    echo "== cargo build -p tandem-cli"
    cargo build -p tandem-cli
  fi
  echo "== examples/python/run.sh"
  bash examples/python/run.sh
fi
