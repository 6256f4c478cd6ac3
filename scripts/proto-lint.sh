#!/usr/bin/env bash
# Lints the public contract (proto/) with buf: the rules in proto/buf.yaml
# and buf's formatting. Uses `buf` from PATH, else installs it from npm
# (@bufbuild/buf) under target/buf; without either it says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac

buf="$(command -v buf || true)"
if [ -z "$buf" ] && [ -x "$target/buf/node_modules/.bin/buf" ]; then
  buf="$target/buf/node_modules/.bin/buf"
fi
if [ -z "$buf" ] && command -v npm >/dev/null 2>&1; then
  echo "== proto lint: installing buf from npm into $target/buf"
  if npm install --silent --no-audit --no-fund --prefix "$target/buf" @bufbuild/buf@1 >/dev/null 2>&1 &&
    "$target/buf/node_modules/.bin/buf" --version >/dev/null 2>&1; then
    buf="$target/buf/node_modules/.bin/buf"
  fi
fi
if [ -z "$buf" ]; then
  echo "== proto lint: skipped (no buf, and npm could not install it)"
  exit 0
fi
echo "== proto lint: buf $("$buf" --version) lint + format"
cd proto
"$buf" lint
"$buf" format --diff --exit-code
