#!/usr/bin/env bash
# The Python example end to end: a coordinator (`tandem serve`), two Python
# participant processes over SQLite (participant.py) and the Python client
# (client.py), with bearer tokens both ways. The client probes the
# participant protocol's branch-record table directly (2PC, TCC, saga
# steps, deliveries, back-checks), then runs through the coordinator, on 16
# threads and shuffled together, 600 2PC / TCC / mixed transfers, 200 saga
# transfers (some compensated) and 200 transactional-message orders (one in
# five never submitted, left to the back-check), and checks every balance
# and record; meanwhile one participant is killed (SIGKILL) and restarted
# on its port and database. Exits non-zero on any failure.
#
#   bash examples/python/run.sh
#
# TANDEM_BIN   the tandem binary (default: target/debug/tandem, under
#              $CARGO_TARGET_DIR when set; build it with
#              `cargo build -p tandem-cli`)
# TANDEM_PY_VENV  the virtualenv to use or create (default:
#              <target>/python-example/venv; reused while requirements.txt
#              is unchanged)
# TRANSFERS    transfers to run (default 600: a third 2PC, TCC, mixed)
# SAGAS        saga transfers to run (default 200)
# MESSAGES     transactional-message orders to run (default 200)
# KEEP_WORK=1  keep the work directory (logs, databases) after the run
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
tandem="${TANDEM_BIN:-$target/debug/tandem}"
case "$tandem" in /*) ;; *) tandem="$root/$tandem" ;; esac
venv="${TANDEM_PY_VENV:-$target/python-example/venv}"
transfers="${TRANSFERS:-600}"
sagas="${SAGAS:-200}"
messages="${MESSAGES:-200}"
started=$(date +%s)

say() { echo "== python example: $*"; }
die() { echo "python example: $*" >&2; exit 1; }

[ -x "$tandem" ] || die "no tandem binary at $tandem; build it with \`cargo build -p tandem-cli\` or set TANDEM_BIN"

# --- Python 3.10+ with venv and pip (Debian splits them into python3-venv / python3-pip)
python_ok() {
  command -v python3 >/dev/null 2>&1 &&
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null
}
make_venv() {
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >/dev/null 2>&1 && [ -x "$venv/bin/pip" ]
}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
  if ! python_ok || ! make_venv; then
    if command -v apt-get >/dev/null 2>&1; then
      say "installing python3, python3-venv and python3-pip"
      sudo=""
      if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
    elif command -v brew >/dev/null 2>&1 && ! python_ok; then
      say "installing python3"
      brew install python3
    fi
    python_ok || die "Python 3.10 or newer is needed (grpcio); install it and run this again"
    make_venv || die "python3 -m venv failed; install python3-venv (or your system's equivalent)"
  fi
fi
if ! cmp -s "$here/requirements.txt" "$venv/.requirements.txt"; then
  say "pip install -r examples/python/requirements.txt into $venv"
  "$venv/bin/pip" install --disable-pip-version-check -q -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/.requirements.txt"
fi
py="$venv/bin/python"

# --- work directory, stubs, tokens
work="$(mktemp -d "${TMPDIR:-/tmp}/tandem-python.XXXXXX")"
pids=()
status=1
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$status" != 0 ]; then
    for log in "$work"/*.err "$work"/*.out; do
      [ -s "$log" ] || continue
      echo "---- ${log##*/} (last 30 lines)" >&2
      tail -n 30 "$log" >&2
    done
  fi
  if [ "${KEEP_WORK:-0}" = 1 ] || [ "$status" != 0 ]; then
    echo "python example: work directory kept: $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PYTHON="$py" bash "$here/gen.sh" "$work/gen"
export PYTHONPATH="$work/gen" PYTHONUNBUFFERED=1

# Tokens: the client's (role client), the participants' for GetOutcome
# (role participant), and the one the coordinator presents to participants.
token() { "$tandem" auth token --role "$1" --name "$2" 2>/dev/null; }
token client py-client >"$work/client.token"
token participant py-banks >"$work/participant.token"
token coordinator tandem >"$work/to-participants.token"
{
  echo "client py-client $(tr -d '\n' <"$work/client.token" | "$tandem" auth hash)"
  echo "participant py-banks $(tr -d '\n' <"$work/participant.token" | "$tandem" auth hash)"
} >"$work/access.txt"

# Waits for a process's "listening on ADDR" line; prints ADDR.
listening() {
  local out="$1" pid="$2" line
  for _ in $(seq 1 300); do
    line="$(sed -n 's/^listening on //p' "$out" 2>/dev/null | head -n 1)"
    if [ -n "$line" ]; then echo "$line"; return 0; fi
    kill -0 "$pid" 2>/dev/null || { echo "process $pid exited before listening" >&2; return 1; }
    sleep 0.1
  done
  echo "process $pid did not print 'listening on' within 30 s" >&2
  return 1
}

# --- the coordinator: short retry cap so that a restarted participant is
# called again within a second or two
"$tandem" serve --listen 127.0.0.1:0 --data-dir "$work/coordinator" \
  --auth-file "$work/access.txt" \
  --participant-token-file "$work/to-participants.token" \
  --allow-participant 'http://127.0.0.1:*' \
  --call-timeout 3s --retry-max 1s \
  >"$work/coordinator.out" 2>"$work/coordinator.err" &
pids+=($!)
coordinator="$(listening "$work/coordinator.out" "$!")"
say "coordinator on $coordinator"

# --- two participants, ten accounts of 1000 each
accounts() { local p="$1" s="" i; for i in 0 1 2 3 4 5 6 7 8 9; do s="$s${s:+,}${p}0$i=1000"; done; echo "$s"; }
participant() { # name listen
  "$py" "$here/participant.py" --listen "$2" --db "$work/bank-$1.db" --accounts "$(accounts "$1")" \
    --token-file "$work/to-participants.token" \
    --coordinator "$coordinator" --coordinator-token-file "$work/participant.token" \
    --in-doubt-after 3 >>"$work/bank-$1.out" 2>>"$work/bank-$1.err" &
}
participant a 127.0.0.1:0
pid_a=$!
pids+=("$pid_a")
participant b 127.0.0.1:0
pid_b=$!
pids+=("$pid_b")
addr_a="$(listening "$work/bank-a.out" "$pid_a")"
addr_b="$(listening "$work/bank-b.out" "$pid_b")"
say "participants on $addr_a (a00..a09) and $addr_b (b00..b09)"

# --- the client; participant b is killed and restarted part-way
say "client: $transfers transfers (2PC, TCC, mixed), $sagas sagas, $messages message orders, 16 threads"
"$py" "$here/client.py" --coordinator "$coordinator" \
  --bank "a=http://$addr_a=$work/bank-a.db" --bank "b=http://$addr_b=$work/bank-b.db" \
  --token-file "$work/client.token" --participant-token-file "$work/to-participants.token" \
  --transfers "$transfers" --sagas "$sagas" --messages "$messages" --threads 16 --in-doubt-after 3 \
  --halfway-file "$work/halfway" --restarted-file "$work/restarted" &
pid_client=$!
pids+=("$pid_client")

while [ ! -e "$work/halfway" ] && kill -0 "$pid_client" 2>/dev/null; do sleep 0.05; done
if [ -e "$work/halfway" ]; then
  say "killing participant b (SIGKILL) mid-run"
  killed_at=$(date +%s.%N)
  kill -KILL "$pid_b"
  wait "$pid_b" 2>/dev/null || true
  sleep 0.5
  echo "---- restarted" >>"$work/bank-b.out"
  participant b "$addr_b"
  pid_b=$!
  pids+=("$pid_b")
  for _ in $(seq 1 300); do
    grep -q "^listening on $addr_b" <(sed -n '/^---- restarted/,$p' "$work/bank-b.out") && break
    kill -0 "$pid_b" 2>/dev/null || die "participant b did not restart"
    sleep 0.1
  done
  grep -q "^listening on $addr_b" <(sed -n '/^---- restarted/,$p' "$work/bank-b.out") ||
    die "participant b did not listen again on $addr_b"
  say "participant b restarted on $addr_b with its database, down for $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $killed_at }") s"
  touch "$work/restarted"
fi

if wait "$pid_client"; then status=0; else status=$?; fi
resolved=$(cat "$work"/bank-*.err | grep -c "in-doubt branch .* resolved" || true)
left=$(cat "$work"/bank-*.err | grep -c "in-doubt saga step .* left to the coordinator" || true)
say "participants resolved $resolved in-doubt branches through GetOutcome; left $left aborted saga steps to the coordinator's compensation"
if [ "$status" = 0 ]; then
  say "OK in $(($(date +%s) - started)) s"
else
  say "FAILED"
fi
exit "$status"
