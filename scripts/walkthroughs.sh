#!/usr/bin/env bash
# Runs the book's hands-on walkthroughs exactly as written: the shell block
# after `<!-- walkthrough: NAME -->` in a chapter is extracted and run with
# bash (errexit on), in a temp dir, with target/debug on PATH (tandem,
# bank-participant, transfer), then its transcript is checked.
#
# - secured: docs/book/src/security.md, "A secured local setup, by hand".
# - cluster: docs/book/src/cluster.md, "Two coordinators on one host",
#   against a PostgreSQL started here the way tests/src/pg.rs does (initdb
#   + pg_ctl in a temp dir; as user postgres via runuser when root).
#
# The blocks use fixed ports (7070, 7071, 9001, 9002): they must be free.
# About 30 s once the binaries are built. Usage: scripts/walkthroughs.sh
# [secured|cluster]...
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
target="${CARGO_TARGET_DIR:-$repo/target}"

echo "== cargo build -p tandem-cli -p tandem-examples (the walkthroughs' binaries)"
cargo build -q -p tandem-cli -p tandem-examples
export PATH="$target/debug:$PATH"

# The fenced block after the marker line, without its fences.
block() {
  awk -v marker="<!-- walkthrough: $2 -->" '
    $0 == marker { found = 1; next }
    found == 1 && /^```/ { found = 2; next }
    found == 2 && /^```/ { exit }
    found == 2 { print }
  ' "$1"
}

work="$(mktemp -d -t tandem-walkthroughs.XXXXXX)"
pids=()
pg_data=""
run_as=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -9 -- "-$pid" 2>/dev/null || true
  done
  if [ -n "$pg_data" ]; then
    "${run_as[@]}" "$pg_ctl" stop -D "$pg_data" -m immediate >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Runs chapter $1's block $2 in its own dir and process group; its
# transcript goes to $work/$2.out.
run() {
  local text dir
  text="$(block "$1" "$2")"
  [ -n "$text" ] || { echo "walkthroughs: no block '$2' in $1" >&2; exit 1; }
  dir="$work/$2"
  mkdir -p "$dir"
  echo "== walkthrough $2 ($1)"
  (cd "$dir" && exec setsid bash -euo pipefail -c "$text") >"$work/$2.out" 2>&1 &
  pids+=("$!")
  if ! wait "$!"; then
    cat "$work/$2.out"
    echo "walkthroughs: '$2' failed (above: its output)" >&2
    exit 1
  fi
  # Whatever the block left running (it should have stopped it all).
  kill -9 -- "-${pids[-1]}" 2>/dev/null || true
  cat "$work/$2.out"
}

# Fails unless the transcript of $1 has at least $3 lines matching $2.
expect() {
  local n
  n="$(grep -cE -- "$2" "$work/$1.out" || true)"
  if [ "$n" -lt "$3" ]; then
    echo "walkthroughs: '$1' printed $n lines matching /$2/, expected $3 or more" >&2
    exit 1
  fi
}

secured() {
  run docs/book/src/security.md secured
  expect secured '^[0-9a-f-]{36} committed$' 1           # tandem tx submit
  expect secured '^committed [0-9a-f-]{36}$' 1           # transfer
  expect secured '^aborted [0-9a-f-]{36}: .*insufficient funds' 1
  expect secured '^\(exit code 1\)$' 2                   # the abort, the refused caller
  expect secured 'ABORTED .*voted no: insufficient funds' 1
  expect secured 'COMMITTED' 2
  expect secured 'PermissionDenied|PERMISSION_DENIED|permission' 1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_bin() {
  command -v "$1" 2>/dev/null || ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -1
}

cluster() {
  local initdb
  initdb="$(pg_bin initdb)"
  pg_ctl="$(pg_bin pg_ctl)"
  [ -n "$initdb" ] && [ -n "$pg_ctl" ] || {
    echo "walkthroughs: initdb / pg_ctl not found (install PostgreSQL)" >&2
    exit 1
  }
  pg_data="$work/pg/data"
  mkdir -p "$pg_data"
  if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root.
    local user=postgres
    id "$user" >/dev/null 2>&1 || user=nobody
    chmod 755 "$work" "$work/pg"
    chown "$user" "$pg_data"
    run_as=(runuser -u "$user" --)
  fi
  "${run_as[@]}" "$initdb" -D "$pg_data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
  export PGHOST=127.0.0.1 PGPORT
  PGPORT="$(free_port)"
  (cd / && "${run_as[@]}" "$pg_ctl" start -w -D "$pg_data" -l "$pg_data/server.log" \
    -o "-p $PGPORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" >/dev/null)
  run docs/book/src/cluster.md cluster
  expect cluster '^coord-1 .* live ' 1
  expect cluster '^coord-1 .* EXPIRED ' 1
  expect cluster '^[0-9a-f-]{36} committed$' 1        # the second submit (the first is in $gtid)
  expect cluster 'state +COMMIT(TING|TED)' 1          # tx show of the first, from coord-2
  expect cluster 'owner +coord-1 ' 1
}

if [ $# -eq 0 ]; then set -- secured cluster; fi
for walkthrough in "$@"; do
  case "$walkthrough" in
    secured | cluster) "$walkthrough" ;;
    *) echo "walkthroughs: unknown walkthrough '$walkthrough' (secured, cluster)" >&2; exit 2 ;;
  esac
done
echo "== walkthroughs passed: $*"
