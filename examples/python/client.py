#!/usr/bin/env python3
"""A business client for the Python example: bank transfers through Tandem.

1. Probes one participant directly with the cases of
   docs/participant-protocol.md §6 (duplicates, concurrent repeats, null
   compensation, suspension, refusals) and leaves two branches in doubt
   under gtids the coordinator never heard of, which the participant must
   resolve itself with GetOutcome (presumed abort, §11).
2. Runs transfers between accounts of two participant processes through
   the coordinator, 2PC and TCC interleaved on a pool of threads: most
   with Coordinator.Submit, some with Begin / Enlist / Commit, some rolled
   back by the client, some asking for more money than exists (the debit
   votes no, the transfer must abort). Optionally writes --halfway-file
   once part of them are done (run.sh then kills and restarts a
   participant).
3. Waits for every transaction to be COMMITTED or ABORTED, then checks
   each account's balance against the committed transfers, that the total
   is conserved, and that nothing is left prepared, frozen or in doubt.

Exits 1 on any failure.
"""

import argparse
import os
import random
import sqlite3
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_status import rpc_status

from tandem.v1 import coordinator_pb2 as cpb
from tandem.v1 import coordinator_pb2_grpc
from tandem.v1 import participant_pb2 as ppb
from tandem.v1 import participant_pb2_grpc
from tandem.v1 import types_pb2 as tpb

# Transaction mode, then each leg's (mode, resource): a "mixed" transfer
# debits through TCC and credits through 2PC in one transaction (a branch's
# own mode; MODE_UNSPECIFIED is the transaction's).
MODES = {
    "2pc": (tpb.MODE_TWO_PHASE, [(tpb.MODE_UNSPECIFIED, "accounts")] * 2),
    "tcc": (tpb.MODE_TCC, [(tpb.MODE_UNSPECIFIED, "accounts-tcc")] * 2),
    "mixed": (tpb.MODE_TCC, [(tpb.MODE_UNSPECIFIED, "accounts-tcc"),
                             (tpb.MODE_TWO_PHASE, "accounts")]),
}
COMMITTED = (tpb.TX_STATE_COMMITTED, tpb.TX_STATE_COMMITTING)
ABORTED = (tpb.TX_STATE_ABORTED, tpb.TX_STATE_ABORTING)
TIMEOUT_MS = 20_000

failures = []
failures_lock = threading.Lock()


def abort_detail(error):
    """The AbortInfo an ABORTED status carries (google.rpc.Status detail)."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(tpb.AbortInfo.DESCRIPTOR):
            info = tpb.AbortInfo()
            detail.Unpack(info)
            return info
    return None


def fail(message):
    with failures_lock:
        failures.append(message)
    print(f"FAIL: {message}", file=sys.stderr, flush=True)


def expect(condition, message):
    if not condition:
        fail(message)
    return condition


def uuid7():
    """A UUID v7 (time-ordered), as the coordinator expects of client-chosen gtids."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | ((rand >> 62) & 0xFFF) << 64
             | 0b10 << 62 | (rand & ((1 << 62) - 1)))
    return str(uuid.UUID(int=value))


def read_bank(path):
    """What a participant's database holds (read-only; WAL lets us read alongside)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        accounts = {name: (balance, frozen) for name, balance, frozen in
                    con.execute("SELECT name, balance, frozen FROM accounts")}
        prepared = con.execute("SELECT COUNT(*) FROM prepared").fetchone()[0]
        reserved = con.execute("SELECT COUNT(*) FROM reserved").fetchone()[0]
        states = dict(con.execute("SELECT state, COUNT(*) FROM branches GROUP BY state"))
        return accounts, prepared, reserved, states
    finally:
        con.close()


def branch_state(path, gtid, branch_id):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        row = con.execute("SELECT state FROM branches WHERE gtid = ? AND branch_id = ?",
                          (gtid, branch_id)).fetchone()
        return row[0] if row else None
    finally:
        con.close()


class Probe:
    """Calls one participant directly, as a coordinator would (§6)."""

    def __init__(self, address, token):
        self.stub = participant_pb2_grpc.ParticipantStub(grpc.insecure_channel(address))
        self.metadata = [("authorization", f"Bearer {token}")] if token else None

    def call(self, method, gtid, branch_id, resource, payload=b"", metadata=None):
        req = ppb.BranchRequest(gtid=gtid, branch_id=branch_id, resource=resource,
                                payload=payload, attempt=1)
        return getattr(self.stub, method)(req, timeout=10,
                                          metadata=metadata or self.metadata)

    def code(self, method, *args, **kwargs):
        """The status code of a call (OK when it succeeds)."""
        try:
            self.call(method, *args, **kwargs)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    def concurrently(self, calls):
        """Runs (method, args) calls at once; returns their status codes."""
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda c: self.code(c[0], *c[1]), calls))


def run_probes(probe, db, token, total):
    """The §6 table, case by case, against one participant. Returns the
    balance changes it made (it moves 7 from a00 to a01) and the branches
    it leaves in doubt."""
    ok = grpc.StatusCode.OK
    refused = grpc.StatusCode.FAILED_PRECONDITION

    for method1, method2, resource in (("Rollback", "Prepare", "accounts"),
                                       ("Cancel", "Try", "accounts-tcc")):
        g = uuid7()
        # Null compensation: a rollback before any phase 1 is OK and remembered...
        expect(probe.code(method1, g, 1, resource, b"a00:-5") == ok,
               f"{method1} without phase 1 must be OK")
        expect(branch_state(db, g, 1) == "EMPTY_CANCELLED",
               f"{method1} without phase 1 must leave EMPTY_CANCELLED")
        # ...so that the phase 1 arriving late is refused (suspension).
        vote = probe.call(method2, g, 1, resource, b"a00:-5")
        expect(not vote.yes and "barrier" in vote.reason,
               f"{method2} after its {method1} must vote no (got yes={vote.yes})")

    # 2PC: prepare twice, commit sixteen times at once, roll back after commit.
    g = uuid7()
    expect(probe.call("Prepare", g, 1, "accounts", b"a00:-7").yes, "prepare a00:-7 must vote yes")
    expect(probe.call("Prepare", g, 2, "accounts", b"a01:7").yes, "prepare a01:7 must vote yes")
    expect(not probe.call("Prepare", g, 1, "accounts", b"a00:-7").yes,
           "a repeated prepare must vote no")
    codes = probe.concurrently([("Commit", (g, b, "accounts")) for b in (1, 2) for _ in range(8)])
    expect(codes == [ok] * 16, f"concurrent repeated commits must all be OK: {codes}")
    expect(probe.code("Rollback", g, 1, "accounts") == refused,
           "rollback after commit must be FAILED_PRECONDITION")
    expect(probe.code("Commit", uuid7(), 1, "accounts") == refused,
           "commit of a branch never prepared must be FAILED_PRECONDITION")

    # TCC: try, cancel sixteen times at once, confirm after cancel.
    g = uuid7()
    expect(probe.call("Try", g, 1, "accounts-tcc", b"a02:-3").yes, "try a02:-3 must vote yes")
    expect(probe.call("Try", g, 2, "accounts-tcc", b"a03:3").yes, "try a03:3 must vote yes")
    codes = probe.concurrently([("Cancel", (g, b, "accounts-tcc")) for b in (1, 2) for _ in range(8)])
    expect(codes == [ok] * 16, f"concurrent repeated cancels must all be OK: {codes}")
    expect(probe.code("Confirm", g, 1, "accounts-tcc") == refused,
           "confirm after cancel must be FAILED_PRECONDITION")

    # A no holds nothing; its rollback / cancel is OK.
    for p1, p2, resource in (("Prepare", "Rollback", "accounts"), ("Try", "Cancel", "accounts-tcc")):
        g = uuid7()
        vote = probe.call(p1, g, 1, resource, f"a00:-{total + 1}".encode())
        expect(not vote.yes and "insufficient funds" in vote.reason,
               f"{p1} beyond the funds must vote no for insufficient funds: {vote}")
        expect(probe.code(p2, g, 1, resource) == ok, f"{p2} after a no must be OK")

    # Unknown resource: phase 1 is an error; its rollback is OK (nothing was done).
    g = uuid7()
    expect(probe.code("Prepare", g, 1, "no-such-resource", b"a00:1") == grpc.StatusCode.NOT_FOUND,
           "prepare on an unknown resource must be NOT_FOUND")
    expect(probe.code("Rollback", g, 1, "no-such-resource") == ok,
           "rollback on an unknown resource must be OK")

    if token:
        expect(probe.code("Prepare", uuid7(), 1, "accounts", b"a00:-1",
                          metadata=[("authorization", "Bearer wrong")])
               == grpc.StatusCode.UNAUTHENTICATED, "a wrong token must be UNAUTHENTICATED")

    # In doubt: yes votes for transactions the coordinator never recorded.
    # The participant must ask GetOutcome, hear ABORT and release them.
    in_doubt = []
    for method, resource, payload in (("Prepare", "accounts", b"a04:-11"),
                                      ("Try", "accounts-tcc", b"a05:-13")):
        g = uuid7()
        expect(probe.call(method, g, 1, resource, payload).yes, f"{method} {payload} must vote yes")
        in_doubt.append((g, 1))
    return {"a00": -7, "a01": 7}, in_doubt


class Workload:
    def __init__(self, args, stub, metadata, banks, balances):
        self.args = args
        self.stub = stub
        self.metadata = metadata
        self.banks = banks  # account prefix -> endpoint
        self.accounts = sorted(balances)
        self.total = sum(balances.values())
        self.done = 0
        self.lock = threading.Lock()
        self.halfway = threading.Event()

    def endpoint(self, account):
        return self.banks[account[0]]

    def legs(self, t):
        _, ((debit_mode, debit), (credit_mode, credit)) = MODES[t["mode"]]
        return [
            tpb.BranchSpec(endpoint=self.endpoint(t["src"]), resource=debit, mode=debit_mode,
                           payload=f"{t['src']}:{-t['amount']}".encode()),
            tpb.BranchSpec(endpoint=self.endpoint(t["dst"]), resource=credit, mode=credit_mode,
                           payload=f"{t['dst']}:{t['amount']}".encode()),
        ]

    def plan(self):
        rng = random.Random(self.args.seed)
        transfers = []
        for i in range(self.args.transfers):
            src, dst = rng.sample(self.accounts, 2)
            must_abort = i % 7 == 3
            amount = self.total + 1 if must_abort else rng.randint(1, 400)
            path = "submit"
            if i % 5 == 1:
                path = "interactive"
            elif i % 11 == 6 and not must_abort:
                path = "client-rollback"
            transfers.append({"i": i, "mode": ("2pc", "tcc", "mixed")[i % 3], "path": path,
                              "src": src, "dst": dst, "amount": amount,
                              "must_abort": must_abort})
        return transfers

    def run_one(self, t):
        try:
            if t["path"] == "submit":
                self.submit(t)
            else:
                self.interactive(t)
        except grpc.RpcError as e:
            t["outcome"] = "error"
            t["reason"] = f"{e.code()}: {e.details()}"
        except Exception as e:  # noqa: BLE001 - reported, and fails the run
            t["outcome"] = "error"
            t["reason"] = repr(e)
        if t["outcome"] == "error":
            fail(f"transfer {t['i']} ({t['mode']} {t['path']}) failed: {t['reason']}")
        with self.lock:
            self.done += 1
            if self.done >= self.args.transfers * 2 // 5:
                self.halfway.set()

    def call(self, method, request):
        """A coordinator call, repeated on UNAVAILABLE / DEADLINE_EXCEEDED: safe for
        Begin and Submit with a client-chosen gtid (the repeat returns the same
        transaction), and for Commit / Rollback (repeats are answered the same)."""
        for attempt in range(4):
            try:
                return getattr(self.stub, method)(request, timeout=30, metadata=self.metadata)
            except grpc.RpcError as e:
                retriable = e.code() in (grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retriable or attempt == 3:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def submit(self, t):
        mode, _ = MODES[t["mode"]]
        t["gtid"] = uuid7()
        resp = self.call("Submit", cpb.SubmitRequest(
            mode=mode, timeout_ms=TIMEOUT_MS, branches=self.legs(t), gtid=t["gtid"]))
        t["reply_state"] = resp.state
        if resp.state in COMMITTED:
            t["outcome"] = "committed"
        elif resp.state in ABORTED:
            t["outcome"], t["reason"] = "aborted", resp.reason
            t["cause"] = resp.abort.cause
        else:
            t["outcome"], t["reason"] = "error", f"Submit answered state {resp.state}"

    def interactive(self, t):
        mode, _ = MODES[t["mode"]]
        t["gtid"] = self.call("Begin", cpb.BeginRequest(
            mode=mode, timeout_ms=TIMEOUT_MS, gtid=uuid7())).gtid
        try:
            for leg in self.legs(t):
                # Enlist is not repeated: a second call would add a second branch.
                self.stub.Enlist(cpb.EnlistRequest(gtid=t["gtid"], branch=leg),
                                 timeout=30, metadata=self.metadata)
            if t["path"] == "client-rollback":
                resp = self.call("Rollback", cpb.RollbackRequest(
                    gtid=t["gtid"], reason="the client changed its mind"))
                t["outcome"], t["reason"] = "aborted", "rolled back by the client"
                t["cause"] = resp.abort.cause
                return
            resp = self.call("Commit", cpb.CommitRequest(gtid=t["gtid"]))
            t["reply_state"] = resp.state
            if resp.state in COMMITTED:
                t["outcome"] = "committed"
            else:
                t["outcome"], t["reason"] = "error", f"Commit answered state {resp.state}"
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED:
                raise
            t["outcome"], t["reason"] = "aborted", e.details()
            info = abort_detail(e)
            expect(info is not None, f"transfer {t['i']}: ABORTED without an AbortInfo detail")
            t["cause"] = info.cause if info else None

    def settle(self, transfers, deadline_s):
        """Waits until every transaction is COMMITTED or ABORTED; returns gtid -> info."""
        pending = {t["gtid"] for t in transfers if t.get("gtid")}
        final = {}
        deadline = time.monotonic() + deadline_s
        while pending and time.monotonic() < deadline:
            for gtid in list(pending):
                try:
                    info = self.call("GetTransaction", cpb.GetTransactionRequest(gtid=gtid))
                except grpc.RpcError as e:
                    # A start that failed before the coordinator recorded it.
                    fail(f"transaction {gtid}: GetTransaction {e.code()}: {e.details()}")
                    pending.discard(gtid)
                    continue
                if info.state in (tpb.TX_STATE_COMMITTED, tpb.TX_STATE_ABORTED):
                    final[gtid] = info
                    pending.discard(gtid)
                elif info.state == tpb.TX_STATE_STUCK:
                    fail(f"transaction {gtid} is STUCK")
                    final[gtid] = info
                    pending.discard(gtid)
            if pending:
                time.sleep(0.2)
        for gtid in pending:
            info = self.call("GetTransaction", cpb.GetTransactionRequest(gtid=gtid))
            fail(f"transaction {gtid} still {tpb.TxState.Name(info.state)} after "
                 f"{deadline_s} s: {[tpb.BranchState.Name(b.state) + ' ' + b.last_error for b in info.branches]}")
        return final


def wait_for_file(path, seconds):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coordinator", required=True, help="host:port of the coordinator")
    p.add_argument("--bank", action="append", required=True, metavar="PREFIX=ENDPOINT=DB",
                   help="a participant: its accounts' first letter, its endpoint "
                        "(http://host:port) and its SQLite file; give it twice")
    p.add_argument("--token-file", help="token with the coordinator's `client` role")
    p.add_argument("--participant-token-file",
                   help="the token participants expect, for the direct probes")
    p.add_argument("--transfers", type=int, default=600)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--halfway-file", help="created once 40%% of the transfers are done")
    p.add_argument("--restarted-file", help="waited for before the final checks")
    p.add_argument("--in-doubt-after", type=float, default=3.0,
                   help="the participants' --in-doubt-after, to know how long to wait")
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 32)

    def read(path):
        if not path:
            return None
        with open(path) as f:
            return f.read().strip()

    token, participant_token = read(args.token_file), read(args.participant_token_file)
    banks, dbs = {}, {}
    for spec in args.bank:
        prefix, endpoint, db = spec.split("=", 2)
        banks[prefix], dbs[prefix] = endpoint, db
    started = time.monotonic()

    before = {}
    for prefix, db in dbs.items():
        accounts, _, _, _ = read_bank(db)
        before.update({name: balance + frozen for name, (balance, frozen) in accounts.items()})
    total = sum(before.values())
    print(f"python client: {len(before)} accounts on {len(banks)} participants, "
          f"total {total}, seed {args.seed}", flush=True)

    # 1. The §6 table against the first participant, directly.
    first = sorted(banks)[0]
    probe = Probe(banks[first].split("://", 1)[1], participant_token)
    probe_moves, in_doubt = run_probes(probe, dbs[first], participant_token, total)
    print(f"  probes        §6 table checked on participant {first}; "
          f"{len(in_doubt)} branches left in doubt for GetOutcome", flush=True)

    # 2. Transfers through the coordinator.
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(args.coordinator))
    metadata = [("authorization", f"Bearer {token}")] if token else None
    work = Workload(args, stub, metadata, banks, before)
    transfers = work.plan()
    if args.halfway_file:
        def mark_halfway():
            work.halfway.wait()
            open(args.halfway_file, "w").close()
        threading.Thread(target=mark_halfway, daemon=True).start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(work.run_one, transfers))
    elapsed = time.monotonic() - t0

    # 3. Everything finished, and the money adds up.
    if args.restarted_file:
        expect(wait_for_file(args.restarted_file, 60), "the participant was not restarted")
    final = work.settle(transfers, 60)
    expected = dict(before)
    for name, delta in probe_moves.items():
        expected[name] += delta
    for t in transfers:
        info = final.get(t.get("gtid"))
        if info is None:
            continue
        state = info.state
        if t["outcome"] == "committed":
            expect(state == tpb.TX_STATE_COMMITTED,
                   f"transfer {t['i']} reported committed but ended {tpb.TxState.Name(state)}")
        elif t["outcome"] == "aborted":
            expect(state == tpb.TX_STATE_ABORTED,
                   f"transfer {t['i']} reported aborted but ended {tpb.TxState.Name(state)}")
        cause = info.abort.cause
        if t["mode"] == "mixed":
            modes = [b.mode for b in info.branches]
            expect(modes in ([tpb.MODE_TCC, tpb.MODE_TWO_PHASE], [tpb.MODE_TCC]),
                   f"transfer {t['i']}: mixed branches recorded as {modes}")
        if state == tpb.TX_STATE_ABORTED and t.get("cause") is not None:
            expect(t["cause"] == cause,
                   f"transfer {t['i']}: the reply said {tpb.AbortCause.Name(t['cause'])}, "
                   f"the record says {tpb.AbortCause.Name(cause)}")
        if t["must_abort"]:
            # The debit votes no, and says why in its own words; unless the
            # other branch failed first (its participant being down).
            voted_no = (cause == tpb.ABORT_CAUSE_VOTED_NO
                        and info.abort.detail.startswith("insufficient funds"))
            expect(state == tpb.TX_STATE_ABORTED
                   and (voted_no or cause == tpb.ABORT_CAUSE_PHASE_ONE_FAILED),
                   f"transfer {t['i']} of {t['amount']} must abort for insufficient funds: "
                   f"{tpb.TxState.Name(state)} {info.abort!r}")
        if t["path"] == "client-rollback":
            # (unless an enlist aborted it first: a no, or a failure)
            expect(state == tpb.TX_STATE_ABORTED and cause in (tpb.ABORT_CAUSE_CLIENT_ROLLBACK,
                                                                tpb.ABORT_CAUSE_VOTED_NO,
                                                                tpb.ABORT_CAUSE_PHASE_ONE_FAILED),
                   f"transfer {t['i']} was rolled back by the client: "
                   f"{tpb.TxState.Name(state)} {info.abort!r}")
        t["final"] = state
        if state == tpb.TX_STATE_COMMITTED:
            expected[t["src"]] -= t["amount"]
            expected[t["dst"]] += t["amount"]

    # Held work drains: in-flight phase 2 retries land, in-doubt probes resolve.
    wait_until = time.monotonic() + args.in_doubt_after * 4 + 15
    while True:
        snapshot = {prefix: read_bank(db) for prefix, db in dbs.items()}
        open_work = {prefix: (prepared, reserved, sum(f for _, f in accounts.values()),
                              states.get("TRIED", 0))
                     for prefix, (accounts, prepared, reserved, states) in snapshot.items()}
        if all(v == (0, 0, 0, 0) for v in open_work.values()) or time.monotonic() > wait_until:
            break
        time.sleep(0.25)
    for prefix, (prepared, reserved, frozen, tried) in open_work.items():
        expect((prepared, reserved, frozen, tried) == (0, 0, 0, 0),
               f"participant {prefix} still holds work: prepared {prepared}, reserved {reserved}, "
               f"frozen {frozen}, branches in doubt {tried}")
    for gtid, branch_id in in_doubt:
        expect(branch_state(dbs[first], gtid, branch_id) == "CANCELLED",
               f"in-doubt branch {gtid}/{branch_id} was not resolved to CANCELLED by GetOutcome")

    after = {}
    for accounts, _, _, _ in snapshot.values():
        after.update({name: balance for name, (balance, _) in accounts.items()})
    wrong = {n: (after.get(n), expected[n]) for n in expected if after.get(n) != expected[n]}
    expect(not wrong, f"balances differ from the committed transfers (got, expected): {wrong}")
    expect(sum(after.values()) == total,
           f"total balance not conserved: before {total}, after {sum(after.values())}")

    # The report.
    for mode in ("2pc", "tcc", "mixed"):
        mine = [t for t in transfers if t["mode"] == mode]
        committed = sum(t.get("final") == tpb.TX_STATE_COMMITTED for t in mine)
        aborted = [t for t in mine if t.get("final") == tpb.TX_STATE_ABORTED]
        why = [final[t["gtid"]].abort.cause for t in aborted]
        funds = why.count(tpb.ABORT_CAUSE_VOTED_NO)
        by_client = why.count(tpb.ABORT_CAUSE_CLIENT_ROLLBACK)
        failed = why.count(tpb.ABORT_CAUSE_PHASE_ONE_FAILED)
        late = sum(t.get("reply_state") in (tpb.TX_STATE_COMMITTING, tpb.TX_STATE_ABORTING)
                   for t in mine)
        errors = sum(t["outcome"] == "error" for t in mine)
        paths = {p: sum(t["path"] == p for t in mine) for p in ("submit", "interactive",
                                                                "client-rollback")}
        print(f"  {mode:<13} {len(mine)} transfers ({paths['submit']} Submit, "
              f"{paths['interactive']} Begin/Enlist/Commit, {paths['client-rollback']} "
              f"rolled back by the client): committed {committed}, aborted {len(aborted)} "
              f"(by cause: voted no {funds}, by the client {by_client}, phase 1 failed "
              f"{failed}, other {len(aborted) - funds - by_client - failed}), "
              f"phase 2 finished after the reply {late}, errors {errors}", flush=True)
        expect(committed > 0, f"no {mode} transfer committed")
        expect(funds > 0, f"no {mode} transfer aborted for insufficient funds")
    print(f"  throughput    {len(transfers) / elapsed:.0f} transfers/s "
          f"({len(transfers)} in {elapsed:.1f} s, {args.threads} threads)")
    print(f"  balance       before {total}, after {sum(after.values())}; every account as the "
          f"committed transfers say; prepared, reserved, frozen, in doubt: 0")
    if failures:
        print(f"python client: FAILED ({len(failures)} problems, {time.monotonic() - started:.1f} s)",
              flush=True)
        sys.exit(1)
    print(f"python client: OK ({time.monotonic() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
