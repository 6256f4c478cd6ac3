#!/usr/bin/env bash
# The participant SDK taken in part (participant-sdk/Cargo.toml,
# [features]): each feature alone, and none, passes clippy without the
# others, the client-only and participant-only examples build with only
# the feature they name, and tandem-common's tests pass without TLS. Run
# by .ci/run; a couple of minutes warm.
set -euo pipefail
cd "$(dirname "$0")/.."

for features in "" client participant sled postgres metrics otel tls; do
  echo "== cargo clippy -p tandem-sdk --no-default-features --features '$features'"
  cargo clippy -q -p tandem-sdk --no-default-features --features "$features" -- -D warnings
done
echo "== cargo build -p tandem-sdk --no-default-features --features client --example client_only"
cargo build -q -p tandem-sdk --no-default-features --features client --example client_only
echo "== cargo build -p tandem-sdk --no-default-features --features participant --example participant_only"
cargo build -q -p tandem-sdk --no-default-features --features participant --example participant_only
# The participant starts on a free port and stops: the slim build serves.
"${CARGO_TARGET_DIR:-target}/debug/examples/participant_only"
# Without `tls` an https:// address is refused, never called in cleartext
# (tandem-common's own tests, with no features; the workspace's tests run
# it with `tls`).
echo "== cargo test -p tandem-common --lib (no features)"
cargo test -q -p tandem-common --lib security
