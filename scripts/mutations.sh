#!/usr/bin/env bash
# Mutation proof of the seeded cluster simulation: applies each named
# mutation (a small edit that brings back one bug) to a scratch copy of the
# committed tree, runs the simulation on it, and prints which invariant
# caught it, at which seed.
#
#   scripts/mutations.sh                 # every mutation, 300 seeds each
#   SEEDS=500 scripts/mutations.sh drop_fence unlocked_barrier
#
# The scratch copy lives in target/mutation-src and builds into
# target/mutation-target (kept between runs: only mutated crates rebuild). The
# unmutated copy runs first: seeds it already fails are left out of the
# mutation runs (and listed as the baseline row), so that a row counts only
# what the mutation broke.
#
# A mutation is a perl substitution on one file. One that changes nothing
# is stale (the code moved): its row says NOT APPLIED and the script fails,
# as it does when a mutation is not caught.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seeds="${SEEDS:-300}"
base="${CARGO_TARGET_DIR:-$root/target}"
scratch="$base/mutation-src"
pristine="$base/mutation-pristine"
# A target directory of its own: cargo's fingerprints name sources by
# absolute path and artifacts of workspace crates do not differ by
# checkout, so sharing this checkout's would mix mutated and unmutated
# builds. It is kept between runs (only the mutated crates rebuild).
export CARGO_TARGET_DIR="$base/mutation-target"

# Each mutation: name, file, perl substitution (perl -0pi: the whole file
# at once), what it brings back.
mutations=(
  'drop_fence'
  'coordinator/log/src/shared_store/mod.rs'
  's/let own = row\.owner == me && row\.epoch == record\.epoch && decision_kept;/let own = decision_kept;/'
  'shared store: a later write is not conditioned on owner and epoch'
  'insert_on_later_write'
  'coordinator/log/src/shared_store/mod.rs'
  's/return if first && !purged \{/return if true {/'
  'finding 1: a later write that finds no row (retention removed it) inserts it'
  'first_write_under_horizon'
  'coordinator/log/src/shared_store/mod.rs'
  's/let purged = first && t\.horizon\.may_have_purged\(&record\.gtid\);/let purged = false;/'
  'finding 1, first writes: a write held by a process paused past retention creates a purged row again'
  'presume_abort_after_purge'
  'coordinator/src/runtime/requests.rs'
  's/if horizon\.may_have_forgotten\(&gtid\) \|\| horizon\.may_have_purged\(&gtid\) \{/if horizon.may_have_forgotten(\&gtid) {/'
  'GetOutcome presumes ABORT for a gtid retention removed (a late question about a commit hears ABORT)'
  'purge_resolved'
  'coordinator/src/runtime/retention.rs'
  's/tombstone: Tombstone::needed_for\(rec\),/tombstone: None,/'
  'finding 2: retention forgets a commit whose branch an operator settled by hand'
  'skip_driving_claims'
  'coordinator/src/runtime/takeover.rs'
  's/inner\.recovering_set\(\)\.extend\(gtids\.iter\(\)\.copied\(\)\);/inner.recovering_set().extend(gtids.iter().copied());\n                    let gtids: Vec<crate::model::Gtid> = Vec::new();/'
  'finding 3: claimed rows wait in the recovering set and nothing drives them'
  'unlocked_barrier'
  'participant-sdk/src/barrier/mem.rs'
  's/let guard = self\.locks\.lock\(key\)\.await;/let guard = KeyLocks::default().lock(key).await;/'
  'finding 4: the barrier store does not serialise a branch across replicas'
  'skip_rollback_after_no'
  'coordinator/engine/src/phase_two.rs'
  's/\| BranchState::Failed\n(\s*)\| BranchState::Refused => true,/| BranchState::Failed => true,\n$1BranchState::Refused => false,/'
  'finding 5: a no vote (the barrier: already prepared) is taken as holding nothing'
  'drop_failed_phase1_rollback'
  'coordinator/engine/src/phase_two.rs'
  's/\| BranchState::Failed\n(\s*)\| BranchState::Refused => true,/| BranchState::Refused => true,\n$1BranchState::Failed => false,/'
  'the rollback of branches whose phase 1 failed (timeout, lost reply) is skipped'
  'skip_decision_force'
  'coordinator/src/runtime/driver.rs'
  's/(Command::ForceDecision => \{\n\s*let t = Instant::now\(\);\n)\s*self\.log\n\s*\.force_txn\(&entry\.gtid\(\)\)\n\s*\.await\n\s*\.map_err\(\|e\| self\.halt\(e\)\)\?;/$1/'
  'phase 2 starts before the decision is forced'
  'settle_unsure_refusals'
  'coordinator/src/runtime/driver.rs'
  's/if e\.kind == Failure::NotDelivered\n\s*&& entry\.lock\(\)\.phase_one_maybe_sent_before\(\) =>/if false =>/'
  'a refused phase-1 call of a repeat after a crash is settled at once (rule 3a) though the first run may hold'
  'presume_abort_unwritten'
  'coordinator/log/src/shared_store/mod.rs'
  's/t\.decisions\.push\(\(marker\.gtid, Decision::Abort\)\);/return Presumed::Aborted;/'
  'one forced write: GetOutcome answers ABORT for a gtid not in the store without writing it (its owner, deciding later, commits it)'
  'saga_parallel_actions'
  'coordinator/engine/src/lib.rs'
  's/        if txn\.is_saga\(\) \{\n            txn\.phase_one\.clear\(\);\n            cmds = vec!\[Command::Force\];\n            cmds\.extend\(txn\.next_step\(now\)\);\n        \}\n//'
  'saga: every step'"'"'s action goes out at once (not after the step before said yes)'
  'saga_parallel_compensation'
  'coordinator/engine/src/phase_two.rs'
  's/let ids: Vec<BranchId> = if self\.is_saga\(\) && self\.rec\.state == TxState::Aborting \{/let ids: Vec<BranchId> = if false {/'
  'saga: every compensation goes out at once (not newest first, one at a time)'
  'saga_action_first_dep_only'
  'coordinator/engine/src/saga.rs'
  's/\.filter\(\|b\| b\.after\.iter\(\)\.all\(\|d\| done\(d, &self\.rec\)\)\)/.filter(|b| b.after.first().is_none_or(|d| done(d, &self.rec)))/'
  'saga graph: a step'"'"'s action waits only for the first step it runs after'
  'saga_compensation_first_dep_only'
  'coordinator/engine/src/saga.rs'
  's/\.flat_map\(\|b\| b\.after\.iter\(\)\.copied\(\)\)/.flat_map(|b| b.after.first().copied())/'
  'saga graph: a compensation waits only for the steps whose first dependency it is'
  'msg_presume_abort_on_recovery'
  'coordinator/engine/src/lib.rs'
  's/TxState::Preparing if txn\.is_message\(\) => txn\.recover_message\(now\),//'
  'message: recovery (a restart, a takeover) presumes an undecided message aborted, though its local transaction may have committed'
  'msg_failed_check_is_yes'
  'coordinator/engine/src/message.rs'
  's/(fn check_failed\(&mut self, error: String, now: u64\) -> Vec<Command> \{\n)/$1        let _ = error;\n        return self.local_committed(now);\n/'
  'message: a back-check that failed (no answer) is taken as committed: delivered though the local transaction rolled back'
  'msg_repeat_delivers_again'
  'participant-sdk/src/barrier/gate.rs'
  's/\(Phase::Deliver, Some\(Confirmed\)\) => Step::Skip \{ record: None \},/(Phase::Deliver, Some(Confirmed)) => Step::Run,/'
  'message: the barrier runs a repeated delivery again (a lost reply, a duplicate, in-doubt resolution deliver twice)'
)

# Mutations the simulation reaches only rarely, and the test that catches
# them directly (run on the mutated copy when the seeds did not): the row
# then names that test. first_write_under_horizon needs a resumed
# instance's whole batch to be first writes (any fenced later write in the
# batch latches it first), which long pauses almost never leave;
# presume_abort_after_purge needs a question held past retention about a
# commit every branch acknowledged (first caught at seed 266 before the
# clients had deadlines); presume_abort_unwritten needs a participant's
# question in the milliseconds a decision waits unwritten, at an instance
# other than its owner (seeds 613, 834 and 1006 of 300-1799).
declare -A also=(
  [first_write_under_horizon]="-p tandem-coordinator --test shared_conformance"
  [presume_abort_after_purge]="-p tandem-tests --test decision_tombstones"
  [presume_abort_unwritten]="-p tandem-coordinator --test shared_conformance"
)

fresh_copy() {
  rm -rf "$scratch" "$pristine"
  mkdir -p "$scratch" "$pristine"
  git -C "$root" archive HEAD | tar -x -C "$pristine"
  cp -a "$pristine/." "$scratch/"
  # The files mutations edit: newer than any earlier (mutated) build.
  for ((k = 1; k < ${#mutations[@]}; k += 4)); do
    touch "$scratch/${mutations[k]}"
  done
}

# Runs the simulation in the scratch copy; prints "SEED INVARIANT" of the
# first failure, or "- -".
run_sim() {
  local skip="$1" max="$2" out
  out="$(cd "$scratch" && TANDEM_SIM_SEEDS="$seeds" TANDEM_SIM_SKIP="$skip" \
    TANDEM_SIM_MAX_FAILURES="$max" cargo test -q -p tandem-coordinator --test simulation \
    seeded_fault_simulation -- --nocapture 2>&1 || true)"
  if grep -q '^error\[E[0-9]*\]\|^error: could not compile' <<<"$out"; then
    echo "build-failed -"
    grep -m5 '^error' <<<"$out" >&2
    return
  fi
  grep -o '^seed [0-9]* failed: \[[a-z_]*\]' <<<"$out" |
    sed 's/^seed \([0-9]*\) failed: \[\(.*\)\]/\1 \2/' | tr '\n' ' ' | sed 's/ $//'
  grep -q '^seed [0-9]* failed' <<<"$out" || echo "- -"
}

wanted=("$@")
fresh_copy
echo "== baseline (this checkout, unmutated), $seeds seeds" >&2
baseline="$(run_sim "" "$seeds")"
skip="$(tr ' ' '\n' <<<"$baseline" | awk 'NR % 2 == 1 && $1 ~ /^[0-9]+$/' | paste -sd, -)"
first_base="$(cut -d' ' -f1-2 <<<"$baseline")"

rows=()
rows+=("(none: baseline)|${first_base#* }|${first_base% *}|$seeds|seeds failing unmutated: ${skip:-none}")
last=""
for ((k = 0; k < ${#mutations[@]}; k += 4)); do
  name="${mutations[k]}" file="${mutations[k + 1]}" expr="${mutations[k + 2]}" what="${mutations[k + 3]}"
  if [ "${#wanted[@]}" -gt 0 ] && ! printf '%s\n' "${wanted[@]}" | grep -qx "$name"; then
    continue
  fi
  if [ -n "$last" ]; then
    cp "$pristine/$last" "$scratch/$last" && touch "$scratch/$last"
  fi
  perl -0pi -e "$expr" "$scratch/$file"
  touch "$scratch/$file"
  last="$file"
  if cmp -s "$pristine/$file" "$scratch/$file"; then
    # The pattern no longer matches the code: the mutation is stale.
    rows+=("$name|NOT APPLIED|-|-|its pattern matches nothing in $file: update it")
    stale=1
    continue
  fi
  echo "== $name: $what" >&2
  read -r seed inv _ <<<"$(run_sim "$skip" 1)"
  ran="$seeds"
  if [[ "$seed" =~ ^[0-9]+$ ]]; then
    # Seeds run up to and including the failing one, skipped ones not counted.
    ran=$((seed + 1 - $(tr ',' '\n' <<<"$skip" | awk -v s="$seed" '$1 != "" && $1 < s' | wc -l)))
  fi
  if ! [[ "$seed" =~ ^[0-9]+$ ]] && [ -n "${also[$name]:-}" ]; then
    echo "== $name: not within $seeds seeds; cargo test ${also[$name]}" >&2
    # shellcheck disable=SC2086
    if ! (cd "$scratch" && cargo test -q ${also[$name]} >/dev/null 2>&1); then
      inv="(sim: none) cargo test ${also[$name]}"
      seed="-"
      rows+=("$name|$inv|$seed|$ran|$what")
      continue
    fi
  fi
  [[ "$seed" =~ ^[0-9]+$ ]] || missed=1
  rows+=("$name|$inv|$seed|$ran|$what")
done

printf '\n| mutation | invariant that caught it | first failing seed | seeds run (of %s) | what it brings back |\n' "$seeds"
printf '|---|---|---|---|---|\n'
for r in "${rows[@]}"; do
  IFS='|' read -r name inv seed n what <<<"$r"
  printf '| %s | %s | %s | %s | %s |\n' "$name" "$inv" "$seed" "$n" "$what"
done
if [ -n "${stale:-}" ] || [ -n "${missed:-}" ]; then
  echo "some mutation was not applied or not caught" >&2
  exit 1
fi
