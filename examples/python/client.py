#!/usr/bin/env python3
"""A business client for the Python example: bank transfers through Tandem.

1. Probes one participant directly with the cases of
   docs/participant-protocol.md §6 (duplicates, concurrent repeats, null
   compensation, suspension, refusals) and leaves two branches in doubt
   under gtids the coordinator never heard of, which the participant must
   resolve itself with GetOutcome (presumed abort, §11).
   It does the same for saga steps (null compensation, a compensation
   applied once however often it comes, a step in doubt that the
   participant must leave to the coordinator) and for transactional
   messages (a delivery applied once, the back-check's final no).
2. Runs, through the coordinator, on a pool of threads and shuffled
   together:
   - transfers between accounts of two participant processes, 2PC, TCC and
     mixed: most with Coordinator.Submit, some with Begin / Enlist /
     Commit, some rolled back by the client, some asking for more money
     than exists (the debit votes no, the transfer must abort);
   - saga transfers (MODE_SAGA: the debit step, then the credit step), the
     same ways, plus some whose credit names an account that does not
     exist (the credit step says no, the debit is compensated);
   - transactional-message orders (MODE_MSG): PrepareMessage with a
     back-check on the debited bank, the local transaction (a debit and
     the message's row, written straight into that bank's SQLite file),
     then SubmitMessage, which delivers the credits (one or two banks). A
     local debit the funds do not cover is rolled back; one order in five
     never submits (the service "died"), after its local transaction or
     before it, and the coordinator's back-check decides.
   Optionally writes --halfway-file once part of them are done (run.sh
   then kills and restarts a participant).
3. Waits for every transaction to be COMMITTED or ABORTED, then checks
   each account's balance against the committed ones, that the total is
   conserved, the participants' records of every saga step and delivery,
   that a message the back-check dropped can no longer commit locally,
   and that nothing is left prepared, frozen, half-compensated or in
   doubt.

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
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tandem.v1 import coordinator_pb2 as cpb
from tandem.v1 import coordinator_pb2_grpc
from tandem.v1 import participant_pb2 as ppb
from tandem.v1 import participant_pb2_grpc
from tandem.v1 import types_pb2 as tpb

# The business service's local transaction runs on the bank's own
# database file, with the bank's code for it.
from participant import Bank, LocalRefused

# Transaction mode, then each leg's (mode, resource): a "mixed" transfer
# debits through TCC and credits through 2PC in one transaction (a branch's
# own mode; MODE_UNSPECIFIED is the transaction's).
MODES = {
    "2pc": (tpb.MODE_TWO_PHASE, [(tpb.MODE_UNSPECIFIED, "accounts")] * 2),
    "tcc": (tpb.MODE_TCC, [(tpb.MODE_UNSPECIFIED, "accounts-tcc")] * 2),
    "mixed": (tpb.MODE_TCC, [(tpb.MODE_UNSPECIFIED, "accounts-tcc"),
                             (tpb.MODE_TWO_PHASE, "accounts")]),
    # Step 1 debits, step 2 credits: a credit that says no compensates the
    # debit (the other order would let a compensated credit be spent).
    "saga": (tpb.MODE_SAGA, [(tpb.MODE_UNSPECIFIED, "accounts-saga")] * 2),
}
MSG_TIMEOUT_MS = 1_000  # a message not submitted by then is checked back
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
        count = lambda table: con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: E731
        return {
            "accounts": {name: (balance, frozen) for name, balance, frozen in
                         con.execute("SELECT name, balance, frozen FROM accounts")},
            "prepared": count("prepared"),
            "reserved": count("reserved"),
            "saga_steps": set(con.execute("SELECT gtid, branch_id FROM saga_steps")),
            "tried": set(con.execute("SELECT gtid, branch_id FROM branches WHERE state = 'TRIED'")),
            "branches": {(g, b): s for g, b, s in
                         con.execute("SELECT gtid, branch_id, state FROM branches")},
            "messages": dict(con.execute("SELECT gtid, committed FROM messages")),
        }
    finally:
        con.close()


def query(path, sql, args=()):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchone()
    finally:
        con.close()


def branch_state(path, gtid, branch_id):
    row = query(path, "SELECT state FROM branches WHERE gtid = ? AND branch_id = ?",
                (gtid, branch_id))
    return row[0] if row else None


def balance(path, account):
    return query(path, "SELECT balance FROM accounts WHERE name = ?", (account,))[0]


def saga_step(path, gtid, branch_id):
    return query(path, "SELECT account, delta FROM saga_steps WHERE gtid = ? AND branch_id = ?",
                 (gtid, branch_id))


def message_row(path, gtid):
    row = query(path, "SELECT committed FROM messages WHERE gtid = ?", (gtid,))
    return row[0] if row else None


def permanent(error):
    """Whether a status carries the PERMANENT ErrorInfo of docs/participant-protocol.md §5."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.domain == "tandem.v1" and info.reason == "PERMANENT"
    return False


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
        return self.error(method, *args, **kwargs)[0]

    def error(self, method, *args, **kwargs):
        """(status code, the error or None) of a call."""
        try:
            self.call(method, *args, **kwargs)
            return grpc.StatusCode.OK, None
        except grpc.RpcError as e:
            return e.code(), e

    def concurrently(self, calls):
        """Runs (method, args) calls at once; returns their status codes."""
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda c: self.code(c[0], *c[1]), calls))


def run_probes(probe, db, token, total):
    """The §6 table, case by case, against one participant (accounts a00..a09).
    Returns the balance changes it made, the branches it leaves in doubt
    for GetOutcome, and a saga step it leaves in doubt that the participant
    must not compensate on its own."""
    ok = grpc.StatusCode.OK
    refused = grpc.StatusCode.FAILED_PRECONDITION
    moves = {"a00": -7, "a01": 7}

    for method1, method2, resource in (("Rollback", "Prepare", "accounts"),
                                       ("Cancel", "Try", "accounts-tcc"),
                                       ("Cancel", "Try", "accounts-saga")):
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

    # Saga steps: the action moves the money at once; the compensation,
    # sixteen times at once, moves it back once; confirm after it is refused.
    g = uuid7()
    a08, a09 = balance(db, "a08"), balance(db, "a09")
    expect(probe.call("Try", g, 1, "accounts-saga", b"a08:-5").yes, "saga action a08:-5 must vote yes")
    expect(probe.call("Try", g, 2, "accounts-saga", b"a09:5").yes, "saga action a09:5 must vote yes")
    expect((balance(db, "a08"), balance(db, "a09")) == (a08 - 5, a09 + 5),
           "a saga action must move the money at once")
    expect(saga_step(db, g, 1) == ("a08", -5), "a saga action must leave its step row")
    # A repeated action (the coordinator retries it forward after a lost
    # answer) is answered from the step row: yes, and nothing moves again.
    expect(probe.call("Try", g, 1, "accounts-saga", b"a08:-5").yes,
           "a repeated saga action that committed must vote yes")
    expect((balance(db, "a08"), balance(db, "a09")) == (a08 - 5, a09 + 5),
           "a repeated saga action must not move the money again")
    codes = probe.concurrently([("Cancel", (g, b, "accounts-saga")) for b in (2, 1) for _ in range(8)])
    expect(codes == [ok] * 16, f"concurrent repeated compensations must all be OK: {codes}")
    expect((balance(db, "a08"), balance(db, "a09")) == (a08, a09),
           "the compensations must move the money back exactly once")
    expect(saga_step(db, g, 1) is None and saga_step(db, g, 2) is None,
           "a compensation must remove its step row")
    expect(probe.code("Confirm", g, 1, "accounts-saga") == refused,
           "confirm after a compensation must be FAILED_PRECONDITION")
    # ...a completed saga: confirm closes the steps, the money stays moved.
    g = uuid7()
    expect(probe.call("Try", g, 1, "accounts-saga", b"a08:-3").yes, "saga action a08:-3 must vote yes")
    expect(probe.call("Try", g, 2, "accounts-saga", b"a09:3").yes, "saga action a09:3 must vote yes")
    codes = probe.concurrently([("Confirm", (g, b, "accounts-saga")) for b in (1, 2) for _ in range(8)])
    expect(codes == [ok] * 16, f"concurrent repeated saga confirms must all be OK: {codes}")
    expect((balance(db, "a08"), balance(db, "a09")) == (a08 - 3, a09 + 3),
           "a completed saga keeps its actions' moves")
    expect(saga_step(db, g, 1) is None, "confirm must remove the step row")
    expect(probe.code("Cancel", g, 1, "accounts-saga") == refused,
           "compensation after confirm must be FAILED_PRECONDITION")
    moves.update({"a08": -3, "a09": 3})
    # ...a step that says no moves nothing, and its cancel is OK.
    for payload, why in ((f"a08:-{total + 1}", "insufficient funds"), ("a99:5", "no account")):
        g = uuid7()
        vote = probe.call("Try", g, 1, "accounts-saga", payload.encode())
        expect(not vote.yes and vote.reason.startswith(why),
               f"saga action {payload} must vote no ({why}): {vote}")
        expect(saga_step(db, g, 1) is None, f"saga action {payload} that said no left a step row")
        expect(probe.code("Cancel", g, 1, "accounts-saga") == ok, "cancel after a no must be OK")

    # Deliveries: sixteen at once apply the credit once.
    g = uuid7()
    a06 = balance(db, "a06")
    codes = probe.concurrently([("Deliver", (g, 2, "accounts-msg", b"a06:4"))] * 16)
    expect(codes == [ok] * 16, f"concurrent repeated deliveries must all be OK: {codes}")
    expect(balance(db, "a06") == a06 + 4, "a delivery must be applied exactly once")
    expect(branch_state(db, g, 2) == "CONFIRMED", "a delivery must leave CONFIRMED")
    code, error = probe.error("Deliver", g, 3, "accounts-msg", b"a99:4")
    expect(code == refused and permanent(error),
           f"a delivery to no account must be FAILED_PRECONDITION with PERMANENT: {code}")
    # The back-check: yes once the local transaction committed...
    bank = Bank(db)
    bank.local_debit(g, "a07", 4)
    expect(message_row(db, g) == 1, "the local transaction must record the message committed")
    vote = probe.call("Check", g, 1, "accounts-check")
    expect(vote.yes, f"the back-check of a committed message must say yes: {vote}")
    moves.update({"a06": 4, "a07": -4})
    # ...no for one that never did, after which its local transaction is refused.
    g = uuid7()
    vote = probe.call("Check", g, 1, "accounts-check")
    expect(not vote.yes, f"the back-check of an unknown message must say no: {vote}")
    try:
        bank.local_debit(g, "a07", 1)
        fail("a local transaction after its back-check said no must be refused")
    except LocalRefused as e:
        expect("checked back" in str(e), f"a late local transaction refused for {e}")
    expect(message_row(db, g) == 0 and not probe.call("Check", g, 1, "accounts-check").yes,
           "a back-check's no must stay no")
    expect(probe.code("Check", g, 1, "accounts") == refused,
           "a back-check on a 2PC resource must be FAILED_PRECONDITION")

    # In doubt: a saga step the coordinator never heard of. GetOutcome says
    # ABORT (presumed abort), but only the coordinator compensates saga
    # steps (§11): the participant must leave it TRIED.
    parked = (uuid7(), 1)
    expect(probe.call("Try", *parked, "accounts-saga", b"a08:-2").yes,
           "saga action a08:-2 must vote yes")

    # In doubt: yes votes for transactions the coordinator never recorded.
    # The participant must ask GetOutcome, hear ABORT and release them.
    in_doubt = []
    for method, resource, payload in (("Prepare", "accounts", b"a04:-11"),
                                      ("Try", "accounts-tcc", b"a05:-13")):
        g = uuid7()
        expect(probe.call(method, g, 1, resource, payload).yes, f"{method} {payload} must vote yes")
        in_doubt.append((g, 1))
    return moves, in_doubt, parked


class Workload:
    def __init__(self, args, stub, metadata, banks, dbs, balances):
        self.args = args
        self.stub = stub
        self.metadata = metadata
        self.banks = banks  # account prefix -> endpoint
        self.local = {prefix: Bank(db) for prefix, db in dbs.items()}  # the local transactions
        self.accounts = sorted(balances)
        self.total = sum(balances.values())
        self.done = 0
        self.count = 0
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
        """Transfers, sagas and message orders, shuffled together."""
        rng = random.Random(self.args.seed)
        work = []
        for i in range(self.args.transfers + self.args.sagas):
            saga = i >= self.args.transfers
            src, dst = rng.sample(self.accounts, 2)
            must_abort = i % 7 == 3
            # A saga whose credit names no account: step 2 says no, step 1
            # is compensated.
            no_account = saga and i % 7 == 5
            if no_account:
                dst = f"{dst[0]}99"
            amount = self.total + 1 if must_abort else rng.randint(1, 400)
            path = "submit"
            if i % 5 == 1:
                path = "interactive"
            elif i % 11 == 6 and not must_abort and not no_account:
                path = "client-rollback"
            work.append({"i": i, "mode": "saga" if saga else ("2pc", "tcc", "mixed")[i % 3],
                         "path": path, "src": src, "dst": dst, "amount": amount,
                         "must_abort": must_abort, "no_account": no_account})
        first = len(work)
        for i in range(self.args.messages):
            src = rng.choice(self.accounts)
            must_abort = i % 7 == 3  # the local debit cannot be covered
            amount = self.total + 1 if must_abort else rng.randint(2, 400)
            others = [a for a in self.accounts if a != src]
            if i % 3 == 0:
                # Two deliveries, one on each bank.
                one = rng.choice([a for a in others if a[0] == self.accounts[0][0]])
                two = rng.choice([a for a in others if a[0] != self.accounts[0][0]])
                part = amount // 2
                credits = [(one, part), (two, amount - part)]
            else:
                credits = [(rng.choice(others), amount)]
            # One in five never submits: the service "died" after its local
            # transaction committed (the back-check says yes) or before
            # (the back-check says no, and its local transaction can then
            # never commit).
            path = {2: "no-submit", 7: "died"}.get(i % 10, "submit")
            work.append({"i": first + i, "mode": "msg", "path": path, "src": src,
                         "credits": credits, "amount": amount, "must_abort": must_abort})
        rng.shuffle(work)
        self.count = len(work)
        return work

    def run_one(self, t):
        try:
            if t["mode"] == "msg":
                self.message(t)
            elif t["path"] == "submit":
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
            fail(f"{t['mode']} {t['i']} ({t['path']}) failed: {t['reason']}")
        with self.lock:
            self.done += 1
            if self.done >= self.count * 2 // 5:
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

    def message(self, t):
        """A message order: prepare, the local transaction, submit."""
        t["gtid"] = uuid7()
        src_bank = t["src"][0]
        deliveries = [tpb.BranchSpec(endpoint=self.endpoint(account), resource="accounts-msg",
                                     payload=f"{account}:{amount}".encode())
                      for account, amount in t["credits"]]
        check = tpb.BranchSpec(endpoint=self.banks[src_bank], resource="accounts-check",
                               payload=f"{t['src']}:{-t['amount']}".encode())
        self.call("PrepareMessage", cpb.PrepareMessageRequest(
            gtid=t["gtid"], check=check, branches=deliveries, timeout_ms=MSG_TIMEOUT_MS))
        t["local"] = False
        if t["path"] == "died":
            t["outcome"] = "aborted"  # the back-check must say no
            return
        try:
            self.local[src_bank].local_debit(t["gtid"], t["src"], t["amount"])
            t["local"] = True
        except LocalRefused as e:
            t["local_refused"] = str(e)
        if not t["local"]:
            t["outcome"] = "aborted"
            if t["path"] == "submit":
                resp = self.call("Rollback", cpb.RollbackRequest(gtid=t["gtid"],
                                                                 reason=t["local_refused"]))
                t["reply_state"] = resp.state
                t["cause"] = resp.abort.cause
            return
        t["outcome"] = "committed"
        if t["path"] == "submit":
            t["reply_state"] = self.call("SubmitMessage",
                                         cpb.SubmitMessageRequest(gtid=t["gtid"])).state
            if t["reply_state"] not in COMMITTED:
                t["outcome"], t["reason"] = "error", f"SubmitMessage answered {t['reply_state']}"

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
    p.add_argument("--transfers", type=int, default=600,
                   help="2PC, TCC and mixed transfers (a third each)")
    p.add_argument("--sagas", type=int, default=200, help="saga transfers")
    p.add_argument("--messages", type=int, default=200, help="transactional-message orders")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--halfway-file", help="created once 40%% of the work is done")
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
        before.update({name: balance + frozen for name, (balance, frozen)
                       in read_bank(db)["accounts"].items()})
    total = sum(before.values())
    print(f"python client: {len(before)} accounts on {len(banks)} participants, "
          f"total {total}, seed {args.seed}", flush=True)

    # 1. The §6 table against the first participant, directly.
    first = sorted(banks)[0]
    probe = Probe(banks[first].split("://", 1)[1], participant_token)
    probe_moves, in_doubt, parked = run_probes(probe, dbs[first], participant_token, total)
    print(f"  probes        §6 table checked on participant {first} (2PC, TCC, saga steps, "
          f"deliveries, back-checks); {len(in_doubt)} branches left in doubt for GetOutcome, "
          f"1 saga step it must leave alone", flush=True)

    # 2. Transfers, sagas and messages through the coordinator.
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(args.coordinator))
    metadata = [("authorization", f"Bearer {token}")] if token else None
    work = Workload(args, stub, metadata, banks, dbs, before)
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
        what = f"{t['mode']} {t['i']} ({t['path']})"
        if t["outcome"] == "committed":
            expect(state == tpb.TX_STATE_COMMITTED,
                   f"{what} reported committed but ended {tpb.TxState.Name(state)}")
        elif t["outcome"] == "aborted":
            expect(state == tpb.TX_STATE_ABORTED,
                   f"{what} reported aborted but ended {tpb.TxState.Name(state)}")
        cause = info.abort.cause
        modes = [b.mode for b in info.branches]
        if t["mode"] == "mixed":
            expect(modes in ([tpb.MODE_TCC, tpb.MODE_TWO_PHASE], [tpb.MODE_TCC]),
                   f"{what}: mixed branches recorded as {modes}")
        elif t["mode"] in ("saga", "msg"):
            mode = tpb.MODE_SAGA if t["mode"] == "saga" else tpb.MODE_MSG
            expect(info.mode == mode and set(modes) == {mode},
                   f"{what}: recorded as {info.mode} with branches {modes}")
        if state == tpb.TX_STATE_ABORTED and t.get("cause") is not None:
            # (a message's client Rollback may come after its back-check's no)
            expect(t["cause"] == cause or (t["mode"] == "msg" and cause == tpb.ABORT_CAUSE_VOTED_NO),
                   f"{what}: the reply said {tpb.AbortCause.Name(t['cause'])}, "
                   f"the record says {tpb.AbortCause.Name(cause)}")
        t["final"] = state
        if t["mode"] == "msg":
            check_message(t, info, dbs, expected, work)
            continue
        if t["must_abort"] or t["no_account"]:
            # The debit (or the saga's credit step) votes no, and says why in
            # its own words; unless a branch failed first (its participant
            # being down).
            # (A saga crediting no account may find its debit not covered
            # first: step 1 says no, step 2 never runs.)
            why = ("no account", "insufficient funds") if t["no_account"] else ("insufficient funds",)
            voted_no = (cause == tpb.ABORT_CAUSE_VOTED_NO and info.abort.detail.startswith(why))
            expect(state == tpb.TX_STATE_ABORTED
                   and (voted_no or cause == tpb.ABORT_CAUSE_PHASE_ONE_FAILED),
                   f"{what} of {t['amount']} to {t['dst']} must abort for {' or '.join(why)}: "
                   f"{tpb.TxState.Name(state)} {info.abort!r}")
        if t["path"] == "client-rollback":
            # (unless an enlist aborted it first: a no, or a failure)
            expect(state == tpb.TX_STATE_ABORTED and cause in (tpb.ABORT_CAUSE_CLIENT_ROLLBACK,
                                                                tpb.ABORT_CAUSE_VOTED_NO,
                                                                tpb.ABORT_CAUSE_PHASE_ONE_FAILED),
                   f"{what} was rolled back by the client: "
                   f"{tpb.TxState.Name(state)} {info.abort!r}")
        if state == tpb.TX_STATE_COMMITTED:
            expected[t["src"]] -= t["amount"]
            expected[t["dst"]] += t["amount"]
        if t["mode"] == "saga":
            # The participants' records of both steps: closed if it
            # committed; after an abort compensated, refused or never run.
            done = {"CONFIRMED"} if state == tpb.TX_STATE_COMMITTED else {
                None, "REFUSED", "CANCELLED", "EMPTY_CANCELLED"}
            for branch_id, account in ((1, t["src"]), (2, t["dst"])):
                got = branch_state(dbs[account[0]], t["gtid"], branch_id)
                expect(got in done, f"{what}: step {branch_id} recorded {got} on "
                                    f"participant {account[0]} after {tpb.TxState.Name(state)}")
            # A step that had said yes is compensated: the abort came from
            # step 2, or from the client after both.
            t["compensated"] = state == tpb.TX_STATE_ABORTED and (
                cause == tpb.ABORT_CAUSE_CLIENT_ROLLBACK or info.abort.branch_id == 2)

    # A message the back-check dropped: its local transaction, tried now
    # (the service woke up), must be refused.
    late = 0
    for t in transfers:
        if t["mode"] == "msg" and t["path"] == "died" and t.get("final") == tpb.TX_STATE_ABORTED:
            try:
                work.local[t["src"][0]].local_debit(t["gtid"], t["src"], 1)
                fail(f"msg {t['i']}: its local transaction committed after the back-check said no")
                expected[t["src"]] -= 1
            except LocalRefused as e:
                expect("checked back" in str(e), f"msg {t['i']}: late local transaction refused "
                                                 f"for another reason: {e}")
                late += 1

    # Held work drains: in-flight phase 2 retries land, in-doubt probes resolve.
    wait_until = time.monotonic() + args.in_doubt_after * 4 + 15
    while True:
        snapshot = {prefix: read_bank(db) for prefix, db in dbs.items()}
        open_work = {prefix: {"prepared": s["prepared"], "reserved": s["reserved"],
                              "frozen": sum(f for _, f in s["accounts"].values()),
                              "saga steps": len(s["saga_steps"] - {parked}),
                              "in doubt": len(s["tried"] - {parked})}
                     for prefix, s in snapshot.items()}
        if all(not any(v.values()) for v in open_work.values()) or time.monotonic() > wait_until:
            break
        time.sleep(0.25)
    for prefix, held in open_work.items():
        expect(not any(held.values()), f"participant {prefix} still holds work: {held}")
    for gtid, branch_id in in_doubt:
        expect(branch_state(dbs[first], gtid, branch_id) == "CANCELLED",
               f"in-doubt branch {gtid}/{branch_id} was not resolved to CANCELLED by GetOutcome")
    # The saga step in doubt: the participant heard ABORT (the others were
    # resolved after it) and must not have compensated it; the compensation
    # is the coordinator's, so send it ourselves now.
    expect(branch_state(dbs[first], *parked) == "TRIED" and saga_step(dbs[first], *parked),
           f"saga step {parked[0]}/{parked[1]} in doubt was compensated by the participant on "
           "its own")
    expect(probe.code("Cancel", *parked, "accounts-saga") == grpc.StatusCode.OK,
           "the parked saga step's compensation must be OK")
    snapshot[first] = read_bank(dbs[first])

    after = {}
    for s in snapshot.values():
        after.update({name: balance for name, (balance, _) in s["accounts"].items()})
    wrong = {n: (after.get(n), expected[n]) for n in expected if after.get(n) != expected[n]}
    expect(not wrong, f"balances differ from the committed work (got, expected): {wrong}")
    expect(sum(after.values()) == total,
           f"total balance not conserved: before {total}, after {sum(after.values())}")
    expect(not any(s["saga_steps"] for s in snapshot.values()), "saga step rows are left")
    overdrawn = sorted(n for n, b in after.items() if b < 0)

    # The report.
    paths = ("submit", "interactive", "client-rollback")
    for mode in ("2pc", "tcc", "mixed", "saga"):
        mine = [t for t in transfers if t["mode"] == mode]
        committed = sum(t.get("final") == tpb.TX_STATE_COMMITTED for t in mine)
        aborted = [t for t in mine if t.get("final") == tpb.TX_STATE_ABORTED]
        why = [final[t["gtid"]].abort.cause for t in aborted]
        funds = why.count(tpb.ABORT_CAUSE_VOTED_NO)
        by_client = why.count(tpb.ABORT_CAUSE_CLIENT_ROLLBACK)
        failed = why.count(tpb.ABORT_CAUSE_PHASE_ONE_FAILED)
        late_p2 = sum(t.get("reply_state") in (tpb.TX_STATE_COMMITTING, tpb.TX_STATE_ABORTING)
                      for t in mine)
        retried = sum(any(b.attempts > 1 for b in final[t["gtid"]].branches)
                      for t in mine if t.get("gtid") in final)
        errors = sum(t["outcome"] == "error" for t in mine)
        n = {p: sum(t["path"] == p for t in mine) for p in paths}
        extra = ""
        if mode == "saga":
            compensated = sum(bool(t.get("compensated")) for t in mine)
            no_account = sum(t["no_account"] for t in mine)
            extra = (f", {no_account} crediting no account; compensated after a step had "
                     f"run {compensated}")
            expect(compensated > 0, "no saga was compensated")
        print(f"  {mode:<13} {len(mine)} {'sagas' if mode == 'saga' else 'transfers'} "
              f"({n['submit']} Submit, {n['interactive']} Begin/Enlist/Commit, "
              f"{n['client-rollback']} rolled back by the client{extra}): committed {committed}, "
              f"aborted {len(aborted)} (by cause: voted no {funds}, by the client {by_client}, "
              f"phase 1 failed {failed}, other {len(aborted) - funds - by_client - failed}), "
              f"phase 2 finished after the reply {late_p2}, retried {retried}, errors {errors}",
              flush=True)
        expect(committed > 0, f"no {mode} transfer committed")
        expect(funds > 0, f"no {mode} transfer aborted for a no vote")
    msgs = [t for t in transfers if t["mode"] == "msg"]
    committed = [t for t in msgs if t.get("final") == tpb.TX_STATE_COMMITTED]
    aborted = [t for t in msgs if t.get("final") == tpb.TX_STATE_ABORTED]
    checked_yes = sum(t["path"] == "no-submit" for t in committed)
    checked_no = sum(final[t["gtid"]].abort.cause == tpb.ABORT_CAUSE_VOTED_NO for t in aborted)
    n = {p: sum(t["path"] == p for t in msgs) for p in ("submit", "no-submit", "died")}
    redelivered = sum(any(b.attempts > 1 for b in final[t["gtid"]].branches[1:]) for t in committed)
    rechecked = sum(final[t["gtid"]].branches[0].attempts > 1 for t in committed + aborted)
    print(f"  msg           {len(msgs)} orders ({n['submit']} submitted, {n['no-submit']} not "
          f"submitted after the local transaction, {n['died']} before it; "
          f"{sum('local_refused' in t for t in msgs)} local debits refused): committed "
          f"{len(committed)} ({checked_yes} by the back-check), delivered "
          f"{sum(len(t['credits']) for t in committed)} times, once each ({redelivered} "
          f"messages with a delivery retried); aborted {len(aborted)} "
          f"(rolled back by the client {len(aborted) - checked_no}, back-check said no "
          f"{checked_no}); back-check asked again {rechecked}; {late} late local transactions "
          f"refused; errors "
          f"{sum(t['outcome'] == 'error' for t in msgs)}", flush=True)
    expect(checked_yes > 0 and checked_no > 0, "the back-check never said yes, or never no")
    expect(len(committed) > 0 and late > 0, "no message committed, or none was dropped")
    print(f"  throughput    {len(transfers) / elapsed:.0f} transactions/s "
          f"({len(transfers)} in {elapsed:.1f} s, {args.threads} threads)")
    print(f"  balance       before {total}, after {sum(after.values())}; every account as the "
          f"committed work says; prepared, reserved, frozen, saga steps, in doubt: 0"
          + (f"; overdrawn by a compensation: {', '.join(overdrawn)}" if overdrawn else ""))
    if failures:
        print(f"python client: FAILED ({len(failures)} problems, {time.monotonic() - started:.1f} s)",
              flush=True)
        sys.exit(1)
    print(f"python client: OK ({time.monotonic() - started:.1f} s)", flush=True)


def check_message(t, info, dbs, expected, work):
    """A message order's end: delivered exactly once everywhere if its local
    transaction committed, nowhere if not; the message's row as the local
    transaction or the back-check left it."""
    what = f"msg {t['i']} ({t['path']})"
    state = info.state
    want = tpb.TX_STATE_COMMITTED if t["local"] else tpb.TX_STATE_ABORTED
    expect(state == want, f"{what}: local transaction {'committed' if t['local'] else 'did not'}, "
                          f"the message ended {tpb.TxState.Name(state)}")
    row = message_row(dbs[t["src"][0]], t["gtid"])
    if t["local"]:
        expect(row == 1, f"{what}: the message's row is {row}, not committed (1)")
    else:
        expect(row in (None, 0), f"{what}: the message's row is {row} without a local commit")
        if t["path"] != "submit":
            # Nobody rolled it back: the back-check said no.
            expect(info.abort.cause == tpb.ABORT_CAUSE_VOTED_NO and info.abort.branch_id == 1
                   and row == 0, f"{what}: not dropped by its back-check: {info.abort!r}, row {row}")
    for k, (account, amount) in enumerate(t["credits"], start=2):
        got = branch_state(dbs[account[0]], t["gtid"], k)
        if state == tpb.TX_STATE_COMMITTED:
            expect(got == "CONFIRMED", f"{what}: delivery {k} to {account} recorded {got}")
            expected[account] += amount
        else:
            expect(got is None, f"{what}: dropped, but delivery {k} to {account} recorded {got}")
        coord = info.branches[k - 1].state if len(info.branches) >= k else None
        expect((coord == tpb.BRANCH_STATE_CONFIRMED) == (state == tpb.TX_STATE_COMMITTED),
               f"{what}: delivery {k} is {coord} at the coordinator, the message "
               f"{tpb.TxState.Name(state)}")
    if state == tpb.TX_STATE_COMMITTED:
        expected[t["src"]] -= t["amount"]


if __name__ == "__main__":
    main()
