#!/usr/bin/env python3
"""A Tandem participant in Python: a bank shard over SQLite, for 2PC and TCC.

Written from docs/participant-protocol.md alone (section numbers below
refer to it); it uses nothing of the Rust SDK, only the stubs that
grpcio-tools generates from proto/tandem/v1 (see gen.sh).

Each branch is one leg of a transfer, payload "<account>:<delta>" (e.g.
"a03:-120" debits a03, "b07:120" credits b07), on one of two resources:

- "accounts" (2PC): Prepare checks the funds and holds the leg in the
  `prepared` table (a held debit counts against the balance, nothing is
  visible yet); Commit applies it to the balance; Rollback drops it.
- "accounts-tcc" (TCC): Try of a debit freezes the money (balance ->
  frozen) and of a credit records it as incoming; Confirm lets the frozen
  money go / credits the balance; Cancel unfreezes / forgets it.

The branch record of §6 (the "barrier") is the `branches` table. Every call
is one SQLite transaction (BEGIN IMMEDIATE: one writer at a time, which
also serialises the calls of a branch, §8) that reads the record, does the
business change and writes the new record, so the change and the record
commit together or not at all (§6 invariant, §7). The database runs in WAL
mode with synchronous=FULL: a commit is on disk before the answer.

Branches in doubt for longer than --in-doubt-after ask the coordinator
(Coordinator.GetOutcome, §11) and finish themselves through the same code.
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

from tandem.v1 import coordinator_pb2, coordinator_pb2_grpc, types_pb2
from tandem.v1 import participant_pb2, participant_pb2_grpc

log = logging.getLogger("participant")

RESOURCE_2PC = "accounts"
RESOURCE_TCC = "accounts-tcc"
MODE_OF_RESOURCE = {RESOURCE_2PC: "2pc", RESOURCE_TCC: "tcc"}

# Branch records (§6).
TRIED = "TRIED"
REFUSED = "REFUSED"
CONFIRMED = "CONFIRMED"
CANCELLED = "CANCELLED"
EMPTY_CANCELLED = "EMPTY_CANCELLED"

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    name    TEXT PRIMARY KEY,
    balance INTEGER NOT NULL CHECK (balance >= 0),
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
    """A call answered with an error status (and nothing changed)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


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
        """Prepare / Try. Returns (yes, reason, reply)."""
        account, delta = parse_leg(payload)
        with self.transaction() as con:
            state, _ = self.record(con, gtid, branch_id)
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

    def _resource_mode(self, resource, mode):
        served = MODE_OF_RESOURCE.get(resource)
        if served is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"no resource {resource[:256]!r} here")
        if served != mode:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"resource {resource!r} is {served}, called with {mode}")

    def _vote(self, mode, request, context):
        try:
            refused = self.auth.check(context)
            if refused:
                raise refused
            self._resource_mode(request.resource, mode)
            yes, reason, reply = self.bank.phase_one(
                mode, request.gtid, request.branch_id, request.resource, request.payload)
            log.debug("%s %s/%d: %s %s", "prepare" if mode == "2pc" else "try",
                      request.gtid, request.branch_id, "yes" if yes else "no", reason)
            return participant_pb2.VoteResponse(yes=yes, reason=reason, reply=reply)
        except Refusal as r:
            context.abort(r.code, r.message)
        except sqlite3.Error as e:
            # Unsure whether anything happened? Nothing did: the SQLite
            # transaction rolled back. Either way an error, never a no (§5).
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {e}")
        except Exception as e:  # noqa: BLE001 - any failure is an error status
            log.exception("phase 1 failed")
            context.abort(grpc.StatusCode.INTERNAL, f"phase 1 failed: {e}")

    def _ack(self, mode, commit, request, context):
        try:
            refused = self.auth.check(context)
            if refused:
                raise refused
            # A rollback for a resource not served here is answered through
            # the record (absent: an empty rollback, OK): nothing can have
            # been done for it, and an error would be retried for an hour.
            if commit or request.resource in MODE_OF_RESOURCE:
                self._resource_mode(request.resource, mode)
            outcome = self.bank.phase_two(mode, commit, request.gtid, request.branch_id)
            log.debug("%s %s/%d: %s", "commit" if commit else "rollback",
                      request.gtid, request.branch_id, outcome)
            return participant_pb2.AckResponse()
        except Refusal as r:
            context.abort(r.code, r.message)
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


def resolve_in_doubt(bank, coordinator, token, after_s, stop):
    """§11: branches TRIED for longer than `after_s` ask GetOutcome."""
    channel = grpc.insecure_channel(coordinator)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    pause = min(max(after_s / 2, 0.2), 30)
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
