#!/usr/bin/env python3
"""A Tandem participant in Python: a bank shard over SQLite, for 2PC, TCC,
sagas and transactional messages.

Written from docs/participant-protocol.md alone (section numbers below
refer to it); it uses nothing of the Rust SDK, only the stubs that
grpcio-tools generates from proto/tandem/v1 (see gen.sh).

Each branch is one leg of a transfer, payload "<account>:<delta>" (e.g.
"a03:-120" debits a03, "b07:120" credits b07), on one of these resources:

- "accounts" (2PC): Prepare checks the funds and holds the leg in the
  `prepared` table (a held debit counts against the balance, nothing is
  visible yet); Commit applies it to the balance; Rollback drops it.
- "accounts-tcc" (TCC): Try of a debit freezes the money (balance ->
  frozen) and of a credit records it as incoming; Confirm lets the frozen
  money go / credits the balance; Cancel unfreezes / forgets it.
- "accounts-saga" (saga step, called with TCC's RPCs): Try is the step's
  action: it moves the money now and commits it, with a row in
  `saga_steps` saying what it moved, in the same SQLite transaction as the
  branch record; Cancel (the compensation) moves back what that row says
  and deletes it; Confirm (the saga completed) deletes it.
- "accounts-msg" (delivery of a transactional message): Deliver applies the
  leg (a credit) once, in the same SQLite transaction as the branch record
  CONFIRMED; a repeat finds the record and applies nothing.
- "accounts-check" (the back-check of a transactional message): this bank's
  database is also the business service's local store. The business
  service's local transaction (`Bank.local_debit`, run by client.py in its
  own process on this database file) debits an account and inserts
  (gtid, committed=1) into `messages` in one SQLite transaction; Check
  inserts (gtid, committed=0) if no row is there and reads the row back:
  once that commits, the local transaction's insert of the same key fails,
  so a no is final.

The branch record of §6 (the "barrier") is the `branches` table. Every call
is one SQLite transaction (BEGIN IMMEDIATE: one writer at a time, which
also serialises the calls of a branch, §8) that reads the record, does the
business change and writes the new record, so the change and the record
commit together or not at all (§6 invariant, §7). The database runs in WAL
mode with synchronous=FULL: a commit is on disk before the answer.

Branches in doubt for longer than --in-doubt-after ask the coordinator
(Coordinator.GetOutcome, §11) and finish themselves through the same code;
a saga step is closed on COMMIT but never compensated on ABORT (only the
coordinator compensates, newest step first).
"""

import argparse
import hashlib
import hmac
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tandem.v1 import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from tandem.v1 import participant_pb2, participant_pb2_grpc

log = logging.getLogger("participant")

RESOURCE_2PC = "accounts"
RESOURCE_TCC = "accounts-tcc"
RESOURCE_SAGA = "accounts-saga"
RESOURCE_MSG = "accounts-msg"
RESOURCE_CHECK = "accounts-check"
# What each resource is, and the RPCs it is called with: a saga step gets
# TCC's Try / Confirm / Cancel; a message delivery Deliver; the back-check
# Check.
MODE_OF_RESOURCE = {RESOURCE_2PC: "2pc", RESOURCE_TCC: "tcc", RESOURCE_SAGA: "saga",
                    RESOURCE_MSG: "msg", RESOURCE_CHECK: "check"}
RPCS_OF_MODE = {"2pc": "2pc", "tcc": "tcc", "saga": "tcc", "msg": "deliver", "check": "check"}

# Branch records (§6).
TRIED = "TRIED"
REFUSED = "REFUSED"
CONFIRMED = "CONFIRMED"
CANCELLED = "CANCELLED"
EMPTY_CANCELLED = "EMPTY_CANCELLED"

SCHEMA = """
-- No CHECK on balance: phase 1 refuses a debit the balance does not cover,
-- but a saga's compensation must not fail for business reasons, so taking
-- back a credit that was spent meanwhile overdraws the account.
CREATE TABLE IF NOT EXISTS accounts (
    name    TEXT PRIMARY KEY,
    balance INTEGER NOT NULL,
    frozen  INTEGER NOT NULL DEFAULT 0 CHECK (frozen >= 0)
);
-- 2PC: legs prepared and not yet committed or rolled back.
CREATE TABLE IF NOT EXISTS prepared (
    gtid TEXT NOT NULL, branch_id INTEGER NOT NULL,
    account TEXT NOT NULL, delta INTEGER NOT NULL,
    PRIMARY KEY (gtid, branch_id)
);
-- TCC: legs tried and not yet confirmed or cancelled.
CREATE TABLE IF NOT EXISTS reserved (
    gtid TEXT NOT NULL, branch_id INTEGER NOT NULL,
    account TEXT NOT NULL, delta INTEGER NOT NULL,
    PRIMARY KEY (gtid, branch_id)
);
-- Saga: steps whose action committed here, not yet closed or compensated;
-- written in the action's own transaction, so the compensation undoes
-- exactly what the action did.
CREATE TABLE IF NOT EXISTS saga_steps (
    gtid TEXT NOT NULL, branch_id INTEGER NOT NULL,
    account TEXT NOT NULL, delta INTEGER NOT NULL,
    PRIMARY KEY (gtid, branch_id)
);
-- Transactional messages whose local transaction ran on this database:
-- committed = 1 written by the local transaction, 0 by a back-check that
-- found no row (after which the local transaction can no longer commit).
CREATE TABLE IF NOT EXISTS messages (
    gtid TEXT PRIMARY KEY,
    committed INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
-- The branch record of docs/participant-protocol.md §6.
CREATE TABLE IF NOT EXISTS branches (
    gtid TEXT NOT NULL, branch_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    mode TEXT NOT NULL DEFAULT '',
    resource TEXT NOT NULL DEFAULT '',
    payload BLOB,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (gtid, branch_id)
);
CREATE INDEX IF NOT EXISTS branches_in_doubt ON branches (state, updated_ms);
"""


class Refusal(Exception):
    """A call answered with an error status (and nothing changed).
    `permanent`: FAILED_PRECONDITION with the PERMANENT ErrorInfo (§5), so
    that the coordinator does not retry what can never succeed."""

    def __init__(self, code, message, permanent=False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.permanent = permanent

    def abort(self, context):
        if not self.permanent:
            context.abort(self.code, self.message)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(domain="tandem.v1", reason="PERMANENT"))
        context.abort_with_status(rpc_status.to_status(status_pb2.Status(
            code=code_pb2.FAILED_PRECONDITION, message=self.message, details=[detail])))


class LocalRefused(Exception):
    """The business service's local transaction did not commit."""


def now_ms():
    return int(time.time() * 1000)


def parse_leg(payload):
    """'<account>:<delta>' -> (account, delta)."""
    try:
        account, delta = payload.decode("utf-8").rsplit(":", 1)
        delta = int(delta)
    except (UnicodeDecodeError, ValueError):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f"payload {payload[:64]!r} is not <account>:<delta>")
    if not account:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "account is empty")
    return account, delta


class Bank:
    """The shard's state and the protocol's rules over it."""

    def __init__(self, path):
        self.path = path
        self.local = threading.local()
        con = self.con()
        con.executescript(SCHEMA)

    def con(self):
        """One connection per thread (sqlite3 connections are not shared)."""
        con = getattr(self.local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA busy_timeout=30000")
            self.local.con = con
        return con

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time; durable on exit."""
        con = self.con()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def add_accounts(self, balances):
        with self.transaction() as con:
            for name, balance in balances.items():
                con.execute("INSERT OR IGNORE INTO accounts (name, balance) VALUES (?, ?)",
                            (name, balance))

    # -- the branch record ------------------------------------------------

    @staticmethod
    def record(con, gtid, branch_id):
        row = con.execute("SELECT state, mode FROM branches WHERE gtid = ? AND branch_id = ?",
                          (gtid, branch_id)).fetchone()
        return (None, None) if row is None else row

    @staticmethod
    def put(con, gtid, branch_id, state, mode="", resource="", payload=None):
        con.execute(
            "INSERT INTO branches (gtid, branch_id, state, mode, resource, payload, updated_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (gtid, branch_id) DO UPDATE SET state = excluded.state,"
            " updated_ms = excluded.updated_ms",
            (gtid, branch_id, state, mode, resource, payload, now_ms()))

    # -- phase 1 (§9) -------------------------------------------------------

    def phase_one(self, mode, gtid, branch_id, resource, payload):
        """Prepare / Try (2PC, TCC, or a saga step's action). Returns (yes, reason, reply)."""
        account, delta = parse_leg(payload)
        with self.transaction() as con:
            state, _ = self.record(con, gtid, branch_id)
            if mode == "saga" and state == TRIED:
                # A saga's action is retried forward after a failure or a
                # lost answer ("Saga steps"): TRIED commits with the action
                # here, so the first run committed; answer it again.
                row = con.execute("SELECT delta FROM saga_steps WHERE gtid = ? AND branch_id = ?",
                                  (gtid, branch_id)).fetchone()
                if row is not None:
                    return True, "", f"moved {row[0]:+d} on {account}".encode()
            if state is not None:
                # §6: a duplicate (TRIED, REFUSED, CONFIRMED) or a suspended
                # phase 1 arriving after its rollback (CANCELLED,
                # EMPTY_CANCELLED): never run it, answer no.
                return False, f"barrier: branch already {state}; phase 1 is not run again", b""
            row = con.execute("SELECT balance FROM accounts WHERE name = ?",
                              (account,)).fetchone()
            if row is None:
                self.put(con, gtid, branch_id, REFUSED)
                return False, f"no account {account}", b""
            if delta < 0:
                available = row[0] - self.held_debits(con, account)
                if available < -delta:
                    self.put(con, gtid, branch_id, REFUSED)
                    return (False,
                            f"insufficient funds in {account}: {available} available, "
                            f"{-delta} needed", b"")
            if mode == "2pc":
                con.execute("INSERT INTO prepared VALUES (?, ?, ?, ?)",
                            (gtid, branch_id, account, delta))
                reply = f"prepared {delta:+d} on {account}"
            elif mode == "saga":
                # The action commits now, with the row its compensation
                # will read ("Saga steps": TRIED alone proves nothing).
                con.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?",
                            (delta, account))
                con.execute("INSERT INTO saga_steps VALUES (?, ?, ?, ?)",
                            (gtid, branch_id, account, delta))
                reply = f"moved {delta:+d} on {account}"
            else:
                con.execute("INSERT INTO reserved VALUES (?, ?, ?, ?)",
                            (gtid, branch_id, account, delta))
                if delta < 0:
                    con.execute("UPDATE accounts SET balance = balance + ?, frozen = frozen - ?"
                                " WHERE name = ?", (delta, delta, account))
                reply = f"reserved {delta:+d} on {account}"
            # TRIED commits with the held work, in the same transaction (§7).
            self.put(con, gtid, branch_id, TRIED, mode, resource, payload)
            return True, "", reply.encode()

    @staticmethod
    def held_debits(con, account):
        """2PC debits prepared on `account` (TCC debits are already frozen)."""
        (held,) = con.execute("SELECT COALESCE(-SUM(delta), 0) FROM prepared"
                              " WHERE account = ? AND delta < 0", (account,)).fetchone()
        return held

    # -- phase 2 (§10) --------------------------------------------------------

    def phase_two(self, mode, commit, gtid, branch_id):
        """Commit / Confirm (commit=True) or Rollback / Cancel, through the record."""
        with self.transaction() as con:
            state, tried_mode = self.record(con, gtid, branch_id)
            if commit:
                if state == CONFIRMED:
                    return "repeat"
                if state != TRIED:
                    raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"barrier: cannot commit branch {gtid}/{branch_id}: record is "
                                  f"{state or 'absent'} (never prepared here, or rolled back)")
            else:
                if state in (CANCELLED, EMPTY_CANCELLED):
                    return "repeat"
                if state is None:
                    # Null compensation: nothing ran, nothing to undo; remember
                    # it so that a late phase 1 is refused.
                    self.put(con, gtid, branch_id, EMPTY_CANCELLED)
                    return "empty"
                if state == REFUSED:
                    self.put(con, gtid, branch_id, CANCELLED)
                    return "refused"
                if state == CONFIRMED:
                    raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"barrier: branch {gtid}/{branch_id} is committed; "
                                  "a commit is never reversed")
            # state == TRIED
            if mode is not None and tried_mode != mode:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"branch {gtid}/{branch_id} was phase-1'd as {tried_mode}, "
                              f"called as {mode}")
            if tried_mode == "2pc":
                self.finish_2pc(con, commit, gtid, branch_id)
            elif tried_mode == "saga":
                self.finish_saga(con, commit, gtid, branch_id)
            else:
                self.finish_tcc(con, commit, gtid, branch_id)
            self.put(con, gtid, branch_id, CONFIRMED if commit else CANCELLED)
            return "done"

    @staticmethod
    def finish_2pc(con, commit, gtid, branch_id):
        row = con.execute("SELECT account, delta FROM prepared WHERE gtid = ? AND branch_id = ?",
                          (gtid, branch_id)).fetchone()
        if row is None:
            return
        account, delta = row
        if commit:
            con.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?",
                        (delta, account))
        con.execute("DELETE FROM prepared WHERE gtid = ? AND branch_id = ?", (gtid, branch_id))

    @staticmethod
    def finish_tcc(con, commit, gtid, branch_id):
        row = con.execute("SELECT account, delta FROM reserved WHERE gtid = ? AND branch_id = ?",
                          (gtid, branch_id)).fetchone()
        if row is None:
            return
        account, delta = row
        if delta < 0:
            # The frozen money leaves (confirm) or comes back (cancel).
            back = -delta if not commit else 0
            con.execute("UPDATE accounts SET frozen = frozen + ?, balance = balance + ?"
                        " WHERE name = ?", (delta, back, account))
        elif commit:
            con.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?",
                        (delta, account))
        con.execute("DELETE FROM reserved WHERE gtid = ? AND branch_id = ?", (gtid, branch_id))

    @staticmethod
    def finish_saga(con, commit, gtid, branch_id):
        """Confirm closes the step; Cancel (the compensation) moves back what
        the action's row says it moved, and nothing if there is no row."""
        row = con.execute("SELECT account, delta FROM saga_steps WHERE gtid = ? AND branch_id = ?",
                          (gtid, branch_id)).fetchone()
        if row is None:
            return
        account, delta = row
        if not commit:
            con.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?",
                        (delta, account))
        con.execute("DELETE FROM saga_steps WHERE gtid = ? AND branch_id = ?", (gtid, branch_id))

    # -- transactional messages ----------------------------------------------

    def deliver(self, gtid, branch_id, resource, payload):
        """Deliver: apply the leg once; its effect and the record CONFIRMED
        commit together, so a repeat (at least once) finds the record."""
        account, delta = parse_leg(payload)
        with self.transaction() as con:
            state, _ = self.record(con, gtid, branch_id)
            if state == CONFIRMED:
                return "repeat"
            if state is not None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"barrier: cannot deliver branch {gtid}/{branch_id}: record is {state}")
            row = con.execute("SELECT balance FROM accounts WHERE name = ?",
                              (account,)).fetchone()
            if row is None:
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"no account {account}: the delivery can never be applied",
                              permanent=True)
            if delta < 0 and row[0] - self.held_debits(con, account) < -delta:
                # Messages carry credits; a debit that does not fit now is
                # retried (an error), never dropped.
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"insufficient funds in {account} for {delta}; try again later")
            con.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?",
                        (delta, account))
            self.put(con, gtid, branch_id, CONFIRMED, "msg", resource, payload)
            return "delivered"

    def local_debit(self, gtid, account, amount):
        """The business service's local transaction for message `gtid`: takes
        `amount` from `account` and records the message as committed, in one
        SQLite transaction. Raises LocalRefused (nothing changed) when the
        account cannot cover it, or when a back-check already recorded the
        message as not committed (or it committed already)."""
        with self.transaction() as con:
            row = con.execute("SELECT committed FROM messages WHERE gtid = ?",
                              (gtid,)).fetchone()
            if row is not None:
                raise LocalRefused(
                    f"message {gtid} was checked back as not committed; its local transaction "
                    "is refused" if row[0] == 0 else f"message {gtid} committed already")
            row = con.execute("SELECT balance FROM accounts WHERE name = ?",
                              (account,)).fetchone()
            if row is None:
                raise LocalRefused(f"no account {account}")
            available = row[0] - self.held_debits(con, account)
            if available < amount:
                raise LocalRefused(f"insufficient funds in {account}: {available} available, "
                                   f"{amount} needed")
            con.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?",
                        (amount, account))
            # A plain INSERT: were a "not committed" row there, this would fail.
            con.execute("INSERT INTO messages (gtid, committed, updated_ms) VALUES (?, 1, ?)",
                        (gtid, now_ms()))

    def check(self, gtid):
        """The back-check: True if the local transaction of `gtid` committed.
        A gtid with no row gets a "not committed" row first, so the local
        transaction can no longer commit and the no is final."""
        with self.transaction() as con:
            con.execute("INSERT OR IGNORE INTO messages (gtid, committed, updated_ms)"
                        " VALUES (?, 0, ?)", (gtid, now_ms()))
            (committed,) = con.execute("SELECT committed FROM messages WHERE gtid = ?",
                                       (gtid,)).fetchone()
            return committed == 1

    # -- in doubt (§11) -----------------------------------------------------

    def in_doubt(self, older_than_ms, limit=100):
        con = self.con()
        return con.execute(
            "SELECT gtid, branch_id, mode FROM branches WHERE state = ? AND updated_ms < ?"
            " ORDER BY updated_ms LIMIT ?", (TRIED, older_than_ms, limit)).fetchall()


class Auth:
    """Checks `authorization: Bearer <token>` against the expected token (§12)."""

    def __init__(self, token):
        self.digest = hashlib.sha256(token.encode()).digest() if token else None

    def check(self, context):
        if self.digest is None:
            return None
        value = dict(context.invocation_metadata()).get("authorization")
        if value is None:
            return Refusal(grpc.StatusCode.UNAUTHENTICATED,
                           "no credential: send `authorization: Bearer <token>`")
        if not value.startswith("Bearer "):
            return Refusal(grpc.StatusCode.UNAUTHENTICATED,
                           "the authorization header must be `Bearer <token>`")
        got = hashlib.sha256(value[len("Bearer "):].encode()).digest()
        if not hmac.compare_digest(got, self.digest):
            return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return None


class ParticipantService(participant_pb2_grpc.ParticipantServicer):
    def __init__(self, bank, auth):
        self.bank = bank
        self.auth = auth

    @staticmethod
    def _resource_mode(resource, rpcs):
        """The mode of `resource`, which must be served with the `rpcs`
        family ("2pc", "tcc", "deliver", "check")."""
        served = MODE_OF_RESOURCE.get(resource)
        if served is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"no resource {resource[:256]!r} here")
        if RPCS_OF_MODE[served] != rpcs:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"resource {resource!r} is {served}, called with {rpcs} RPCs")
        return served

    def _vote(self, rpcs, request, context):
        try:
            refused = self.auth.check(context)
            if refused:
                raise refused
            mode = self._resource_mode(request.resource, rpcs)
            yes, reason, reply = self.bank.phase_one(
                mode, request.gtid, request.branch_id, request.resource, request.payload)
            log.debug("%s %s/%d: %s %s", {"2pc": "prepare", "tcc": "try", "saga": "action"}[mode],
                      request.gtid, request.branch_id, "yes" if yes else "no", reason)
            return participant_pb2.VoteResponse(yes=yes, reason=reason, reply=reply)
        except Refusal as r:
            r.abort(context)
        except sqlite3.Error as e:
            # Unsure whether anything happened? Nothing did: the SQLite
            # transaction rolled back. Either way an error, never a no (§5).
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {e}")
        except Exception as e:  # noqa: BLE001 - any failure is an error status
            log.exception("phase 1 failed")
            context.abort(grpc.StatusCode.INTERNAL, f"phase 1 failed: {e}")

    def _ack(self, rpcs, commit, request, context):
        try:
            refused = self.auth.check(context)
            if refused:
                raise refused
            # A rollback for a resource not served here is answered through
            # the record (absent: an empty rollback, OK): nothing can have
            # been done for it, and an error would be retried for an hour.
            mode = rpcs
            if commit or request.resource in MODE_OF_RESOURCE:
                mode = self._resource_mode(request.resource, rpcs)
            outcome = self.bank.phase_two(mode, commit, request.gtid, request.branch_id)
            log.debug("%s %s/%d: %s", "commit" if commit else "rollback",
                      request.gtid, request.branch_id, outcome)
            return participant_pb2.AckResponse()
        except Refusal as r:
            r.abort(context)
        except sqlite3.Error as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {e}")
        except Exception as e:  # noqa: BLE001
            log.exception("phase 2 failed")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"phase 2 failed: {e}")

    def Prepare(self, request, context):
        return self._vote("2pc", request, context)

    def Try(self, request, context):
        return self._vote("tcc", request, context)

    def Commit(self, request, context):
        return self._ack("2pc", True, request, context)

    def Rollback(self, request, context):
        return self._ack("2pc", False, request, context)

    def Confirm(self, request, context):
        return self._ack("tcc", True, request, context)

    def Cancel(self, request, context):
        return self._ack("tcc", False, request, context)

    def Deliver(self, request, context):
        """A message's delivery: repeated until acknowledged, applied once."""
        try:
            refused = self.auth.check(context)
            if refused:
                raise refused
            self._resource_mode(request.resource, "deliver")
            outcome = self.bank.deliver(request.gtid, request.branch_id, request.resource,
                                        request.payload)
            log.debug("deliver %s/%d: %s", request.gtid, request.branch_id, outcome)
            return participant_pb2.AckResponse()
        except Refusal as r:
            r.abort(context)
        except sqlite3.Error as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {e}")
        except Exception as e:  # noqa: BLE001
            log.exception("deliver failed")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"deliver failed: {e}")

    def Check(self, request, context):
        """The back-check of a message whose local transaction ran on this
        database: yes (committed), no (not, and now never), or an error
        status when the store cannot tell (asked again)."""
        try:
            refused = self.auth.check(context)
            if refused:
                raise refused
            self._resource_mode(request.resource, "check")
            committed = self.bank.check(request.gtid)
            log.debug("check %s: %s", request.gtid, "committed" if committed else "not committed")
            if committed:
                return participant_pb2.VoteResponse(yes=True)
            return participant_pb2.VoteResponse(
                yes=False, reason=f"the local transaction of message {request.gtid} did not "
                                  "commit, and now never will")
        except Refusal as r:
            r.abort(context)
        except sqlite3.Error as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {e}")
        except Exception as e:  # noqa: BLE001
            log.exception("check failed")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"check failed: {e}")


def resolve_in_doubt(bank, coordinator, token, after_s, stop):
    """§11: branches TRIED for longer than `after_s` ask GetOutcome."""
    channel = grpc.insecure_channel(coordinator)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    pause = min(max(after_s / 2, 0.2), 30)
    left_to_coordinator = set()
    while not stop.wait(pause):
        try:
            branches = bank.in_doubt(now_ms() - int(after_s * 1000))
        except sqlite3.Error as e:
            log.warning("in-doubt scan failed: %s", e)
            continue
        for gtid, branch_id, mode in branches:
            try:
                answer = stub.GetOutcome(coordinator_pb2.GetOutcomeRequest(gtid=gtid),
                                         timeout=5, metadata=metadata)
            except grpc.RpcError as e:
                # Unreachable is not abort: ask again next round.
                log.warning("in-doubt %s/%d: cannot ask the coordinator: %s %s",
                            gtid, branch_id, e.code(), e.details())
                break
            if answer.outcome == types_pb2.OUTCOME_PENDING:
                continue
            commit = answer.outcome == types_pb2.OUTCOME_COMMIT
            if mode == "saga" and not commit:
                # §11: only the coordinator compensates a saga's steps (newest
                # first); it keeps calling Cancel until this one is done.
                if (gtid, branch_id) not in left_to_coordinator:
                    left_to_coordinator.add((gtid, branch_id))
                    log.info("in-doubt saga step %s/%d: aborted; its compensation is left "
                             "to the coordinator", gtid, branch_id)
                continue
            try:
                bank.phase_two(None, commit, gtid, branch_id)
                log.info("in-doubt branch %s/%d resolved: %s", gtid, branch_id,
                         "commit" if commit else "abort")
            except (Refusal, sqlite3.Error) as e:
                log.warning("in-doubt branch %s/%d not resolved yet: %s", gtid, branch_id, e)


def parse_accounts(text):
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, balance = item.split("=")
        out[name.strip()] = int(balance)
    return out


def read_token(path):
    if not path:
        return None
    with open(path) as f:
        token = f.read().strip()
    if not token:
        sys.exit(f"token file {path} is empty")
    return token


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="host:port to serve on (port 0 picks a free one)")
    p.add_argument("--db", required=True, help="SQLite database file")
    p.add_argument("--accounts", default="",
                   help="accounts to create if missing: name=balance,name=balance")
    p.add_argument("--coordinator", help="host:port of the coordinator, for in-doubt resolution")
    p.add_argument("--coordinator-token-file",
                   help="token with the coordinator's `participant` role, for GetOutcome")
    p.add_argument("--in-doubt-after", type=float, default=10.0,
                   help="seconds a branch waits in doubt before asking GetOutcome")
    p.add_argument("--token-file", help="accept calls only with this bearer token")
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s participant[{os.getpid()}] %(levelname)s %(message)s",
                        stream=sys.stderr)

    bank = Bank(args.db)
    bank.add_accounts(parse_accounts(args.accounts))

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers),
        options=[
            # §2.2: at least the coordinator's payload limit (16 MiB at most).
            ("grpc.max_receive_message_length", 17 * 1024 * 1024),
            # One process per port: a restarted participant must not share it.
            ("grpc.so_reuseport", 0),
        ],
    )
    participant_pb2_grpc.add_ParticipantServicer_to_server(
        ParticipantService(bank, Auth(read_token(args.token_file))), server)
    stop = threading.Event()

    def shutdown(signum, _frame):
        log.info("signal %d: stopping", signum)
        stop.set()
        server.stop(grace=2)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)

    port = server.add_insecure_port(args.listen)
    if port == 0:
        sys.exit(f"cannot listen on {args.listen}")
    server.start()
    if args.coordinator:
        threading.Thread(
            target=resolve_in_doubt, daemon=True,
            args=(bank, args.coordinator, read_token(args.coordinator_token_file),
                  args.in_doubt_after, stop)).start()
    host = args.listen.rsplit(":", 1)[0]
    # The first line on stdout, for scripts that start us on port 0.
    print(f"listening on {host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
