#!/usr/bin/env python3
"""cloudsync: a small, auditable sync server for offline-first devices.

Devices (tills, scanners, field apps) push batches of row operations and pull
rows back, over HTTP/JSON, against one MySQL/MariaDB or SQLite database.

What this service guarantees, and the one place each is enforced:
- Only a device with a valid token calls /sync* (Authenticator.identify;
  presented_digest is the one reading of the Authorization header).
- A request reads and writes only what its grant holds: its tables, its
  actions, its columns, its rows (Grant, one per token: SyncEngine.grant_for).
  Grant.decide allows or refuses every push operation, judging the row as it
  will be after it; every statement that finds rows carries the grant's scope
  (the SQL builders take one, never by default); a table outside the grant
  does not exist for the request. With ROW_SCOPES a device reads, writes and
  hears of only its scope's rows; a row that leaves it arrives as a delete.
- Every value a client sends becomes its column's type before it meets SQL,
  or is refused (bind_value, under Binding); every value is bound (the SQL
  builders write ?, the database classes bind it), and only tables in
  ALLOWED_TABLES and columns the database's catalogue lists reach SQL, quoted
  (Column, TableSchema, from Database.introspect).
- A checkpoint is one this server issued, for this database (Checkpoints:
  HMAC-SHA256 with a key kept in the database).
- A push is applied in one database transaction: all of it or none of it
  (Pushes._push); retried with its batch id, it is applied once
  (ChangeLog.claim_batch inside that transaction); with the device's
  checkpoint it never overwrites silently (Pushes._conflicts: column by
  column, each operation from its own checkpoint when it names one
  (Pushes._decode_bases), an increment never).
- Every change to an allowed table, by cloudsync or any other program, is in
  the change log, numbered in commit order; a device that follows the pull
  loop from its checkpoint never misses one (Change capture: the triggers,
  numbered by ChangeLog.sequence, which only the LogWatcher runs in serve).
  On a Galera cluster the numbering's one `last_seq` row keeps one order for
  every node, and a node behind waits for it instead of resetting devices
  (Database.catch_up, from Pulls and Pushes._check_basis).
  The capture follows the live schema: a table altered, re-created, swapped
  or truncated gets triggers for its columns again, and devices start that
  table alone again when its history broke (ChangeLog.follow, every
  SCHEMA_LOOK_SECONDS from LogWatcher.look; Pulls._continue answers for it).
- A change is attributed to a device only when its own statement wrote it
  (Database.attribute_table before the statements of each table of a push);
  rows the shop's triggers write in other tables are another writer's changes.
- One client cannot take the server from the others. Memory: a pull's page
  stops at PULL_MAX_BYTES of rows (Pulls._scan_tables, Pulls._taken_within,
  Pulls.seed_pull: sizes read before rows that types do not bound). Time:
  every database wait ends (_Pool.connection: DB_WAIT_SECONDS for a
  connection, at once while the database does not answer;
  MySQLDatabase.bound_statements: read and write timeouts in serve), and a
  push's retries stop within REQUEST_BUDGET_SECONDS
  (Pushes._push_with_retries). /health is answered by the server's loop
  (_loop_dispatcher). Connections: MAX_CONNECTIONS_PER_ADDRESS per client
  address (_ConnectionLimits).
- An error is always a JSON body with ``success: false``, an ``error`` and,
  where it helps, a ``detail``; never SQL, a traceback or a password (App.__call__
  and _answer, from the one catalogue REFUSALS).
- Requests of the original Node.js service keep working unchanged: same
  paths, same request fields, same response fields (fields are only added).

How to read it. The module reads top to bottom in sections, each under a banner:
Constants, Errors, .env parser, Logs, Identifiers and values; then what an
auditor of trust reads in one sitting: Authentication, Grants (and row scopes),
Binding, Checkpoints; then Configuration, SQL builders, Private APIs (each with
its public fallback), Database layer, Change capture, Sync engine, Long polls
(the watcher that numbers the log and wakes waiting pulls), Push, Pull,
Operations (metrics, device fleet), HTTP application, Command line (with WORKERS
above 1, serve's master and its workers: _Arbiter, _WorkerShare), and the data
at the end (cloudsync's own tables, metric help, OpenAPI). A definition uses
what is below it in its section or in an earlier section (a class's methods may
use each other either way); only the data at the end is named from above. Within
a section a class comes before the records and helpers it uses: a push or a pull
reads forward within each of its own two sections (HTTP application, then Push
or Pull), and whatever else it calls was defined in an earlier section.

The path of a push (POST /sync/push), function by function:
  App.__call__            wraps the WSGI environ in a Request; the one place a
                          Refused becomes an answer (_answer, from REFUSALS)
  App._dispatch           route and method (405 with Allow), Authenticator.identify,
                          SyncEngine.grant_for: the request's Grant
  App.push                Request.json_object (parse_json, _check_depth), then
                          read_fields(PUSH_FIELDS): device_id, batch_id, ...
  Pushes.validate_operations   every operation before any SQL: Grant.table (a
                          table outside the grant is refused first), bind_value
                          for each value, key_problem for the key, then
                          Grant.decide (DECISIONS: writable, action, columns,
                          scope), which gives the operation its scope
  Pushes.push             Checkpoints.decode, each operation's (_decode_bases);
                          a batch seen before is replayed (ChangeLog.find_batch,
                          Pushes._replay)
  Pushes._push_with_retries    a deadlock (Galera: a certification failure) or a
                          lock timeout runs it again, while another run fits in
                          REQUEST_BUDGET_SECONDS
  Pushes._push            one transaction (_push_transaction):
                            ChangeLog.claim_batch, ChangeLog.attributed
                            Pushes._check_basis: the checkpoint covers each
                              table, and its history did not break (410 reset_tables)
                            Pushes._conflicts: SyncEngine.rows_for_keys,
                              ChangeLog.touched_by_others (the device's scope,
                              from _judged_since per table)
                            Pushes._apply, each operation by ACTIONS:
                              _insert_many, _insert_one, _update, _delete,
                              _upsert, _increment -> SQL builders with the
                              operation's scope -> Database.execute (triggers log
                              the change);
                              on_reject skip: _apply_or_set_aside
                            Pushes._checkpoint_after_push: the request's
                              checkpoint, plus its push_id when every row
                              echoes what the device sent (_echoes)
                            ChangeLog.finish_batch keeps the outcome for a retry
  App.push                after the commit, LogWatcher.poke: the watcher numbers
                          the push's changes and wakes the waiting pulls (and
                          until then, polls of its tables and scope values go
                          to the database)
  App.__call__            to_json_bytes, gzip; App._account: metrics, the
                          device fleet, one access-log line

The path of a pull (POST /sync/pull):
  App.__call__ -> App._dispatch -> App.pull   read_fields(PULL_FIELDS),
                          Pulls.check_tables (Grant.table), parse_limit
  sync mode (`since` present):
    App._sync_pull        LogWatcher.known_head: Pulls.unchanged answers an
                          idle poll from memory, or one behind the head only by
                          other tables' or stores' changes (LogWatcher.quiet_between);
                          else, within the pull readers' share of the pool:
    Pulls.pull_changes    Pulls._position (Checkpoints.decode, the tables, the
                          grant's scope fingerprint); Pulls._read: ChangeLog.read,
                          one statement giving a Snapshot (head, each table's
                          epoch and compaction mark, the grant's entries only);
                          changes committed but not numbered yet: number_now,
                          then read again; Pulls._continue per table: go on,
                          learn added_columns, or 410 reset_tables (Pulls._reset);
                          a first sync pages through the tables (Pulls._scan_tables:
                          page_sql with the grant's scope), later ones fetch the
                          logged rows (Pulls._fetch_changed: SyncEngine.select_by_keys,
                          deleted keys by key_value); both stop at PULL_MAX_BYTES
                          (Pulls._fits, or the rows' sizes first); Checkpoints.encode
    App._sync_pull        with "wait" and nothing new: LogWatcher.enter (a share
                          per device), LogWatcher.park: an event of its own, set
                          by LogWatcher._wake only for a move of its tables and
                          scope values (ChangeLog.touched at each look, or told
                          by another worker: LogWatcher.heard); pull again, one
                          read for the pulls at one checkpoint (LogWatcher.shared)
  seed mode (no `since`):
    Pulls.seed_pull       ChangeLog.tables_version validates the cached answer;
                          else Database.rows_as_json or Pulls._read_rows
                          (first_rows_sql with the grant's scope), kept as
                          Encoded with an ETag hashed from the answer itself
  App.__call__            the encoded body, or 304 for a matching If-None-Match
"""

import argparse
import base64
import bisect
import collections
import binascii
import datetime
import decimal
import errno
import gzip
import hashlib
import hmac
import http
import itertools
import json
import logging
import math
import os
import re
import mmap
import secrets
import select
import signal
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import uuid
import weakref
import zlib
import contextlib
from contextlib import contextmanager

__all__ = [
    # errors, and the catalogue of refusals
    "CloudsyncError", "ConfigError", "SchemaError", "ChangeCaptureError", "DatabaseUnavailable",
    "Retryable", "SchemaMoved", "Denied", "DataRejected", "Refused", "REFUSALS",
    # tokens, grants, binding (the trust-critical sections), configuration
    "DeviceToken", "hash_token", "parse_scope", "parse_tokens", "SCOPE_ALL", "read_tokens_file",
    "add_token", "rotate_token", "remove_token", "presented_digest", "Authenticator",
    "Grant", "TableGrant", "TableScope", "EVERY_ROW", "DECISIONS", "ACTIONS", "bind_value",
    "key_problem", "SETTINGS", "Config", "parse_dotenv", "load_config",
    # values and SQL
    "Column", "TableSchema", "parse_json", "to_json_bytes", "key_where", "keys_where",
    "select_keyed_sql", "insert_sql", "update_sql", "exists_sql", "delete_sql", "first_rows_sql",
    "page_sql",
    # the database, its change log, the sync engine
    "Database", "SQLiteDatabase", "MySQLDatabase", "open_database", "ChangeLog", "Checkpoints",
    "SyncEngine", "Pushes", "Pulls",
    # serving it
    "Metrics", "DeviceFleet", "App", "make_app", "main", "OPENAPI", "ROUTE_REFUSALS",
]

__version__ = "0.1.0"

log = logging.getLogger("cloudsync")

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------
# Limits and intervals, each with its unit in its name. What an operator may
# change is a setting (SETTINGS, under Configuration), its default written
# there only.

# requests and answers
READ_CHUNK_BYTES = 64 * 1024        # request bodies are read in pieces this size
DEFAULT_PULL_LIMIT_ROWS = 1000      # the original service's default page size
# what a pull's byte budget (PULL_MAX_BYTES) counts for a row beyond its values: its JSON names,
# quotes and commas, a column at a time
ROW_OVERHEAD_BYTES = 16
# MySQL: the largest value of a type whose length is declared; longer ones (MEDIUMTEXT, LONGBLOB,
# JSON) have none, and their rows are measured before a pull reads them
DECLARED_MAX_BYTES = {"tinytext": 255, "tinyblob": 255, "text": 65535, "blob": 65535}
SIZES_FIRST_ASKED = 16              # rows measured first, in a table whose rows were never measured
MAX_ID_CHARS = 128                  # device_id and batch_id
CORS_ALLOWED_HEADERS = "Authorization, Content-Type, Content-Encoding, If-None-Match"
CORS_MAX_AGE_SECONDS = 600          # browsers may reuse a preflight answer this long
RETRY_AFTER_SECONDS = 5             # what a 503 tells a client to wait
# A request's database work, retries included, ends within this: below the reference clients'
# 30 s timeout, so a client never gives up on a push that may still commit (Pushes)
REQUEST_BUDGET_SECONDS = 25
# a push undone by a deadlock or a Galera certification failure (writers of one row on two
# nodes) is run again up to this many times within the budget, PUSH_RETRIES counting lock waits
DEADLOCK_RETRIES = 12
# a MySQL statement's read and write timeouts are DB_WAIT_SECONDS plus this: a lock wait ends
# first (with its own error); only a database that stopped answering meets the timeout
STATEMENT_MARGIN_SECONDS = 2
MAX_WAIT_SECONDS = 25               # the longest a pull waits for a change ("wait"), below 30 s
WATCH_INTERVAL_SECONDS = 0.5        # the watcher looks at the change log this often (Long polls)
LONGPOLL_RETRY_AFTER_SECONDS = 2    # what a pull turned away from waiting is told to wait
LONGPOLL_WAITERS_PER_DEVICE = 4     # pulls of one device (or one address) waiting at once
WATCH_MOVES_KEPT = 64               # the watcher's last moves of the log a waiting pull judges
# woken pulls' answers kept for others at the same checkpoint: at most this many, each at most
# this large (about: the text of its values), 16 MiB in all
SHARED_ANSWERS_KEPT = 256
# a pull's log read reads each table and scope value as a range of its own, in order, up to
# this many ranges; with more, one per table (ChangeLog._entries_sql)
ENTRY_PARTS_MOST = 16
# threads a server keeps beyond THREADS and the waiting pulls (_with_spare_threads)
SPARE_THREADS = 8
SHARED_ANSWER_BYTES = 64 << 10
# connections of the pool (DB_POOL_SIZE) pulls never take all of: kept for pushes (App._read_pull)
PUSH_RESERVED_CONNECTIONS = 2
# a look that finds more new changes than this wakes every waiting pull without reading which
# tables and stores they were
WATCH_MOVES_READ_MOST = 5000
# near MAX_CONNECTIONS (three quarters), connections idle this long are closed to make room
NEAR_LIMIT_IDLE_SECONDS = 2
TOKEN_BYTES = 32                    # random bytes in a generated token
MAX_SCOPE_VALUE_CHARS = 200         # a scope value in a token: a store number, a region's name
SCOPE_ALL = "*"                     # the scope value of a token that sees every row (the office)

# values: what no column can hold is refused before any SQL runs
MAX_INTEGER_DIGITS = 20             # beyond 64-bit integers no column can hold the value
MAX_DECIMAL_EXPONENT = 65           # MySQL DECIMAL holds at most 65 digits
MAX_FLOAT_EXPONENT = 308            # a double reaches 1.8e308
SQLITE_EXACT_DIGITS = 15            # what a SQLite REAL keeps exactly

# the database and the change log
MYSQL_STATEMENT_BYTES = 1 << 20     # a multi-row INSERT is cut into statements of about this size
SCHEMA_REFRESH_SECONDS = 1.0        # status re-reads the tables' columns at most this often
# the watcher looks at the tables' definitions this often: an ALTER TABLE, a table made again or
# swapped, a TRUNCATE is followed within it (Long polls, SyncEngine.follow_schema)
SCHEMA_LOOK_SECONDS = 0.5
# and at cloudsync's triggers on them this often (information_schema.TRIGGERS costs the database
# milliseconds per table): a trigger dropped or replaced by hand is followed within it
TRIGGER_LOOK_SECONDS = 5
CASCADE_DEPTH = 4                   # foreign-key cascade chains are followed this many tables deep
# pending rows numbered per statement (and per transaction in the background)
SEQUENCE_BATCH_ROWS = 2000
COMPACT_BATCH_ROWS = 10000          # log rows deleted per compaction transaction
# the server saves the device fleet and re-reads a changed tokens file this often
MAINTAIN_INTERVAL_SECONDS = 1
CHECKPOINT_PREFIX = "cs1."          # the checkpoint format's version
# the change log keeps this much of a row's scope value (MySQL; longer values match no token), as
# bytes: compared byte for byte, 'north ' is not 'north' (every MySQL text collation pads)
MYSQL_SCOPE_CHARS = 255

# memory
PULL_CACHE_ENTRIES = 64             # encoded seed-mode pull answers kept
PULL_CACHE_BYTES = 16 << 20         # ... holding at most this many bytes (their gzipped copies too)
MAX_GRANTS_KEPT = 10000             # grants kept per set of schemas (one per token in use)

# worker processes (WORKERS above 1: Workers)
WORKERS_AUTO_MOST = 4               # WORKERS=auto starts one per core, at most this many
WORKERS_MOST = 64
# each worker's least share of DB_POOL_SIZE: a pull's, a push's and its watcher's
WORKER_LEAST_CONNECTIONS = 3
METRICS_SHARE_SECONDS = 0.25        # a worker publishes its metrics at most this long after a change
WORKER_MESSAGE_BYTES = 32768        # a move told to the other workers; a larger one says "anything"
METRICS_SLOT_BYTES = 1 << 20        # shared memory one worker's published metrics may fill
# a worker that dies within WORKER_STABLE_SECONDS of its start is started again after 1 s, then
# 2, 4... up to WORKER_RESTART_MOST_SECONDS; one that lived longer, at once
WORKER_STABLE_SECONDS = 10
WORKER_RESTART_MOST_SECONDS = 10
# after SHUTDOWN_GRACE_SECONDS, a worker still running is killed this much later
WORKER_KILL_MARGIN_SECONDS = 5

# operations: metrics, the device fleet, exit codes
LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SILENT_DEVICE_SECONDS = 86400       # `devices` highlights devices not seen for longer than this
LAG_COUNTED_UP_TO = 100000          # `devices` counts a device's lag up to this many changes
EXIT_RETRY = 1                      # the database is unavailable: try again later
# what to do about an allowed table that is missing or has no primary key (serve and check)
TABLE_FIX = "create the table with a primary key, or remove it from ALLOWED_TABLES"
READ_ONLY_FIX = ("point DB_HOST at a writable server (the primary, or a Galera node with "
                 "read_only=OFF): cloudsync writes on every server it uses, its change log and "
                 "batch ids included, pulls too")
EXIT_CONFIGURATION = 2              # a setting or the schema must be fixed first

EXAMPLE_TABLES = ("sales", "products", "customers", "item_sales", "product_stock")
# the web till the demo serves at /demo/ (App.demo_file): path as routed -> (file beside this
# module, content type); nothing else is read from disk for a request
DEMO_FILES = {
    "/demo": ("demo/index.html", "text/html; charset=utf-8"),
    "/demo/index.html": ("demo/index.html", "text/html; charset=utf-8"),
    "/demo/till.js": ("demo/till.js", "text/javascript; charset=utf-8"),
    "/demo/cloudsync_client.mjs": ("cloudsync_client.mjs", "text/javascript; charset=utf-8"),
}
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
# Domain code raises these; only the HTTP section turns them into answers.
# Refused is every refusal a client gets: its `reason` names an entry of
# REFUSALS, the one catalogue of (HTTP status, `error`, when) from which both
# the answers and the error responses of the OpenAPI description are made.
#
# The taxonomy, by who must act:
#   the operator, before serving    ConfigError (a setting), SchemaError (a table; its
#                                   `fix`), ChangeCaptureError and Denied (a privilege):
#                                   one line and exit code 2 (_exit_code_of)
#   nobody: it passes               DatabaseUnavailable (503 with Retry-After; `lasting`:
#                                   the settings are wrong, exit 2 at start), and of it
#                                   Retryable (a lock wait), Deadlocked (undone at once),
#                                   SchemaMoved (the schema moved): run again first
#   the device, for one operation   DataRejected: the database refused a value (a key
#                                   taken, NOT NULL, the shop's rule); PushRejected ties it
#                                   to the operation, and becomes a Refused naming `op`
#   the device, for its request     Refused, the only one a client sees
# _GroupRejected and _BatchTaken never leave Pushes: a multi-row insert to redo row by
# row, and a twin push that committed first (answered as a replay).


class CloudsyncError(Exception):
    """Every error cloudsync raises on purpose (a connection that saw one is still good)."""


class ConfigError(CloudsyncError):
    """A configuration problem, told at start-up in one sentence."""


class SchemaError(CloudsyncError):
    """An allowed table that cannot be synced, with what fixes it (`fix`).

    Missing, no primary key, a key that cannot name a row, or a setting that
    names a column the table does not have.
    """

    def __init__(self, message, fix=None):
        super().__init__(message)
        self.fix = fix or TABLE_FIX


class ChangeCaptureError(CloudsyncError):
    """Triggers cannot be installed (usually: the database user lacks the privilege)."""


class DatabaseUnavailable(CloudsyncError):
    """The database is unreachable (refused, timed out, restarting), or refuses these settings."""

    def __init__(self, message, fix=None, lasting=False):
        super().__init__(message if fix is None else "%s; %s" % (message, fix))
        self.words = message            # what the database said
        self.fix = fix                  # what to do about it, when cloudsync knows
        # the settings are wrong (unknown database, wrong password): no retry helps
        self.lasting = lasting


class Retryable(DatabaseUnavailable):
    """A deadlock or lock timeout: the transaction was undone and may simply be run again."""


class Deadlocked(Retryable):
    """A deadlock, or a Galera cluster's certification failure or brute-force abort: undone at
    once, nothing waited, so running it again costs little (DEADLOCK_RETRIES)."""


class SchemaMoved(Retryable):
    """A statement met a table or column that is not there: the schema may have changed under it
    (SyncEngine.after_schema_moved decides whether to run it again)."""


class Denied(CloudsyncError):
    """The database user lacks a privilege cloudsync needs (to create its tables or triggers)."""


class DataRejected(CloudsyncError):
    """The database refused the pushed values (duplicate key, NOT NULL, a rule of the user's...)."""

    def __init__(self, message, duplicate=False, rule=False):
        super().__init__(message)
        self.duplicate = duplicate      # another row holds this key or unique value
        # a trigger of the user's refused it (SIGNAL, RAISE): message is theirs
        self.rule = rule


class Refused(CloudsyncError):
    """A request refused: `reason` is its REFUSALS entry, `detail` says exactly what was wrong."""

    def __init__(self, reason, detail, **fields):
        super().__init__(detail)
        if reason not in REFUSALS:
            raise KeyError("no refusal %r in REFUSALS" % reason)
        self.reason = reason
        self.detail = detail
        self.fields = fields            # more of the answer: op, conflicts, rejected, reset, status
        self.headers = []               # set by the HTTP section where the answer needs one (Allow)


class PushRejected(CloudsyncError):
    """The database refused one operation of a push (turned into a Refused naming the operation)."""

    def __init__(self, op, error):
        super().__init__(str(error))
        self.op = op
        self.error = error


class _GroupRejected(CloudsyncError):
    """A multi-row insert was refused; the push is redone row by row to name the operation."""


class _BatchTaken(CloudsyncError):
    """Another request with the same device and batch id committed first."""


# reason: (HTTP status, `error` as clients see it, when). The `error` texts are the original
# service's where it had one; they never change.
REFUSALS = {
    "invalid_json": (400, "Invalid JSON",
                     "the body is not JSON or not UTF-8, or an object names a field twice"),
    "invalid_request": (400, "Invalid request",
                        "a broken body: Content-Length not a number or not reached, gzip that is "
                        "not valid, cut short or followed by other bytes"),
    "invalid_payload": (400, "Invalid payload",
                        "the body is not an object, or a field has the wrong type"),
    "too_deep": (400, "Too deeply nested", "the body nests deeper than MAX_JSON_DEPTH"),
    "invalid_operation": (400, "Invalid operation",
                          "an operation is not an object or lacks table, action or data"),
    "invalid_table": (400, "Invalid table", "a table is not in ALLOWED_TABLES"),
    "invalid_action": (400, "Invalid action",
                       "an action is not insert, update, delete, upsert or increment"),
    "unknown_column": (400, "Unknown column", "a column is not in the table"),
    "missing_key": (400, "Missing key", "data lacks a primary-key column"),
    "invalid_value": (400, "Invalid value",
                      "a value its column cannot hold as it is (the detail names the operation "
                      "and column)"),
    "invalid_checkpoint": (400, "Invalid checkpoint",
                           "a checkpoint this server did not issue for this database and these "
                           "tables"),
    "invalid_limit": (400, "Invalid limit", "limit is not a whole number of at least 1"),
    "invalid_wait": (400, "Invalid wait",
                     "wait is not a number of seconds of at least 0, or comes without since"),
    "batch_id_required": (400, "Batch id required",
                          "an increment without batch_id: only a recorded batch makes a retried "
                          "increment safe"),
    "no_tables": (400, "No tables configured", "tables is [] or ALLOWED_TABLES is empty"),
    "data_refused": (400, "Sync failed",
                     "the database refused a value (NOT NULL, too long, foreign key, CHECK); op "
                     "names the operation"),
    "unauthorized": (401, "Unauthorized", "tokens are configured and the request has no valid one"),
    "forbidden": (403, "Forbidden", "device_id is not the token's device"),
    "read_only_table": (403, "Read-only table", "a push to a table in READ_ONLY_TABLES"),
    "table_not_permitted": (403, "Table not permitted",
                            "a table outside the token's tables, or a scoped table (ROW_SCOPES) "
                            "for whose column the token has no value"),
    "insert_only_table": (403, "Insert-only table",
                          "an update, upsert, increment or delete of a table in "
                          "INSERT_ONLY_TABLES; op names the operation"),
    "read_only_column": (403, "Read-only column",
                         "a push sets a column of READ_ONLY_COLUMNS; op and column name it"),
    "out_of_scope": (403, "Out of scope",
                     "an insert or update puts a row outside the token's scope values; op names "
                     "the operation"),
    "not_found": (404, "Not found", "no endpoint at this path"),
    "method_not_allowed": (405, "Method not allowed",
                           "the path does not take this method (see Allow)"),
    "duplicate": (409, "Sync failed",
                  "a row with that key or unique value exists with other values; op names the "
                  "operation"),
    "conflict": (409, "Conflict",
                 "with a checkpoint: operations touch rows changed since; conflicts lists them"),
    "batch_reused": (409, "Batch id reused",
                     "this device pushed a different batch under this batch_id"),
    "expired": (410, "Checkpoint expired",
                "the checkpoint is older than what compaction removed, or ahead of the log (a "
                "restored database), or a table's history broke (reset_tables names the tables "
                "to pull again); reset: true"),
    "too_large": (413, "Payload too large",
                  "the body, or the unpacked gzip body, is over MAX_BODY_BYTES"),
    "too_many_operations": (413, "Too many operations", "a push holds more than MAX_OPERATIONS"),
    "value_too_large": (413, "Value too large", "a text is over MAX_VALUE_BYTES"),
    "unsupported_encoding": (415, "Unsupported content encoding",
                             "Content-Encoding other than gzip or identity"),
    "rejected": (422, "Rejected",
                 "a rule of the database (a trigger's SIGNAL or RAISE) refused an operation; "
                 "rejected carries its message"),
    "push_failed": (500, "Sync failed", "the database failed; nothing was applied"),
    "pull_failed": (500, "Pull sync failed", "the database failed while reading"),
    "schema_problem": (500, "Schema problem",
                       "an allowed table disappeared or lost its primary key"),
    "internal": (500, "Internal server error",
                 "an unexpected error; the server log has the details"),
    "push_unavailable": (503, "Sync failed",
                         "the database is unreachable, or still locked after PUSH_RETRIES "
                         "retries; Retry-After"),
    "pull_unavailable": (503, "Pull sync failed", "the database is unreachable; Retry-After"),
    "database_unavailable": (503, "Database unavailable",
                             "the database is unreachable; Retry-After"),
}


# ---------------------------------------------------------------------------
# .env parser
# ---------------------------------------------------------------------------

_DOTENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_DOTENV_EXPAND = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ESCAPED_DOLLAR = "\x00"             # stands for \$ until ${VAR} expansion is done
_DOUBLE_QUOTE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\",
                         "$": _ESCAPED_DOLLAR, "'": "'"}


def _expand(value, known, environ):
    """Replace ${VAR} and ${VAR:-default}: the environment first, then earlier lines."""
    def substitute(match):
        name, default = match.group(1), match.group(2)
        found = environ.get(name, known.get(name))
        return found if found else (default or "")
    return _DOTENV_EXPAND.sub(substitute, value)


def parse_dotenv(text, environ=None):
    """Parse .env text into (values, problems); problems are (line_number, message)."""
    environ = os.environ if environ is None else environ
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    values, problems = {}, []
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index]
        index += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[7:].lstrip()
        match = _DOTENV_KEY.match(stripped)
        rest = stripped[match.end():].lstrip() if match else ""
        if not match or not rest.startswith("="):
            problems.append((number, "expected KEY=VALUE"))
            continue
        key, rest = match.group(0), rest[1:].lstrip()
        if rest[:1] in ("'", '"'):
            quote = rest[0]
            body, rest = rest[1:], None
            chars, escaped = [], False
            while rest is None:
                for position, char in enumerate(body):
                    if escaped:
                        if quote == '"':
                            chars.append(_DOUBLE_QUOTE_ESCAPES.get(char, "\\" + char))
                        else:
                            chars.append(char if char in "'\\" else "\\" + char)
                        escaped = False
                    elif char == "\\":
                        escaped = True
                    elif char == quote:
                        rest = body[position + 1:]
                        break
                    else:
                        chars.append(char)
                if rest is None:
                    if index >= len(lines):     # a quote that never closes
                        break
                    chars.append("\n")           # quoted values may span lines
                    body = lines[index]
                    index += 1
            if rest is None:
                problems.append((number, "unterminated %s quote"
                                 % ("double" if quote == '"' else "single")))
                index = number              # carry on with the next line, as python-dotenv does
                continue
            trailing = rest.strip()
            if trailing and not trailing.startswith("#"):
                problems.append((number, "unexpected text after the closing quote"))
                continue
            value = "".join(chars)
            if quote == '"':
                value = _expand(value, values, environ).replace(_ESCAPED_DOLLAR, "$")
        else:
            comment = re.search(r"\s#", rest)
            value = (rest[:comment.start()] if comment else rest).strip()
            if value.startswith("#"):
                value = ""
            value = _expand(value, values, environ)
        values[key] = value
    return values, problems


# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------
# One line a message on stderr, as text or JSON (LOG_FORMAT). Whatever a
# client sent is escaped before it reaches a log line, so a line break in an
# id or a path cannot forge an entry.


def _printable(text):
    """Text for a one-line log entry: control and other unprintable characters escaped."""
    return (text if text.isprintable()
            else text.encode("unicode_escape", "backslashreplace").decode("ascii"))


def _loggable(value, limit=200):
    """Anything a client sent, fit for a log line.

    Cut to `limit` characters, line breaks and controls escaped.
    """
    return _printable(str(value)[:limit])


class TextLogFormatter(logging.Formatter):
    """LOG_FORMAT=text: one line a message.

    A line break in a message (from anywhere) cannot start a fake entry.
    """

    def formatMessage(self, record):
        """The message with unprintable characters escaped."""
        record.message = _printable(record.message)
        return super().formatMessage(record)


class JSONLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object a line; access lines carry their fields as keys."""

    def format(self, record):
        """One JSON object: time, level, logger, message, and an access line's fields."""
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                 .isoformat(timespec="milliseconds"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(log_format, level):
    """Send every log line to stderr, as text or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONLogFormatter() if log_format == "json" else
                         TextLogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


access_log = logging.getLogger("cloudsync.access")


# ---------------------------------------------------------------------------
# Identifiers and values
# ---------------------------------------------------------------------------
# Identifiers reach SQL only through Column/TableSchema objects built from the
# database's own catalogue, quoted by doubling the quote character.
#
# Every value has one form on the wire, its *pulled form*: what a pull sends,
# and what a push of the same row sends back to leave the stored bytes as they
# are. Column.kind decides it:
#
#   integer, bit                 a number
#   decimal                      a string with the exact value ("12.50")
#   float                        a number; a value no JSON number can hold, stored
#                                by another program, as "Infinity", "-Infinity", "NaN"
#   date, datetime, timestamp,   MySQL: ISO 8601 ("2026-11-26T09:30:00.500000",
#   time                         "-00:00:00.500000"); SQLite: the stored text as it is
#   binary                       base64
#   set                          the members in the column's own order ("red,blue")
#   enum, text, json, other      a string
#
# A push is checked against the same kinds before any SQL runs (bind_value).

COLUMN_KINDS = ("integer", "bit", "decimal", "float", "date", "datetime", "timestamp", "time",
                "binary", "enum", "set", "text", "json", "other")
TEXT_KINDS = ("text", "enum", "set", "json", "other")
DATE_KINDS = ("date", "datetime", "timestamp", "time")
# rounding SQLite decimals of any size without overflow
_WIDE_CONTEXT = decimal.Context(prec=1000)


def quote_mysql(name):
    """Quote a MySQL identifier: `name` with backticks doubled."""
    return "`" + name.replace("`", "``") + "`"


def quote_sqlite(name):
    """Quote a SQLite identifier: "name" with double quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


class Column:
    """One column of an allowed table, as the database describes it."""

    __slots__ = ("name", "quoted", "select", "kind", "declared", "scale", "fsp", "members",
                 "generated", "octets", "pads", "max_code_point", "int_limit", "affinity",
                 "checks_decimals", "dates_as_text", "plain_text", "param", "default")

    def __init__(self, name, quoted, kind, declared="", scale=None, fsp=0, members=(),
                 generated=False, octets=None, pads=False, max_code_point=0x10FFFF,
                 int_limit=1 << 64, affinity=None, checks_decimals=False, dates_as_text=False,
                 select=None, param="?", default=None):
        self.name = name
        self.quoted = quoted
        # how a SELECT reads it (MySQL dates as text: zero dates survive)
        self.select = select or quoted
        self.kind = kind                    # one of COLUMN_KINDS
        self.declared = declared            # the type as the database states it, for status
        # digits after the point of a decimal; None: as many as stored
        self.scale = scale
        # MySQL: digits of a second kept by a datetime, timestamp or time
        self.fsp = fsp
        self.members = tuple(members)       # MySQL ENUM and SET: the members in the column's order
        self.generated = generated          # computed by the database: never written by a push
        self.octets = octets                # MySQL BINARY(n): the fixed length the database pads to
        self.pads = pads                    # MySQL CHAR: trailing spaces are not kept
        # utf8mb3 (MySQL "utf8") stores nothing beyond U+FFFF
        self.max_code_point = max_code_point
        self.int_limit = int_limit          # whole numbers must be below this (SQLite: 2**63)
        self.affinity = affinity            # SQLite: INTEGER, REAL, NUMERIC, TEXT or BLOB
        # SQLite: cloudsync rounds and range-checks decimals itself
        self.checks_decimals = checks_decimals
        self.dates_as_text = dates_as_text  # SQLite: dates and times are text, kept as sent
        # a string for this column may be bound as it is when it is plain ASCII
        self.plain_text = kind in TEXT_KINDS or dates_as_text and kind in DATE_KINDS
        # how a bound value stands in SQL that compares it with the column (MySQL decimals: as
        # exact decimals, not as the doubles text or an exponent would be compared as)
        self.param = param
        # (value,): the constant every row gets when the column is added, as a pull sends it;
        # None: no such constant (an expression, or NOT NULL without a default)
        self.default = default


class TableSchema:
    """An allowed table: its quoted name, columns in order, and primary key."""

    def __init__(self, name, quoted, columns, primary_key, generated_key=False):
        self.name = name
        self.generated_key = generated_key      # the database fills in the key when it is left out
        self.quoted = quoted
        self.columns = {column.name: column for column in columns}
        self.column_names = [column.name for column in columns]
        self.primary_key = list(primary_key)
        self.key_columns = [self.columns[name] for name in primary_key]
        self.select_list = ", ".join(column.select for column in columns)
        # about a row's size in a pull, in bytes: what a pull's byte budget counts (Pull)
        self.size_sql = " + ".join(["%d" % (ROW_OVERHEAD_BYTES * len(columns))] + [
            "COALESCE(LENGTH(%s), 0)" % column.quoted for column in columns])
        self.key_order = ", ".join(self.columns[name].quoted for name in primary_key)
        self.key_positions = [self.column_names.index(name) for name in primary_key]
        self.has_generated = any(column.generated for column in columns)
        # (position, function(value, column), column) turning stored values into pulled form
        self.decoders = []
        # MySQL: SQL writing a row as a JSON object, when every column allows it
        self.json_row = None
        # SQL writing the row key as the change log holds it (set by the backend)
        self.key_sql = None
        # MySQL: a foreign key cascade writes this table without firing triggers
        self.cascaded = False
        # the Column of ROW_SCOPES that says whose each row is, or None: every device's rows
        self.scope = None
        # SQLite: the column sets of its UNIQUE constraints besides the key (a REPLACE removes a
        # row holding one)
        self.unique = []

    def fingerprint(self):
        """A short value that changes when a column, type, key or scope of the table changes."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True)
                              .encode("utf-8")).hexdigest()[:16]

    def describe(self):
        """The table as the status endpoint shows it."""
        described = {"primary_key": self.primary_key, "columns": self.column_names,
                     "types": {column.name: column.declared for column in self.columns.values()}}
        if self.scope is not None:
            described["scope"] = self.scope.name
        return described


def parse_json(body):
    """Decode a request body; numbers with a fraction become exact Decimals."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refused("invalid_json",
                      "the body is not valid UTF-8 (byte %d)" % error.start) from None
    if not text.strip():
        return {}
    try:
        return json.loads(text, parse_float=decimal.Decimal, parse_constant=_reject_constant,
                          object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as error:
        raise Refused("invalid_json", "%s at line %d column %d"
                      % (error.msg, error.lineno, error.colno)) from None
    except _NotJSON as error:
        raise Refused("invalid_json", str(error)) from None
    except ValueError:
        # Python's own limit on the digits of a whole number (4300): no column holds one
        raise Refused("invalid_json", "a number in the body has thousands of digits; no column "
                      "holds it") from None
    except RecursionError:
        raise Refused("invalid_json", "the body is nested too deeply") from None


def _object_without_duplicates(pairs):
    """A JSON object; a name given twice is refused: which value counts is undefined (RFC 8259)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        twice = next(name for name, _ in pairs if name in seen or seen.add(name))
        raise _NotJSON("the name %s appears twice in one object" % json.dumps(twice)[:100])
    return result


def _reject_constant(name):
    """json.loads hook: NaN and Infinity are not JSON."""
    raise _NotJSON("%s is not valid JSON" % name)


class _NotJSON(ValueError):
    """What parse_json's hooks refuse, in words for the client."""


def to_json_bytes(payload):
    """Encode a response payload as compact UTF-8 JSON, always strict JSON (RFC 8259)."""
    try:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=_json_default,
                          allow_nan=False)
    except ValueError:              # Infinity or NaN another program stored in a float column
        text = json.dumps(_finite(payload), ensure_ascii=False, separators=(",", ":"),
                          default=_json_default, allow_nan=False)
    return text.encode("utf-8")


def _as_json_value(value):
    """A database value as a pull sends it: exact decimals and dates as strings, bytes as base64."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    return _json_default(value)


def _json_default(value):
    """Encode the database's non-JSON types: exact decimals, ISO dates, base64 bytes."""
    if isinstance(value, decimal.Decimal):
        return format(value, "f")       # as MySQL writes it: 0.0000000000, not 0E-10
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):        # MySQL TIME columns
        return _time_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    # a MySQL SET read without its column (decoders order it)
    if isinstance(value, (set, frozenset)):
        return ",".join(sorted(value))
    raise TypeError("cannot encode %s as JSON" % type(value).__name__)


def _time_text(value):
    """A MySQL TIME (a timedelta) in pulled form: [-]HH:MM:SS[.ffffff], hours beyond 24 kept."""
    micro = (value.days * 86400 + value.seconds) * 1000000 + value.microseconds
    sign = "-" if micro < 0 else ""
    seconds, fraction = divmod(abs(micro), 1000000)
    text = "%s%02d:%02d:%02d" % (sign, seconds // 3600, seconds // 60 % 60, seconds % 60)
    return text + (".%06d" % fraction if fraction else "")


def _finite(value):
    """A payload with every float JSON cannot hold (inf, nan) replaced by its name as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE.get(value, "NaN")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


_DEFAULT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def constant_default(column, text, nullable):
    """The default a catalogue states for `column` as (value in pulled form,), or None.

    `text` is the default as the catalogue writes it: NULL, a quoted string, a
    number; an expression (CURRENT_TIMESTAMP), a date or binary default, or NOT
    NULL without any default, is None: rows that get it cannot be told.
    """
    if text is None:
        return (None,) if nullable else None
    text = text.strip()
    if text.upper() == "NULL":
        return (None,)
    if len(text) >= 2 and text[0] == text[-1] == "'":
        value = text[1:-1].replace("''", "'")
    elif _DEFAULT_NUMBER.fullmatch(text):
        value = decimal.Decimal(text)
    else:
        return None
    try:
        if column.kind in ("integer", "bit"):
            number = decimal.Decimal(value)
            return (int(number),) if number == number.to_integral_value() else None
        if column.kind == "decimal":
            number = decimal.Decimal(value)
            if column.scale is not None:
                number = number.quantize(decimal.Decimal(1).scaleb(-column.scale),
                                         context=_WIDE_CONTEXT)
            return (format(number, "f"),)
        if column.kind == "float":
            return (float(decimal.Decimal(value)),)
        if column.kind in TEXT_KINDS:
            return (value if isinstance(value, str) else format(value, "f"),)
    except (ArithmeticError, ValueError):
        return None
    return None


def _json_type(value):
    """A JSON value's type as a client would name it: object, array, string..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _mysql_set(value, column):
    """A MySQL SET (the driver gives a Python set) as MySQL writes it: members in column order."""
    if isinstance(value, (set, frozenset)):
        order = {member.lower(): position for position, member in enumerate(column.members)}
        return ",".join(sorted(value, key=lambda member: order.get(member.lower(), len(order))))
    return value


def _sqlite_decimal(value, column):
    """A SQLite DECIMAL column's number as exact decimal text, with at least the column's scale."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value                         # text another program stored: shown as it is
    if isinstance(value, float):
        if not math.isfinite(value):
            return value                     # written by another program; to_json_bytes names it
        exact = decimal.Decimal(repr(value))
    else:
        exact = decimal.Decimal(value)
    if column.scale is not None and exact.as_tuple().exponent > -column.scale:
        exact = exact.quantize(decimal.Decimal(1).scaleb(-column.scale), context=_WIDE_CONTEXT)
    return format(exact, "f")


_NUMBER_TEXT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")    # a well-formed number
_TIME_TEXT = re.compile(r"\s*(-)?(\d+):(\d{1,2})(?::(\d{1,2})(?:\.(\d+))?)?\s*")


def _parse_date(value):
    """A pushed date ('2026-11-26', or the date part of a date and time)."""
    text = str(value).strip()
    return datetime.date.fromisoformat(text[:10] if len(text) > 10 and text[10] in " T" else text)


def _parse_datetime(value, fsp=6):
    """A pushed date and time, rounded as MySQL stores it.

    '2026-11-26 09:30:00', or with T, a fraction, an offset.
    """
    text = str(value).strip()
    moment = datetime.datetime.fromisoformat(text + "T00:00:00" if len(text) == 10 else text)
    # an offset: the instant in UTC, as cloudsync's sessions read it
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return moment + datetime.timedelta(
        microseconds=_rounded_micro(moment.microsecond, fsp) - moment.microsecond)


def _parse_time(value, fsp=6):
    """A pushed TIME ('-00:00:00.500', '838:59:59') as a timedelta, rounded as MySQL stores it."""
    found = _TIME_TEXT.fullmatch(str(value))
    if not found:
        raise ValueError("not a time")
    sign, hours, minutes, seconds, fraction = found.groups()
    whole = int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)
    micro = whole * 1000000 + _rounded_micro(int((fraction or "")[:6].ljust(6, "0")), fsp)
    return datetime.timedelta(microseconds=-micro if sign else micro)


def _rounded_micro(micro, fsp):
    """Microseconds rounded half up to fsp digits, as MySQL rounds fractional seconds."""
    quantum = 10 ** (6 - max(0, min(6, fsp)))
    return (micro + quantum // 2) // quantum * quantum


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------
# Devices present `Authorization: Bearer <token>` (presented_digest is the one
# reading of that header). A token is bound to one device id and optionally
# to a list of tables and to row scope values. Tokens are kept as given or,
# better, as "sha256:<hex>" of the token (what `cloudsync.py token add`
# writes); either way the presented token is compared in constant time. One
# format writes them, a line each: the tokens file, and the TOKENS setting
# (lines separated by ';').

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class DeviceToken:
    """A device's credential: device id, token's SHA-256, optional tables and scopes, its date."""

    __slots__ = ("device_id", "digest", "tables", "created", "scopes")

    def __init__(self, device_id, secret, tables=None, created=None, scopes=None):
        self.device_id = device_id
        if secret[:7].lower() == "sha256:":
            # a mistyped hash must not quietly become a plaintext token that nobody holds
            if not re.fullmatch(r"[0-9a-fA-F]{64}", secret[7:]):
                raise ValueError("the token of device %r is written as sha256: but is not followed "
                                 "by exactly 64 hex digits" % device_id)
            self.digest = bytes.fromhex(secret[7:])
        else:
            self.digest = hashlib.sha256(secret.encode("utf-8")).digest()
        self.tables = None if tables is None else tuple(tables)      # None: every allowed table
        self.created = created              # "2026-12-01T09:30:00Z" for tokens `token add` made
        # {scope column: values}, e.g. {"store_id": ("7", "8")}; ("*",) is every row (Row scopes)
        self.scopes = dict(scopes or {})

    def __str__(self):
        return "%s:***" % self.device_id

    def matches(self, presented_digest):
        """Constant-time comparison of the SHA-256 of a presented token."""
        return hmac.compare_digest(self.digest, presented_digest)

    def scope_text(self):
        """The token's scopes as `token list` and the devices view show them: store_id=7,8."""
        return " ".join("%s=%s" % (column, ",".join(values))
                        for column, values in sorted(self.scopes.items()))


def parse_scope(text, where):
    """(column, values) of a scope written COLUMN=V[,V...], or COLUMN=* for every row.

    ValueError naming `where` when it is not one.
    """
    column, equals, listed = text.partition("=")
    values = tuple(value.strip() for value in listed.split(","))
    if not equals or not re.fullmatch(r"[^\s=#,.]{1,64}", column.strip()) \
            or not all(values) or len(set(values)) != len(values) \
            or any(len(value) > MAX_SCOPE_VALUE_CHARS or re.search(r"[\s#|;]", value)
                   for value in values):
        raise ValueError("%s: %r is not a scope; write COLUMN=VALUE[,VALUE...] (store_id=7,8), "
                         "each value at most %d characters without spaces, '#', '|' or ';', or "
                         "COLUMN=* for every row" % (where, text, MAX_SCOPE_VALUE_CHARS))
    if SCOPE_ALL in values and len(values) > 1:
        raise ValueError("%s: %r mixes * (every row) with values; give one or the other"
                         % (where, text))
    return column.strip(), values


def hash_token(token):
    """The form to store: 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


TOKEN_LINE = "device_id sha256:HEX [tables=a,b] [scope.COLUMN=V,V ...] [created=TIME]"
# the comment line `token remove` leaves: "# removed DEVICE_ID TIME" (token list and devices show it)
REMOVED_MARK = "# removed"


def read_tokens_file(path):
    """DeviceTokens from a tokens file; a bad line is a ConfigError naming it."""
    return [token for _, token in _tokens_file(path) if token is not None]


def parse_tokens(text, where="TOKENS"):
    """DeviceTokens from the TOKENS setting: tokens-file lines, separated by newlines or ';'."""
    entries = [entry.strip() for entry in re.split(r"[;\n]", text or "")]
    return [_token_of_line(entry, "%s entry %d" % (where, number))
            for number, entry in enumerate(entries, 1) if entry and not entry.startswith("#")]


def _tokens_file(path):
    """(line, DeviceToken or None) per line of a tokens file: comments and blank lines get None."""
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("cannot read tokens file %s: %s." % (path, error)) from None
    return [(line, _token_of_line(line, "%s line %d" % (path, number))
             if line.split("#", 1)[0].strip() else None)
            for number, line in enumerate(lines, 1)]


def _token_of_line(line, where):
    """The DeviceToken a line of the tokens-file format gives; ConfigError naming `where`.

    The one token format: the tokens file and TOKENS both write it.
    """
    fields = line.split("#", 1)[0].split()
    if len(fields) < 2:
        raise ConfigError("%s: expected '%s'." % (where, TOKEN_LINE))
    options, scopes = {}, {}
    for field in fields[2:]:
        name, equals, value = field.partition("=")
        if name.startswith("scope.") and equals:
            try:
                column, values = parse_scope(field[len("scope."):], where)
            except ValueError as error:
                raise ConfigError("%s." % error) from None
            if column in scopes:
                raise ConfigError("%s: scope.%s is given twice." % (where, column))
            scopes[column] = values
            continue
        if not equals or name not in ("tables", "created") or name in options:
            raise ConfigError("%s: %r is not one of tables=a,b, scope.COLUMN=V,V or "
                              "created=TIME ('%s')." % (where, field, TOKEN_LINE))
        options[name] = value
    tables = None
    if "tables" in options:
        tables = [name for name in options["tables"].split(",") if name]
        if not tables:
            raise ConfigError("%s: tables= names no table; list the tables the device may sync, "
                              "or leave tables= out to allow every table." % where)
    try:
        return DeviceToken(fields[0], fields[1], tables, options.get("created"), scopes)
    except ValueError as error:
        raise ConfigError("%s: %s." % (where, error)) from None


def _token_line(device_id, tables, scopes=None):
    """A new token for device_id, and its tokens-file line (only the hash is kept)."""
    if not re.fullmatch(r"[^\s#]{1,%d}" % MAX_ID_CHARS, device_id):
        raise ConfigError("a device id is 1 to %d characters without spaces or '#'." % MAX_ID_CHARS)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    scoped = "".join(" scope.%s=%s" % (column, ",".join(values))
                     for column, values in sorted((scopes or {}).items()))
    return token, "%s %s%s%s created=%s" % (device_id, hash_token(token),
                                            " tables=" + ",".join(tables) if tables else "",
                                            scoped, created)


def _rewrite_tokens_file(path, lines):
    """Replace the tokens file at once, readable by its owner only.

    A running server never reads half of it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=".cloudsync-tokens-", dir=folder)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def removed_devices(path):
    """{device id: when its token was removed} from the tokens file's removal marks."""
    removed = {}
    for line, token in _tokens_file(path):
        fields = line.split()
        if token is None and line.startswith(REMOVED_MARK + " ") and len(fields) >= 4:
            removed[fields[2]] = fields[3]
    return removed


def _without_removal_mark(entries, device_id):
    """The tokens file's (line, token) entries, less the removal mark of device_id."""
    return [(text, token) for text, token in entries
            if token is not None or text.split()[:3] != REMOVED_MARK.split() + [device_id]]


def add_token(path, device_id, tables=None, scopes=None):
    """Make a token for a device that has none, store only its hash in `path`, return the token."""
    entries = _tokens_file(path)
    if any(token is not None and token.device_id == device_id for _, token in entries):
        raise ConfigError("device %s already has a token; `token rotate %s` replaces it (the old "
                          "one stops working), `token remove %s` takes it away."
                          % (device_id, device_id, device_id))
    token, line = _token_line(device_id, tables, scopes)
    # it has a token again: no longer removed
    _rewrite_tokens_file(path, [text for text, _ in _without_removal_mark(entries, device_id)]
                         + [line])
    return token


def rotate_token(path, device_id, tables=None, scopes=None):
    """Give a device a new token (its tables and scopes kept unless given); return it."""
    entries = _tokens_file(path)
    found = [token for _, token in entries if token is not None and token.device_id == device_id]
    if not found:
        raise ConfigError("device %s has no token in %s; `token add %s` makes one."
                          % (device_id, path, device_id))
    token, line = _token_line(device_id, tables if tables is not None else found[0].tables,
                              scopes if scopes is not None else found[0].scopes)
    lines = [text for text, entry in entries if entry is None or entry.device_id != device_id]
    _rewrite_tokens_file(path, lines + [line])
    return token


def remove_token(path, device_id):
    """Take a device's token away (a lost scanner): the next request with it is refused.

    A comment line marks the device removed, with the time, for `token list` and `devices`.
    """
    entries = _tokens_file(path)
    if not any(token is not None and token.device_id == device_id for _, token in entries):
        raise ConfigError("device %s has no token in %s." % (device_id, path))
    removed = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    _rewrite_tokens_file(path, [text for text, token in _without_removal_mark(entries, device_id)
                                if token is None or token.device_id != device_id]
                         + ["%s %s %s" % (REMOVED_MARK, device_id, removed)])


def presented_digest(request):
    """The SHA-256 of the bearer token a request shows, or None.

    The one place the Authorization header is read.
    """
    scheme, _, presented = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    return hashlib.sha256(presented.strip().encode("utf-8", "replace")).digest()


def _by_digest(tokens):
    """{a token's SHA-256: the token} (of tokens written twice, the last, as the file reads)."""
    return {token.digest: token for token in tokens}


class Authenticator:
    """Who may call /sync*: a device with a valid token, or anyone when no token is configured.

    The tokens file is read again when it changes (the server looks every
    second, and at once on SIGHUP), so `token add`, `rotate` and `remove`
    take effect on a running server. A file that no longer reads keeps the
    tokens in force, and says why in the log.
    """

    def __init__(self, config):
        self.config = config
        self._file_state = self._file_stat()
        self.tokens = self._load()
        self._by_digest = _by_digest(self.tokens)
        # once tokens guard the server, an emptied file does not open it: every request gets 401
        self._started_required = bool(self.tokens)
        self.required = self._started_required
        if config.row_scopes and not self.tokens:
            raise ConfigError("ROW_SCOPES is set, but no device token is configured: a scope "
                              "belongs to a device's token (cloudsync.py token add DEVICE "
                              "--scope %s=VALUE)" % config.row_scopes[0][1])
        if config.auth == "auto" and not self.required and config.host not in LOOPBACK_HOSTS:
            raise ConfigError("HOST=%s is not a loopback address and no device tokens are "
                              "configured; add tokens (cloudsync.py token add DEVICE) or set "
                              "AUTH=off to run without authentication." % config.host)

    def _load(self):
        """Read TOKENS and the tokens file into the tokens in force."""
        tokens = list(self.config.tokens) + read_tokens_file(self.config.tokens_file)
        allowed = set(self.config.allowed_tables)
        for token in tokens:
            unknown = sorted(set(token.tables or ()) - allowed)
            if unknown:
                # a table taken out of ALLOWED_TABLES: the token keeps the others (the table is
                # out of reach anyway)
                log.warning("the token of device %s names %s, which %s not in ALLOWED_TABLES: "
                            "ignored for it; `token rotate %s --tables ...` or an edit of %s "
                            "makes it go", token.device_id, ", ".join(unknown),
                            "is" if len(unknown) == 1 else "are", token.device_id,
                            self.config.tokens_file or "TOKENS")
                token.tables = tuple(table for table in token.tables if table in allowed)
        if self.config.auth == "off" and tokens:
            raise ConfigError("AUTH=off, but device tokens are configured; remove the tokens or "
                              "AUTH=off.")
        return tokens

    def _file_stat(self):
        """What tells the tokens file changed: mtime, inode and size, or None when absent."""
        try:
            status = os.stat(self.config.tokens_file) if self.config.tokens_file else None
        except OSError:
            return None
        return status and (status.st_ino, status.st_mtime_ns, status.st_size)

    def reload(self, force=False):
        """Reread the tokens file if it changed (or when forced); True when the tokens changed."""
        state = self._file_stat()
        if state == self._file_state and not force:
            return False
        self._file_state = state
        try:
            tokens = self._load()
        except ConfigError as error:
            log.error("tokens file not reloaded, the tokens in force stay: %s", error)
            return False
        # one assignment each: a request finds its token in the old tokens or in the new ones
        self._by_digest = _by_digest(tokens)
        self.tokens = tokens
        self.required = self._started_required or bool(tokens)
        log.info("tokens reloaded: %d device token(s)", len(tokens))
        return True

    def identify(self, request, monitors=()):
        """The DeviceToken of the request.

        None when no token is needed or a monitoring token was shown; else
        Refused("unauthorized").
        """
        if not self.required and not any(monitors):
            return None
        digest = presented_digest(request)
        if digest is None:
            if not self.required:
                return None
            self._refuse(request, "send the header Authorization: Bearer <token>")
        # by the SHA-256 of what was presented: how long the lookup takes depends on that digest,
        # which tells nothing of any token held (one comparison per token took milliseconds
        # with a chain's 500 tills)
        found = self._by_digest.get(digest)
        if found is None \
                and not any([token.matches(digest) for token in monitors if token is not None]) \
                and self.required:
            self._refuse(request, "the token is not valid")
        return found

    def require(self, request, *accepted, names=("ADMIN_TOKEN",)):
        """Refused("unauthorized") unless the request has an `accepted` token (admin, metrics).

        `names`: the settings that would turn the endpoint on, for the refusal's words.
        """
        configured = [token for token in accepted if token is not None]
        digest = presented_digest(request)
        if digest is None or not any([token.matches(digest) for token in configured]):
            self._refuse(request, "this endpoint needs its own token (ADMIN_TOKEN or METRICS_TOKEN)"
                         if configured else "this endpoint is off: set %s to use it"
                         % " or ".join(names))

    def _refuse(self, request, detail):
        """Count and log a failed authentication; raise Refused("unauthorized")."""
        log.warning("auth failure from %s on %s: %s",
                    _loggable(request.environ.get("REMOTE_ADDR", "?")),
                    _loggable(request.path, 100), detail)
        request.auth_failed = True
        raise Refused("unauthorized", detail)


# ---------------------------------------------------------------------------
# Grants: what one request may read and write
# ---------------------------------------------------------------------------
# Access is a value. The HTTP section builds one Grant per request from its
# token (SyncEngine.grant_for keeps one per token and schema) and hands it to
# everything that reads or writes a synced table, as PostgreSQL attaches a
# row-level policy once and its executor applies it to every query. A Grant
# holds, for each table the request may see, a TableGrant: the schema,
# whether devices may write it, whether only insert, the columns pushes may
# not set, and the rows it may touch (a TableScope, or EVERY_ROW). A table
# the grant does not hold does not exist for the request: a device limited to
# some tables gets the same 403 for another allowed table as for a name that
# is no table at all, before anything about the table is looked at.
# Grant.decide is the one function deciding whether a push operation may
# happen; it judges the row as it will be after the operation.
#
# Row scopes. ROW_SCOPES names, for some tables, the column that says whose a
# row is (sales.store_id); a token carries the values its device may see
# (store_id=7,8, or * for every row). A device reads and writes only the rows
# whose scope column holds one of its values: every statement a push or pull
# sends for it carries the condition (TableScope). The triggers log each
# change with the row's scope value, indexed by (table, scope, seq), so a
# sync pull reads only its own stores' entries, however busy the others. An
# update that moves a row to another store logs it under the old store too:
# the old store's devices then look the row up, do not find it in their
# scope, and get it as deleted; the new store's get it as upserted. A device
# is never sent a key that was not in its scope when it was logged. Its
# checkpoints carry a fingerprint of its scope ("c"): when the token's values
# change, the next pull from an old checkpoint answers 410 with reset: true.

# The push actions a grant may allow. action: (the method of Pushes that applies it, what the
# log records when it changed a row)
ACTIONS = {
    "insert": ("_insert_one", "I"),
    "update": ("_update", "U"),
    "delete": ("_delete", "D"),
    "upsert": ("_upsert", "U"),
    # adds to numeric columns in the database: never a conflict, needs a batch_id
    "increment": ("_increment", "U"),
}
NUMBER_KINDS = ("integer", "decimal", "float")        # what an increment may add to


class _EveryRow:
    """The scope of a table a device sees whole, or of an operator's read: no condition at all."""

    __slots__ = ()
    where = None
    params = ()
    texts = None

    @staticmethod
    def holds(value):
        """Every row is in it."""
        return True

    def __repr__(self):
        return "EVERY_ROW"


# Named wherever a statement reads or writes every row of a table: an unscoped device's grant,
# and the operator's commands. A builder never takes it as the default of a missing argument.
EVERY_ROW = _EveryRow()


# the column kinds a scope column may have: their values are written the same in the log and tokens
SCOPE_KINDS = ("integer", "text", "enum")


class TableScope:
    """One device's scope on one table: the column, its values, and the condition to add."""

    __slots__ = ("column", "values", "texts", "where", "params")

    def __init__(self, db, column, texts):
        self.column = column
        if column.kind == "integer":
            # "07" is store 7; a value that is no number matches no row
            texts = [str(int(text)) for text in texts if re.fullmatch(r"-?[0-9]{1,19}", text)]
            self.values = [int(text) for text in texts]
        else:
            self.values = list(texts)
        self.texts = tuple(dict.fromkeys(texts))     # as the log writes them
        self.where, self.params = db.scope_where(column, self.values)

    def holds(self, value):
        """Whether a bound value of the scope column is one of the device's, byte for byte."""
        return value is not None and not isinstance(value, (bytes, bytearray, float)) \
            and _scope_text(value) in self.texts


def _scope_text(value):
    """A scope column's value as the log writes it: 7 -> '7'."""
    if isinstance(value, decimal.Decimal) and value == value.to_integral_value():
        return str(int(value))
    return str(value)


class TableGrant:
    """What a request may do with one table: its rows (scope), writing, actions, columns."""

    __slots__ = ("schema", "scope", "writable", "insert_only", "read_only_columns")

    def __init__(self, schema, scope, writable=True, insert_only=False, read_only_columns=()):
        self.schema = schema
        self.scope = scope                  # a TableScope, or EVERY_ROW
        self.writable = writable            # not in READ_ONLY_TABLES
        self.insert_only = insert_only      # in INSERT_ONLY_TABLES
        self.read_only_columns = frozenset(read_only_columns)

    def actions(self):
        """The push actions the grant allows on the table, as /sync/status tells a device."""
        if not self.writable:
            return []
        return ["insert"] if self.insert_only else list(ACTIONS)

    def rules(self):
        """The table's rules as /sync/status shows them to the device they apply to."""
        return {"read_only": not self.writable, "insert_only": self.insert_only,
                "read_only_columns": sorted(self.read_only_columns), "actions": self.actions()}


class Grant:
    """One request's access: its device and, for each table it may see, a TableGrant."""

    __slots__ = ("device_id", "tables", "limited", "scopes", "described")

    def __init__(self, device_id, tables, limited, scopes=None):
        self.device_id = device_id
        self.tables = tables                # {table: TableGrant}, in ALLOWED_TABLES order
        # some allowed table is out of reach: its name is answered like a name that is no table
        self.limited = limited
        self.scopes = scopes                # {column: values} of the token, for /sync/status
        # /sync/status's answer but for the database's figures, encoded once: a grant is made
        # again whenever the tables' schemas change (SyncEngine.grant_for)
        self.described = None

    @property
    def visible(self):
        """The tables the request may use, in ALLOWED_TABLES order."""
        return list(self.tables)

    @property
    def scoped(self):
        """Whether some table is narrowed to the rows of a scope."""
        return any(granted.scope.where is not None for granted in self.tables.values())

    def table(self, name, where):
        """The TableGrant of a table a request names; else Refused, before anything else is read.

        A device limited to some tables cannot tell an allowed table it may
        not use from a name that is no table: both are 403.
        """
        granted = self.tables.get(name) if isinstance(name, str) else None
        if granted is not None:
            return granted
        shown = json.dumps(name, default=str)[:100]
        if self.limited:
            raise Refused("table_not_permitted", "%s: this device may not use table %s"
                          % (where, shown))
        raise Refused("invalid_table", "%s: table %s is not in ALLOWED_TABLES" % (where, shown))

    def scope(self, table):
        """The rows of `table` the request may see: its TableScope, or EVERY_ROW."""
        return self.tables[table].scope

    def fingerprint(self, tables):
        """A short value naming the rows of `tables` the request sees; None when all of them.

        It goes into checkpoints ("c") and the seed cache's key.
        """
        limited = [(table, self.tables[table].scope.column.name,
                    sorted(self.tables[table].scope.texts))
                   for table in tables if self.tables[table].scope.where is not None]
        if not limited:
            return None
        return hashlib.sha256(json.dumps(limited).encode("utf-8")).hexdigest()[:12]

    def decide(self, op):
        """The one place a push operation is allowed or refused (Refused naming it).

        Judged on the row as it will be after the operation, by each check of
        DECISIONS in turn; the operation then carries its table's scope, which
        every statement it sends adds to its WHERE.
        """
        granted = self.tables[op.table.name]
        for check in DECISIONS:
            check(granted, op)
        op.scope = granted.scope


def _may_write(granted, op):
    """A table devices may only pull (READ_ONLY_TABLES) takes no push."""
    if not granted.writable:
        raise Refused("read_only_table", "operation %d: devices may pull %s but not push to it"
                      % (op.index, op.table.name), op=op.index)


def _may_do(granted, op):
    """An insert-only table (a ledger) takes inserts only."""
    if granted.insert_only and op.action != "insert":
        raise Refused("insert_only_table", "operation %d: %s is insert-only (a ledger); devices "
                      "may add rows to it, not %s them" % (op.index, op.table.name, op.action),
                      op=op.index)


def _may_set(granted, op):
    """No operation but a delete (which may carry the whole row) sets a read-only column."""
    if granted.read_only_columns and op.action != "delete":
        fixed = [name for name in op.sent if name in granted.read_only_columns]
        if fixed:
            raise Refused("read_only_column", "operation %d: column %s of %s is read-only; leave "
                          "it out (an insert gets the database's default)"
                          % (op.index, fixed[0], op.table.name), op=op.index, column=fixed[0])


def _stays_in_scope(granted, op):
    """The row after the operation is in the device's scope.

    An insert or upsert names its scope value (or gets the token's only one);
    an update that sets the scope column keeps it inside; an increment may not
    add to it (the sum is not known before it runs). An update, increment or
    delete finds only rows of the scope: its WHERE carries the scope.
    """
    scope = granted.scope
    if scope.where is None or op.action == "delete":
        return
    name = scope.column.name
    where = "operation %d (%s on %s)" % (op.index, op.action, op.table.name)
    if op.action == "increment":
        if name in op.values and name not in op.table.primary_key:
            raise Refused("out_of_scope", "%s: an increment may not add to %s, which says whose "
                          "the row is" % (where, name), op=op.index)
    elif name in op.values:
        if op.action == "update" and name in op.table.primary_key:
            return                          # the key names the row; the scope finds it or not
        if not scope.holds(op.values[name]):
            raise Refused("out_of_scope", "%s: %s %s is outside this device's scope (%s)"
                          % (where, name, json.dumps(op.sent.get(name), default=str)[:100],
                             ", ".join(scope.texts) or "none"), op=op.index)
    elif op.action in ("insert", "upsert"):
        if len(scope.values) != 1:
            raise Refused("out_of_scope", "%s: data must include %s, one of this device's values "
                          "(%s)" % (where, name, ", ".join(scope.texts)), op=op.index)
        op.values[name] = scope.values[0]


# Grant.decide runs these, in this order; each refuses an operation on its own ground.
DECISIONS = (_may_write, _may_do, _may_set, _stays_in_scope)


# ---------------------------------------------------------------------------
# Binding: client values as their column's type
# ---------------------------------------------------------------------------
# The one place a value a client sent becomes a value for SQL: bind_value
# turns it into its column's type (COLUMN_KINDS, under Identifiers and
# values) or refuses it with 400 Invalid value naming the operation and the
# column, and key_problem refuses a key the database would store as another
# value. Nothing a client sent is left for the database to coerce.


def _invalid(where, column, text):
    """Refused("invalid_value") naming the operation and the column."""
    return Refused("invalid_value", "%s: %s" % (where, text % repr(column.name)))


def bind_value(column, value, where):
    """Turn a pushed JSON value into `column`'s type, to bind; or raise Refused naming the column.

    The one place a client's value becomes a value for SQL. Nothing the
    database would silently turn into another value gets through (a fraction
    for a whole-number column, a number for a date, a float no double holds,
    text a utf8mb3 column cannot store, binary not in base64), and nothing is
    left for the database to coerce when it compares: a number for a text
    column becomes its text (MySQL would compare 'abc' = 0 as numbers, and
    match), a decimal becomes its exact text (compared through Column.param),
    a date must be a date.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str):
        if not value.isascii():
            _check_text(column, value, where)
    elif not isinstance(value, (int, decimal.Decimal)):
        raise Refused("invalid_value", "%s: column %r must be a string, number, "
                        "boolean or null, not %s" % (where, column.name, _json_type(value)))
    kind = column.kind
    if kind == "binary":
        if not isinstance(value, str):
            raise _invalid(where, column, "column %s holds binary data, send it as base64")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(where, column,
                           "column %s holds binary data, send it as base64") from None
    if kind == "float":
        try:
            number = decimal.Decimal(value.strip() if isinstance(value, str) else value)
        except decimal.InvalidOperation:
            raise _invalid(where, column, "column %s holds a number") from None
        return _checked_float(column, number, where)
    if kind in ("integer", "bit"):
        return _checked_whole(column, value, where)
    if column.checks_decimals:
        return _checked_decimal(column, value, where)
    if kind == "decimal":
        return _checked_exact(column, value, where)
    if kind in DATE_KINDS and not column.dates_as_text:
        return _checked_moment(column, value, where)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not -(1 << 63) <= value < column.int_limit \
            or isinstance(value, decimal.Decimal) \
            and (not value.is_finite() or abs(value.adjusted()) > MAX_DECIMAL_EXPONENT):
        raise _invalid(where, column, "the number for column %s is out of range")
    if column.affinity in (None, "TEXT"):
        return str(value)                   # a text column (MySQL: any column kept as text)
    return value                            # SQLite without a type: kept as sent


def _check_text(column, value, where):
    """A text value the column can hold: length, code points, ENUM and SET members."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(where, column, "the text for column %s is not valid Unicode (a lone "
                       "surrogate)") from None
    if column.max_code_point < 0x10FFFF and max(map(ord, value)) > column.max_code_point:
        raise _invalid(where, column, "column %s uses the utf8mb3 character set, which cannot "
                       "store characters beyond U+FFFF (emoji and some CJK); convert the column "
                       "to utf8mb4")


_WHOLE_NUMBER_TEXT = re.compile(r"\s*[+-]?[0-9]{1,%d}\s*" % MAX_INTEGER_DIGITS)
_UTC_OFFSET = re.compile(r"(Z|[+-][0-9]{2}:?[0-9]{2})\s*$")
# a MySQL date, or date and time, as ISO 8601 writes it (zero dates too: 0000-00-00)
_DATE_TIME_TEXT = re.compile(r"\s*[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([ T][0-9]{1,2}:[0-9]{1,2}"
                             r"(:[0-9]{1,2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:?[0-9]{2})?)?\s*")


def _checked_whole(column, value, where):
    """A whole-number column: a whole number in range, as a number or text.

    A fraction is refused, not rounded.
    """
    if isinstance(value, str):
        if not _WHOLE_NUMBER_TEXT.fullmatch(value):
            raise _invalid(where, column, "column %s holds whole numbers")
        value = int(value)
    elif isinstance(value, decimal.Decimal):
        if not value.is_finite() or abs(value.adjusted()) > MAX_INTEGER_DIGITS:
            raise _invalid(where, column, "the number for column %s is out of range")
        if value != value.to_integral_value():
            raise _invalid(where, column, "column %s holds whole numbers")
        value = int(value)
    if not -(1 << 63) <= value < column.int_limit:
        raise _invalid(where, column, "the number for column %s is out of range")
    return value


def _checked_exact(column, value, where):
    """A MySQL DECIMAL: the exact number as plain text ("1000", never "1E+3", which MySQL reads as
    a double)."""
    if isinstance(value, str):
        if not _NUMBER_TEXT.fullmatch(value):
            raise _invalid(where, column, "column %s holds a decimal number")
        value = decimal.Decimal(value.strip())
    number = decimal.Decimal(value)
    if not number.is_finite() or abs(number.adjusted()) > MAX_DECIMAL_EXPONENT:
        raise _invalid(where, column, "the number for column %s is out of range")
    return format(number, "f")


def _checked_moment(column, value, where):
    """A MySQL date or time, as text (a number would be read as YYYYMMDD or HHMMSS).

    An offset becomes UTC.
    """
    shape = _TIME_TEXT if column.kind == "time" else _DATE_TIME_TEXT
    if not isinstance(value, str) or not shape.fullmatch(value):
        # MySQL compares a date column with text it cannot read as a zero date: 'x' = '0000-00-00'
        raise _invalid(where, column, "column %%s holds a %s: send it as text (%s)" % (
            column.kind, "'09:30:00'" if column.kind == "time" else "'2026-11-26 09:30:00'"))
    if column.kind in ("datetime", "timestamp") and _UTC_OFFSET.search(value):
        # what JavaScript's toISOString sends ("...Z"): the instant in UTC, as cloudsync's
        # sessions read it
        try:
            moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise _invalid(where, column,
                           "column %s holds a date and time; this is not one") from None
        return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None).isoformat()
    return value


def key_problem(column, value, sent=None):
    """Why a pushed key value would be stored as another value, or None.

    Stored so, the key could not name its row again. `value` is the bound
    value; `sent`, the one the client sent (a SQLite decimal is bound rounded).
    """
    try:
        if column.octets and isinstance(value, (bytes, bytearray)) and len(value) != column.octets:
            return ("column %r is BINARY(%d): a key of %d bytes would be stored padded with zero "
                    "bytes, as another key; send exactly %d bytes"
                    % (column.name, column.octets, len(value), column.octets))
        if column.kind == "decimal" and column.scale is not None:
            number = decimal.Decimal(str(value if sent is None else sent).strip())
            if number != number.quantize(decimal.Decimal(1).scaleb(-column.scale),
                                         context=_WIDE_CONTEXT):
                return ("column %r keeps %d decimals: this key would be stored rounded, as "
                        "another key" % (column.name, column.scale))
        if column.kind in ("datetime", "timestamp", "time") and not column.dates_as_text:
            fraction = re.search(r"[0-9]:[0-9]{2}\.([0-9]+)", str(value))
            if fraction and fraction.group(1)[column.fsp:].strip("0"):
                return ("column %r keeps %d digits of a second: this key would be stored cut, as "
                        "another key" % (column.name, column.fsp))
    except (ArithmeticError, ValueError):
        # not a value of the column's type: the database refuses it
        return None
    return None


def _checked_float(column, number, where):
    """A float column: the nearest double; refused when no double holds it (1e400, 1e-400)."""
    if not number.is_finite() or abs(number.adjusted()) > MAX_FLOAT_EXPONENT + 20:
        raise _invalid(where, column, "the number for column %s is out of range")
    value = float(number)
    if not math.isfinite(value) or (value == 0 and number != 0):
        raise _invalid(where, column, "the number for column %s is out of range")
    return value


def _checked_decimal(column, value, where):
    """SQLite DECIMAL(p,s): round half up to s places like MySQL; refuse what a REAL cannot keep."""
    try:
        number = decimal.Decimal(value.strip() if isinstance(value, str) else value)
    except (decimal.InvalidOperation, ValueError):
        raise _invalid(where, column, "column %s holds a decimal number") from None
    if not number.is_finite() or abs(number.adjusted()) > MAX_FLOAT_EXPONENT:
        raise _invalid(where, column, "the number for column %s is out of range")
    try:
        if column.scale is not None:
            number = number.quantize(decimal.Decimal(1).scaleb(-column.scale),
                                     rounding=decimal.ROUND_HALF_UP, context=_WIDE_CONTEXT)
    except (decimal.InvalidOperation, ValueError):
        raise _invalid(where, column, "column %s holds a decimal number") from None
    if len(number.normalize(_WIDE_CONTEXT).as_tuple().digits) > SQLITE_EXACT_DIGITS:
        raise Refused("invalid_value", "%s: %s has more digits than SQLite keeps exactly (%d); use "
                        "MySQL/MariaDB for such amounts" % (where, number, SQLITE_EXACT_DIGITS))
    return number


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
# A checkpoint is opaque to devices: "cs1.<payload>.<mac>", the payload being
# base64url JSON of these fields:
#   db    this database's instance id
#   t     the tables it was issued for, in order
#   s     the sequence number of the log it covers
#   scan  during a first sync or a table's new start: [table position, last key]
#   r     the tables being pulled again from their start (410 reset_tables), if any
#   f     per table, a fingerprint of the columns the device holds: after an
#         ALTER TABLE it learns an added column (added_columns) or pulls the
#         table again
#   a     per table, the log position from which the device's copy of it is
#         whole: a table whose history broke later (re-created, swapped,
#         truncated: its epoch), or whose entries after it were compacted away,
#         is pulled again on its own
#   c     with row scopes, a fingerprint of the device's scope
#   x     the push id of a push's own changes, which the device holds
# The HMAC (key in cloudsync_meta) makes a forged or altered checkpoint a 400,
# not a wrong answer. A checkpoint is signed, not encrypted: its numbers are
# readable (docs/security.md says what a device can learn from them).


class Checkpoints:
    """Encode and verify checkpoints for one database."""

    def __init__(self, changelog):
        self.changelog = changelog

    def encode(self, fields):
        """A checkpoint string of `fields` (those above; db is added, empty ones left out)."""
        fields = dict({name: value for name, value in fields.items()
                       if value is not None and name != "db"}, db=self.changelog.instance)
        fields.setdefault("scan", None)
        payload = base64.urlsafe_b64encode(json.dumps(
            fields, separators=(",", ":"), default=_json_default).encode("utf-8")).rstrip(b"=")
        return CHECKPOINT_PREFIX + payload.decode("ascii") + "." \
            + self._mac(payload).decode("ascii")

    def decode(self, text):
        """The checkpoint's fields, or Refused("invalid_checkpoint").

        Refused when it is malformed, altered or from another database.
        """
        if not isinstance(text, str) or not text.startswith(CHECKPOINT_PREFIX) \
                or text.count(".") != 2:
            raise Refused("invalid_checkpoint",
                          "checkpoint must be a string this server returned, or null")
        _, payload, mac = text.split(".")
        payload = payload.encode("ascii", "replace")
        if not hmac.compare_digest(self._mac(payload), mac.encode("ascii", "replace")):
            raise Refused("invalid_checkpoint", "the checkpoint was not issued by this server for "
                                                "this database; start again with \"since\": null")
        fields = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        if fields.get("db") != self.changelog.instance:
            raise Refused("invalid_checkpoint", "the checkpoint belongs to another database")
        return fields

    def _mac(self, payload):
        """The checkpoint payload's HMAC-SHA256, base64url."""
        digest = hmac.new(self.changelog.secret, payload, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=")


def _checked_checkpoint(value, field):
    """checkpoint / since: null, or a string this server returned (decoded later, by the engine)."""
    if value is not None and not isinstance(value, str):
        raise Refused("invalid_checkpoint",
                      "%s must be null or a checkpoint string this server returned" % field)
    return value


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _as_port(text):
    """A TCP port, 1 to 65535."""
    if not re.fullmatch(r"\s*[0-9]{1,5}\s*", text) or not 0 < int(text) < 65536:
        raise ValueError("expected a port number from 1 to 65535")
    return int(text)


def _as_positive_int(text):
    """A whole number of at least 1."""
    if not re.fullmatch(r"\s*[0-9]{1,18}\s*", text) or int(text) < 1:
        raise ValueError("expected a whole number of at least 1")
    return int(text)


def _as_count(text):
    """A whole number of at least 0."""
    if not re.fullmatch(r"\s*[0-9]{1,18}\s*", text):
        raise ValueError("expected a whole number of at least 0")
    return int(text)


def _as_positive_float(text):
    """A finite number above 0."""
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not 0 < number < 86400:
        raise ValueError("expected a number of seconds greater than 0 and below 86400")
    return number


def _as_table_list(text):
    """Comma-separated table names, each named once, none of cloudsync's own."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ValueError("a table is named twice")
    own = [name for name in names if name.lower().startswith("cloudsync_")]
    if own:
        # cloudsync_meta holds the checkpoint-signing key; no cloudsync_* table is for devices
        raise ValueError("%s is one of cloudsync's own tables (cloudsync_*), which devices may "
                         "never sync" % own[0])
    return tuple(names)


def _either(choices, quote="%s"):
    """'a, b or c'."""
    shown = [quote % choice for choice in choices]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def _as_choice(*choices):
    """The caster of a setting that is one of `choices`, in any case (given back as written
    here): LOG_LEVEL, AUTH, LOG_FORMAT, CHANGE_CAPTURE."""
    known = {choice.lower(): choice for choice in choices}

    def cast(text):
        found = known.get(text.strip().lower())
        if found is None:
            raise ValueError("expected %s" % _either(choices))
        return found
    cast.__doc__ = "%s." % _either(choices)
    return cast


def _as_token_list(text):
    """TOKENS: lines of the tokens file's format, separated by ';' (or newlines), as DeviceTokens.

    till-07 TOKEN scope.store_id=7; office sha256:HEX tables=sales,products
    """
    try:
        return tuple(parse_tokens(text))
    except ConfigError as error:
        raise ValueError(str(error).rstrip(".")) from None


def _as_secret_token(text):
    """An admin or metrics token: the token itself or sha256:HEX; empty for none."""
    text = text.strip()
    return DeviceToken("-", text) if text else None


def _as_origin_list(text):
    """CORS origins: * or comma-separated scheme://host[:port]."""
    origins = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
            raise ValueError("expected * or origins like https://app.example.com, comma-separated")
    return origins


def _as_column_list(text):
    """READ_ONLY_COLUMNS: comma-separated table.column, each once, as ((table, column), ...)."""
    columns = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        table, dot, column = item.rpartition(".")
        if not dot or not table or not column:
            raise ValueError("expected table.column items separated by commas "
                             "(products.price,customers.store_id)")
        columns.append((table, column))
    if len(set(columns)) != len(columns):
        raise ValueError("a column is named twice")
    return tuple(columns)


def _as_scope_list(text):
    """ROW_SCOPES: comma-separated table.column, each table once, as ((table, column), ...)."""
    scopes = _as_column_list(text)
    tables = [table for table, _ in scopes]
    if len(set(tables)) != len(tables):
        raise ValueError("a table is named twice; a table has one scope column")
    return scopes


def _as_workers(text):
    """WORKERS: auto (None: one per core on MySQL/MariaDB, 1 on SQLite) or a number of processes."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if not text.isdigit() or not 1 <= int(text) <= WORKERS_MOST:
        raise ValueError("expected auto or a number of processes from 1 to %d" % WORKERS_MOST)
    return int(text)


# (name, caster, default, one-line description): the single source for
# parsing, sample.env and README. The original service's names (DB_HOST,
# DB_USER, DB_PASS, DB_NAME, ALLOWED_TABLES, PORT) keep their meaning.
SETTINGS = (
    ("HOST", str, "127.0.0.1", "address to listen on; 0.0.0.0 for every interface"),
    ("PORT", _as_port, "4000", "TCP port to listen on"),
    ("DB_HOST", str, "",
     "MySQL/MariaDB host, or a Galera cluster's nodes to try in order (db1,db2:3307); leave empty "
     "to use the embedded SQLite database"),
    ("DB_PORT", _as_port, "3306", "MySQL/MariaDB port"),
    ("DB_USER", str, "", "MySQL/MariaDB user"),
    ("DB_PASS", str, "", "MySQL/MariaDB password"),
    ("DB_NAME", str, "", "MySQL/MariaDB database (schema) name"),
    ("DB_PATH", str, "cloudsync.db", "SQLite database file, used when DB_HOST is empty"),
    ("ALLOWED_TABLES", _as_table_list, "", "comma-separated tables devices may sync"),
    ("MAX_BODY_BYTES", _as_positive_int, "10485760", "largest request body accepted, in bytes"),
    ("THREADS", _as_positive_int, "8", "request worker threads"),
    ("DB_POOL_SIZE", _as_positive_int, "8", "most database connections held open at once"),
    ("DB_CONNECT_TIMEOUT_SECONDS", _as_positive_float, "5",
     "give up connecting to the database after this long"),
    ("DB_WAIT_SECONDS", _as_positive_float, "10",
     "longest wait for a free database connection, a row or table lock, or the SQLite write lock"),
    ("LOG_LEVEL", _as_choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", "DEBUG, INFO, WARNING or ERROR"),
    ("AUTH", _as_choice("auto", "off"), "auto",
     "auto: tokens are required when any are configured; off: no authentication (never on a "
     "public address)"),
    ("TOKENS", _as_token_list, "",
     "device tokens written as lines of the tokens file, separated by ';': 'device_id TOKEN' or "
     "'device_id sha256:HEX', then [tables=a,b] [scope.COLUMN=V,V]"),
    ("TOKENS_FILE", str, "cloudsync.tokens",
     "file of device tokens, one 'device_id sha256:HEX [tables=a,b] [scope.COLUMN=V,V] "
     "[created=TIME]' a line; "
     "re-read when it changes"),
    ("READ_ONLY_TABLES", _as_table_list, "", "tables devices may pull but never push"),
    ("INSERT_ONLY_TABLES", _as_table_list, "",
     "tables devices may only insert into (sales, stock movements: ledgers); an update, upsert, "
     "increment or delete is refused"),
    ("READ_ONLY_COLUMNS", _as_column_list, "",
     "table.column items, comma-separated, that pushes may not set (products.price); an insert "
     "gets the database's default"),
    ("ROW_SCOPES", _as_scope_list, "",
     "table.column items, comma-separated: a device syncs only the rows of these tables whose "
     "column holds one of its token's scope values (see Row scopes)"),
    ("MAX_OPERATIONS", _as_positive_int, "10000", "most operations in one push"),
    ("MAX_PULL_ROWS", _as_positive_int, "5000",
     "most rows plus keys in one pull; a larger limit is capped"),
    ("PULL_MAX_BYTES", _as_positive_int, "4194304",
     "a pull's page stops once its rows reach about this many bytes (has_more: true; a single "
     "larger row goes alone): what bounds a server's memory against large rows"),
    ("MAX_JSON_DEPTH", _as_positive_int, "16",
     "deepest nesting of objects and lists in a request body"),
    ("MAX_VALUE_BYTES", _as_positive_int, "1048576", "largest single text value, in bytes"),
    ("READ_TIMEOUT_SECONDS", _as_positive_int, "30",
     "a client that sends nothing for this long is disconnected"),
    ("GZIP_MIN_BYTES", _as_positive_int, "1024",
     "responses at least this large are gzipped for clients that accept it"),
    ("PUSH_RETRIES", _as_positive_int, "3",
     "times a push is retried after a deadlock or lock timeout before 503"),
    ("CHANGE_CAPTURE", _as_choice("triggers", "api"), "triggers",
     "triggers (every writer is recorded) or api (only writes through cloudsync)"),
    ("CHANGELOG_RETENTION_DAYS", _as_positive_int, "30",
     "change log and batch ids are kept this many days"),
    ("COMPACT_INTERVAL_SECONDS", _as_positive_int, "3600",
     "how often the server compacts the change log"),
    ("LOG_FORMAT", _as_choice("text", "json"), "text", "text, or json for one JSON object a line"),
    ("ADMIN_TOKEN", _as_secret_token, "",
     "token (or sha256:HEX) for GET /sync/devices, /metrics and /sync/status; empty: none"),
    ("METRICS_TOKEN", _as_secret_token, "",
     "token (or sha256:HEX) for GET /metrics and /sync/status (monitoring); empty: /metrics is "
     "protected like the sync endpoints"),
    ("CORS_ORIGINS", _as_origin_list, "",
     "browser origins allowed to call the API (PWA field apps), comma-separated, or *"),
    ("MAX_CONNECTIONS", _as_positive_int, "1000",
     "most open client connections (each device keeps one open between its requests); past it "
     "new ones wait"),
    ("MAX_CONNECTIONS_PER_ADDRESS", _as_count, "250",
     "most open connections from one client address (0: no limit); past it a new one is "
     "answered 503 and closed. Behind a reverse proxy every connection comes from the proxy: "
     "set 0 and let the proxy limit each client (limit_conn)"),
    ("LONGPOLL_MAX_WAITERS", _as_positive_int, "100",
     "most pulls waiting for changes (\"wait\") at once; the server adds a thread for each while "
     "it waits, on top of THREADS"),
    ("SHUTDOWN_GRACE_SECONDS", _as_positive_int, "30",
     "on SIGTERM, requests in progress get this long to finish"),
    ("WORKERS", _as_workers, "auto",
     "server processes sharing the port: auto is one per core (at most 4) on MySQL/MariaDB and 1 "
     "on SQLite, which writes one transaction at a time. DB_POOL_SIZE, MAX_CONNECTIONS and "
     "LONGPOLL_MAX_WAITERS are totals the workers share; THREADS is each worker's"),
)
SETTING_NAMES = tuple(name for name, _, _, _ in SETTINGS)
SECRET_SETTINGS = ("DB_PASS", "TOKENS", "ADMIN_TOKEN", "METRICS_TOKEN")


class Config:
    """Validated settings; attribute names are the setting names in lower case."""

    def __init__(self, values):
        for name, _, _, _ in SETTINGS:
            setattr(self, name.lower(), values[name])
        self.reload_from = None     # a fresh Config from the same sources (main sets it; SIGHUP)

    @property
    def backend(self):
        """'mysql' when DB_HOST is set, else 'sqlite'."""
        return "mysql" if self.db_host else "sqlite"

    def db_nodes(self):
        """DB_HOST as [(host, port)]: one server, or the nodes of a cluster in the order to try
        them ("db1,db2:3307,[::1]:3308"; DB_PORT where an item names no port)."""
        nodes = []
        for item in (item.strip() for item in self.db_host.split(",")):
            host, port = item, ""
            if item.startswith("["):                    # an IPv6 address, maybe with a port
                host, _, rest = item[1:].partition("]")
                port = rest[1:] if rest.startswith(":") else ""
            elif item.count(":") == 1:
                host, port = item.split(":")
            nodes.append((host, int(port) if port else self.db_port))
        return nodes

    @property
    def worker_count(self):
        """How many server processes `serve` runs (WORKERS; auto: Workers)."""
        if self.workers is not None:
            return self.workers
        if self.backend == "sqlite":
            return 1
        return max(1, min(os.cpu_count() or 1, WORKERS_AUTO_MOST,
                          self.db_pool_size // WORKER_LEAST_CONNECTIONS))

    def worker_share(self):
        """The settings of one worker: its share of the totals the workers divide."""
        count = self.worker_count
        share = Config({name: getattr(self, name.lower()) for name in SETTING_NAMES})
        share.db_pool_size = self.db_pool_size // count
        share.max_connections = -(-self.max_connections // count)
        share.longpoll_max_waiters = -(-self.longpoll_max_waiters // count)
        share.reload_from = self.reload_from and (lambda: self.reload_from().worker_share())
        return share

    def describe(self):
        """Effective settings as text, secrets masked."""
        parts = []
        for name in SETTING_NAMES:
            value = getattr(self, name.lower())
            if name in SECRET_SETTINGS and value:
                value = "***"
            elif value is None:
                value = "auto (%d)" % self.worker_count if name == "WORKERS" else ""
            elif name in ("ROW_SCOPES", "READ_ONLY_COLUMNS"):
                value = ",".join("%s.%s" % pair for pair in value)
            elif isinstance(value, tuple):
                value = ",".join(map(str, value))
            parts.append("%s=%s" % (name, value))
        return " ".join(parts)


def _nearest_setting(name):
    """The known setting a mistyped name most likely meant (DB_PASWORD: DB_PASS), or None."""
    import difflib
    name = name.upper()
    close = difflib.get_close_matches(name, SETTING_NAMES, 3, 0.7)
    # of the close ones, the one that shares the longest start with it
    return max(close, key=lambda known: len(os.path.commonprefix([name, known])), default=None)


def load_config(env_file=".env", environ=None, overrides=None, required=False):
    """Build a Config from defaults, the .env file and the environment (which wins).

    `required`: the file was named on purpose (--env-file), so its absence is an error.
    """
    environ = os.environ if environ is None else environ
    file_values = {}
    if env_file and required and not os.path.exists(env_file):
        raise ConfigError("the settings file %s does not exist (--env-file); give an existing "
                          "file, or leave --env-file out to read .env in the working directory if "
                          "there is one." % env_file)
    if env_file and os.path.exists(env_file):
        try:
            with open(env_file, encoding="utf-8", newline="") as handle:
                file_values, problems = parse_dotenv(handle.read(), environ)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError("cannot read %s: %s." % (env_file, error)) from None
        for number, message in problems:
            log.warning("%s line %d skipped: %s", env_file, number, message)
        unknown = sorted(set(file_values) - set(SETTING_NAMES))
        if unknown:
            near = [_nearest_setting(name) for name in unknown if _nearest_setting(name)]
            raise ConfigError("%s sets unknown setting %s;%s the settings are listed in sample.env."
                              % (env_file, ", ".join(unknown),
                                 " did you mean %s?" % " or ".join(near) if near else ""))
    values = {}
    for name, caster, default, _ in SETTINGS:
        raw = default
        if name in file_values:
            raw = file_values[name]
        if name in environ:
            raw = environ[name]
        if overrides and name in overrides:
            raw = overrides[name]
        try:
            values[name] = caster(raw)
        except ValueError as error:
            shown = "(hidden)" if name in SECRET_SETTINGS else repr(raw)      # never echo a secret
            raise ConfigError("%s=%s is not valid: %s." % (name, shown, error)) from None
    config = Config(values)
    scoped = [table for table, _ in config.row_scopes]
    # the settings that name tables name allowed ones
    for name, tables in (("READ_ONLY_TABLES", config.read_only_tables),
                         ("INSERT_ONLY_TABLES", config.insert_only_tables),
                         ("READ_ONLY_COLUMNS", [table for table, _ in config.read_only_columns]),
                         ("ROW_SCOPES", scoped)):
        outside = sorted(set(tables) - set(config.allowed_tables))
        if outside:
            raise ConfigError("%s names %s, which %s not in ALLOWED_TABLES."
                              % (name, ", ".join(outside), "is" if len(outside) == 1 else "are"))
    if scoped and config.change_capture != "triggers":
        raise ConfigError("ROW_SCOPES needs CHANGE_CAPTURE=triggers: a row that leaves a device's "
                          "scope is seen only by the triggers.")
    if scoped and config.auth == "off":
        raise ConfigError("ROW_SCOPES needs device tokens (a scope belongs to a token), and "
                          "AUTH=off turns them off.")
    if config.workers is not None \
            and config.workers * WORKER_LEAST_CONNECTIONS > config.db_pool_size:
        raise ConfigError("WORKERS=%d needs DB_POOL_SIZE of at least %d (%d connections for each "
                          "worker; DB_POOL_SIZE is the total of all workers)."
                          % (config.workers, config.workers * WORKER_LEAST_CONNECTIONS,
                             WORKER_LEAST_CONNECTIONS))
    if config.backend == "mysql":
        for item in config.db_host.split(","):
            port = item.strip().rpartition("]")[2] if "[" in item else \
                (item.split(":")[1] if item.count(":") == 1 else "")
            port = port.lstrip(":")
            if not item.strip() or item.strip() in ("[]",) or port and not (
                    port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError("DB_HOST=%r is not valid: expected a host, or several separated "
                                  "by commas, each maybe with :PORT (db1,db2:3307)." % config.db_host)
        missing = [name for name in ("DB_USER", "DB_NAME") if not values[name]]
        if missing:
            raise ConfigError("DB_HOST is set, so %s must be set too." % " and ".join(missing))
    return config


# -- SIGHUP: the settings that reload ---------------------------------------------
# A SIGHUP reads the settings again (.env and the environment the server started
# with) and puts these in force on the running server; any other setting that
# changed is named in the log as needing a restart. Each is read where it is
# used, at each request (or copied into the object that uses it by
# App.reload_settings), so none is half in force.
RELOADABLE_SETTINGS = (
    "LOG_LEVEL", "TOKENS", "ADMIN_TOKEN", "METRICS_TOKEN", "CORS_ORIGINS",
    "READ_ONLY_TABLES", "INSERT_ONLY_TABLES", "READ_ONLY_COLUMNS",
    "MAX_OPERATIONS", "MAX_PULL_ROWS", "PULL_MAX_BYTES", "MAX_JSON_DEPTH", "MAX_VALUE_BYTES",
    "GZIP_MIN_BYTES", "PUSH_RETRIES", "CHANGELOG_RETENTION_DAYS", "COMPACT_INTERVAL_SECONDS",
)


def _comparable(value):
    """A setting's value in a form == compares by content (tokens by their fields)."""
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(item) for item in value)
    if isinstance(value, DeviceToken):
        return tuple(_comparable(getattr(value, name)) for name in DeviceToken.__slots__)
    if isinstance(value, dict):
        return tuple(sorted((key, _comparable(item)) for key, item in value.items()))
    return value


def put_settings_in_force(config, fresh):
    """Set `fresh`'s reloadable settings on `config`, in place; (names reloaded, names that
    changed but need a restart)."""
    reloaded, restart = [], []
    for name in SETTING_NAMES:
        attribute = name.lower()
        if _comparable(getattr(config, attribute)) == _comparable(getattr(fresh, attribute)):
            continue
        if name in RELOADABLE_SETTINGS and not (name in TABLE_RULES and _rules_wait(config, fresh)):
            setattr(config, attribute, getattr(fresh, attribute))
            reloaded.append(name)
        else:
            restart.append(name)
    return reloaded, restart


TABLE_RULES = ("READ_ONLY_TABLES", "INSERT_ONLY_TABLES", "READ_ONLY_COLUMNS")


def _rules_wait(config, fresh):
    """Whether the table rules must wait for a restart: they were written for other allowed
    tables (ALLOWED_TABLES changed), and the running server still serves the old ones."""
    return _comparable(config.allowed_tables) != _comparable(fresh.allowed_tables)


def reload_said(reloaded, restart):
    """The log line of a SIGHUP's settings reload."""
    return "SIGHUP: settings reloaded: %s; %s" % (
        ", ".join(reloaded) or "none changed",
        "changed but need a restart (systemctl restart cloudsync): %s" % ", ".join(restart)
        if restart else "nothing needs a restart")


# ---------------------------------------------------------------------------
# SQL builders
# ---------------------------------------------------------------------------
# The statements push and pull send, written the same way for both databases:
# each builder returns (sql, params) with ? for every value. Every name in the
# text is a Column's or TableSchema's `quoted` form, built from the database's
# own catalogue, never from a request. Tests compare their text. Every builder
# that reads, changes or deletes rows of a synced table takes a scope, never
# by default: a device's TableScope (under Grants) adds its condition, so its
# statements see only the rows of its scope; EVERY_ROW, named on purpose,
# adds none. A value compared with a column stands as the column's `param`.


def select_keyed_sql(schema, keys, scope, lock="", select=None):
    """(sql, params) reading these keys' rows, each led by its key as the change log writes it.

    select: what to read of each row instead of its columns (schema.size_sql: its size).
    """
    where, params = keys_where(schema, keys)
    where, params = _scoped("(%s)" % where, params, scope)
    return "SELECT %s, %s FROM %s WHERE %s%s" % (schema.key_sql, select or schema.select_list,
                                                 schema.quoted, where, lock), params


def insert_sql(schema, names):
    """INSERT of one row with these columns, ? for each value (the grant judged the row first)."""
    return "INSERT INTO %s (%s) VALUES (%s)" % (schema.quoted, ", ".join(schema.columns[name].quoted
                                                                         for name in names),
                                                ", ".join("?" for _ in names))


def update_sql(schema, values, key, scope):
    """(sql, params) setting `values` ({column: value}) on the row with `key`."""
    where, params = _scoped(key_where(schema), key, scope)
    return "UPDATE %s SET %s WHERE %s" % (
        schema.quoted, ", ".join("%s = ?" % schema.columns[name].quoted for name in values),
        where), tuple(values.values()) + tuple(params)


def _plain_added(column):
    """SQL adding a bound number to a column (NULL counts as 0)."""
    return "COALESCE(%s, 0) + ?" % column.quoted


def increment_sql(schema, added, key, scope, adding=_plain_added):
    """(sql, params) adding `added` ({column: number}) to the row with `key`, in the database.

    `adding(column)`: the database's SQL for one column (Database.added_sql).
    """
    where, params = _scoped(key_where(schema), key, scope)
    return "UPDATE %s SET %s WHERE %s" % (
        schema.quoted, ", ".join("%s = %s" % (schema.columns[name].quoted,
                                            adding(schema.columns[name])) for name in added),
        where), tuple(added.values()) + tuple(params)


def exists_sql(schema, key, scope):
    """(sql, params) finding whether the row with `key` is there."""
    where, params = _scoped(key_where(schema), key, scope)
    return "SELECT 1 FROM %s WHERE %s" % (schema.quoted, where), tuple(params)


def delete_sql(schema, key, scope):
    """(sql, params) deleting the row with `key`."""
    where, params = _scoped(key_where(schema), key, scope)
    return "DELETE FROM %s WHERE %s" % (schema.quoted, where), tuple(params)


def first_rows_sql(schema, limit, scope, select=None):
    """(sql, params) reading the first `limit` rows in key order (a seed-mode pull); `select`
    instead of the columns (schema.size_sql: each row's size)."""
    where, params = ("", []) if scope.where is None \
        else (" WHERE " + scope.where, list(scope.params))
    return "SELECT %s FROM %s%s ORDER BY %s LIMIT ?" % (select or schema.select_list,
                                                        schema.quoted, where,
                                                        schema.key_order), params + [limit]


def page_sql(schema, after, limit, scope, select=None):
    """(sql, params) reading up to `limit` rows in key order after the key `after` (bound values),
    or from the start: keyset paging, (a > ?) OR (a = ? AND b > ?)..., an index range however
    large the table. A NULL in a key (SQLite allows it) would break the order: such rows are left
    out. `select`: what to read of each row instead of its columns (schema.size_sql)."""
    where = " AND ".join("%s IS NOT NULL" % column.quoted for column in schema.key_columns)
    where, params = _scoped(where, [], scope)
    if after is not None:
        columns = schema.key_columns
        where += " AND (%s)" % " OR ".join(
            "(%s)" % " AND ".join(["%s = %s" % (column.quoted, column.param)
                                   for column in columns[:n]]
                                  + ["%s > %s" % (columns[n].quoted, columns[n].param)])
            for n in range(len(columns)))
        for n in range(len(after)):
            params.extend(after[:n + 1])
    return "SELECT %s FROM %s WHERE %s ORDER BY %s LIMIT ?" % (
        select or schema.select_list, schema.quoted, where, schema.key_order), params + [limit]


def keys_where(schema, keys):
    """(WHERE text, params) matching any of `keys`: a IN (?, ?) or (a = ? AND b = ?) OR ..."""
    if len(schema.primary_key) == 1:
        param = schema.key_columns[0].param
        return ("%s IN (%s)" % (schema.key_order, ", ".join(param for _ in keys)),
                [key[0] for key in keys])
    return (" OR ".join("(%s)" % key_where(schema) for _ in keys),
            [value for key in keys for value in key])


def key_where(schema):
    """WHERE text matching one row by its primary key: a = ? AND b = ?."""
    return " AND ".join("%s = %s" % (column.quoted, column.param) for column in schema.key_columns)


def _scoped(where, params, scope):
    """WHERE text and params, narrowed to the rows of `scope` (EVERY_ROW: none left out)."""
    if scope.where is None:
        return where, list(params)
    return "%s AND %s" % (where, scope.where), list(params) + list(scope.params)


# ---------------------------------------------------------------------------
# Private APIs, each with its public fallback
# ---------------------------------------------------------------------------
# Five places reach past a library's documented interface. Each is used only
# when what it needs is there; otherwise the public path, tested on its own,
# does the same work more slowly. No other code touches a private name.
#
# mysql-connector-python. A cursor pings the server each time it is made and
# runs a multi-statement splitter over every statement, which together cost
# more than the statements. _DriverStatements sends each statement with
# cmd_query(), its values escaped by the driver's own prepare_for_mysql() (C
# extension) or converter (pure Python), as the driver's cursors do. The public
# path, _CursorStatements, is a cursor per statement, each ? bound as %(pN)s
# (which leaves every other % alone). Both cut a multi-row INSERT at about
# MYSQL_STATEMENT_BYTES, within the bound fits_one_statement() checks, so an
# insert it passes is one statement, atomic by itself, either way.
#
# waitress's thread pool. A pull waiting for a change holds a waitress thread.
# A pool sized for every possible waiting pull is slow for everything else (a
# request then wakes a sleeping thread instead of the one that just finished:
# 0.7x the pushes per second with 108 threads instead of 9), so the pool is
# THREADS, and grows by one thread for each pull while it waits, through the
# dispatcher's set_thread_count(). Without it, the pool is fixed at THREADS +
# LONGPOLL_MAX_WAITERS from the start (create_server's threads=).
#
# waitress. Its own refusals (a declared body over the limit, refused before it
# is read; a malformed request) are answered in JSON, like every other error,
# by subclasses of its channel and error task; without them, in its plain text.
# A subclass of its request parser refuses a body framed both by
# Content-Length and as chunked (waitress would read it as chunked and keep
# the connection, which a proxy reading Content-Length makes a smuggled
# request); without it, such a request is read as chunked.
# server.run() stops only when an exception leaves its loop, cutting
# off the requests in progress. A graceful stop (close the listening socket,
# answer what is open, then stop) turns waitress's loop one step at a time over
# server._map and reads each channel's requests and output buffers. Without
# them, SIGTERM stops server.run() at once: requests in progress are cut off
# and their transactions roll back, which loses nothing acknowledged.
# The channel also counts connections per client address
# (MAX_CONNECTIONS_PER_ADDRESS: a new one past it is answered 503 and closed)
# and, near MAX_CONNECTIONS, closes keep-alive connections idle for
# NEAR_LIMIT_IDLE_SECONDS; without it, one address can take every connection.
# A subclass of the task dispatcher leaves /health to the loop, which answers
# it after each turn (graceful stop's loop only), so it answers while every
# thread waits on a database that stopped; without it /health waits for a
# thread like any request.
#
# glibc's allocator (ctypes: mallopt). A burst of large pulls leaves freed
# memory in the process's heap and per-thread arenas; fixed thresholds make
# large blocks go back to the system when freed. Elsewhere it is not set.


class _DriverStatements:
    """MySQL statements through cmd_query(), values escaped by the driver's internals (fast)."""

    @staticmethod
    def available(conn):
        """Whether this connection has what the fast path uses."""
        return hasattr(conn, "cmd_query") and hasattr(conn, "get_rows") and (
            hasattr(conn, "prepare_for_mysql")
            or hasattr(getattr(conn, "converter", None), "escape"))

    def begin(self, conn):
        """START TRANSACTION."""
        conn.cmd_query("START TRANSACTION")

    def execute(self, conn, sql, params):
        """Run one statement; the rows it matched."""
        result = conn.cmd_query(self._bind(conn, sql, params))
        if "columns" in result:
            conn.get_rows()
            self._free_result(conn)
            return 0
        return result["affected_rows"]

    def query(self, conn, sql, params):
        """Run a SELECT; its rows as tuples."""
        result = conn.cmd_query(self._bind(conn, sql, params))
        if "columns" not in result:
            return []
        rows = conn.get_rows()[0]
        self._free_result(conn)
        return rows

    def executemany(self, conn, sql, rows):
        """An INSERT of many rows as multi-row statements of about MYSQL_STATEMENT_BYTES (what
        follows the row's (?, ...), such as ON DUPLICATE KEY UPDATE, ends each)."""
        head, row_template, tail = _insert_parts(sql)
        tail = tail.encode("utf-8")
        template = row_template.encode("utf-8").split(b"?")
        width = len(template) - 1
        rows = [tuple(row) for row in rows]
        if any(len(row) != width for row in rows):
            raise ValueError("the statement has %d placeholders per row" % width)
        statement, size = [], 0
        # the values of about a statement's rows escaped in one call into the driver: a push holds
        # its rows once, and at most one statement of them escaped besides
        for group in _groups_of_bytes(rows, MYSQL_STATEMENT_BYTES):
            escaped = self._escape(conn, tuple(value for row in group for value in row)) \
                if width else []
            for start in range(0, len(group) * width or len(group), width or 1):
                values = _fill(template, escaped[start:start + width])
                statement.append(values)
                size += len(values) + 2
                if size > MYSQL_STATEMENT_BYTES:
                    conn.cmd_query(head.encode("utf-8") + b" VALUES " + b", ".join(statement)
                                   + tail)
                    statement, size = [], 0
        if statement:
            conn.cmd_query(head.encode("utf-8") + b" VALUES " + b", ".join(statement) + tail)

    @staticmethod
    def _free_result(conn):
        """Free the C extension's result buffer."""
        free = getattr(conn, "free_result", None)      # the pure-Python driver has nothing to free
        if free is not None:
            free()

    def _bind(self, conn, sql, params):
        """The statement as bytes, each ? replaced by its escaped value."""
        template = sql.encode("utf-8").split(b"?")
        values = self._escape(conn, tuple(params)) if params else ()
        if len(template) != len(values) + 1:
            raise ValueError("the statement has %d placeholders for %d values"
                             % (len(template) - 1, len(values)))
        return _fill(template, values)

    @staticmethod
    def _escape(conn, params):
        """Values as SQL literals, escaped by the driver as its cursors do.

        The C extension's prepare_for_mysql() or the pure Python converter.
        """
        prepare = getattr(conn, "prepare_for_mysql", None)
        if prepare is not None:
            return prepare(params)
        converter, sql_mode = conn.converter, conn.sql_mode
        escaped = [converter.escape(converter.to_mysql(value), sql_mode) for value in params]
        return [text if isinstance(value, decimal.Decimal) else converter.quote(text)
                for value, text in zip(params, escaped)]


class _CursorStatements:
    """MySQL statements through the driver's documented cursor: the public path."""

    def begin(self, conn):
        """START TRANSACTION, through the driver."""
        conn.start_transaction()

    def execute(self, conn, sql, params):
        """Run one statement; the rows it matched."""
        with self._cursor(conn, sql, params) as cursor:
            if cursor.with_rows:
                cursor.fetchall()
                return 0
            return cursor.rowcount

    def query(self, conn, sql, params):
        """Run a SELECT; its rows as tuples."""
        with self._cursor(conn, sql, params) as cursor:
            return cursor.fetchall() if cursor.with_rows else []

    def executemany(self, conn, sql, rows):
        """An INSERT of many rows as multi-row statements within fits_one_statement()'s bound."""
        parts = _insert_parts(sql)
        run, size = [], 0
        for row in rows:                    # runs within the bound fits_one_statement() checks
            bound = _row_bytes_bound(row)
            if run and size + bound > MYSQL_STATEMENT_BYTES:
                self._insert_run(conn, parts, run)
                run, size = [], 0
            run.append(tuple(row))
            size += bound
        if run:
            self._insert_run(conn, parts, run)

    def _insert_run(self, conn, parts, run):
        """One multi-row INSERT of these rows."""
        head, row_template, tail = parts
        self.execute(conn, "%s VALUES %s%s" % (head, ", ".join([row_template] * len(run)), tail),
                     [value for row in run for value in row])

    @staticmethod
    @contextlib.contextmanager
    def _cursor(conn, sql, params):
        """A cursor that ran `sql`, each ? bound by name: %(p0)s, %(p1)s...

        A % elsewhere stays as it is.
        """
        cursor = conn.cursor()
        try:
            if params:
                pieces = sql.split("?")
                if len(pieces) != len(params) + 1:
                    raise ValueError("the statement has %d placeholders for %d values"
                                     % (len(pieces) - 1, len(params)))
                cursor.execute(pieces[0] + "".join("%%(p%d)s%s" % (number, piece)
                                                   for number, piece in enumerate(pieces[1:])),
                               {"p%d" % number: value for number, value in enumerate(params)})
            else:
                cursor.execute(sql)
            yield cursor
        finally:
            cursor.close()


def _insert_parts(sql):
    """(INSERT ... up to VALUES, the row's (?, ..., NOW(6)), the ON DUPLICATE KEY UPDATE or
    ON CONFLICT that ends the statement, or '') of a one-row INSERT."""
    head, _, rest = sql.partition(" VALUES ")
    for clause in (" ON DUPLICATE KEY UPDATE ", " ON CONFLICT "):
        if clause in rest:
            row, _, tail = rest.partition(clause)
            return head, row, clause + tail
    return head, rest, ""


def _groups_of_bytes(rows, most):
    """The rows in order, in groups whose _row_bytes_bound adds up to about `most` (a row larger
    than that alone)."""
    group, size = [], 0
    for row in rows:
        bound = _row_bytes_bound(row)
        if group and size + bound > most:
            yield group
            group, size = [], 0
        group.append(row)
        size += bound
    if group:
        yield group


def _row_bytes_bound(row):
    """An upper bound of a row's size in a MySQL INSERT, escaped.

    UTF-8 is at most 4 bytes a character.
    """
    size = 4
    for value in row:
        size += 4 * len(value) + 16 if isinstance(value, str) else 2 * len(value) + 16 \
            if isinstance(value, (bytes, bytearray)) else 96
    return size


def _fill(template, values):
    """SQL text pieces split at ?, joined with the escaped values between them."""
    pieces = [template[0]]
    for value, text in zip(values, template[1:]):
        pieces.append(value)
        pieces.append(text)
    return b"".join(pieces)


def _channel_class(config, limits):
    """waitress's channel, answering its own refusals (oversized body, malformed request) in JSON,
    refusing a body framed both by Content-Length and as chunked, and holding each client address
    to MAX_CONNECTIONS_PER_ADDRESS connections.

    None when waitress lacks the classes it extends: those refusals are then its plain text, a
    doubly framed body is read as chunked, and no address is limited (put a proxy that does
    these in front).
    """
    try:
        import waitress.channel
        import waitress.parser
        import waitress.task
        base_task, base_channel = waitress.task.ErrorTask, waitress.channel.HTTPChannel
        base_parser, parsing_error = waitress.parser.HTTPRequestParser, waitress.parser.ParsingError
    except (ImportError, AttributeError):
        return None
    max_body_bytes = config.max_body_bytes

    class FramedOnceParser(base_parser):
        # A body framed two ways (Content-Length and chunked) is request smuggling behind a
        # proxy that reads the other one (RFC 9112 section 6.1): 400, and the connection closes.
        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            if self.chunked and "CONTENT_LENGTH" in self.headers:
                raise parsing_error("the request has both Content-Length and Transfer-Encoding: "
                                    "chunked; send one")

    class JSONErrorTask(base_task):
        def execute(self):
            error = self.request.error
            if error.code == 413:
                payload = {"success": False, "error": "Payload too large",
                           "detail": "the body is over the limit of %d bytes; split the batch "
                                     "into smaller pushes" % max_body_bytes}
            else:
                payload = {"success": False, "error": error.reason, "detail": str(error.body)}
            body = to_json_bytes(payload)
            self.status = "%d %s" % (error.code, error.reason)
            self.response_headers.append(("Content-Type", "application/json; charset=utf-8"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class CloudsyncChannel(base_channel):
        error_task_class = JSONErrorTask
        parser_class = FramedOnceParser
        client = None                       # the address counted for this connection

        def __init__(self, server, sock, addr, adj, map=None):
            client = limits.admit(addr)
            if client is None:
                # answered before it asks, 503, and closed: never a channel the loop watches,
                # so a flood that dials again at once costs an accept and a send
                limits.refuse(sock)
                return
            super().__init__(server, sock, addr, adj, map)
            self.client = client

        def del_channel(self, map=None):
            limits.release(self)
            super().del_channel(map)

    return CloudsyncChannel


class _ConnectionLimits:
    """Open connections per client address, for waitress's channels (Private APIs).

    Each address holds at most `per_address` (0: no limit) at once. While
    the server is near MAX_CONNECTIONS, connections idle for
    NEAR_LIMIT_IDLE_SECONDS are closed, so idle keep-alives make room for
    clients with something to ask.
    """

    def __init__(self, most, per_address):
        self.most, self.per_address = most, per_address
        self.open = collections.Counter()
        self.lock = threading.Lock()
        self.swept_at = 0.0
        body = to_json_bytes({
            "success": False, "error": "Too many connections",
            "detail": "this address holds %d open connections, the most one client address may "
                      "(MAX_CONNECTIONS_PER_ADDRESS); close some, or retry later" % per_address})
        self.refusal = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; "
                        b"charset=utf-8\r\nRetry-After: %d\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (RETRY_AFTER_SECONDS, len(body), body))

    def admit(self, addr):
        """Count a new connection from `addr`: its client address, or None when that holds its
        most already."""
        client = addr[0] if isinstance(addr, tuple) and addr else str(addr)
        with self.lock:
            if self.per_address and self.open[client] >= self.per_address:
                return None
            self.open[client] += 1
        return client

    def refuse(self, sock):
        """Answer a connection refused by admit with 503, and close it."""
        try:
            sock.setblocking(False)
            sock.send(self.refusal)             # a fresh socket's buffer takes it whole
        except OSError:
            pass                                # gone already: nothing to tell
        finally:
            sock.close()

    def sweep(self, server):
        """Near MAX_CONNECTIONS (three quarters), close the connections idle for
        NEAR_LIMIT_IDLE_SECONDS; at most once a second (after a turn of the loop)."""
        now = time.monotonic()
        if now - self.swept_at < 1 or len(server._map) * 4 <= self.most * 3:
            return
        self.swept_at = now
        cutoff = time.time() - NEAR_LIMIT_IDLE_SECONDS
        for channel in list(server.active_channels.values()):
            if not channel.requests and channel.request is None \
                    and not channel.total_outbufs_len and channel.last_activity < cutoff:
                channel.will_close = True

    def release(self, channel):
        """Forget a connection as it closes."""
        client = channel.client
        if client is not None:
            channel.client = None
            with self.lock:
                self.open[client] -= 1
                if self.open[client] <= 0:
                    del self.open[client]


def _loop_dispatcher(threads, answers_in_loop, goes_first=lambda command, path: False):
    """waitress's task dispatcher with `threads` threads, except that the requests
    `answers_in_loop(command, path)` picks are answered by the server's loop itself
    (serve_in_loop, after each turn): /health answers while every thread waits on the database;
    and those `goes_first(command, path)` picks are queued ahead of the others (pushes ahead of
    the pulls a change woke).

    None when waitress lacks the class it extends: /health then waits for a thread like any
    request, and pushes queue with the pulls.
    """
    try:
        import waitress.task
        base = waitress.task.ThreadedTaskDispatcher
    except (ImportError, AttributeError):
        return None

    class LoopDispatcher(base):
        def __init__(self):
            super().__init__()
            self.in_loop = collections.deque()
            self.loop_answers = False       # set while _run turns the loop itself

        def add_task(self, task):
            # called with the channel's lock held: the loop answers after its turn, not here
            requests = getattr(task, "requests", None)
            request = requests[0] if requests else None
            command, path = getattr(request, "command", None), getattr(request, "path", None)
            if self.loop_answers and request is not None and not getattr(request, "error", None) \
                    and answers_in_loop(command, path):
                self.in_loop.append(task)
                task.server.pull_trigger()      # a thread's call: the loop may be waiting
                return
            queue = getattr(self, "queue", None)
            if request is not None and isinstance(queue, collections.deque) \
                    and goes_first(command, path):
                with self.lock:             # behind the pushes queued before it, ahead of the rest
                    ahead = 0
                    for queued in queue:
                        first = (getattr(queued, "requests", None) or [None])[0]
                        if first is None or not goes_first(getattr(first, "command", None),
                                                           getattr(first, "path", None)):
                            break
                        ahead += 1
                    queue.insert(ahead, task)
                    self.queue_cv.notify()
                return
            super().add_task(task)

        def serve_in_loop(self):
            while self.in_loop:
                self.in_loop.popleft().service()

    dispatcher = LoopDispatcher()
    dispatcher.set_thread_count(threads)
    return dispatcher


def _tune_allocator():
    """glibc's allocator: blocks of 128 KiB or more (a large row, a page's JSON) are mapped on
    their own and given back to the system when freed, in at most two arenas; whether it took.

    Without it (another C library), memory a burst of large pulls took stays with the process.
    """
    try:
        import ctypes
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (ImportError, OSError, AttributeError):
        return False
    # M_MMAP_THRESHOLD (-3) set by hand also stops glibc raising it after each such block is
    # freed; M_TRIM_THRESHOLD (-1): free heap past 1 MiB goes back; M_ARENA_MAX (-8)
    return all(mallopt(option, value) == 1
               for option, value in ((-3, 128 * 1024), (-1, 1 << 20), (-8, 2)))


def _pool_resizer(server):
    """The function setting the waitress server's thread count, or None when it has none."""
    set_count = getattr(getattr(server, "task_dispatcher", None), "set_thread_count", None)
    return set_count if callable(set_count) else None


def _with_spare_threads(set_count, threads):
    """resize(waiting) for the watcher: at least `threads` plus one per waiting pull, with up to
    SPARE_THREADS more when it grows and up to twice that before it shrinks. A till's pull that
    is answered and waits again at once neither starts nor stops a thread (in waitress, a stop
    wakes every idle thread)."""
    count = [threads]
    lock = threading.Lock()

    def resize(waiting):
        wanted = threads + waiting
        with lock:
            if wanted > count[0] or count[0] > wanted + 2 * SPARE_THREADS:
                count[0] = wanted + SPARE_THREADS if waiting else threads
                set_count(count[0])
    return resize


def _resizable_pool():
    """Whether this waitress's dispatcher can change its thread count while it serves."""
    import waitress.task
    return callable(getattr(getattr(waitress.task, "ThreadedTaskDispatcher", None),
                            "set_thread_count", None))


def _graceful_stop_possible(server):
    """Whether waitress has the internals a graceful stop uses: socket map, loop and channels."""
    import waitress.channel
    import waitress.wasyncore
    # a channel's `requests` and `total_outbufs_len` are set per instance: _requests_in_progress
    # reads them with defaults, so a version without them drains nothing rather than failing
    return isinstance(getattr(server, "_map", None), dict) and hasattr(waitress.wasyncore, "loop") \
        and hasattr(waitress.channel, "HTTPChannel") and hasattr(server, "adj")


def _stop_listening(server):
    """Close the listening socket only; open connections and the wake-up pipe stay."""
    import waitress.wasyncore
    waitress.wasyncore.dispatcher.close(server)


def _serve_one_step(server, timeout):
    """One turn of waitress's loop: accept, read, write what is ready; then answer what the loop
    answers itself (_loop_dispatcher)."""
    import waitress.wasyncore
    waitress.wasyncore.loop(timeout=timeout, map=server._map, use_poll=server.adj.asyncore_use_poll,
                            count=1)
    serve_in_loop = getattr(server.task_dispatcher, "serve_in_loop", None)
    if serve_in_loop is not None:
        serve_in_loop()
    limits = getattr(server, "cloudsync_limits", None)
    if limits is not None:
        limits.sweep(server)


def _requests_in_progress(server):
    """Whether a connection holds a request not yet answered, or an answer not yet sent."""
    import waitress.channel
    return any(getattr(channel, "requests", None) or getattr(channel, "total_outbufs_len", 0)
               for channel in list(server._map.values())
               if isinstance(channel, waitress.channel.HTTPChannel))


# ---------------------------------------------------------------------------
# Database layer
# ---------------------------------------------------------------------------
# Two backends with one small interface: connection(), transaction(conn),
# execute/executemany/query helpers, introspect(table) and ping(). SQL text is
# written once with `?` placeholders; each backend binds them itself.


# -- triggers: their names, the events they fire on, literals in their bodies --------

TRIGGER_EVENTS = {"ins": "INSERT", "upd": "UPDATE", "del": "DELETE"}
# SQLite: BEFORE triggers logging the rows a REPLACE (or ON CONFLICT REPLACE) will remove
REPLACED_EVENTS = {"rin": "INSERT", "rup": "UPDATE"}
CASCADING_RULES = ("CASCADE", "SET NULL", "SET DEFAULT")


def _sql_literal(text, backslashes=False):
    """A string literal for DDL, where values cannot be bound (trigger bodies).

    MySQL doubles backslashes too.
    """
    if backslashes:
        text = text.replace("\\", "\\\\")
    return "'" + text.replace("'", "''") + "'"


class _ForeignKey:
    """A foreign key that makes InnoDB write child rows.

    Child and parent tables, columns, ON DELETE/UPDATE rules.
    """

    __slots__ = ("child", "parent", "on_delete", "on_update", "child_columns", "parent_columns")

    def __init__(self, child, parent, on_delete, on_update):
        self.child, self.parent, self.on_delete, self.on_update = \
            child, parent, on_delete, on_update
        self.child_columns, self.parent_columns = [], []


def _cascade_trigger_name(table, event):
    """A parent table's cascade trigger, named by a hash.

    Thus no table's own trigger name can clash with it.
    """
    return "cloudsync_cascade_%s_%s" % (hashlib.sha1(table.encode("utf-8")).hexdigest()[:16], event)


def _own_trigger_names(table):
    """The names a table's change-capture triggers may have."""
    return {_trigger_name(table, event) for event in list(TRIGGER_EVENTS) + list(REPLACED_EVENTS)}


def _trigger_name(table, event):
    """A table's own trigger for an event: readable when the name allows, else by a hash."""
    name = "cloudsync_%s_%s" % (table, event)
    if len(name) > 64 or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        name = "cloudsync_%s_%s" % (hashlib.sha1(table.encode("utf-8")).hexdigest()[:16], event)
    return name


class _Pool:
    """A bounded set of reusable connections; a broken one is dropped, not reused."""

    IDLE_CHECK_SECONDS = 30     # a connection idle longer is pinged before it is lent again
    # after a connection failed, every lent connection is pinged this long
    SUSPECT_SECONDS = 60

    def __init__(self, connect, size, wait_seconds, alive=None):
        self._connect = connect
        self._alive = alive or (lambda conn: True)
        self._idle = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._wait_seconds = wait_seconds
        self._failed_at = -self.SUSPECT_SECONDS
        # since when the database has not answered (monotonic), None while it answers: a request
        # then takes a free connection or answers 503 at once, never waiting for one held by a
        # statement that hangs
        self.down_since = None
        self.in_use = 0

    @property
    def idle_count(self):
        """Open connections waiting in the pool."""
        return len(self._idle)

    @contextmanager
    def connection(self):
        """Lend a connection for the duration of a with-block."""
        down = self.down_since is not None
        if not self._slots.acquire(timeout=0 if down else self._wait_seconds):
            raise DatabaseUnavailable("the database has not answered for %.0f s" % (
                time.monotonic() - self.down_since) if down else
                "no free database connection within %.0f s" % self._wait_seconds)
        conn = None
        try:
            with self._lock:
                conn, idle_since = self._idle.pop() if self._idle else (None, 0)
                self.in_use += 1
            now = time.monotonic()
            if conn is not None and (now - idle_since > self.IDLE_CHECK_SECONDS
                                     or now - self._failed_at < self.SUSPECT_SECONDS) \
                    and not self._alive(conn):
                self._discard(conn)          # the server closed it (restart, wait_timeout)
                conn = None
            if conn is None:
                conn = self._connect()
            yield conn
            self.down_since = None
        except Retryable:
            # the transaction was rolled back; the connection is fine
            self.down_since = None
            raise
        except DatabaseUnavailable:
            # the server went away or restarted: the idle connections are most likely dead too
            self._failed_at = time.monotonic()
            if self.down_since is None:
                self.down_since = self._failed_at
            if conn is not None:
                self._discard(conn)
                conn = None
            self.close()
            raise
        except CloudsyncError:
            # refused on purpose (the transaction rolled back): the connection is fine
            raise
        except BaseException:
            if conn is not None:
                self._discard(conn)
                conn = None
            raise
        finally:
            with self._lock:
                self.in_use -= 1
                if conn is not None:
                    self._idle.append((conn, time.monotonic()))
            self._slots.release()

    def _discard(self, conn):
        """Close a broken connection and free its place."""
        try:
            conn.close()
        except Exception:       # a dead connection may fail to close; it is gone either way
            pass

    def close(self):
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._discard(conn)


class Database:
    """What both backends share: the pool, transactions and SQL helpers.

    What differs lives in the two subclasses, as attributes and methods of
    the same names, so no other code asks which database it talks to:
    numbers_at_commit (triggers number changes as they write them: one writer
    at a time), cascades_fire_triggers, transactional_ddl, replaces_triggers,
    autocommit_atomic, lock_rows, json_array, insert_ignore, now_sql,
    cutoff_sql, delete_oldest_sql, log_tables(), trigger_sql(), attributed(),
    limited_part().
    """

    name = "?"
    # a 0 given to a generated key is stored as 0 (SQLite; MySQL with NO_AUTO_VALUE_ON_ZERO)
    keeps_zero_keys = True

    def __init__(self, config):
        self.config = config
        self.pool = _Pool(self._connect, config.db_pool_size, config.db_wait_seconds, self._alive)

    def connection(self):
        """A pooled connection, as a context manager."""
        return self.pool.connection()

    def _alive(self, conn):
        """Whether a connection answers a ping."""
        try:
            self.ping(conn)
            return True
        except Exception:
            return False

    def bound_statements(self):
        """From now on no statement waits without end (serve, after its start): SQLite's waits
        are its busy timeout, DB_WAIT_SECONDS, already."""

    def close(self):
        """Release every pooled connection."""
        self.pool.close()

    @contextmanager
    def transaction(self, conn):
        """Run a with-block in one transaction: commit at the end, roll back on any exception."""
        self._begin(conn)
        try:
            yield
        except BaseException:
            try:
                self._rollback(conn)
            except Exception:
                log.warning("rollback failed; the connection is dropped", exc_info=True)
            raise
        self._commit(conn)

    def decode_rows(self, schema, rows):
        """Rows as the driver gives them, the columns that need it turned into their pulled form."""
        if not schema.decoders:
            return rows
        decoded = []
        for row in rows:
            row = list(row)
            for position, decoder, column in schema.decoders:
                if row[position] is not None:
                    row[position] = decoder(row[position], column)
            decoded.append(row)
        return decoded

    # -- row keys ---------------------------------------------------------------
    # The change log names a row by its key: a JSON array of the key columns,
    # each in its *log form*, written by SQL (the triggers, and every query that
    # reads a row's key) with one expression per column kind (key_sql). The log
    # form converts exactly back to a value to look the row up by (key_bind)
    # and to the pulled form a device holds (key_present). key_text writes the
    # same text in Python for a key a device pushed, for rows that do not exist
    # (or no longer do), where SQL cannot read it.

    def key_sql(self, schema, ref=None):
        """SQL writing the key of row `ref` (NEW, OLD, or the table itself) as the log holds it."""
        prefix = "" if ref is None else ref + "."
        return self.key_sql_from(schema, {column.name: prefix + column.quoted
                                          for column in schema.key_columns})

    def key_sql_from(self, schema, sources):
        """The same, each key column's value read from `sources` (column name -> SQL expression)."""
        return "%s(%s)" % (self.json_array, ", ".join(
            self._key_column_sql(column).format(sources[column.name])
            for column in schema.key_columns))

    @staticmethod
    def parse_key(text):
        """The log-form values of a logged row key."""
        return json.loads(_text(text))

    def catch_up(self, conn):
        """Wait until this server has applied every commit its cluster made before now; False when
        it is not a node of a cluster (nothing to wait for). One server: False."""
        return False

    def key_text(self, schema, values):
        """A key a device pushed, as the change log would hold it.

        Exact for the usual forms of each type.
        """
        return self._json_array_text([None if value is None else self._log_form(column, value)
                                      for column, value in zip(schema.key_columns, values)])

    def key_bind(self, schema, logged, ordered=False):
        """Log-form key values as values to look the row up by.

        With `ordered`: to compare with >, as ORDER BY sorts.
        """
        return tuple(self._bind_logged(column, value, ordered)
                     for column, value in zip(schema.key_columns, logged))

    def prepare(self, conn):
        """Learn what this database server does differently (nothing to learn by default)."""

    def triggers(self, conn):
        """(name, table) of every trigger in the database."""
        return [(_text(name), _text(table)) for name, table in self.query(conn, self.triggers_sql)]

    def trigger_definitions(self, conn, table=None):
        """{trigger name: its definition as the catalogue keeps it}, of one table or of all."""
        rows = self.query(conn, self.trigger_definitions_sql
                          + (" AND %s = ?" % self.trigger_table if table is not None else ""),
                          () if table is None else (table,))
        return {_text(name): _text(text) for name, text in rows}

    @staticmethod
    def trigger_events(schema):
        """The events a table's change-capture triggers record."""
        return tuple(TRIGGER_EVENTS)

    @staticmethod
    def capture_intact(stored, live, truncated):
        """Whether a table's capture is the one cloudsync left: its triggers the same ones (not
        dropped with the table, not made again by another program or a dump), and, where the
        database shows it, the table the same (not truncated, not swapped for a copy).

        `truncated`: whether a TRUNCATE ran since the last look (None: not known).
        An identity taken on another node of a cluster (Galera: DB_HOST moved, or
        one instance per node) shares only the triggers' names: their creation
        times and the table's id are each node's own.
        """
        if live is None:
            return False
        if stored.get("node") != live.get("node"):
            return set(stored.get("triggers") or {}) == set(live.get("triggers") or {}) \
                and truncated is not True
        if stored.get("triggers") != live.get("triggers"):
            return False
        same_table = stored.get("id") is None or live.get("id") is None \
            or stored["id"] == live["id"]
        # a table rebuilt by ALTER or OPTIMIZE gets a new id too: only a TRUNCATE loses rows
        return same_table or truncated is False

    def table_names(self, conn):
        """The names of the tables in the database."""
        return {_text(name) for (name,) in self.query(conn, self.tables_sql)}

    def column_names(self, conn, table):
        """A table's column names (a table cloudsync made: for adding columns of later versions)."""
        return {_text(name) for (name,) in self.query(conn, self.columns_sql, (table,))}

    @staticmethod
    def bytewise(expression):
        """SQL comparing `expression` byte for byte, whatever its collation."""
        return expression

    @staticmethod
    def limited_part(select):
        """A SELECT with its own ORDER BY and LIMIT, as one part of a UNION ALL (SQLite allows
        them only at the end of the whole, or in a subquery)."""
        return "SELECT * FROM (%s)" % select

    @staticmethod
    def added_sql(column):
        """SQL adding a bound number to `column` for an increment (NULL counts as 0)."""
        return _plain_added(column)

    # -- row scopes (see Row scopes in the sync engine) ----------------------------

    def logged_update(self, schema, record, same_key, same_form):
        """The update trigger's entries: `record(row, op, guard)` writes one.

        A key that changed logs a delete of the old key (with its old scope)
        and an update of the new. A row whose scope value changed under the
        same key logs an update under its old scope too: the devices of the
        old scope then read it, find it outside their scope, and delete it.
        `same_form` compares two values byte for byte ("%s IS %s ..."). The
        update entry names the columns whose value changed (column-level
        conflicts, in Push); the others name none (NULL: any column).
        """
        body = [record("OLD", "D", "NOT (%s)" % same_key)]
        if schema.scope is not None:
            same_scope = same_form % (self.scope_value_sql("OLD." + schema.scope.quoted),
                                      self.scope_value_sql("NEW." + schema.scope.quoted))
            body.append(record("OLD", "U", "(%s) AND NOT (%s)" % (same_key, same_scope)))
        changed = self.concat_sql([
            "CASE WHEN %s THEN '' ELSE %s END" % (
                same_form % ("OLD." + column.quoted, "NEW." + column.quoted),
                self.text_literal(json.dumps(column.name) + ","))
            for column in schema.columns.values()])
        return body + [record("NEW", "U", columns=changed)]

    @staticmethod
    def concat_sql(parts):
        """SQL joining text expressions (SQLite: ||)."""
        return "(%s)" % " || ".join(parts)

    @staticmethod
    def text_literal(text):
        """A string literal of this database's SQL."""
        return _sql_literal(text)

    def scope_sql(self, schema, ref):
        """SQL writing the scope value of row `ref` (NEW, OLD, an alias) as the log keeps it.

        NULL for a table without a scope column: every device sees its entries.
        """
        if schema.scope is None:
            return "NULL"
        return self.scope_value_sql("%s.%s" % (ref, schema.scope.quoted))

    @staticmethod
    def scope_value_sql(expression):
        """SQL turning a scope column's value into the log's text (SQLite: TEXT affinity does)."""
        return expression

    def scope_where(self, column, values):
        """(WHERE text, params) matching rows whose scope `column` holds one of `values`."""
        if not values:
            return "0 = 1", []
        return "%s IN (%s)" % (column.quoted, ", ".join("?" for _ in values)), list(values)

    def key_logged(self, schema, row):
        """The log-form key of a row read from the table (driver's values, before decode_rows)."""
        return [None if row[position] is None else self._stored_logged(column, row[position])
                for column, position in zip(schema.key_columns, schema.key_positions)]

    def key_present(self, schema, logged):
        """Log-form key values as the pulled form a device holds."""
        return tuple(None if value is None else self._present_logged(column, value)
                     for column, value in zip(schema.key_columns, logged))


class SQLiteDatabase(Database):
    """SQLite through the standard library: one writer at a time, WAL journal."""

    name = "sqlite"
    quote = staticmethod(quote_sqlite)
    # a declared VARCHAR(n) holds text of any length: every row is measured before a pull reads it
    enforces_lengths = False
    # one writer at a time: AUTOINCREMENT numbers follow commit order
    numbers_at_commit = True
    cascades_fire_triggers = True
    transactional_ddl = True
    insert_ignore = "INSERT OR IGNORE"
    # the time a change is stamped with, and the cutoff compaction compares it to (? is a number
    # of days)
    now_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    cutoff_sql = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ? || ' days')"
    delete_oldest_sql = ("DELETE FROM cloudsync_changes WHERE seq IN"
                         " (SELECT seq FROM cloudsync_changes WHERE seq <= ? ORDER BY seq LIMIT ?)")
    # compaction: the newest seq it removes, per table and scope value
    compacted_upsert_sql = (
        "INSERT INTO cloudsync_compacted (table_name, scope, upto)"
        " SELECT table_name, COALESCE(scope, ''), MAX(seq) FROM cloudsync_changes WHERE seq <= ?"
        " GROUP BY table_name, COALESCE(scope, '')"
        " ON CONFLICT (table_name, scope) DO UPDATE SET upto = max(upto, excluded.upto)")
    json_array = "json_array"
    # the newest seq given out (AUTOINCREMENT keeps it, whatever compaction removed)
    head_sql = ("SELECT COALESCE((SELECT seq FROM sqlite_sequence"
                " WHERE name = 'cloudsync_changes'), 0)")
    head_part = "SELECT 'h', NULL, NULL, (%s)" % head_sql
    # ChangeLog.position: the head, the sum of the tables' epochs, the version
    position_sql = ("SELECT (%s), (SELECT value FROM cloudsync_meta WHERE name = 'epoch'),"
                    " sqlite_version(), NULL" % head_sql)
    columns_sql = "SELECT name FROM pragma_table_info(?)"
    tables_sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
    triggers_sql = "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'"
    trigger_definitions_sql = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
    trigger_table = "tbl_name"
    # no CREATE OR REPLACE: a changed trigger is dropped and made again
    replaces_triggers = False

    @staticmethod
    def stored_trigger(create_sql):
        """A CREATE TRIGGER as sqlite_master keeps it: the statement itself."""
        return create_sql

    def capture_identity(self, conn, tables):
        """{table: {"triggers": {name: ""}}}: cloudsync's triggers each table has now."""
        found = {table: {"triggers": {}} for table in tables}
        if tables:
            for table, name in self.query(conn, "SELECT tbl_name, name FROM sqlite_master"
                                                " WHERE type = 'trigger' AND tbl_name IN (%s)"
                                                % ", ".join("?" for _ in tables), tables):
                if _text(name) in _own_trigger_names(_text(table)):
                    found[_text(table)]["triggers"][_text(name)] = ""
        return found

    def schema_signature(self, conn, tables, triggers=True):
        """(the database's time, what changes with any change of any table's definition or
        trigger, None): the schema version covers triggers too."""
        now, version = self.query(conn, "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now'),"
                                        " (SELECT schema_version FROM pragma_schema_version)")[0]
        return now, (version,), None

    @staticmethod
    def truncated_between(before, after):
        """SQLite has no TRUNCATE: a DELETE of every row fires the triggers."""
        return False
    lock_rows = ""                  # one writer at a time: the push's write lock covers every row
    # a push records its device in cloudsync_context: always a transaction
    autocommit_atomic = False
    SQLITE_CONSTRAINT_TRIGGER = 1811    # RAISE(ABORT|FAIL|ROLLBACK, 'message') in a trigger

    def __init__(self, config):
        super().__init__(config)
        sqlite3.register_adapter(decimal.Decimal, str)   # exact decimals go in as text

    def _connect(self):
        """A new connection in autocommit mode: WAL, synchronous=FULL, foreign keys on."""
        try:
            conn = sqlite3.connect(self.config.db_path, timeout=self.config.db_wait_seconds,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise DatabaseUnavailable("cannot open %s: %s" % (self.config.db_path, error),
                                      "check DB_PATH and that its folder is writable",
                                      lasting=True) from None
        conn.execute("PRAGMA journal_mode=WAL")     # readers never block the writer
        conn.execute("PRAGMA synchronous=FULL")     # an acknowledged push survives a power cut
        conn.execute("PRAGMA foreign_keys=ON")      # as InnoDB enforces them on MySQL
        return conn

    def _begin(self, conn):
        """BEGIN IMMEDIATE: the write lock now, not at the first write."""
        # a write lock held past DB_WAIT_SECONDS: Retryable
        with self._errors():
            # take the write lock now, not at the first write
            conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn):
        """COMMIT."""
        with self._errors():
            conn.execute("COMMIT")

    def _rollback(self, conn):
        """ROLLBACK."""
        # RAISE(ROLLBACK) in a trigger has already done it
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    @contextmanager
    def _errors(self):
        """Turn SQLite's exceptions into DataRejected, Retryable or DatabaseUnavailable."""
        try:
            yield
        except sqlite3.IntegrityError as error:
            if getattr(error, "sqlite_errorcode", None) == self.SQLITE_CONSTRAINT_TRIGGER:
                raise DataRejected(str(error), rule=True) from None
            raise DataRejected(_sqlite_message(error), duplicate="UNIQUE" in str(error)) from None
        except OverflowError:
            raise DataRejected("a whole number is beyond SQLite's 64-bit integers") from None
        except sqlite3.DataError as error:
            raise DataRejected(str(error)) from None
        except sqlite3.OperationalError as error:
            text = str(error)
            if "locked" in text or "busy" in text:
                raise Retryable(text) from None     # the write lock
            if "no such table" in text or "no such column" in text:
                raise SchemaMoved(text) from None
            if "unable to open" in text or "disk I/O" in text:
                raise DatabaseUnavailable(text) from None
            raise

    def execute(self, conn, sql, params=()):
        """Run one statement; return the number of rows it matched."""
        with self._errors():
            return conn.execute(sql, params).rowcount

    def executemany(self, conn, sql, rows):
        """Run one statement for many parameter rows."""
        with self._errors():
            conn.executemany(sql, rows)

    def query(self, conn, sql, params=()):
        """Run a SELECT; return its rows as tuples."""
        with self._errors():
            return conn.execute(sql, params).fetchall()

    def ping(self, conn):
        """A real round trip to the database."""
        self.query(conn, "SELECT 1")

    def server_version(self, conn):
        """The database engine's version string."""
        return self.version_name(sqlite3.sqlite_version)

    @staticmethod
    def version_name(version):
        """The version as status shows it."""
        return "SQLite " + version

    def driver(self):
        """The driver in use, as status and the start-up log show it."""
        return "sqlite3 (Python %s)" % sys.version.split()[0]

    def introspect(self, conn, table):
        """Read one table's columns (generated ones too) and primary key from the catalogue."""
        rows = self.query(conn, "SELECT name, type, pk, hidden, \"notnull\", dflt_value"
                                " FROM pragma_table_xinfo(?)", (table,))
        if not rows:
            raise SchemaError("table %r does not exist in %s" % (table, self.config.db_path))
        columns, keyed = [], []
        for name, declared, key_position, hidden, not_null, default in rows:
            if hidden == 1:                 # a virtual table's hidden column
                continue
            affinity = _sqlite_affinity(declared)
            kind, scale = _sqlite_kind(declared, affinity)
            column = Column(name, quote_sqlite(name), kind, declared or "", scale=scale,
                            generated=hidden in (2, 3), int_limit=1 << 63, affinity=affinity,
                            checks_decimals=kind == "decimal", dates_as_text=True)
            if not column.generated:
                column.default = constant_default(column, default, not not_null)
            columns.append(column)
            if key_position:
                keyed.append((key_position, name))
        if not keyed:
            raise SchemaError("table %r has no primary key; cloudsync needs one to find rows"
                              % table)
        key = [name for _, name in sorted(keyed)]
        # only an INTEGER PRIMARY KEY (the rowid) is generated; other SQLite keys would take NULL
        generated = len(key) == 1 and any(
            row[0] == key[0] and (row[1] or "").strip().upper() == "INTEGER" for row in rows)
        schema = TableSchema(table, quote_sqlite(table), columns, key, generated)
        for column in schema.key_columns:
            if column.kind == "float":
                raise SchemaError("table %r: primary key column %r is a floating-point %s, which "
                                  "cannot name a row exactly; use an integer, decimal, text, date "
                                  "or binary key" % (table, column.name, column.declared))
        schema.decoders = [(position, _sqlite_decimal, column)
                           for position, column in enumerate(columns) if column.kind == "decimal"]
        schema.key_sql = self.key_sql(schema)
        for (index,) in self.query(conn, "SELECT name FROM pragma_index_list(?)"
                                         " WHERE \"unique\" AND origin <> 'pk'", (table,)):
            names = tuple(_text(name) for (name,) in self.query(
                conn, "SELECT name FROM pragma_index_info(?) ORDER BY seqno", (_text(index),)))
            if names and None not in names:
                schema.unique.append(names)
        return schema

    @staticmethod
    def added_sql(column):
        """An increment's SQL: a DECIMAL(p,s) rounded to its scale (SQLite keeps it as a REAL)."""
        if column.kind == "decimal" and column.scale is not None:
            return "round(COALESCE(%s, 0) + ?, %d)" % (column.quoted, column.scale)
        return _plain_added(column)

    def rows_as_json(self, conn, schema, limit, scope):
        """SQLite rows are encoded in Python (its decimals need rounding here first)."""
        return None

    def insert_defaults_sql(self, schema):
        """An INSERT in which every column takes its default (a generated key)."""
        return "INSERT INTO %s DEFAULT VALUES" % schema.quoted

    # -- change capture (see that section) --------------------------------------

    @staticmethod
    def log_tables():
        """cloudsync's own tables."""
        return SQLITE_LOG_TABLES

    def index_columns(self, conn, table):
        """The columns of each index of `table`, in index order (the primary key's first)."""
        found = [tuple(_text(name) for (name,) in self.query(
            conn, "SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk", (table,)))]
        for (name,) in self.query(conn, "SELECT name FROM pragma_index_list(?)", (table,)):
            found.append(tuple(_text(column) for (column,) in self.query(
                conn, "SELECT name FROM pragma_index_info(?) ORDER BY seqno", (_text(name),))))
        return found

    @staticmethod
    def devices_table():
        """CREATE TABLE of cloudsync_devices."""
        return SQLITE_DEVICES_TABLE

    @staticmethod
    def devices_upsert():
        """The statement flushing one device's counts into cloudsync_devices."""
        return SQLITE_DEVICES_UPSERT

    def trigger_sql(self, schema, event):
        """CREATE TRIGGER text numbering one event of one table into cloudsync_changes, with the
        device and batch of the push in progress (cloudsync_context: SQLite has no session
        variables; safe because the push holds the only write lock and clears it before
        committing)."""
        table_literal = _sql_literal(schema.name)

        def record(row, op, guard="", columns="NULL"):
            # the push's change only when its statement writes this table (not a trigger of the
            # shop's writing here from another table, nor a cascade)
            own = "table_name = %s" % table_literal
            return ("INSERT INTO cloudsync_changes (table_name, row_key, op, device_id, batch_id,"
                    " changed_at, scope, columns, push_id)"
                    " SELECT %s, %s, '%s', CASE WHEN %s THEN device_id END,"
                    " CASE WHEN %s THEN batch_id END, %s, %s, %s, CASE WHEN %s THEN push_id END"
                    " FROM cloudsync_context WHERE id = 1%s"
                    % (table_literal, self.key_sql(schema, row), op, own, own, self.now_sql,
                       self.scope_sql(schema, row), columns, own,
                       " AND " + guard if guard else ""))
        if event in REPLACED_EVENTS:
            # SQLite deletes the rows a REPLACE pushes out (a UNIQUE column clashing) without
            # firing their DELETE trigger: logged beforehand as changed, another writer's; a
            # device looks each up and deletes what is gone (an INSERT OR IGNORE leaves them)
            clash = " OR ".join("(%s)" % " AND ".join(
                "t.%s = NEW.%s" % (quote_sqlite(name), quote_sqlite(name)) for name in unique)
                for unique in schema.unique)
            keyed = self.key_sql_from(schema, {column.name: "t." + column.quoted
                                               for column in schema.key_columns})
            statement = ("INSERT INTO cloudsync_changes"
                         " (table_name, row_key, op, device_id, batch_id, changed_at, scope,"
                         " columns) SELECT %s, %s, 'U', NULL, NULL, %s, %s, NULL FROM %s AS t"
                         " WHERE %s" % (table_literal, keyed, self.now_sql,
                                        self.scope_sql(schema, "t"), schema.quoted, clash))
            return "CREATE TRIGGER %s BEFORE %s ON %s BEGIN %s; END" % (
                self.quote(_trigger_name(schema.name, event)), REPLACED_EVENTS[event],
                schema.quoted, statement)
        if event == "upd":
            # byte for byte, not by the column's collation: 'abc' -> 'ABC' is a new key to a device;
            # an update that changes the key deletes the old row and creates a new one
            same = " AND ".join("OLD.%s IS NEW.%s COLLATE BINARY" % (column.quoted, column.quoted)
                                for column in schema.key_columns)
            body = self.logged_update(schema, record, same, "%s IS %s COLLATE BINARY")
        else:
            body = [record("NEW", "I")] if event == "ins" else [record("OLD", "D")]
        return "CREATE TRIGGER %s AFTER %s ON %s BEGIN %s; END" % (
            self.quote(_trigger_name(schema.name, event)), TRIGGER_EVENTS[event], schema.quoted,
            "; ".join(body))

    @contextmanager
    def attributed(self, conn, device_id, batch_id, table, push_id):
        """In a push's transaction: changes its statements make to `table` (attribute_table
        moves it) carry this device, batch and push."""
        self.execute(conn, "UPDATE cloudsync_context SET device_id = ?, batch_id = ?,"
                           " table_name = ?, push_id = ? WHERE id = 1",
                     (device_id, batch_id, table, push_id))
        yield
        self.execute(conn, "UPDATE cloudsync_context SET device_id = NULL, batch_id = NULL,"
                           " table_name = NULL, push_id = NULL WHERE id = 1")

    def attribute_table(self, conn, table):
        """The push's next statements write `table`."""
        self.execute(conn, "UPDATE cloudsync_context SET table_name = ? WHERE id = 1", (table,))

    @contextmanager
    def altering(self, conn, table, triggers):
        """One transaction for an ALTER and the new triggers (SyncEngine.alter).

        The old triggers go first: SQLite refuses to drop a column a trigger names.
        """
        with self.transaction(conn):
            for name in triggers:
                self.execute(conn, "DROP TRIGGER IF EXISTS %s" % self.quote(name))
            yield

    @staticmethod
    def trigger_events(schema):
        """The events a table's triggers record: with UNIQUE columns besides the key, the rows a
        REPLACE removes too."""
        return tuple(TRIGGER_EVENTS) + (tuple(REPLACED_EVENTS) if schema.unique else ())

    def upsert(self, conn, schema, values, scope):
        """Insert the row, or set the given columns on the row with its key.

        Another unique column clashing is refused. With a scope, a row with the
        key outside it is left as it is, and refused as a duplicate.
        """
        changes = [schema.columns[name].quoted for name in values if name not in schema.primary_key]
        limit, params = ("", []) if scope.where is None or not changes \
            else (" WHERE " + scope.where, scope.params)
        written = self.execute(conn, "%s ON CONFLICT (%s) DO %s" % (
            insert_sql(schema, list(values)), schema.key_order,
            "UPDATE SET " + ", ".join("%s = excluded.%s" % (quoted, quoted) for quoted in changes)
            + limit if changes else "NOTHING"), tuple(values.values()) + tuple(params))
        if scope.where is not None and not written and not self.query(conn, *exists_sql(
                schema, [values[name] for name in schema.primary_key], scope)):
            raise DataRejected("another row holds this key", duplicate=True)

    # -- row keys (see Database) --------------------------------------------------
    # A key value is stored in whatever form SQLite's type affinity gave it; the log
    # keeps that: integers and text as they are, a REAL exactly (quote() writes as
    # many digits as it takes), a BLOB as hex. json_array cannot hold a BLOB.

    def _key_column_sql(self, column):
        """SQL writing one key column as the change log holds it ({0}: the column)."""
        if column.kind == "binary":
            # a BLOB as hex; text or a number another program stored there, wrapped: ["abc"] is
            # not hex
            return "CASE typeof({0}) WHEN 'blob' THEN hex({0}) ELSE json_array({0}) END"
        return ("CASE typeof({0}) WHEN 'real'"
                " THEN (CASE WHEN abs({0}) <= 1.7976931348623157e308 THEN json(quote({0}))"
                " ELSE quote({0}) END) WHEN 'blob' THEN hex({0}) ELSE {0} END")

    @staticmethod
    def _json_array_text(values):
        """Key values as json_array() writes them."""
        return "[" + ",".join("null" if value is None
                              else _sqlite_real_text(value) if isinstance(value, float)
                              else json.dumps(value, ensure_ascii=False) for value in values) + "]"

    def _log_form(self, column, value):
        """A pushed key value as the log holds it."""
        stored = _sqlite_stored(column.affinity, value)
        if isinstance(stored, (bytes, bytearray)):
            return bytes(stored).hex().upper()
        return stored

    def _bind_logged(self, column, value, ordered=False):
        """A logged key value as the value that matches the row."""
        if column.kind == "binary":
            return value[0] if isinstance(value, list) else bytes.fromhex(value)
        return value

    @staticmethod
    def _stored_logged(column, value):
        """A stored key value as the log holds it."""
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).hex().upper()
        return [value] if column.kind == "binary" else value

    def _present_logged(self, column, value):
        """A logged key value in pulled form."""
        if column.kind == "binary":
            return value[0] if isinstance(value, list) \
                else base64.b64encode(bytes.fromhex(value)).decode("ascii")
        if column.kind == "decimal":
            return _sqlite_decimal(value, column)
        return value


def _sqlite_affinity(declared):
    """SQLite's own rules for the type affinity of a declared column type."""
    upper = (declared or "").upper()
    if "INT" in upper:
        return "INTEGER"
    if "CHAR" in upper or "CLOB" in upper or "TEXT" in upper:
        return "TEXT"
    if "BLOB" in upper or not upper.strip():
        return "BLOB"
    if "REAL" in upper or "FLOA" in upper or "DOUB" in upper:
        return "REAL"
    return "NUMERIC"


def _sqlite_kind(declared, affinity):
    """A declared SQLite type as a value kind and decimal scale (None: whatever is stored)."""
    upper = (declared or "").upper().strip()
    match = re.match(r"(DECIMAL|NUMERIC)\s*(?:\(\s*\d+\s*(?:,\s*(\d+)\s*)?\))?", upper)
    if match:
        scale = None if "(" not in upper else int(match.group(2) or 0)
        return "decimal", scale
    if affinity == "INTEGER":
        return "integer", None
    if "BLOB" in upper or "BINARY" in upper:
        return "binary", None
    if affinity == "REAL":
        return "float", None
    for prefix, kind in (("DATETIME", "datetime"), ("TIMESTAMP", "datetime"), ("DATE", "date"),
                         ("TIME", "time"), ("JSON", "json")):
        if upper.startswith(prefix):
            return kind, None
    return ("text" if affinity == "TEXT" else "other"), None


def _sqlite_stored(affinity, value):
    """The value SQLite stores for a bound value under a column affinity (its conversion rules)."""
    if isinstance(value, decimal.Decimal):
        value = str(value)                  # the adapter binds exact decimals as text
    if isinstance(value, (bytes, bytearray)) or value is None:
        return value
    if affinity == "TEXT":
        return value if isinstance(value, str) \
            else _sqlite_real_text(value) if isinstance(value, float) else str(value)
    if affinity == "BLOB":
        return value
    if isinstance(value, str):
        if not _NUMBER_TEXT.fullmatch(value):
            return value
        number = decimal.Decimal(value.strip())
        value = int(number) if affinity != "REAL" and number == number.to_integral_value() \
            and -(1 << 63) <= number < 1 << 63 else float(number)
    if isinstance(value, float) and affinity != "REAL" and value.is_integer() \
            and -(1 << 63) <= value < 1 << 63:
        return int(value)
    if isinstance(value, int) and affinity == "REAL":
        return float(value)
    return value


def _sqlite_real_text(value):
    """A REAL as SQLite's quote() writes it: 15 significant digits, 20 if 15 do not give it back."""
    def shortest(digits, style):
        text = ("%." + str(digits) + style) % value
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa and style == "g":
            mantissa += ".0"
        return mantissa + ("e" + exponent if exponent else "")
    if not math.isfinite(value):
        return json.dumps("Inf" if value > 0 else "-Inf")
    text = shortest(15, "g")
    return text if float(text) == value else shortest(20, "e")


def _sqlite_message(error):
    """SQLite's words for a refused value, with the column named where it can be."""
    text = str(error)
    if text.startswith("UNIQUE constraint failed"):
        return "a row with this primary key or unique value already exists"
    if text.startswith("NOT NULL constraint failed"):
        return "column %r may not be null" % text.rsplit(".", 1)[-1]
    if text.startswith("FOREIGN KEY"):
        return "a foreign key refers to a row that does not exist"
    if text.startswith("CHECK constraint failed"):
        return "a CHECK constraint refused the value"
    return "the database refused the values"


class MySQLDatabase(Database):
    """MySQL/MariaDB through mysql-connector-python (C extension when it loads)."""

    name = "mysql"
    quote = staticmethod(quote_mysql)
    # a row of declared lengths only is never larger than they allow (Pulls.row_bytes_bound)
    enforces_lengths = True
    # commits run at once: a sequencer numbers changes after they commit
    numbers_at_commit = False
    # InnoDB writes the rows a foreign-key cascade reaches without triggers
    cascades_fire_triggers = False
    transactional_ddl = False
    insert_ignore = "INSERT IGNORE"
    now_sql = "NOW(6)"
    cutoff_sql = "NOW(6) - INTERVAL ? DAY"
    delete_oldest_sql = "DELETE FROM cloudsync_changes WHERE seq <= ? ORDER BY seq LIMIT ?"
    # compaction: the newest seq it removes, per table and scope value
    compacted_upsert_sql = (
        "INSERT INTO cloudsync_compacted (table_name, scope, upto)"
        " SELECT table_name, COALESCE(scope, ''), MAX(seq) FROM cloudsync_changes WHERE seq <= ?"
        " GROUP BY table_name, COALESCE(scope, '')"
        " ON DUPLICATE KEY UPDATE upto = GREATEST(upto, VALUES(upto))")
    json_array = "JSON_ARRAY"
    # the newest seq given out: the numberer keeps it
    head_sql = "SELECT value FROM cloudsync_meta WHERE name = 'last_seq'"
    head_part = "SELECT 'h', NULL, NULL, value FROM cloudsync_meta WHERE name = 'last_seq'"
    # ChangeLog.position: the head, the sum of the tables' epochs, the server's version, and the
    # newest change waiting to be numbered
    position_sql = ("SELECT (SELECT value FROM cloudsync_meta WHERE name = 'last_seq'),"
                    " (SELECT value FROM cloudsync_meta WHERE name = 'epoch'), VERSION(),"
                    " (SELECT MAX(id) FROM cloudsync_pending)")
    columns_sql = ("SELECT COLUMN_NAME FROM information_schema.COLUMNS"
                   " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?")
    tables_sql = "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
    triggers_sql = ("SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS"
                    " WHERE TRIGGER_SCHEMA = DATABASE()")
    trigger_definitions_sql = (
        "SELECT TRIGGER_NAME, ACTION_STATEMENT FROM information_schema.TRIGGERS"
        " WHERE TRIGGER_SCHEMA = DATABASE()")
    trigger_table = "EVENT_OBJECT_TABLE"
    replaces_triggers = True        # CREATE OR REPLACE TRIGGER swaps a trigger atomically

    @staticmethod
    def stored_trigger(create_sql):
        """A CREATE TRIGGER as information_schema keeps it: its body, from BEGIN."""
        return create_sql[create_sql.index(" BEGIN ") + 1:]

    # whether information_schema.INNODB_SYS_TABLES answers this user (it needs PROCESS): the
    # table ids there are how a TRUNCATE is seen
    sees_table_ids = None

    def capture_identity(self, conn, tables):
        """{table: {"triggers": {name: created}, "id": InnoDB table id or None}}.

        A trigger made again (by a dump, by another program) has another
        creation time; a truncated table, or one swapped for a copy, another id.
        """
        node = _text(self.query(conn, "SELECT CONCAT(@@hostname, ':', @@port)")[0][0])
        found = {table: {"triggers": {}, "id": None, "node": node} for table in tables}
        if not tables:
            return found
        marks = ", ".join("?" for _ in tables)
        for table, name, created in self.query(
                conn, "SELECT EVENT_OBJECT_TABLE, TRIGGER_NAME, CAST(CREATED AS CHAR)"
                      " FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
                      " AND EVENT_OBJECT_TABLE IN (%s)" % marks, tables):
            if _text(name) in _own_trigger_names(_text(table)):
                found[_text(table)]["triggers"][_text(name)] = _text(created)
        for table, table_id in self._table_ids(conn, tables):
            found[table]["id"] = table_id
        return found

    def _table_ids(self, conn, tables):
        """[(table, InnoDB table id)], or [] when this user may not see them."""
        if self.sees_table_ids is False:
            return []
        try:
            rows = self.query(conn, "SELECT NAME, TABLE_ID FROM"
                                    " information_schema.INNODB_SYS_TABLES"
                                    " WHERE NAME IN (%s)" % ", ".join(
                                        "CONCAT(DATABASE(), '/', ?)" for _ in tables), tables)
        except Denied:
            self.sees_table_ids = False
            log.warning("the database user may not read information_schema.INNODB_SYS_TABLES "
                        "(the PROCESS privilege): a TRUNCATE TABLE of an allowed table is not "
                        "seen; grant PROCESS (cloudsync.py check)")
            return []
        self.sees_table_ids = True
        return [(_text(name).split("/", 1)[1], int(table_id)) for name, table_id in rows]

    def schema_signature(self, conn, tables, triggers=True):
        """(the database's time, what changes with any change of these tables' definitions, and
        cloudsync's triggers on them or None when not asked).

        The definitions: their columns, their creation times (a table made
        again, or a copy swapped in, to the second) and the server's count of
        TRUNCATEs (ChangeLog.follow then tells which table by its InnoDB id).
        One round trip of 1-2 ms, made every SCHEMA_LOOK_SECONDS. The
        triggers only when `triggers`: information_schema.TRIGGERS parses every
        trigger of the tables (the look takes 8.6 ms with them for 50 tables,
        1.8 ms without); they also catch a table made again within the second
        it was made before.
        """
        marks = ", ".join("?" for _ in tables)
        parts = [
            "NOW(6)",
            # the server's own counts and times: which node of a cluster they are of
            "CONCAT(@@hostname, ':', @@port)",
            "(SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS"
            " WHERE VARIABLE_NAME = 'COM_TRUNCATE')",
            "(SELECT GROUP_CONCAT(CONCAT_WS(':', TABLE_NAME, COLUMN_NAME, COLUMN_TYPE,"
            " IFNULL(COLUMN_DEFAULT, '-'), IS_NULLABLE, COLUMN_KEY, EXTRA)"
            " ORDER BY TABLE_NAME, ORDINAL_POSITION SEPARATOR '|') FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN (%s))" % marks,
            "(SELECT GROUP_CONCAT(CONCAT_WS(':', TABLE_NAME, CREATE_TIME) ORDER BY TABLE_NAME)"
            " FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
            " AND TABLE_NAME IN (%s))" % marks]
        params = list(tables) * 2
        if triggers:
            parts.append("(SELECT GROUP_CONCAT(CONCAT_WS(':', EVENT_OBJECT_TABLE, TRIGGER_NAME,"
                         " CREATED) ORDER BY TRIGGER_NAME SEPARATOR '|')"
                         " FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
                         " AND EVENT_OBJECT_TABLE IN (%s))" % marks)
            params += list(tables)
        row = [_text(value) for value in self.query(conn, "SELECT " + ", ".join(parts), params)[0]]
        if triggers:
            # no trigger left at all is "" (GROUP_CONCAT gives NULL), never None: "not looked at"
            return row[0], tuple(row[1:-1]), row[-1] or ""
        return row[0], tuple(row[1:]), None

    @staticmethod
    def truncated_between(before, after):
        """Whether the server ran a TRUNCATE between two schema signatures (their definitions'
        second part); None when they are of two nodes of a cluster (not known)."""
        if before[0][0] != after[0][0]:
            return None
        return before[0][1] != after[0][1]
    lock_rows = " FOR UPDATE"
    autocommit_atomic = True    # one statement in autocommit is atomic, its triggers included
    # the C extension; the driver falls back to pure Python when it cannot load
    use_pure = False

    def __init__(self, config):
        super().__init__(config)
        try:
            import mysql.connector
            from mysql.connector import errorcode
        except ImportError:
            raise ConfigError("DB_HOST is set, but mysql-connector-python is not installed for %s: "
                              "run cloudsync.py with the virtualenv's python (.venv/bin/python), "
                              "or pip install -r requirements.txt" % sys.executable) from None
        self._driver = mysql.connector
        self._codes = errorcode
        self._node = 0              # the DB_HOST node connections go to (Config.db_nodes)
        self._galera = None         # whether the server is a Galera node (catch_up), once known
        # _DriverStatements or _CursorStatements, chosen at the first connection
        self.statements = None
        # the most a statement may take (None: no bound, for the commands that alter tables)
        self.statement_seconds = None

    def bound_statements(self):
        """From now on every statement ends within DB_WAIT_SECONDS + STATEMENT_MARGIN_SECONDS
        (read and write timeouts); the connections opened before are closed."""
        self.statement_seconds = int(math.ceil(self.config.db_wait_seconds)) \
            + STATEMENT_MARGIN_SECONDS
        self.pool.close()

    def _connect(self):
        """A new connection: UTC, READ COMMITTED, bounded lock waits, matched-row counts."""
        nodes = self.config.db_nodes()
        for attempt in range(len(nodes)):
            node = nodes[(self._node + attempt) % len(nodes)]
            try:
                conn = self._connect_to(*node)
            except DatabaseUnavailable as error:
                # one server: a refusal of the settings is final; several nodes: try the next
                # (a node's name may stop resolving while it is down)
                if attempt == len(nodes) - 1 or error.lasting and len(nodes) == 1:
                    raise
                continue
            if attempt:
                # DB_HOST lists several nodes (a Galera cluster): the next one that answers
                self._node = (self._node + attempt) % len(nodes)
                log.warning("database node %s:%d did not answer; using %s:%d (DB_HOST)"
                            % (nodes[(self._node - attempt) % len(nodes)] + node))
            return conn

    def _connect_to(self, host, port):
        """A new connection to one database server."""
        connector = self._driver
        try:
            conn = connector.connect(
                host=host, port=port, user=self.config.db_user,
                password=self.config.db_pass, database=self.config.db_name,
                charset="utf8mb4", collation="utf8mb4_unicode_ci", autocommit=True,
                use_pure=self.use_pure,
                # while the database does not answer, a new connection is a quick probe (1 s): a
                # request that waited for a free connection does not wait that long again
                connection_timeout=1 if self.pool.down_since is not None
                else int(self.config.db_connect_timeout_seconds) or 1,
                # a database that stops answering (frozen, a network that drops packets) ends a
                # statement with an error, which the request answers with 503
                read_timeout=self.statement_seconds, write_timeout=self.statement_seconds,
                # rowcount of UPDATE counts matched rows, not only changed ones
                client_flags=[connector.constants.ClientFlag.FOUND_ROWS],
            )
            cursor = conn.cursor()
            # each statement sees what is committed now: the change log relies on it
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            # Every wait is bounded: row locks (innodb_lock_wait_timeout) and table locks
            # (lock_wait_timeout: LOCK TABLES, an ALTER in progress; MySQL's default is a year).
            # TIMESTAMP values are read and written in UTC, whatever the server's time zone.
            cursor.execute("SET SESSION innodb_lock_wait_timeout = %d, lock_wait_timeout = %d, "
                           "time_zone = '+00:00'"
                           % ((max(1, int(self.config.db_wait_seconds)),) * 2))
            cursor.close()
            if self.statements is None:
                self.statements = _DriverStatements() if _DriverStatements.available(conn) \
                    else _CursorStatements()
                if isinstance(self.statements, _CursorStatements):
                    log.warning("this mysql-connector-python lacks the internals of cloudsync's "
                                "fast path; statements go through cursors (slower, same results)")
            return conn
        except connector.Error as error:
            errno = getattr(error, "errno", None)
            words = (getattr(error, "msg", None) or str(error)).strip().rstrip(".")
            raise DatabaseUnavailable(
                "%s (MySQL error %s)" % (words, errno or "?"),
                self._CONNECT_FIXES.get(errno, "check DB_HOST, DB_PORT, DB_USER, DB_PASS and "
                                               "DB_NAME, and that the server runs"),
                lasting=errno in self._SETTINGS_REFUSED) from None

    def _safe_message(self, error):
        """An error for a client: its number, never the server's text."""
        return "MySQL error %s" % (getattr(error, "errno", None) or "?")

    # what to do about the commonest reasons a connection is refused
    _CONNECT_FIXES = {
        1049: "create the database (CREATE DATABASE ...) or correct DB_NAME",
        1045: "check DB_USER and DB_PASS, and that the user may connect from this host",
        1044: "check DB_NAME (a database the user was never granted is refused the same way), "
              "then grant the user its privileges on it (python cloudsync.py check lists them)",
        2003: "check DB_HOST and DB_PORT, and that the database server is running",
        2002: "check DB_HOST and DB_PORT, and that the database server is running",
        2005: "check DB_HOST: the name does not resolve",
        1040: "the server has no connection left: lower DB_POOL_SIZE or raise its max_connections",
    }

    # unknown database, access denied (password, host, database), unknown host: the settings, not
    # the moment
    _SETTINGS_REFUSED = {1049, 1045, 1044, 1698, 2005}

    def _begin(self, conn):
        """START TRANSACTION."""
        with self._errors():
            self.statements.begin(conn)

    def _commit(self, conn):
        """COMMIT."""
        with self._errors():
            conn.commit()

    def _rollback(self, conn):
        """ROLLBACK."""
        conn.rollback()

    # errno values that mean "the server is not there" or "try again"
    # client-side connection errors; too many connections, shutdown in progress, network errors,
    # connection killed (MariaDB kills sessions while it shuts down), idle disconnect
    # and a Galera node that is not part of the primary component (1047: not ready for use)
    _UNAVAILABLE = {2002, 2003, 2005, 2006, 2013, 2055, 1040, 1053, 1158, 1159, 1160, 1927, 4031,
                    1047}
    # lock wait timeout, deadlock (Galera's certification failure is one too)
    _RETRYABLE = {1205, 1213}
    # read_only (or super_read_only): a replica, or a node set read-only
    _READ_ONLY = {1290, 1836}
    # a table or column not there: the schema may have changed under the statement
    _MOVED = {1146, 1054}
    _DUPLICATE = {1062, 1586}
    _RULE = {1644}                     # SIGNAL in a trigger of the user's (ER_SIGNAL_EXCEPTION)
    _DENIED = {1142, 1419, 1227, 1044}  # this user may not create a table or a trigger
    _REJECTED = {
        1048: "column %(column)s may not be null",
        1364: "column %(column)s has no default value and must be given",
        1406: "the value for column %(column)s is too long",
        1264: "the value for column %(column)s is out of range",
        1366: "the value for column %(column)s has the wrong type",
        1292: "the value for column %(column)s is not a valid date or number",
        1265: "the value for column %(column)s was truncated",
        1452: "a foreign key refers to a row that does not exist",
        1451: "another row still refers to this row",
        1367: "the value for column %(column)s is out of range",
        1690: "a value is out of range",
        3819: "a CHECK constraint refused the value",
        4025: "a CHECK constraint refused the value",
        1267: "a value holds characters its column's character set cannot store",
        1270: "a value holds characters its column's character set cannot store",
        1271: "a value holds characters its column's character set cannot store",
        1906: "column %(column)s is generated by the database and cannot be written",
        3105: "column %(column)s is generated by the database and cannot be written",
        3140: "the value for column %(column)s is not valid JSON",
        4038: "a value is not valid JSON",
        1365: "a division by zero",
        1416: "a value is not valid for a spatial column",
    }

    @contextmanager
    def _errors(self):
        """Turn the driver's exceptions into DataRejected, Retryable or DatabaseUnavailable."""
        connector = self._driver
        try:
            yield
        except connector.Error as error:
            errno = getattr(error, "errno", None)
            if errno in self._DENIED:
                raise Denied("MySQL error %s: %s"
                             % (errno, getattr(error, "msg", "") or "")) from None
            if errno in self._READ_ONLY:
                raise DatabaseUnavailable(
                    "the database is read-only (MySQL error %s: read_only is ON)" % errno,
                    READ_ONLY_FIX, lasting=True) from None
            if errno in self._RULE or (getattr(error, "sqlstate", None) or "").startswith("45"):
                # the user's own rule (a trigger's SIGNAL SQLSTATE '45000'): its message is for
                # the device
                raise DataRejected(getattr(error, "msg", None)
                                   or "refused by a rule of the database", rule=True) from None
            if errno in self._DUPLICATE:
                raise DataRejected("a row with this primary key or unique value already exists",
                                   duplicate=True) from None
            if errno in self._REJECTED:
                column = _mysql_error_column(getattr(error, "msg", "") or "")
                raise DataRejected(self._REJECTED[errno] % {"column": column}) from None
            if errno == 1213:
                raise Deadlocked(self._safe_message(error)) from None
            if errno in self._RETRYABLE:
                raise Retryable(self._safe_message(error)) from None
            if errno in self._MOVED:
                raise SchemaMoved(self._safe_message(error)) from None
            if errno in self._UNAVAILABLE \
                    or isinstance(error, (connector.InterfaceError, connector.OperationalError)):
                raise DatabaseUnavailable(self._safe_message(error)) from None
            raise
        except Exception as error:
            # The C extension's commit() and rollback() raise its own MySQLInterfaceError, which is
            # not a mysql.connector.Error ("Lost connection to MySQL server during query").
            if type(error).__name__ == "MySQLInterfaceError":
                errno = getattr(error, "errno", None)
                # a Galera cluster certifies a transaction at its COMMIT: a conflict with
                # another node's is a deadlock there, undone, to run again
                kind = Deadlocked if errno == 1213 else Retryable if errno in self._RETRYABLE \
                    else DatabaseUnavailable
                raise kind("MySQL error %s" % (errno or "?")) from None
            raise

    # Statements reach the server through self.statements, chosen at the first
    # connection (see "Private APIs, each with its public fallback").

    def execute(self, conn, sql, params=()):
        """Run one statement; return the number of rows it matched."""
        with self._errors():
            return self.statements.execute(conn, sql, params)

    def executemany(self, conn, sql, rows):
        """Run an INSERT ... VALUES (?, ...) for many rows as multi-row statements up to ~1 MiB."""
        with self._errors():
            self.statements.executemany(conn, sql, rows)

    def query(self, conn, sql, params=()):
        """Run a SELECT; return its rows as tuples."""
        with self._errors():
            return self.statements.query(conn, sql, params)

    def ping(self, conn):
        """A real round trip to the database."""
        self.query(conn, "SELECT 1")

    def server_version(self, conn):
        """The database engine's version string."""
        return self.version_name(_text(self.query(conn, "SELECT VERSION()")[0][0]))

    def catch_up(self, conn):
        """A Galera node: a causal read (wsrep_sync_wait) returns once the node has applied every
        commit the cluster made before it, bounded by the statement's time (then 503)."""
        if self._galera is None:
            rows = self.query(conn, "SHOW VARIABLES LIKE 'wsrep_on'")
            self._galera = bool(rows) and _text(rows[0][1]).upper() == "ON"
        if self._galera:
            # three statements, not SET STATEMENT ... FOR (MariaDB's): Galera on MySQL has it not
            self.execute(conn, "SET SESSION wsrep_sync_wait = 1")
            try:
                self.query(conn, "SELECT 1")
            finally:
                self.execute(conn, "SET SESSION wsrep_sync_wait = DEFAULT")
        return self._galera

    @staticmethod
    def version_name(version):
        """The version as status shows it."""
        return "MySQL " + version

    def driver(self):
        """The driver and whether its C extension is active."""
        from mysql.connector import version
        implementation = "C extension" if self._driver.HAVE_CEXT else "pure Python (slow)"
        return "mysql-connector-python %s (%s)" % (".".join(map(str, version.VERSION[:3])),
                                                   implementation)

    # -- columns --------------------------------------------------------------------

    _KINDS = {
        "tinyint": "integer", "smallint": "integer", "mediumint": "integer", "int": "integer",
        "bigint": "integer", "year": "integer", "bit": "bit", "decimal": "decimal",
        "float": "float", "double": "float", "date": "date", "datetime": "datetime",
        "timestamp": "timestamp", "time": "time", "binary": "binary", "varbinary": "binary",
        "tinyblob": "binary", "blob": "binary", "mediumblob": "binary", "longblob": "binary",
        "set": "set", "char": "text", "varchar": "text", "tinytext": "text", "text": "text",
        "mediumtext": "text", "longtext": "text", "enum": "enum", "json": "json",
    }
    _KEY_OTHER_TYPES = ("uuid", "inet4", "inet6")
    _DECODERS = {"set": lambda value, column: _mysql_set(value, column),
                 "date": lambda value, column: _text(value),
                 "datetime": lambda value, column: _mysql_datetime_text(value),
                 # MariaDB types that name a row exactly as text
                 "timestamp": lambda value, column: _mysql_datetime_text(value)}
    _GENERATED = re.compile(r"(?i)\b(VIRTUAL|STORED|PERSISTENT)\b")

    def introspect(self, conn, table):
        """Read one table's columns and primary key from information_schema."""
        rows = self.query(conn, (
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, NUMERIC_SCALE, DATETIME_PRECISION,"
            " CHARACTER_SET_NAME, CHARACTER_OCTET_LENGTH, EXTRA, COLUMN_DEFAULT, IS_NULLABLE"
            " FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
            " ORDER BY ORDINAL_POSITION"), (table,))
        if not rows:
            raise SchemaError("table %r does not exist in database %r"
                              % (table, self.config.db_name))
        keys = self.query(conn, (
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY'"
            " ORDER BY ORDINAL_POSITION"), (table,))
        if not keys:
            raise SchemaError("table %r has no primary key; cloudsync needs one to find rows"
                              % table)
        columns, generated, json_parts = [], set(), []
        for name, data_type, column_type, scale, fsp, charset, octets, extra, default, nullable \
                in rows:
            name, data_type, column_type = _text(name), _text(data_type).lower(), _text(column_type)
            extra = _text(extra or "")
            if "?" in name + table or "%(" in name + table:
                # values are bound where the SQL text has ? (by the cursor path, as %(pN)s): a name
                # holding either could not be told apart from a value
                raise SchemaError("table %r or its column %r contains '?' or '%%(', which "
                                  "cloudsync cannot quote safely on MySQL" % (table, name))
            kind = self._KINDS.get(data_type, "other")
            quoted = quote_mysql(name)
            column = Column(
                name, quoted, kind, column_type, scale=scale if kind == "decimal" else None,
                # as text: the driver would turn a zero date (0000-00-00, which MariaDB allows)
                # into NULL
                select=("CAST(%s AS CHAR)" % quoted
                        if kind in ("date", "datetime", "timestamp") else None),
                fsp=int(fsp or 0),
                param=("CAST(? AS DECIMAL(65, %d))" % int(scale or 0) if kind == "decimal"
                       else "?"),
                members=_mysql_members(column_type) if kind in ("enum", "set") else (),
                generated=(bool(self._GENERATED.search(extra))
                           and "DEFAULT_GENERATED" not in extra.upper()),
                octets=int(octets) if data_type == "binary" and octets else None,
                pads=data_type == "char",
                max_code_point=0xFFFF if _text(charset or "") in ("utf8", "utf8mb3") else 0x10FFFF)
            if not column.generated:
                # a NOT NULL column without a default gives rows an implicit 0 or '': not known
                column.default = constant_default(
                    column, None if default is None else _text(default), _text(nullable) == "YES")
            columns.append(column)
            if "auto_increment" in extra.lower():
                generated.add(name)
            expression = self._json_expression(column, data_type)
            if expression is None:
                json_parts = None
            elif json_parts is not None:
                json_parts.append("%s, %s" % (_sql_literal(name, "mysql"),
                                              expression.format(column.quoted)))
        key = [_text(name) for (name,) in keys]
        schema = TableSchema(table, quote_mysql(table), columns, key,
                             len(key) == 1 and key[0] in generated)
        for column in schema.key_columns:
            data_type = column.declared.split("(")[0].split()[0].lower()
            if column.kind in ("float", "json") \
                    or column.kind == "other" and data_type not in self._KEY_OTHER_TYPES:
                raise SchemaError("table %r: primary key column %r is %s, which cannot name a row "
                                  "exactly; use an integer, decimal, text, date or binary key"
                                  % (table, column.name, column.declared))
        if json_parts is not None:
            schema.json_row = "JSON_OBJECT(%s)" % ", ".join(json_parts)
        schema.decoders = [(position, self._DECODERS[column.kind], column)
                           for position, column in enumerate(columns)
                           if column.kind in self._DECODERS]
        schema.key_sql = self.key_sql(schema)
        return schema

    # How the server writes a column's value into JSON exactly as the pulled form
    # (decimals as exact strings, ISO dates, base64 without line breaks). Kinds
    # missing here (floats, TIME, BIT...) make the table's rows encoded in Python.
    # No format holds a lowercase %s: the driver substitutes %s in SQL text.
    _JSON_AS_IS = ("integer", "text", "enum", "set")
    _JSON_EXPRESSIONS = {
        "decimal": "CAST({0} AS CHAR)",
        "json": "CAST({0} AS CHAR)",
        "date": "DATE_FORMAT({0}, '%Y-%m-%d')",
        "datetime": "DATE_FORMAT({0}, IF(MICROSECOND({0}) = 0, '%Y-%m-%dT%H:%i:%S',"
                    " '%Y-%m-%dT%H:%i:%S.%f'))",
        "binary": "REPLACE(TO_BASE64({0}), '\\n', '')",
    }
    _JSON_EXPRESSIONS["timestamp"] = _JSON_EXPRESSIONS["datetime"]

    def _json_expression(self, column, data_type):
        """SQL writing one column into a JSON object as a pull sends it, or None."""
        if column.kind in self._JSON_AS_IS:
            # MariaDB's JSON is a LONGTEXT that JSON_OBJECT would embed as an object, not a string
            return "CAST({0} AS CHAR)" if data_type == "longtext" else "{0}"
        return self._JSON_EXPRESSIONS.get(column.kind)

    def insert_defaults_sql(self, schema):
        """An INSERT in which every column takes its default (a generated key)."""
        return "INSERT INTO %s () VALUES ()" % schema.quoted

    # -- change capture (see that section) --------------------------------------

    @staticmethod
    def log_tables():
        """cloudsync's own tables."""
        return MYSQL_LOG_TABLES

    def index_columns(self, conn, table):
        """The columns of each index of `table`, in index order (the primary key's among them)."""
        found = collections.defaultdict(list)
        for name, column in self.query(conn, "SELECT INDEX_NAME, COLUMN_NAME"
                                             " FROM information_schema.STATISTICS"
                                             " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
                                             " ORDER BY INDEX_NAME, SEQ_IN_INDEX", (table,)):
            found[_text(name)].append(_text(column))
        return [tuple(columns) for columns in found.values()]

    @staticmethod
    def devices_table():
        """CREATE TABLE of cloudsync_devices."""
        return MYSQL_DEVICES_TABLE

    @staticmethod
    def devices_upsert():
        """The statement flushing one device's counts into cloudsync_devices."""
        return MYSQL_DEVICES_UPSERT

    def trigger_sql(self, schema, event):
        """CREATE TRIGGER text recording one event of one table into cloudsync_pending, with the
        device and batch a push set in its session (outside writers leave both NULL)."""
        def record(row, op, guard="", columns="NULL"):
            statement = self.log_rows_sql(schema.name, self.key_sql(schema, row), op,
                                          scope=self.scope_sql(schema, row), columns=columns)
            return self.when_sql(guard, [statement]) if guard else statement
        if event == "upd":
            # byte for byte, not by the column's collation: 'abc' -> 'ABC' is a new key to a device;
            # an update that changes the key deletes the old row and creates a new one
            same = " AND ".join("%s <=> %s" % (self.bytewise("OLD." + column.quoted), self.bytewise(
                "NEW." + column.quoted)) for column in schema.key_columns)
            body = self.logged_update(schema, record, same, "%s <=> %s" % (
                self.bytewise("%s"), self.bytewise("%s")))
        else:
            body = [record("NEW", "I")] if event == "ins" else [record("OLD", "D")]
        return "CREATE OR REPLACE TRIGGER %s AFTER %s ON %s FOR EACH ROW BEGIN %s; END" % (
            self.quote(_trigger_name(schema.name, event)), TRIGGER_EVENTS[event], schema.quoted,
            "; ".join(body))

    def log_rows_sql(self, table, key, op, source=None, where=None, scope="NULL", columns="NULL"):
        """An INSERT into cloudsync_pending.

        Of one row (NEW, OLD) of the table's own trigger, or of the rows of
        `source` WHERE `where` (a cascade trigger: another writer's change, no
        device's); `scope`: SQL writing each row's scope value; `columns`: the
        changed columns'. A change is the push's (its device and batch) only
        when the push's statement writes this very table (@cloudsync_table):
        a trigger of the shop's that writes here from another table is not.
        """
        literal = _sql_literal(table, backslashes=True)
        if source is None:
            own = "%s = %s" % (self.bytewise("@cloudsync_table"), self.bytewise(literal))
            who = "IF(%s, @cloudsync_device, NULL), IF(%s, @cloudsync_batch, NULL)" % (own, own)
            push = "IF(%s, @cloudsync_push, NULL)" % own
        else:
            who, push = "NULL, NULL", "NULL"
        values = "%s, %s, '%s', %s, %s, %s, %s, %s" % (literal, key, op, who, self.now_sql, scope,
                                                       columns, push)
        return ("INSERT INTO cloudsync_pending"
                " (table_name, row_key, op, device_id, batch_id, changed_at, scope, columns,"
                " push_id) "
                + ("VALUES (%s)" % values if source is None
                   else "SELECT %s FROM %s WHERE %s" % (values, source, where)))

    @staticmethod
    def when_sql(condition, statements):
        """Statements run only when `condition` holds, inside a trigger body."""
        return "IF %s THEN %s; END IF" % (condition, "; ".join(statements))

    def before_trigger_sql(self, name, event, table, statements):
        """A BEFORE trigger running `statements` for each row (a parent's cascade trigger)."""
        return "CREATE OR REPLACE TRIGGER %s BEFORE %s ON %s FOR EACH ROW BEGIN %s; END" % (
            self.quote(name), TRIGGER_EVENTS[event], self.quote(table), "; ".join(statements))

    @contextmanager
    def attributed(self, conn, device_id, batch_id, table, push_id):
        """In a push's transaction: changes its statements make to `table` (attribute_table
        moves it) carry this device, batch and push.

        No reset afterwards: pooled connections write to allowed tables only in
        a push, and every push sets the variables first; outside writers have
        their own sessions.
        """
        self.execute(conn, "SET @cloudsync_device = ?, @cloudsync_batch = ?, @cloudsync_table = ?,"
                           " @cloudsync_push = ?", (device_id, batch_id, table, push_id))
        yield

    def attribute_table(self, conn, table):
        """The push's next statements write `table`."""
        self.execute(conn, "SET @cloudsync_table = ?", (table,))

    @contextmanager
    def altering(self, conn, table, triggers):
        """The table's write lock, from an ALTER until its new triggers are in (SyncEngine.alter).

        cloudsync's own tables are locked with it: the new triggers write to
        them, and LOCK TABLES lets a session use only what it locked.
        """
        self.execute(conn, "LOCK TABLES %s WRITE, %s" % (self.quote(table), ", ".join(
            "%s WRITE" % name for name in ("cloudsync_tables", "cloudsync_schemas",
                                           "cloudsync_changes", "cloudsync_pending",
                                           "cloudsync_meta"))))
        try:
            yield
        finally:
            self.execute(conn, "UNLOCK TABLES")

    def foreign_keys(self, conn):
        """The foreign keys whose ON DELETE/UPDATE makes InnoDB write child rows, as _ForeignKey."""
        rows = self.query(conn, (
            "SELECT k.CONSTRAINT_NAME, k.TABLE_NAME, k.REFERENCED_TABLE_NAME, k.COLUMN_NAME,"
            " k.REFERENCED_COLUMN_NAME, r.DELETE_RULE, r.UPDATE_RULE"
            " FROM information_schema.KEY_COLUMN_USAGE k"
            " JOIN information_schema.REFERENTIAL_CONSTRAINTS r"
            " ON r.CONSTRAINT_SCHEMA = k.CONSTRAINT_SCHEMA"
            " AND r.CONSTRAINT_NAME = k.CONSTRAINT_NAME AND r.TABLE_NAME = k.TABLE_NAME"
            " WHERE k.TABLE_SCHEMA = DATABASE() AND k.REFERENCED_TABLE_NAME IS NOT NULL"
            " ORDER BY k.TABLE_NAME, k.CONSTRAINT_NAME, k.ORDINAL_POSITION"))
        found = collections.OrderedDict()
        for name, child, parent, column, referenced, on_delete, on_update in rows:
            key = (_text(child), _text(name))
            if key not in found:
                found[key] = _ForeignKey(_text(child), _text(parent), _text(on_delete),
                                         _text(on_update))
            found[key].child_columns.append(_text(column))
            found[key].parent_columns.append(_text(referenced))
        return [fk for fk in found.values()
                if (fk.on_delete in CASCADING_RULES or fk.on_update in CASCADING_RULES)
                and "?" not in fk.child + fk.parent + "".join(fk.child_columns + fk.parent_columns)]

    def prepare(self, conn):
        """Learn how this server escapes JSON (MariaDB \\u001F, MySQL 8 \\u001f), for key_text,
        and whether it keeps a 0 given to an AUTO_INCREMENT column (NO_AUTO_VALUE_ON_ZERO)."""
        self.keeps_zero_keys = "NO_AUTO_VALUE_ON_ZERO" in _text(
            self.query(conn, "SELECT @@SESSION.sql_mode")[0][0]).upper()
        text = _text(self.query(conn, "SELECT JSON_ARRAY(?)", ("\x1f",))[0][0])
        if "\\u001f" in text:
            self._JSON_ESCAPES = {code: escape.lower() if escape.startswith("\\u") else escape
                                  for code, escape in self._JSON_ESCAPES.items()}

    @staticmethod
    def bytewise(expression):
        """SQL comparing `expression` byte for byte: 'a ' is not 'a' (all MySQL collations pad)."""
        return "CAST(%s AS BINARY)" % expression

    @staticmethod
    def limited_part(select):
        """A SELECT with its own ORDER BY and LIMIT, as one part of a UNION ALL: in parentheses,
        read straight from the index (a subquery would be a temporary table, on disk for TEXT)."""
        return "(%s)" % select

    @staticmethod
    def scope_value_sql(expression):
        """SQL turning a scope column's value into the log's text: '7', 'north'."""
        return "LEFT(CAST(%s AS CHAR), %d)" % (expression, MYSQL_SCOPE_CHARS)

    @staticmethod
    def concat_sql(parts):
        """SQL joining text expressions."""
        return "CONCAT(%s)" % ", ".join(parts)

    @staticmethod
    def added_sql(column):
        """An increment's SQL: a DECIMAL adds an exact decimal (a string would add as a double)."""
        if column.kind == "decimal":
            return "COALESCE(%s, 0) + CAST(? AS DECIMAL(65, %d))" % (column.quoted,
                                                                     column.scale or 0)
        return _plain_added(column)

    @staticmethod
    def text_literal(text):
        """A string literal of MySQL's SQL (backslashes escaped)."""
        return _sql_literal(text, backslashes=True)

    def scope_where(self, column, values):
        """(WHERE text, params): an index range by the column's collation, then byte for byte.

        Under a case-blind collation 'North' would match 'north'.
        """
        where, params = Database.scope_where(self, column, values)
        if column.kind == "integer" or not values:
            return where, params
        return "%s AND %s IN (%s)" % (where, self.bytewise(column.quoted), ", ".join(
            self.bytewise("?") for _ in values)), params + list(values)

    def upsert(self, conn, schema, values, scope):
        """Set the given columns on the row with this key, or insert it.

        Another unique column clashing is refused; with a scope, so is a row
        with the key outside it (its UPDATE finds nothing, its INSERT clashes).
        Not INSERT ... ON DUPLICATE KEY UPDATE: that updates whichever row a
        clash on *any* unique key finds, so {"id": 2, "code": "A"} would rewrite
        the row whose code is "A". An UPDATE by the primary key, then an INSERT,
        touches only the row the key names.
        """
        key = tuple(values[name] for name in schema.primary_key)
        changes = {name: value for name, value in values.items() if name not in schema.primary_key}
        for attempt in (1, 2):
            if changes:
                found = self.execute(conn, *update_sql(schema, changes, key, scope))
            else:
                found = len(self.query(conn, *exists_sql(schema, key, scope)))
            if found:
                return
            try:
                self.execute(conn, insert_sql(schema, list(values)), tuple(values.values()))
                return
            except DataRejected as error:
                # the key itself was inserted by another push since the UPDATE: update that row
                if not error.duplicate or attempt == 2 \
                        or not self.query(conn, *exists_sql(schema, key, EVERY_ROW)):
                    raise

    def fits_one_statement(self, rows):
        """Whether executemany() sends these rows as one statement.

        By an upper bound of their escaped size.
        """
        return sum(_row_bytes_bound(row) for row in rows) <= MYSQL_STATEMENT_BYTES

    # -- row keys (see Database) --------------------------------------------------
    # Each key column in the form a pull sends it, written the same way in every
    # session: a TIMESTAMP in UTC from its stored instant (the writer's time zone
    # does not matter), a TIME with its sign and fraction, a BIT as a number, a
    # binary value as hex (JSON cannot hold raw bytes).

    _ISO = "DATE_FORMAT({0}, IF(MICROSECOND({0}) = 0, '%Y-%m-%dT%H:%i:%S', '%Y-%m-%dT%H:%i:%S.%f'))"
    _KEY_SQL = {
        "integer": "{0}", "text": "{0}", "enum": "{0}", "set": "{0}",
        "bit": "CAST({0} AS UNSIGNED)",
        "decimal": "CAST({0} AS CHAR)",
        "date": "DATE_FORMAT({0}, '%Y-%m-%d')",
        "datetime": _ISO,
        # (a zero TIMESTAMP has no instant: written as the zero date it shows)
        "timestamp": "IF(UNIX_TIMESTAMP({0}) = 0, DATE_FORMAT({0}, '%Y-%m-%dT%H:%i:%S'), "
                     + _ISO.replace("{0}", "TIMESTAMPADD(MICROSECOND,"
                                           " UNIX_TIMESTAMP({0}) * 1000000, '1970-01-01')") + ")",
        "time": "IF(MICROSECOND({0}) = 0, TIME_FORMAT({0}, '%H:%i:%S'),"
                " TIME_FORMAT({0}, '%H:%i:%S.%f'))",
        "binary": "HEX({0})",
        "other": "CAST({0} AS CHAR)",
    }
    _JSON_ESCAPES = {code: "\\u%04X" % code for code in range(32)}
    _JSON_ESCAPES.update({8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r", 34: '\\"',
                          92: "\\\\"})

    def _key_column_sql(self, column):
        """SQL writing one key column as the change log holds it ({0}: the column)."""
        return self._KEY_SQL[column.kind]

    def _json_array_text(self, values):
        """JSON text as JSON_ARRAY writes it: ", " between values, control characters as \\u00XX."""
        return "[" + ", ".join("null" if value is None else str(value) if isinstance(value, int)
                               else '"%s"' % value.translate(self._JSON_ESCAPES)
                               for value in values) + "]"

    def _log_form(self, column, value):
        """A pushed key value as the log holds it."""
        kind = column.kind
        try:
            if kind in ("integer", "bit"):
                return int(decimal.Decimal(str(value).strip()))
            if kind == "decimal":
                return format(decimal.Decimal(str(value).strip()).quantize(
                    decimal.Decimal(1).scaleb(-(column.scale or 0)), rounding=decimal.ROUND_HALF_UP,
                    context=_WIDE_CONTEXT), "f")
            if kind == "date":
                return _parse_date(value).isoformat()
            if kind in ("datetime", "timestamp"):
                return _parse_datetime(value, column.fsp).isoformat()
            if kind == "time":
                return _time_text(_parse_time(value, column.fsp))
            if kind == "binary":
                data = bytes(value)
                return (data.ljust(column.octets, b"\0") if column.octets else data).hex().upper()
            if kind == "set":
                return _mysql_set(set(filter(None, str(value).split(","))), column)
            if column.pads:
                return str(value).rstrip(" ")
        except (ValueError, ArithmeticError, TypeError):
            # not a form the database takes: it refuses the push anyway
            pass
        return value if isinstance(value, (str, int)) else str(value)

    def _bind_logged(self, column, value, ordered=False):
        """A logged key value as the value that matches the row."""
        if column.kind == "binary" and isinstance(value, str):
            return bytes.fromhex(value)
        if column.kind == "decimal" and isinstance(value, str):
            return decimal.Decimal(value)   # compared as an exact decimal, not as a double
        if ordered and column.kind in ("enum", "set") and isinstance(value, str):
            # ORDER BY sorts ENUM and SET by their number, while > compares a string as text
            positions = {member.lower(): position for position, member in enumerate(column.members)}
            if column.kind == "enum":
                return positions.get(value.lower(), -1) + 1
            return sum(1 << positions[member.lower()] for member in value.split(",")
                       if member.lower() in positions)
        return value

    def _present_logged(self, column, value):
        """A logged key value in pulled form."""
        if column.kind == "binary" and isinstance(value, str):
            return base64.b64encode(bytes.fromhex(value)).decode("ascii")
        return value

    @staticmethod
    def _stored_logged(column, value):
        """A stored key value as the log holds it."""
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).hex().upper()
        if column.kind in MySQLDatabase._DECODERS:
            return MySQLDatabase._DECODERS[column.kind](value, column)
        if isinstance(value, datetime.timedelta):
            return _time_text(value)
        return _as_json_value(value)        # decimals as the key SQL writes them

    def rows_as_json(self, conn, schema, limit, scope):
        """(JSON array of the first `limit` rows in key order, row count), encoded by the server.

        None if it cannot.
        One string per row instead of a Python object per column, and JSON
        written in C: the seed pull, which sends whole pages, is about twice as
        fast. (One GROUP_CONCAT of the page measured slower than this.)
        """
        if schema.json_row is None:
            return None
        where, params = ("", []) if scope.where is None \
            else (" WHERE " + scope.where, list(scope.params))
        rows = self.query(conn, "SELECT %s FROM %s%s ORDER BY %s LIMIT ?" % (
            schema.json_row, schema.quoted, where, schema.key_order), params + [limit])
        return b"[" + ",".join([row[0] for row in rows]).encode("utf-8") + b"]", len(rows)


def _mysql_error_column(message):
    """The column an error message names: 'col', `db`.`table`.`col`, or Field 'col'."""
    found = re.search(r"(?i)(?:column|field) ((?:`[^`]*`\.?)+|'[^']*')", message)
    if not found:
        return "?"
    return repr("".join(re.findall(r"`([^`]*)`|'([^']*)'", found.group(1))[-1]))


def _mysql_datetime_text(value):
    """MySQL's text of a DATETIME or TIMESTAMP ('2026-11-26 09:30:00.500') in pulled form.

    That is: T, six digits or none.
    """
    text = _text(value)
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0")
    return whole.replace(" ", "T", 1) + ("." + fraction.ljust(6, "0") if fraction else "")


def _mysql_members(column_type):
    """The members of a MySQL SET, in order, from its COLUMN_TYPE: set('red','it''s')."""
    return [member.replace("''", "'") for member in re.findall(r"'((?:[^']|'')*)'", column_type)]


def _text(value):
    """information_schema values may come back as bytes on some servers."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def open_database(config):
    """The database backend the configuration names."""
    return MySQLDatabase(config) if config.backend == "mysql" else SQLiteDatabase(config)


# ---------------------------------------------------------------------------
# Change capture
# ---------------------------------------------------------------------------
# Every insert, update and delete on an allowed table is recorded in
# cloudsync_changes with a sequence number (seq). The order of seq is the
# order of commits: a reader that has seen seq N never later finds a
# committed change numbered below N.
#
# SQLite has one writer at a time, so triggers append to cloudsync_changes
# directly and AUTOINCREMENT numbers follow commit order. MySQL commits
# concurrently, and an AUTO_INCREMENT taken at insert time can commit after a
# higher one; so triggers append to cloudsync_pending, and a sequencer numbers
# only rows that are already committed, one sequencer at a time (it holds the
# lock on the last_seq row of cloudsync_meta). A row is numbered after its
# transaction committed, so every later commit gets a higher number.
#
# The device and batch of a push reach the triggers through the session
# variables @cloudsync_device/@cloudsync_batch (MySQL) or the one-row table
# cloudsync_context (SQLite, which has no session variables; safe because the
# push holds the only write lock and clears it before committing). Outside
# writers leave both NULL.

CHANGE_OPS = {"I": "insert", "U": "update", "D": "delete", "E": "new start"}
# the table name of the log's entries that only move it on (a table's history starting again):
# no allowed table has it, so no pull reads them
EPOCH_ENTRY = "cloudsync_epoch"


class ChangeLog:
    """cloudsync's own tables: the change log, sequence numbers, batches, and the triggers."""

    def __init__(self, db, capture):
        self.db = db
        self.capture = capture
        self.instance = None
        self.secret = None

    # -- installation ---------------------------------------------------------

    def install(self, conn, schemas, progress=None):
        """Create the log tables and (re)install the triggers; idempotent.

        Returns each table's epoch (follow).
        """
        say = progress or (lambda message: None)
        try:
            for statement in self.db.log_tables():
                self.db.execute(conn, statement)
        except Denied as denied:
            raise ChangeCaptureError("the database user may not create cloudsync's own tables "
                                     "(%s); grant it CREATE, INDEX and ALTER on the database "
                                     "(cloudsync.py check lists what is missing)"
                                     % denied) from None
        for name, value in (("instance", uuid.uuid4().hex), ("secret", secrets.token_hex(32)),
                            ("last_seq", "0"), ("compacted_upto", "0"), ("epoch", "0")):
            self.db.execute(conn, "%s INTO cloudsync_meta (name, value) VALUES (?, ?)"
                            % self.db.insert_ignore, (name, value))
        self.load_identity(conn)
        epochs, changed = self.follow(conn, schemas, say)
        changed += self._remove_stale_triggers(conn, schemas, say)
        say("change capture (%s) on %d table(s)%s" % (
            self.capture, len(schemas), "" if changed else ", unchanged"))
        return epochs

    def follow(self, conn, schemas, say, truncated=None, looked_at=None, trusted=(),
               cascades=True):
        """Make each table's capture what its columns ask for now: ({table: epoch}, how many
        tables' triggers changed).

        A table whose writes may have gone unrecorded (its triggers missing, made
        again by another program or a dump, or the table truncated or swapped
        for a copy: Database.capture_intact) gets a new epoch, the head of the
        log: devices whose copy of it began before pull it again. Entries of a
        table whose columns changed, logged since `looked_at` (the last look:
        by triggers made for the old columns), say nothing of columns any more:
        conflicts count them as a change of every column.
        """
        stored = {_text(table): (_text(fingerprint), int(epoch),
                                 json.loads(_text(identity)) if identity else {})
                  for table, fingerprint, epoch, identity in self.db.query(
                      conn, "SELECT table_name, fingerprint, epoch, identity"
                            " FROM cloudsync_tables")}
        tracked = self.capture == "triggers"
        live = self.db.capture_identity(conn, list(schemas)) if tracked else {}
        epochs, changed, head = {}, 0, None
        for schema in schemas.values():
            table, fingerprint = schema.name, schema.fingerprint()
            old = stored.get(table)
            broken = tracked and old is not None and table not in trusted \
                and not self.db.capture_intact(old[2], live.get(table), truncated)
            installed = self._install_triggers(conn, schema, alone=table not in trusted)
            if installed:
                changed += 1
                say("%s triggers on %s" % ("installed" if tracked else "removed", table))
            if old is not None and old[0] != fingerprint:
                self._forget_columns(conn, table, looked_at or old[2].get("at"))
            epoch = old[1] if old is not None else 0
            if broken:
                if head is None:
                    head = self._new_start(conn)
                epoch = head
                say("the history of %s starts again at %d (its triggers were missing or made "
                    "again, or the table was truncated or swapped): devices pull it again" % (
                        table, head))
                log.warning("the change capture of %s was interrupted (the table re-created, "
                            "swapped, truncated, or its triggers dropped or made by another "
                            "program): its history starts again at %d, and devices pull it again",
                            table, head)
            identity = (self.db.capture_identity(conn, [table])[table] if installed
                        else live.get(table, {})) if tracked else {}
            if old is None or (old[0], old[1]) != (fingerprint, epoch) \
                    or dict(old[2], at=None) != dict(identity, at=None):
                self._keep_table(conn, schema, fingerprint, epoch, identity)
            epochs[table] = epoch
        if cascades and not self.db.cascades_fire_triggers:
            self._install_cascade_triggers(conn, schemas)
        return epochs, changed

    def _new_start(self, conn):
        """A log position that every copy begun before now is below: the new epoch of tables
        whose history broke. The log is moved on by an entry no device reads (table
        EPOCH_ENTRY), numbered with what committed before it."""
        self.db.execute(conn, "INSERT INTO %s (table_name, row_key, op, changed_at)"
                              " VALUES (?, '[]', 'E', %s)" % (self._logs()[0], self.db.now_sql),
                        (EPOCH_ENTRY,))
        self.sequence(conn)
        head = self.head(conn)
        # what the watchers of every instance look at (position): the newest new start
        self.db.execute(conn, "UPDATE cloudsync_meta SET value = ? WHERE name = 'epoch'",
                        (str(head),))
        return head

    def _keep_table(self, conn, schema, fingerprint, epoch, identity):
        """Write down a table's state (cloudsync_tables) and its columns' description."""
        now = str(_text(self.db.query(conn, "SELECT %s" % self.db.now_sql)[0][0]))
        self.db.execute(conn, "DELETE FROM cloudsync_tables WHERE table_name = ?", (schema.name,))
        self.db.execute(conn, "INSERT INTO cloudsync_tables (table_name, fingerprint, epoch,"
                              " identity) VALUES (?, ?, ?, ?)",
                        (schema.name, fingerprint, epoch, json.dumps(dict(identity, at=now))))
        self.db.execute(conn, "%s INTO cloudsync_schemas (fingerprint, table_name, description)"
                              " VALUES (?, ?, ?)" % self.db.insert_ignore,
                        (fingerprint, schema.name, json.dumps(schema.describe(), sort_keys=True)))

    def _forget_columns(self, conn, table, since):
        """Updates of `table` logged since `since` (the database's time) say nothing of columns."""
        for log_table in self._logs():
            self.db.execute(conn, "UPDATE %s SET columns = NULL WHERE table_name = ? AND op = 'U'"
                                  " AND changed_at >= ?" % log_table, (table, since or ""))

    def description(self, conn, fingerprint):
        """The columns a table had when its fingerprint was `fingerprint`, or None."""
        rows = self.db.query(conn, "SELECT description FROM cloudsync_schemas"
                                   " WHERE fingerprint = ?", (fingerprint,))
        return json.loads(_text(rows[0][0])) if rows else None

    def epochs(self, conn):
        """{table: epoch} as cloudsync_tables holds them."""
        return {_text(table): int(epoch) for table, epoch in self.db.query(
            conn, "SELECT table_name, epoch FROM cloudsync_tables")}

    def _install_triggers(self, conn, schema, alone=True):
        """Make the table's triggers what they should be; True when something had to change.

        `alone`: in a transaction of their own where DDL takes part in one
        (SQLite); else inside the caller's (SyncEngine.alter).
        """
        existing = self.db.trigger_definitions(conn, schema.name)
        statements = []
        recorded = self.db.trigger_events(schema) if self.capture == "triggers" else ()
        for event in list(TRIGGER_EVENTS) + list(REPLACED_EVENTS):
            name = _trigger_name(schema.name, event)
            if event not in recorded and name not in existing:
                continue
            wanted = self.db.trigger_sql(schema, event) if event in recorded else None
            if wanted is not None and existing.get(name) == self.db.stored_trigger(wanted):
                continue                    # already as it should be
            if name not in existing or wanted is None or not self.db.replaces_triggers:
                # a trigger of this name may be on another table: the table this one was
                # renamed to when a copy took its place (pt-online-schema-change, gh-ost)
                statements.append("DROP TRIGGER IF EXISTS %s" % self.db.quote(name))
            if wanted is not None:
                statements.append(wanted)
        if not statements:
            return False
        try:
            # where DDL is transactional (SQLite) the triggers change in one transaction, and no
            # write goes unrecorded; MySQL's CREATE OR REPLACE swaps each trigger atomically
            with self.db.transaction(conn) if self.db.transactional_ddl and alone \
                    else contextlib.nullcontext():
                for statement in statements:
                    self.db.execute(conn, statement)
        except Denied as denied:
            raise ChangeCaptureError(
                "the database user may not create triggers on %r (%s); grant it the TRIGGER "
                "privilege (with binary logging also set log_bin_trust_function_creators=1), or "
                "set CHANGE_CAPTURE=api to record only writes made through cloudsync"
                % (schema.name, denied)) from None
        return True

    def stale_triggers(self, conn, allowed):
        """{table: [names]}: cloudsync's change-capture triggers on tables not in `allowed`."""
        stale = {}
        for name, table in self.db.triggers(conn):
            if table not in allowed \
                    and name in _own_trigger_names(table):
                stale.setdefault(table, []).append(name)
        return stale

    def _remove_stale_triggers(self, conn, schemas, say):
        """A table taken out of ALLOWED_TABLES stops being recorded: its triggers go."""
        stale = self.stale_triggers(conn, set(schemas))
        for table, names in sorted(stale.items()):
            for name in names:
                self.db.execute(conn, "DROP TRIGGER IF EXISTS %s" % self.db.quote(name))
            say("removed the change-capture triggers of %s, which is no longer in ALLOWED_TABLES"
                % table)
        return len(stale)

    # -- foreign-key cascades (where they fire no triggers: InnoDB) ------------------
    # InnoDB changes the rows a foreign-key cascade reaches without firing their
    # triggers. So a BEFORE DELETE and a BEFORE UPDATE trigger on the parent
    # table (allowed or not) logs them, while they still hold the parent's old
    # values: ON DELETE CASCADE chains through tables of any kind, CASCADE_DEPTH
    # deep, as deletes; ON DELETE SET NULL as updates; ON UPDATE CASCADE or SET
    # NULL one level deep, a child key that changes with its parent as a delete
    # of the old key and an update of the new. What they cannot follow (a table
    # cascading into itself past the first level, deeper chains) is marked on the
    # table (TableSchema.cascaded), whose seed pulls are then never cached.

    def cascade_plan(self, foreign_keys, schemas):
        """(plan, tables whose cascades it cannot follow) for the parents' cascade triggers.

        The plan, {parent: {"del": [SQL], "upd": [SQL]}}, logs what cascades write.
        """
        plan = collections.defaultdict(lambda: {"del": [], "upd": []})
        cut = set()                         # tables where following stopped

        def walk(root, steps):
            parent = steps[-1].child if steps else root
            for fk in foreign_keys:
                if fk.parent != parent or fk.on_delete not in CASCADING_RULES:
                    continue
                visited = [step.child for step in steps]
                if fk.child in visited or steps and fk.child == root or len(steps) >= CASCADE_DEPTH:
                    cut.add(fk.child)       # a table cascading into itself, or a chain too deep
                    continue
                path = steps + [fk]
                if fk.child in schemas:
                    plan[root]["del"].append(self._cascade_rows_sql(
                        schemas[fk.child], path, "D" if fk.on_delete == "CASCADE" else "U"))
                if fk.on_delete == "CASCADE":
                    walk(root, path)
        for parent in dict.fromkeys(fk.parent for fk in foreign_keys):
            walk(parent, [])
        for fk in foreign_keys:
            if fk.on_update in CASCADING_RULES:
                if fk.child in schemas:
                    plan[fk.parent]["upd"].append(self._cascade_update_sql(schemas[fk.child], fk))
                cut.update(deeper.child for deeper in foreign_keys if deeper.parent == fk.child
                           and deeper.on_update in CASCADING_RULES
                           and set(deeper.parent_columns) & set(fk.child_columns))
        uncaptured, queue = set(), list(cut)
        while queue:                        # and every table a cascade reaches from there
            table = queue.pop()
            if table not in uncaptured:
                uncaptured.add(table)
                queue.extend(fk.child for fk in foreign_keys if fk.parent == table)
        return plan, uncaptured

    def _cascade_rows_sql(self, schema, path, op):
        """Log the rows of `schema` a delete of OLD reaches through the foreign keys of `path`."""
        quote = self.db.quote
        last = len(path)
        source = "%s AS t%d" % (quote(path[-1].child), last)
        # t<n> is the child of the n-th foreign key of the path
        for position in range(last - 1, 0, -1):
            step = path[position]
            source += " JOIN %s AS t%d ON %s" % (
                quote(path[position - 1].child), position, " AND ".join(
                    "t%d.%s = t%d.%s" % (position + 1, quote(child), position, quote(parent))
                    for child, parent in zip(step.child_columns, step.parent_columns)))
        where = " AND ".join("t1.%s = OLD.%s" % (quote(child), quote(parent))
                             for child, parent in zip(path[0].child_columns,
                                                      path[0].parent_columns))
        return self.db.log_rows_sql(schema.name, self.db.key_sql(schema, "t%d" % last), op, source,
                                    where, self.db.scope_sql(schema, "t%d" % last))

    def _cascade_update_sql(self, schema, fk):
        """Log the rows of `schema` an update of OLD's referenced columns changes, or moves.

        It moves them if the columns are its key.
        """
        quote = self.db.quote
        changed = " OR ".join("NOT (%s <=> %s)" % (self.db.bytewise("OLD." + quote(column)),
                                                   self.db.bytewise("NEW." + quote(column)))
                              for column in fk.parent_columns)
        source = "%s AS c" % quote(fk.child)
        where = " AND ".join("c.%s = OLD.%s" % (quote(child), quote(parent))
                             for child, parent in zip(fk.child_columns, fk.parent_columns))
        moved = dict(zip(fk.child_columns, fk.parent_columns))
        old_scope = new_scope = self.db.scope_sql(schema, "c")
        if schema.scope is not None and schema.scope.name in moved:
            # the cascade changes the child's scope: the devices of both scopes hear of it
            new_scope = "NULL" if fk.on_update != "CASCADE" \
                else self.db.scope_value_sql("NEW." + quote(moved[schema.scope.name]))

        def log(key, op, scope):
            return self.db.log_rows_sql(schema.name, key, op, source, where, scope)
        if fk.on_update == "CASCADE" and set(fk.child_columns) & set(schema.primary_key):
            new_key = self.db.key_sql_from(schema, {
                column.name: "NEW." + quote(moved[column.name]) if column.name in moved
                else "c." + column.quoted for column in schema.key_columns})
            statements = [log(self.db.key_sql(schema, "c"), "D", old_scope),
                          log(new_key, "U", new_scope)]
        else:
            statements = [log(self.db.key_sql(schema, "c"), "U", old_scope)]
            if new_scope != old_scope:
                statements.append(log(self.db.key_sql(schema, "c"), "U", new_scope))
        return self.db.when_sql(changed, statements)

    def _install_cascade_triggers(self, conn, schemas):
        """Install the parents' cascade triggers.

        Or, with CHANGE_CAPTURE=api or no cascades left, remove them.
        """
        existing = {name: text for name, text in self.db.trigger_definitions(conn).items()
                    if name.startswith("cloudsync_cascade_")}
        wanted = {}
        if self.capture == "triggers":
            plan, _ = self.cascade_plan(self.db.foreign_keys(conn), schemas)
            for parent, events in plan.items():
                for event in ("del", "upd"):
                    if events[event]:
                        name = _cascade_trigger_name(parent, event)
                        wanted[name] = self.db.before_trigger_sql(name, event, parent,
                                                                  events[event])

        for name in sorted(set(existing) - set(wanted)):
            self.db.execute(conn, "DROP TRIGGER IF EXISTS %s" % self.db.quote(name))
        for name, statement in wanted.items():
            if existing.get(name) != self.db.stored_trigger(statement):
                self.db.execute(conn, statement)

    def mark_uncaptured(self, conn, schemas):
        """Mark the tables a foreign-key cascade writes where the cascade triggers cannot follow."""
        if self.db.cascades_fire_triggers:
            return
        _, uncaptured = self.cascade_plan(self.db.foreign_keys(conn), schemas)
        for schema in schemas.values():
            schema.cascaded = schema.name in uncaptured

    def load_identity(self, conn):
        """Read this database's instance id and checkpoint-signing secret."""
        meta = dict(self.db.query(conn, "SELECT name, value FROM cloudsync_meta"))
        self.instance, self.secret = meta["instance"], meta["secret"].encode("ascii")

    # -- sequence numbers -------------------------------------------------------

    def touched(self, conn, after, upto):
        """{table: scope values as text (None: no scope value)} of the changes numbered after
        `after` up to `upto`; None (every table, every scope) when they are more than
        WATCH_MOVES_READ_MOST or include a new start of a table's history."""
        if upto - after > WATCH_MOVES_READ_MOST:
            return None
        moved = {}
        for table, scope in self.db.query(
                conn, "SELECT DISTINCT table_name, scope FROM cloudsync_changes"
                      " WHERE seq > ? AND seq <= ?", (after, upto)):
            table = _text(table)
            if table == EPOCH_ENTRY:
                return None
            moved.setdefault(table, set()).add(None if scope is None else _text(scope))
        return moved

    def sequence(self, conn):
        """Number the committed pending changes, one short transaction per batch; the number of
        changes numbered.

        The numberer of each instance (LogWatcher) and the operator's commands
        call it; a push or a pull never does, so none of them writes the shared
        last_seq row. Not where triggers number changes (SQLite).
        """
        numbered = 0
        if self.db.numbers_at_commit:
            return numbered
        while self.db.query(conn, "SELECT 1 FROM cloudsync_pending LIMIT 1"):
            with self.db.transaction(conn):
                count = self._number(conn)
            numbered += count
            if count < SEQUENCE_BATCH_ROWS:
                break
        return numbered

    def _number(self, conn):
        """Inside a transaction: number up to SEQUENCE_BATCH_ROWS pending changes visible now.

        It holds the lock on the last_seq row until its commit, so numberers
        take turns, and a change is numbered only once its transaction has
        committed: whatever commits later is numbered later. Only the ids pass
        through here; the rows move inside the database. The ids are exactly
        the committed rows seen now: a range would also take in rows committed
        later, which the DELETE would then remove unnumbered.
        """
        last = int(self.db.query(
            conn, "SELECT value FROM cloudsync_meta WHERE name = 'last_seq' FOR UPDATE")[0][0])
        ids = [row[0] for row in self.db.query(
            conn, "SELECT id FROM cloudsync_pending ORDER BY id LIMIT ?", (SEQUENCE_BATCH_ROWS,))]
        if not ids:
            return 0
        marks = ", ".join("?" for _ in ids)
        self.db.execute(
            conn, "INSERT INTO cloudsync_changes"
                  " (seq, table_name, row_key, op, device_id, batch_id, changed_at, scope, columns,"
                  " push_id) SELECT ? + ROW_NUMBER() OVER (ORDER BY id),"
                  " table_name, row_key, op, device_id, batch_id, changed_at, scope, columns,"
                  " push_id"
                  " FROM cloudsync_pending WHERE id IN (%s)" % marks, [last] + ids)
        self.db.execute(conn, "DELETE FROM cloudsync_pending WHERE id IN (%s)" % marks, ids)
        self.db.execute(conn, "UPDATE cloudsync_meta SET value = ? WHERE name = 'last_seq'",
                        (str(last + len(ids)),))
        return len(ids)

    def tables_version(self, conn, schemas, epochs):
        """A value that changes with every committed write to these tables: one indexed round trip.

        The newest sequence number of the tables and the compaction mark (so
        it cannot fall back to an old value when their entries are compacted
        away), whether each table holds a row (a TRUNCATE fires no trigger, but
        empties the table, and every row inserted after it is logged) and, on
        MySQL, the count and the newest id of their changes not numbered yet: a
        commit adds a pending row (its id may be lower than one committed
        before it, the count still grows), and numbering one raises the first
        part. Last, each table's epoch as the watcher last saw it (`epochs`): a
        table made again, swapped or truncated starts a new one within
        SCHEMA_LOOK_SECONDS.
        """
        tables = [schema.name for schema in schemas]
        marks = ", ".join("?" for _ in tables)
        holds_rows = "".join(", (SELECT 1 FROM %s LIMIT 1)" % schema.quoted for schema in schemas)
        newest = ("SELECT (SELECT MAX(seq) FROM cloudsync_changes WHERE table_name IN (%s)),"
                  " (SELECT value FROM cloudsync_meta WHERE name = 'compacted_upto')" % marks)
        if self.db.numbers_at_commit:
            row = self.db.query(conn, newest + holds_rows, tables)[0]
        else:
            row = self.db.query(conn, newest + ", COUNT(*), MAX(id)%s FROM cloudsync_pending"
                                               " WHERE table_name IN (%s)" % (holds_rows, marks),
                                tables * 2)[0]
        return tuple(row) + tuple(epochs.get(table, 0) for table in tables)

    def position(self, conn):
        """(head, the newest epoch given to a table, the database server's version, the newest
        change not numbered yet or None): one round trip."""
        head, epochs, version, waiting = self.db.query(conn, self.db.position_sql)[0]
        return int(head or 0), int(epochs or 0), self.db.version_name(_text(version)), waiting

    def head(self, conn):
        """The highest sequence number given out so far."""
        return int(self.db.query(conn, self.db.head_sql)[0][0] or 0)

    # -- reading: one statement, one view of the log -----------------------------

    def read(self, conn, tables, since, limit, grant, exclude=None, waiting=False):
        """The log as one statement sees it (Snapshot), for `tables` through `grant`.

        The head; each table's epoch and fingerprint; the newest entry
        compaction removed among those the grant reads (per table); with
        `limit`, the rows changed after `since` (a seq, or {table: seq}) the
        grant may read: the first `limit` changes, oldest first (a row changed
        several times once per change), leaving out the changes of the
        push `exclude` (its push id: its own rows, which the device holds); with
        `limit` or `waiting`, whether changes of these tables wait to be
        numbered. One statement, so the entries are exactly those numbered up to
        the head it shows, and a compaction that removed some shows its mark in
        the same view.
        """
        params = []
        parts = [self.db.head_part]
        marks = ", ".join("?" for _ in tables)
        parts.append("SELECT 't', table_name, epoch, fingerprint FROM cloudsync_tables"
                     " WHERE table_name IN (%s)" % marks)
        params += tables
        for where, where_params in self._visible_sql(tables, grant, "cloudsync_compacted"):
            parts.append("SELECT 'c', table_name, NULL, MAX(upto) FROM cloudsync_compacted"
                         " WHERE %s GROUP BY table_name" % where)
            params += where_params
        if limit:
            for sql, entry_params in self._entries_sql(tables, since, limit, grant, exclude):
                parts.append(self.db.limited_part(sql))
                params += entry_params
        if (limit or waiting) and not self.db.numbers_at_commit:
            # changes it would read, committed but not numbered yet: the pull has them numbered
            for where, where_params in self._visible_sql(tables, grant, "cloudsync_pending"):
                parts.append("SELECT 'w', NULL, NULL, MAX(id) FROM cloudsync_pending WHERE %s"
                             % where)
                params += where_params
        if exclude and not self.db.numbers_at_commit:
            parts.append("SELECT 'p', NULL, NULL, COUNT(*) FROM cloudsync_pending WHERE %s"
                         % self._excluded_sql())
            params += [exclude]
        snapshot = Snapshot(self.db.query(conn, " UNION ALL ".join(parts), params))
        if limit:
            del snapshot.entries[limit:]    # the first `limit` of every part's first `limit`
        return snapshot

    def _visible_sql(self, tables, grant, log):
        """[(WHERE text, params)] selecting what `grant` reads of `tables` in `log`.

        One part for the tables every device sees whole, one per scoped table
        (its scope values: an index range each). In cloudsync_compacted, a
        change logged without a scope value is kept under ''.
        """
        shared = [table for table in tables if grant.scope(table).texts is None]
        parts = []
        if shared:
            parts.append(("table_name IN (%s)" % ", ".join("?" for _ in shared), list(shared)))
        for table in tables:
            texts = grant.scope(table).texts
            if texts:
                parts.append(("table_name = ? AND scope IN (%s)" % ", ".join("?" for _ in texts),
                              [table] + list(texts)))
        return parts

    @staticmethod
    def _excluded_sql():
        """WHERE text true for the changes of one push (? : its push id)."""
        return "push_id = ?"

    def _entries_sql(self, tables, since, limit, grant, exclude):
        """[(SELECT, params)]: for each table, and each scope value the grant reads of it, its
        first `limit` entries after `since`, oldest first, as ('e', table_name, row_key, seq).

        Of all the parts together, the first `limit` are those a pull reads
        (ChangeLog.read keeps them). Each part is one range of an index read in
        its order (cloudsync_changes_by_table, or _by_scope), stopping at
        `limit`, however far behind the checkpoint is: no sorting, and no
        grouping, which on MariaDB builds a temporary table on disk (row_key
        is TEXT) for every pull. A row changed several times is there once per
        change; the pull reads it once (_last_of_each_row).
        """
        bounds = since if isinstance(since, dict) else dict.fromkeys(tables, since)
        parts = []
        scopes = {table: grant.scope(table).texts for table in tables}
        # many scope values (a region's stores): one part per table, whose scope values the
        # index reads as several ranges, sorted; so a statement stays within SQLite's 500
        # parts, and a read holds at most a limit's entries per table
        apart = sum(1 if texts is None else len(texts) for texts in scopes.values()) \
            <= ENTRY_PARTS_MOST
        for table in tables:
            texts = scopes[table]
            if not texts and texts is not None:
                continue                    # a scope no row can be in
            marks = ", ".join("?" for _ in texts or ())
            for where, where_params in (
                    [("table_name = ?", [table])] if texts is None else
                    [("table_name = ? AND scope = ?", [table, text]) for text in texts] if apart
                    else [("table_name = ? AND scope IN (%s)" % marks, [table] + list(texts))]):
                if exclude:
                    where += " AND (push_id IS NULL OR NOT (%s))" % self._excluded_sql()
                    where_params = where_params + [exclude]
                parts.append(("SELECT 'e', table_name, row_key, seq FROM cloudsync_changes"
                              " WHERE %s AND seq > ? ORDER BY seq LIMIT ?" % where,
                              where_params + [bounds[table], limit]))
        return parts

    # -- who is writing -----------------------------------------------------------

    def attributed(self, conn, device_id, batch_id, table, push_id=None):
        """In a push's transaction: changes its statements make to `table` carry this device,
        batch and push (Database.attributed; push_id marks the push's own changes, which a pull
        from the checkpoint it returns leaves out)."""
        return self.db.attributed(conn, device_id, batch_id, table, push_id)

    def record(self, conn, entries, device_id, batch_id):
        """CHANGE_CAPTURE=api: log the push's own changes, as the triggers would.

        Entries are (table, op, key text).
        """
        rows = [(table, key_text, op, device_id, batch_id) for table, op, key_text in entries]
        if rows:
            self.db.executemany(
                conn, "INSERT INTO %s (table_name, row_key, op, device_id, batch_id, changed_at)"
                      " VALUES (?, ?, ?, ?, ?, %s)" % (self._logs()[0], self.db.now_sql), rows)

    # -- reading -----------------------------------------------------------------

    def touched_by_others(self, conn, schema, key_texts, since, device_id, scope):
        """{row key: the columns others changed after `since`, or None for any column}.

        Only the keys among key_texts that someone other than device_id
        changed, in entries logged under the device's `scope` (another store's
        change is not there for it: its answer is the one a key nobody changed
        gets); None when an insert, a delete, a cascade or an entry of an older
        version says nothing of columns.
        """
        found = {}
        if scope.texts == ():
            return found                    # a scope no row can be in
        for chunk in _chunks(sorted(key_texts), 500):
            marks = ", ".join("?" for _ in chunk)
            foreign = "" if device_id is None else " AND (device_id IS NULL OR %s <> %s)" % (
                self.db.bytewise("device_id"), self.db.bytewise("?"))
            extra = [] if device_id is None else [device_id]
            if scope.texts is not None:
                foreign += " AND scope IN (%s)" % ", ".join("?" for _ in scope.texts)
                extra += list(scope.texts)
            # Pending first: the sequencer moves rows from pending to changes, so a row
            # missed in pending because it was just numbered is then found in changes.
            # (Pending changes are not numbered yet: they come after any checkpoint.)
            sources = [(log, " AND seq > ?", [since]) if log == "cloudsync_changes"
                       else (log, "", []) for log in self._logs()]
            for table, after, after_params in sources:
                rows = self.db.query(conn,
                    "SELECT row_key, op, columns FROM %s"
                    " WHERE table_name = ? AND row_key IN (%s)%s%s"
                    % (table, marks, after, foreign),
                    [schema.name] + list(chunk) + after_params + extra)
                for row_key, op, columns in rows:
                    key, known = _text(row_key), found.get(_text(row_key), set())
                    if known is None or _text(op) != "U" or columns is None:
                        found[key] = None
                    else:
                        found[key] = known | set(json.loads("[%s]" % _text(columns)[:-1]))
        return found

    def entries(self, conn, device_id=None, table=None, since=0, limit=100, newest=False):
        """The audit trail: log rows, oldest first, filtered; `newest`: the last `limit` of them."""
        sql, params = "SELECT seq, table_name, row_key, op, device_id, batch_id, changed_at" \
                      " FROM cloudsync_changes WHERE seq > ?", [since]
        if device_id is not None:
            sql += " AND %s = %s" % (self.db.bytewise("device_id"), self.db.bytewise("?"))
            params.append(device_id)
        if table is not None:
            sql += " AND table_name = ?"
            params.append(table)
        rows = self.db.query(conn, sql + " ORDER BY seq %s LIMIT ?" % ("DESC" if newest else "ASC"),
                             params + [limit])
        return rows[::-1] if newest else rows

    # -- batches -------------------------------------------------------------------

    def find_batch(self, conn, device_id, batch_id):
        """(request_hash, stored response) of an earlier push with this batch id, or None."""
        rows = self.db.query(conn, 
            "SELECT request_hash, response FROM cloudsync_batches"
            " WHERE device_id = ? AND batch_id = ?",
            (device_id, batch_id))
        return (rows[0][0], rows[0][1]) if rows else None

    def claim_batch(self, conn, device_id, batch_id, request_hash):
        """In the push's transaction: reserve the batch id (a concurrent twin waits, then fails)."""
        self.db.execute(conn, 
            "INSERT INTO cloudsync_batches (device_id, batch_id, request_hash, created_at)"
            " VALUES (?, ?, ?, %s)" % self.db.now_sql, (device_id, batch_id, request_hash))

    def finish_batch(self, conn, device_id, batch_id, response):
        """Inside the push's transaction: store the outcome to replay."""
        self.db.execute(conn, 
            "UPDATE cloudsync_batches SET response = ? WHERE device_id = ? AND batch_id = ?",
            (json.dumps(response, default=_json_default), device_id, batch_id))

    # -- compaction ------------------------------------------------------------------

    def compact(self, conn, retention_days, progress=None):
        """Drop log entries and batch records older than the retention.

        Return (entries, batch ids, the newest seq removed). Each table and scope
        value keeps the newest seq removed of its own entries
        (cloudsync_compacted): a device whose checkpoint is older expired only
        if it could have missed one of them, so a device of a quiet store, or a
        quiet table, never starts again because others were busy.
        """
        self.sequence(conn)
        cutoff = self.db.cutoff_sql
        with self.db.transaction(conn):
            upto = self.db.query(conn,
                "SELECT MAX(seq) FROM cloudsync_changes WHERE changed_at < %s" % cutoff,
                (retention_days,))[0][0] or 0
            if upto:
                # published before the rows go: a reader that misses a row then sees the mark
                # and answers 410
                self.db.execute(conn, self.db.compacted_upsert_sql, (upto,))
                previous = int(self.db.query(conn, "SELECT value FROM cloudsync_meta"
                                                   " WHERE name = 'compacted_upto'")[0][0])
                self.db.execute(conn, "UPDATE cloudsync_meta SET value = ?"
                                      " WHERE name = 'compacted_upto'", (str(max(previous, upto)),))
            batches = self.db.execute(conn,
                "DELETE FROM cloudsync_batches WHERE created_at < %s" % cutoff, (retention_days,))
        removed = 0
        while upto:
            with self.db.transaction(conn):
                count = self.db.execute(conn, self.db.delete_oldest_sql, (upto, COMPACT_BATCH_ROWS))
            removed += count
            if count < COMPACT_BATCH_ROWS:
                break
            if progress:                    # a long compaction says how far it got
                progress("removed %d log entries so far" % removed)
        return removed, batches, upto

    def _logs(self):
        """The tables holding changes: the log, and where changes wait to be numbered."""
        return ("cloudsync_changes",) if self.db.numbers_at_commit \
            else ("cloudsync_pending", "cloudsync_changes")


class Snapshot:
    """One view of the log (ChangeLog.read): the head, each table's (epoch, fingerprint), the
    compaction mark of each table, the changes (table, row key, seq), oldest first, and whether
    changes of the excluded batch still wait to be numbered."""

    __slots__ = ("head", "tables", "marks", "entries", "excluded_pending", "waiting")

    def __init__(self, rows):
        self.head, self.tables, self.marks, self.entries = 0, {}, {}, []
        self.excluded_pending = self.waiting = False
        for kind, name, third, fourth in rows:
            kind = _text(kind)
            if kind == "h":
                self.head = int(fourth or 0)
            elif kind == "t":
                self.tables[_text(name)] = (int(third), _text(fourth))
            elif kind == "c":
                self.marks[_text(name)] = int(fourth or 0)
            elif kind == "e":
                self.entries.append((_text(name), _text(third), int(fourth)))
            elif kind == "p":
                self.excluded_pending = bool(int(fourth or 0))
            elif kind == "w":
                self.waiting = self.waiting or fourth is not None
        self.entries.sort(key=lambda entry: entry[2])     # a UNION keeps no order of its own


def _chunks(items, size):
    """`items` in lists of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _expired():
    """The refusal of a checkpoint the log can no longer serve."""
    return Refused("expired", "changes after this checkpoint were compacted away, or the "
                              "database was restored to an earlier state; start again with "
                              "\"since\": null", reset=True)


# ---------------------------------------------------------------------------
# Sync engine: the tables and their rows
# ---------------------------------------------------------------------------
# What push and pull share: the allowed tables as the database describes
# them, the change log, checkpoints, reading rows by key, and the grants.


def _log_bounds(fields, tables):
    """{table: seq}: where a checkpoint's log reading starts for each table. A table pulled from
    its start since (a first sync, a new start) holds every change up to that start already."""
    return {table: max(fields["s"], since)
            for table, since in zip(tables, _per_table(fields.get("a"), tables, 0))}


def _per_table(values, tables, default):
    """A checkpoint's per-table list, or `default` for each table (a checkpoint without one)."""
    if isinstance(values, list) and len(values) == len(tables):
        return list(values)
    return [default] * len(tables)


def key_value(schema, key):
    """A row key as the protocol shows it: the value, or an object for a composite key."""
    if len(schema.primary_key) == 1:
        return key[0]
    return dict(zip(schema.primary_key, key))


class SyncEngine:
    """The allowed tables and what push and pull share; Pushes and Pulls (below) do the rest."""

    def __init__(self, database, allowed_tables, capture="triggers", row_scopes=(),
                 read_only_columns=(), read_only_tables=(), insert_only_tables=()):
        self.db = database
        self.allowed_tables = tuple(allowed_tables)
        self.row_scopes = dict(row_scopes)      # table -> its scope column's name
        self.read_only_columns = {}             # table -> names pushes may not set
        for table, name in read_only_columns:
            self.read_only_columns.setdefault(table, set()).add(name)
        self.read_only_tables = frozenset(read_only_tables)
        self.insert_only_tables = frozenset(insert_only_tables)
        self._grants = (None, {})               # (the schemas they were made for, token -> Grant)
        self.schemas = {}
        self.schema_loaded_at = 0.0
        # changes only when a table's columns, types or key change
        self.schema_fingerprint = ""
        self._fingerprints = {}                 # table -> TableSchema.fingerprint()
        self._descriptions = {}                 # fingerprint -> the columns it stands for
        self.epochs = {}                        # table -> its epoch (ChangeLog.follow)
        self._signature = None                  # the schemas as the last look saw them
        self._looked_at = None                  # when (the database's time)
        self._following = threading.Lock()      # one look at a time (the watcher, a request)
        self.changelog = ChangeLog(database, capture)
        self.checkpoints = Checkpoints(self.changelog)
        # what a pull finding changes waiting to be numbered calls (serve: the watcher's look)
        self.number_now = self.changelog.sequence

    # -- schema -------------------------------------------------------------

    def load_schema(self):
        """Introspect every allowed table; raise SchemaError naming the first bad one."""
        with self.db.connection() as conn:
            self.db.prepare(conn)
            schemas = self._introspect(conn)
            if self.changelog.instance is None:
                self.changelog.load_identity(conn)
            self.epochs = self.changelog.epochs(conn)
        self._set_schemas(schemas)
        return schemas

    def refresh_schema(self, max_age_seconds=SCHEMA_REFRESH_SECONDS):
        """load_schema(), unless it ran less than `max_age_seconds` ago."""
        if time.monotonic() - self.schema_loaded_at < max_age_seconds:
            return self.schemas
        return self.load_schema()

    def migrate(self, progress=None):
        """Introspect the tables, create cloudsync's own tables and install the triggers."""
        with self.db.connection() as conn:
            self.db.prepare(conn)
            schemas = self._introspect(conn)
            self.epochs = self.changelog.install(conn, schemas, progress)
            self._signature = None
        self._set_schemas(schemas)
        return schemas

    def follow_schema(self, triggers=True):
        """Notice a change of an allowed table and follow it; True when there was one.

        The watcher calls it every SCHEMA_LOOK_SECONDS: one look at the tables'
        definitions (Database.schema_signature), and at cloudsync's triggers
        every TRIGGER_LOOK_SECONDS (`triggers`). When they changed (an ALTER
        TABLE, a table dropped and made again or swapped for a copy, a
        TRUNCATE, triggers dropped or made by another program), the tables are
        read again and ChangeLog.follow puts their capture right, so the shop's
        own writes meet triggers made for their columns again within that time.
        """
        with self._following, self.db.connection() as conn:
            last = self._signature
            # triggers not known since cloudsync made them: looked at now
            triggers = triggers or last is None or last[1] is None
            looked_at, definitions, seen_triggers = self.db.schema_signature(
                conn, list(self.allowed_tables), triggers)
            if seen_triggers is None and last is not None:
                seen_triggers = last[1]         # as the last look at them saw them
            seen = (definitions, seen_triggers)
            if seen == last:
                self._looked_at = looked_at
                return False
            truncated = None if last is None else self.db.truncated_between(last, seen)
            schemas = self._introspect(conn)
            self.epochs, made = self.changelog.follow(conn, schemas, log.info, truncated,
                                                      self._looked_at)
            # triggers made now are not the ones seen: the next look reads them (a table made again
            # twice in one second differs from the first only by its triggers)
            self._signature = (definitions, None) if made else seen
            self._looked_at = looked_at
        self._set_schemas(schemas)
        return True

    def after_schema_moved(self, moved, again):
        """A request's statement met a table or column that is not there (SchemaMoved): follow
        the schema now, and return when running it once more may work.

        Retryable (503) while an allowed table is missing: a dump reload or a
        swap is making it again (GET /sync/status says so if it stays gone).
        When nothing moved and the request ran again already (`again`), the
        error is the database's own (a trigger of the shop's naming a table
        that does not exist): SchemaError, a failure (500).
        """
        try:
            moved_now = self.follow_schema()
        except SchemaError as missing:
            self.schema_loaded_at = 0.0     # GET /sync/status reads the tables again, and says it
            raise Retryable(str(missing)) from None
        if again and not moved_now:
            raise SchemaError("the database refused a statement: %s" % moved) from None

    def alter(self, table, statement, progress=None):
        """Run `statement` (the operator's ALTER TABLE of an allowed table) and make the table's
        capture what its new columns ask for, in one step.

        No write of another program meets a trigger made for the old columns,
        and none goes unrecorded: MySQL holds the table's write lock (LOCK
        TABLES) from the ALTER until the new triggers are in; SQLite runs both
        in one transaction (it refuses to drop a column its triggers name).
        """
        if table not in self.allowed_tables:
            raise ConfigError("%s is not in ALLOWED_TABLES; run the statement with your own tools."
                              % table)
        say = progress or (lambda message: None)
        with self.db.connection() as conn:
            self.db.prepare(conn)
            with self.db.altering(conn, table, [_trigger_name(table, event) for event
                                                in list(TRIGGER_EVENTS) + list(REPLACED_EVENTS)]):
                self.db.execute(conn, statement)
                schema = self.with_table_settings({table: self.db.introspect(conn, table)})
                self.changelog.follow(conn, schema, say, trusted={table}, cascades=False)
        return self.migrate(progress)       # the foreign-key cascades of the new columns

    def _introspect(self, conn):
        """Every allowed table as the catalogue describes it now, with the table settings."""
        schemas = self.with_table_settings({table: self.db.introspect(conn, table)
                                            for table in self.allowed_tables})
        self.changelog.mark_uncaptured(conn, schemas)
        return schemas

    def fingerprint(self, table):
        """The fingerprint of a table's columns as they are now (TableSchema.fingerprint)."""
        return self._fingerprints.get(table)

    def added_columns(self, conn, table, before):
        """{column: default} of the columns `table` gained since its columns were the ones
        fingerprinted `before`, when that is all that changed and each has a constant default.

        None otherwise (a column dropped, renamed or of another type, another
        key or scope, a default that is no constant, or columns not known): the
        device pulls the table again.
        """
        if before is None:
            return None
        old = self._descriptions.get(before) or self.changelog.description(conn, before)
        if old is None:
            return None
        self._descriptions[before] = old
        schema = self.schemas[table]
        now = schema.describe()
        if old["primary_key"] != now["primary_key"] or old.get("scope") != now.get("scope") \
                or any(now["types"].get(name) != declared
                       for name, declared in old["types"].items()):
            return None
        added = {}
        for name in now["columns"]:
            if name not in old["types"]:
                default = schema.columns[name].default
                if default is None:
                    return None
                added[name] = default[0]
        return added

    def set_rules(self, read_only_columns, read_only_tables, insert_only_tables):
        """Put new table rules in force (SIGHUP); SchemaError, and nothing changed, if the
        columns do not fit the tables. Grants are made again at the next request."""
        columns = {}
        for table, name in read_only_columns:
            columns.setdefault(table, set()).add(name)
        kept, self.read_only_columns = self.read_only_columns, columns
        try:
            self.with_table_settings(dict(self.schemas))
        except SchemaError:
            self.read_only_columns = kept
            raise
        self.read_only_tables = frozenset(read_only_tables)
        self.insert_only_tables = frozenset(insert_only_tables)
        self._grants = (None, {})

    def with_table_settings(self, schemas):
        """The settings that name columns, checked against `schemas`; SchemaError if one cannot be.

        READ_ONLY_COLUMNS: columns of the table, none of its key. ROW_SCOPES:
        each table's scope column is marked on its schema (TableSchema.scope).
        """
        for table, names in self.read_only_columns.items():
            schema = schemas.get(table)
            for name in sorted(names) if schema is not None else ():
                if name not in schema.columns or name in schema.primary_key:
                    raise SchemaError("READ_ONLY_COLUMNS names %s.%s, which is %s" % (
                        table, name, "a column of its primary key (a device must name its rows)"
                        if name in schema.columns else "not a column of the table"),
                        "change READ_ONLY_COLUMNS, or the table")
        for table, name in self.row_scopes.items():
            schema = schemas.get(table)
            if schema is None:
                continue
            column = schema.columns.get(name)
            if column is None:
                raise SchemaError("ROW_SCOPES names %s.%s, but table %s has no column %s"
                                  % (table, name, table, name), "change ROW_SCOPES, or the table")
            if column.kind not in SCOPE_KINDS:
                raise SchemaError("ROW_SCOPES names %s.%s, a %s column; a scope column holds "
                                  "whole numbers or text (a store number, a region's name)"
                                  % (table, name, column.declared),
                                  "change ROW_SCOPES, or the table")
            schema.scope = column
        return schemas

    def grant_for(self, token):
        """The Grant of a request made with `token` (a DeviceToken; None: no token is needed).

        Made once per token and set of schemas. A token without a value for a
        scoped table's column may not use that table: fail closed.
        """
        schemas = self.schemas
        made_for, grants = self._grants
        if made_for is not schemas or len(grants) > MAX_GRANTS_KEPT:
            grants = {}
            self._grants = (schemas, grants)
        grant = grants.get(token)
        if grant is None:
            grant = grants[token] = self._grant(token, schemas)
        return grant

    def _grant(self, token, schemas):
        """A new Grant for `token` over `schemas`."""
        tables = {}
        for table in self.allowed_tables:
            schema = schemas.get(table)
            if schema is None or token is not None and token.tables is not None \
                    and table not in token.tables:
                continue
            scope = EVERY_ROW
            if schema.scope is not None and token is not None:
                values = token.scopes.get(schema.scope.name)
                if values is None:
                    continue                # the token has no value for the table's column
                if SCOPE_ALL not in values:
                    scope = TableScope(self.db, schema.scope, values)
            tables[table] = TableGrant(schema, scope, table not in self.read_only_tables,
                                       table in self.insert_only_tables,
                                       self.read_only_columns.get(table, ()))
        return Grant(None if token is None else token.device_id, tables,
                     limited=len(tables) < len(self.allowed_tables),
                     scopes=None if token is None else dict(token.scopes))

    def every_row(self):
        """The Grant of the operator's own commands and of a server without tokens: every row."""
        return self.grant_for(None)

    def _set_schemas(self, schemas):
        """Put newly read schemas in force, with their fingerprints."""
        columns = {name: schema.fingerprint() for name, schema in schemas.items()}
        fingerprint = hashlib.sha256(json.dumps([
            sorted(columns.items()),
            sorted(name for name, schema in schemas.items() if schema.cascaded),
        ]).encode("utf-8")).hexdigest()
        self._fingerprints = columns
        self.schemas = schemas          # one assignment: readers see the old or the new dict
        self.schema_loaded_at = time.monotonic()
        # cached seed pulls are keyed by it: answers encoded with the old columns are not served
        # again
        self.schema_fingerprint = fingerprint

    # -- rows by key -------------------------------------------------------------

    def rows_for_keys(self, conn, schema, keys, scope, lock=False):
        """For each pushed key: (key as logged, row) of the row its statement would find, or None.

        One query for all the keys, each row carrying its key as SQL writes it;
        a key the device wrote in another form of the same value ('ABC' for
        'abc' under a case-blind collation) is then looked up on its own.
        """
        found = self.select_by_keys(conn, schema, keys, scope, lock)
        result, unmatched = [], []
        for position, key in enumerate(keys):
            text = self.db.key_text(schema, key)
            if text in found:
                result.append((text, found[text]))
            else:
                result.append(None)
                unmatched.append(position)
        if unmatched and set(found) - {row[0] for row in result if row}:
            for position in unmatched:
                alone = self.select_by_keys(conn, schema, [keys[position]], scope, lock)
                if alone:
                    result[position] = next(iter(alone.items()))
        return result

    def select_by_keys(self, conn, schema, keys, scope, lock=False):
        """{key text as the log holds it: row} of the rows with these keys (bound values).

        lock: a concurrent writer of these rows waits for this transaction;
        scope: only the rows of a device's scope (EVERY_ROW: all).
        """
        found = {}
        names = schema.column_names
        for chunk in _chunks(list(dict.fromkeys(keys)), 500):
            rows = self.db.query(conn, *select_keyed_sql(schema, chunk, scope,
                                                         self.db.lock_rows if lock else ""))
            for text, row in zip([row[0] for row in rows],
                                 self.db.decode_rows(schema, [row[1:] for row in rows])):
                found[_text(text)] = dict(zip(names, row))
        return found


# ---------------------------------------------------------------------------
# Long polls: one watcher per instance
# ---------------------------------------------------------------------------
# A sync pull with "wait": N that finds nothing new waits, without a database
# connection, until a change may have committed, then pulls again. What wakes
# it: a push through this instance (at once, after its commit), or the
# watcher, one thread per instance that looks at the log twice every
# WATCH_INTERVAL_SECONDS (one query: the head, the newest table epoch, and on MySQL
# the newest change waiting to be numbered, which other instances and programs
# add) and wakes every waiting pull when it moved. So the database work grows
# with instances, not with waiting devices. Each waiting pull holds a waitress
# thread: LONGPOLL_MAX_WAITERS bounds them, and the server adds a thread for
# each while it waits (Private APIs: waitress's pool), so pushes and status
# never wait behind parked pulls. The watcher's last look also answers idle
# polls: a checkpoint at the head it saw at most one interval ago gets "no
# changes" without a round trip (stale by at most that much; a push through
# the instance, or a conflict it answered, sends the next poll to the
# database).
#
# The watcher is also the instance's numberer (MySQL): at each look it numbers
# the committed changes waiting in cloudsync_pending (ChangeLog.sequence), and
# a push through the instance makes it look at once. Pushes and pulls never
# number, so none of them writes the shared last_seq row: the numberers of
# all instances take turns on it, and on a Galera cluster a numberer that
# loses the race at commit simply numbers again at its next look. A pull that
# finds changes of its tables waiting asks the numberer to run and waits for
# that look (number_now); without a watcher thread (commands, tests) it
# numbers them itself. Every SCHEMA_LOOK_SECONDS the watcher also looks at the
# tables' definitions (SyncEngine.follow_schema).


def _listed(moved):
    """{table: a set of scope values, or None} as JSON holds it (_unlisted reads it back)."""
    return None if moved is None else {
        table: None if scopes is None else sorted(scopes, key=lambda scope: (scope is None,
                                                                             scope or ""))
        for table, scopes in moved.items()}


def _unlisted(moved):
    """_listed's JSON back as {table: a set of scope values, or None}."""
    return None if moved is None else {
        table: None if scopes is None else set(scopes) for table, scopes in moved.items()}


def _answer_bytes(answer):
    """About how much memory a sync pull's answer holds: the text of its values and keys."""
    return sum(len(str(value)) for change in answer["changes"].values()
               for row in change["upserted"] for value in row.values()) \
        + sum(len(str(key)) for change in answer["changes"].values() for key in change["deleted"])


class LogWatcher:
    """Knows the change log's head as of its last look, numbers what waits, and wakes the pulls
    waiting for a change."""

    def __init__(self, engine, max_waiters):
        self.engine = engine
        self.changelog = engine.changelog
        self.max_waiters = max_waiters
        self._changed = threading.Condition()
        self.generation = 0         # goes up whenever the log may have moved
        # (generation, what moved: {table: scope values} or None for anything, the log's head
        # before and after or None), the newest last: a waiting pull wakes only for what concerns
        # it (park), and a poll behind the head only by others' changes is answered from memory
        self._moves = collections.deque(maxlen=WATCH_MOVES_KEPT)
        self.woken = 0              # waiting pulls woken by a change that concerned them
        self.head = None            # the head at the last look; None: not known
        self._last_seen = None      # (head, epochs) at the last look
        self._pokes = 0             # pushes through this instance
        self.highest = 0            # the highest head seen (or heard) since the log went back
        # (poke number, {table: scope values} it may have changed) since the last look began
        self._pushed = []
        self.seen_at = 0.0          # when (monotonic)
        self.looks = 0              # looks begun, and finished (number_now waits for one)
        self.looked = 0
        self._look_now = threading.Event()
        self.waiting = 0            # pulls waiting now
        self._waiters = collections.Counter()   # waiting pulls per device (or address)
        # table -> scope value (None: every row) -> events of the pulls waiting there (park)
        self._parked = collections.defaultdict(dict)
        self.turned_away = 0        # pulls that could not wait: LONGPOLL_MAX_WAITERS were
        self.stopping = False
        # serve: resize(waiting) gives the server THREADS threads plus one per waiting pull
        self.resize = None
        # a worker (Workers): tell_others(message) passes each move a look saw (["moved",
        # before, after, moved, began]: heard), and each push through it (["pushed", tables and
        # scope values]: heard_push), to the other workers, which wake their pulls without asking
        # the database; hear_now() takes in what they told so far, before a poll is answered
        # from memory
        self.tell_others = None
        self.hear_now = None
        self._sharing = threading.Lock()
        # key -> [lock, answer, the generation it was read at] (shared()), the newest last
        self._answers = collections.OrderedDict()

    def look(self):
        """One look at the log: number what waits, wake the waiting pulls when it moved."""
        began = time.monotonic()            # what it sees is at least this fresh
        with self._changed:
            self.looks += 1
            look, pokes = self.looks, self._pokes
        try:
            with self.changelog.db.connection() as conn:
                head, epochs, _, waiting = self.changelog.position(conn)
                if waiting is not None:
                    self.changelog.sequence(conn)
                    head, epochs, _, waiting = self.changelog.position(conn)
                last = self._last_seen
                if last is None or epochs != last[1]:
                    self.engine.epochs = self.changelog.epochs(conn)
                moved = None                # not known: concerns every waiting pull
                if last is not None and epochs == last[1] and last[0] is not None:
                    # numbered entries never change: what (last head, head] holds is final
                    moved = {} if head == last[0] else self.changelog.touched(conn, last[0], head)
            with self._changed:
                told = (head, epochs) != (self._last_seen or (None, None))[:2]
                if told:
                    self._moved(moved, last[0] if last is not None else None, head)
                self._last_seen = (head, epochs)
                self.head = head
                self.seen_at = began
                # a head lower than before: the log was restored from a backup
                self.highest = head if last is not None and last[0] is not None \
                    and head < last[0] else max(self.highest, head)
                # the pushes through this instance before the look began are in what it saw
                self._pushed = [(number, pushed) for number, pushed in self._pushed
                                if number > pokes]
            if told and self.tell_others is not None:
                self.tell_others(["moved", last[0] if last is not None else None, head,
                                  _listed(moved), began])
        finally:
            with self._changed:
                self.looked = max(self.looked, look)
                self._changed.notify_all()

    def number_now(self, conn):
        """What a pull finding changes waiting to be numbered does: ask the numberer thread for a
        look and wait for it (at most two intervals); with no thread, number them here."""
        if not self.running():
            self.changelog.sequence(conn)
            return
        with self._changed:
            after = self.looks
            self._look_now.set()
            self._changed.wait_for(lambda: self.looked > after or self.stopping,
                                   2 * WATCH_INTERVAL_SECONDS)

    def poke(self, pushed=None):
        """A push through this instance committed (`pushed`: {table: the scope values it may
        have written, None for any}; None: anything): number it and wake the waiting pulls
        now. Until the next look, a poll of what it may have changed asks the database."""
        if self.tell_others is not None:
            # before the device has its answer: a poll it makes next through another worker
            # finds the mark there (hear_now)
            self.tell_others(["pushed", _listed(pushed)])
        with self._changed:
            self._pokes += 1
            self._pushed.append((self._pokes, pushed))
            # no watcher thread: the woken pulls number it. With one, its look (at once) tells
            # which tables and stores the push changed, and wakes only the pulls it concerns.
            if not self.running():
                self._moved(None)
        self._look_now.set()

    def heard_push(self, pushed):
        """A push through another worker committed (`pushed` as poke's): until this watcher's
        next look, polls of what it may have changed ask the database."""
        with self._changed:
            self._pokes += 1
            self._pushed.append((self._pokes, pushed))

    def _moved(self, moved, before=None, after=None):
        """The log moved (`moved`: {table: scope values}, or None when not known; from head
        `before` to `after` when a look saw it): a new generation, and the waiting pulls look
        whether it concerns them. Holding _changed."""
        self.generation += 1
        self._moves.append((self.generation, moved, before, after))
        self._wake(moved)
        self._changed.notify_all()          # number_now waits for a look

    def heard(self, before, after, moved, began):
        """Another worker's look, begun at `began` (monotonic, the same clock in every
        process), saw the log move from head `before` to `after` (None: not known), changing
        `moved` ({table: scope values}, None: anything): wake the waiting pulls it concerns;
        when it continues this watcher's last look, the head is `after` as of `began`."""
        with self._changed:
            last = self._last_seen
            if after is not None and last is not None and last[0] is not None \
                    and after <= last[0]:
                return                      # this worker's own look saw it already
            self._moved(moved, before, after)
            if after is not None and moved is not None and last is not None \
                    and last[0] == before and self.head == before:
                self._last_seen, self.head, self.seen_at = (after,) + last[1:], after, began
                self.highest = max(self.highest, after)

    def quiet_between(self, since, head, interest):
        """Whether every change of the log after `since` up to `head` is known, from the looks
        kept, to concern none of `interest`'s tables and scope values: a poll from `since` has
        nothing to read."""
        with self._changed:
            covered = since                 # the log up to here is known
            for _, moved, before, after in self._moves:
                if before is None or after is None:
                    continue                # a push's wake: the look after it holds the range
                if after <= covered:
                    continue                # known already (another worker told it too)
                if before > covered:
                    return False            # a stretch of the log no kept look saw
                if moved is None or self._touches(moved, interest):
                    return False
                covered = after
            return covered == head

    def concerns(self, generation, interest):
        """Whether the log moved since `generation` in a way that concerns a pull of `interest`
        ({table: its scope values as text, or None for every row}). Holding _changed."""
        if self.generation == generation:
            return False
        if not self._moves or self._moves[0][0] > generation + 1:
            return True                     # moves older than those kept: not known
        for moved_at, moved, _, _ in self._moves:
            if moved_at > generation and (moved is None or interest is None
                                          or self._touches(moved, interest)):
                return True
        return False

    @staticmethod
    def _touches(moved, interest):
        """Whether changes of `moved` ({table: a set of scope values, or None for any}) are
        some of `interest`'s rows: a change of a shared table, or of a row in one of the pull's
        scope values."""
        for table, texts in interest.items():
            if table in moved:
                scopes = moved[table]       # None: any scope value
                if scopes is None or texts is None or not scopes.isdisjoint(texts):
                    return True
        return False

    def forget(self):
        """Something may have changed that the last look did not see (a conflict showed it)."""
        self.head = None

    def running(self):
        """Whether the watcher thread looked within WATCH_INTERVAL_SECONDS (serve runs it)."""
        return time.monotonic() - self.seen_at <= WATCH_INTERVAL_SECONDS

    def shared(self, key, interest, compute):
        """compute(), or the answer it gave a pull with the same `key` (the same tables,
        checkpoint and grant) since the log last moved in a way that concerns `interest`.

        Woken by one sale, the tills of its store at one checkpoint ask the
        database once, even when other stores' sales move the log between
        their wake-ups. Only while the watcher runs: it sees any commit within
        WATCH_INTERVAL_SECONDS (an answer a commit made just before outdated
        moves the device's checkpoint to before it: it comes next time).
        """
        if not self.running():
            return compute()
        with self._sharing:
            slot = self._answers.get(key)
            # an answer read (or being read) since a move that concerns the pull: read again
            if slot is None or self._concerned_since(slot[2], interest):
                # what it will hold is at least as new as this generation
                slot = self._answers[key] = [threading.Lock(), None, self.generation]
            self._answers.move_to_end(key)
            while len(self._answers) > SHARED_ANSWERS_KEPT:
                self._answers.popitem(last=False)
        with slot[0]:                       # one computes; the others wait for its answer
            if slot[1] is None:
                slot[1] = compute()
                if _answer_bytes(slot[1]) > SHARED_ANSWER_BYTES:
                    with self._sharing:     # for those waiting now only: memory stays bounded
                        if self._answers.get(key) is slot:
                            del self._answers[key]
            return dict(slot[1])

    def _concerned_since(self, generation, interest):
        """concerns(), taking _changed."""
        with self._changed:
            return self.concerns(generation, interest)

    def known_head(self, interest=None):
        """The head if the last look began at most WATCH_INTERVAL_SECONDS ago, and no push
        through this instance since may have changed `interest` ({table: scope values}); else
        None."""
        if self.hear_now is not None:
            self.hear_now()                 # another worker's push answered before this poll
        head, seen_at = self.head, self.seen_at
        if head is None or time.monotonic() - seen_at > WATCH_INTERVAL_SECONDS:
            return None
        with self._changed:
            if any(pushed is None or interest is None or self._touches(pushed, interest)
                   for _, pushed in self._pushed):
                return None
        return head

    def enter(self, waiter):
        """Take a waiting slot for `waiter` (a device or an address); False when it may not wait.

        At most LONGPOLL_MAX_WAITERS wait in all, LONGPOLL_WAITERS_PER_DEVICE of
        them for one waiter (one device cannot take every slot), and none once
        the server stops.
        """
        with self._changed:
            if self.stopping or self.waiting >= self.max_waiters \
                    or self._waiters[waiter] >= LONGPOLL_WAITERS_PER_DEVICE:
                self.turned_away += 1
                return False
            self.waiting += 1
            self._waiters[waiter] += 1
            if self.resize is not None:
                self.resize(self.waiting)       # a thread takes the place of this one
            return True

    def leave(self, waiter):
        """Give a waiting slot back."""
        with self._changed:
            self.waiting -= 1
            self._waiters[waiter] -= 1
            if not self._waiters[waiter]:
                del self._waiters[waiter]
            if self.resize is not None:
                self.resize(self.waiting)

    def park(self, generation, deadline, interest=None):
        """Wait until the log moved since `generation` in a way that concerns a pull of
        `interest` ({table: scope values as text, or None}; None: any move), the deadline, or a
        stop. True when woken by such a change.

        A sale in store 7 wakes the pulls of store 7's tills and of devices that
        see every store, not those of the other stores; a change of a shared
        table (the catalogue) wakes every pull of it.
        """
        event = threading.Event()
        with self._changed:
            if self.stopping:
                return False
            if self.concerns(generation, interest):
                self.woken += 1
                return True
            places = self._places(interest)
            for table, text in places:      # a move of these wakes it (_moved), nothing else
                self._parked[table].setdefault(text, set()).add(event)
        try:
            event.wait(max(0.0, deadline - time.monotonic()))
        finally:
            with self._changed:
                for table, text in places:
                    waiting = self._parked[table][text]
                    waiting.discard(event)
                    if not waiting:
                        del self._parked[table][text]
                        if not self._parked[table]:
                            del self._parked[table]
                woken = event.is_set() and not self.stopping
                self.woken += woken
        return woken

    @staticmethod
    def _places(interest):
        """Where a pull of `interest` waits: (table, scope value), or (table, None) for every
        row of the table; (None, None) for any move (no interest given)."""
        if interest is None:
            return [(None, None)]
        return [(table, text) for table, texts in interest.items()
                for text in ((None,) if texts is None else texts)]

    def _wake(self, moved):
        """Set the events of the waiting pulls a move of `moved` concerns (None: every one).
        Holding _changed. Only those threads wake: a sale in store 7 costs store 8's waiting
        pulls nothing."""
        if moved is None:
            woken = [event for texts in self._parked.values() for events in texts.values()
                     for event in events]
        else:
            woken = [event for event in self._parked.get(None, {}).get(None, ())]
            for table, scopes in moved.items():
                texts = self._parked.get(table)
                if not texts:
                    continue
                if scopes is None:          # any scope value
                    woken += [event for events in texts.values() for event in events]
                    continue
                woken += texts.get(None, ())
                for scope in scopes:
                    if scope is not None:
                        woken += texts.get(scope, ())
        for event in woken:
            event.set()

    def stop(self):
        """SIGTERM: every waiting pull answers now, and none starts waiting."""
        with self._changed:
            self.stopping = True
            self._wake(None)
            self._changed.notify_all()

    def run(self, stop):
        """The watcher thread: look twice every WATCH_INTERVAL_SECONDS (and at once when a push or
        a pull asks), and at the tables every SCHEMA_LOOK_SECONDS, until `stop` is set."""
        schema_due, triggers_due, problem = 0.0, 0.0, None
        while not stop.is_set():
            self._look_now.clear()
            try:
                self.look()
                now = time.monotonic()
                if now >= schema_due:
                    schema_due = now + SCHEMA_LOOK_SECONDS
                    triggers = now >= triggers_due
                    if triggers:
                        triggers_due = now + TRIGGER_LOOK_SECONDS
                    try:
                        if self.engine.follow_schema(triggers):
                            self.poke()     # waiting pulls see what changed (a table to pull again)
                        problem = None
                    except SchemaError as error:
                        # a table dropped (a reload making it again, or gone): said once, not at
                        # every look; requests on it answer 503, status 500
                        if str(error) != problem:
                            log.error("an allowed table cannot be synced now: %s", error)
                        problem = str(error)
            except DatabaseUnavailable:
                self.head = None        # requests report it; the next look tries again
            except Exception:
                self.head = None
                log.warning("the change-log watcher failed; it looks again shortly",
                            exc_info=True)
            # twice an interval: a look younger than WATCH_INTERVAL_SECONDS is nearly always there
            self._look_now.wait(WATCH_INTERVAL_SECONDS / 2)

    def stop_looking(self):
        """Wake the thread so it sees its stop event."""
        self._look_now.set()


# ---------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------
# A push is validated in full (tables, actions, columns, keys, every value
# bound for its column) before the first statement runs, so a bad operation
# anywhere leaves the database untouched. Then, in one transaction: the batch
# id is claimed, conflicts with the device's checkpoint are found, each
# operation runs (ACTIONS names its method), the outcome is stored for a
# replay, and the checkpoint to return is decided (below, "The checkpoint a
# push returns").

class Pushes:
    """Validate pushed operations, apply them in one transaction, answer (or replay) the outcome."""

    def __init__(self, engine, max_value_bytes, push_retries):
        self.engine = engine
        self.db = engine.db
        self.changelog = engine.changelog
        self.max_value_bytes = max_value_bytes
        self.push_retries = push_retries
        self.retries = 0                    # pushes run again after a deadlock or lock timeout
        self.on_retry = lambda: None        # App: counts it in the metrics

    # -- validation ----------------------------------------------------------------

    def validate_operations(self, operations, grant):
        """Check every operation against the grant and the schema, before any SQL runs.

        Return Operations (each with its scope, the grant's decision made) or
        raise Refused naming the operation.
        """
        if not isinstance(operations, list):
            raise Refused("invalid_payload", "operations must be a list")
        validated = []
        for index, operation in enumerate(operations):
            try:
                validated.append(self._validate_operation(index, operation, grant))
            except Refused as refusal:
                refusal.fields.setdefault("op", index)  # which operation to fix or drop
                raise
        return validated

    def _validate_operation(self, index, operation, grant):
        """One operation: the table through the grant, its values bound, then the grant decides."""
        where = "operation %d" % index
        if not isinstance(operation, dict):
            raise Refused("invalid_operation", "%s must be an object" % where)
        if "table" not in operation or "action" not in operation or "data" not in operation:
            missing = [field for field in ("table", "action", "data") if field not in operation]
            raise Refused("invalid_operation", "%s has no %s" % (where, " or ".join(missing)))
        checkpoint = _checked_checkpoint(operation.get("checkpoint"), "%s: checkpoint" % where)
        schema = grant.table(operation["table"], where).schema
        action = operation["action"]
        if not isinstance(action, str) or action not in ACTIONS:
            raise Refused("invalid_action", "%s: action must be one of %s"
                          % (where, ", ".join(ACTIONS)))
        data = operation["data"]
        if not isinstance(data, dict):
            raise Refused("invalid_operation", "%s: data must be an object" % where)
        values, columns = {}, schema.columns
        for name, value in data.items():
            column = columns.get(name)
            if column is None:
                raise Refused("unknown_column", "%s: table %r has no column %s"
                              % (where, schema.name, json.dumps(name)[:100]))
            if type(value) is str:
                if len(value) * 4 > self.max_value_bytes \
                        and len(value.encode("utf-8", "surrogatepass")) > self.max_value_bytes:
                    raise Refused("value_too_large", "%s: the value for column %r is over %d "
                                  "bytes; store large files elsewhere and sync a reference"
                                  % (where, name, self.max_value_bytes))
                if column.plain_text and value.isascii():
                    values[name] = value        # the common case: nothing to convert or check
                    continue
            values[name] = bind_value(column, value, where)
        absent = [name for name in schema.primary_key if values.get(name) is None]
        # an insert may leave out a key the database generates (AUTO_INCREMENT, INTEGER
        # PRIMARY KEY)
        generated = action == "insert" and schema.generated_key \
            and not any(name in values for name in absent)
        if absent and not generated:
            raise Refused("missing_key", "%s: data must include primary key column %s"
                          % (where, ", ".join(repr(name) for name in absent)))
        if action == "increment":
            self._check_increment(schema, values, where)
        key = tuple(values.get(name) for name in schema.primary_key)
        for column, value in zip(schema.key_columns, key):
            problem = None if value is None else key_problem(column, value, data.get(column.name))
            if problem is not None:
                raise Refused("invalid_value", "%s: %s" % (where, problem))
        if schema.generated_key and key == (0,) and action in ("insert", "upsert") \
                and not self.db.keeps_zero_keys:
            raise Refused("invalid_value", "%s: column %r is AUTO_INCREMENT: 0 makes the database "
                          "choose another key, so a retry would make another row; send the key "
                          "(not 0), or leave it out to let the database choose"
                          % (where, schema.primary_key[0]))
        # computed by the database: a pulled row pushed back still works
        if schema.has_generated:
            values = {name: value for name, value in values.items() if not columns[name].generated}
        op = Operation(index, schema, action, values, key, data, checkpoint)
        grant.decide(op)
        return op

    @staticmethod
    def _check_increment(schema, values, where):
        """An increment names its row by key and adds a number to at least one numeric column."""
        added = [name for name in values if name not in schema.primary_key]
        if not added:
            raise Refused("invalid_operation", "%s: an increment adds to at least one numeric "
                          "column besides the key" % where)
        for name in added:
            column = schema.columns[name]
            if column.kind not in NUMBER_KINDS or column.generated:
                raise Refused("invalid_value", "%s: an increment adds to numbers; column %s is %s"
                              % (where, name, "computed by the database" if column.generated
                                 else column.declared or column.kind))
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)) \
                    and not (isinstance(value, str) and _NUMBER_TEXT.fullmatch(value)):
                raise Refused("invalid_value", "%s: an increment of column %s needs a number, not "
                              "%s" % (where, name, json.dumps(value, default=str)[:40]))

    # -- the push -------------------------------------------------------------------

    def push(self, operations, device_id=None, batch_id=None, checkpoint=None, on_conflict="abort",
             request_hash=None, grant=None, conflict_level="column", on_reject="abort"):
        """Apply validated operations in one transaction; return the response fields."""
        if batch_id is None and any(op.action == "increment" for op in operations):
            raise Refused("batch_id_required", "operation %d: an increment needs a batch_id, so "
                          "that a retry is not counted twice" % next(
                              op.index for op in operations if op.action == "increment"))
        # 400 when malformed or foreign, even for a replay; its expiry is checked inside the push's
        # transaction
        fields = self.engine.checkpoints.decode(checkpoint) if checkpoint is not None else None
        self._decode_bases(operations, checkpoint, fields)
        if batch_id is not None:
            with self.db.connection() as conn:
                prior = self.changelog.find_batch(conn, device_id or "", batch_id)
            # a retry is answered even when its checkpoint has expired since
            if prior is not None:
                return self._replay(prior, request_hash, checkpoint)
        attempt = dict(device_id=device_id, batch_id=batch_id, fields=fields,
                       on_conflict=on_conflict, request_hash=request_hash, grant=grant,
                       conflict_level=conflict_level, on_reject=on_reject)
        try:
            return self._push_with_retries(operations, attempt, checkpoint)
        except _BatchTaken:
            # a twin of this push (same batch id) committed first: answer as a replay
            with self.db.connection() as conn:
                prior = self.changelog.find_batch(conn, device_id or "", batch_id)
            return self._replay(prior, request_hash, checkpoint)
        except PushRejected as rejected:
            raise _refusal_of(rejected) from None
        # refused outside any one operation (a key the column cannot hold)
        except DataRejected as error:
            raise Refused("data_refused", "the database refused the push: %s" % error) from None

    def _decode_bases(self, operations, checkpoint, fields):
        """Each operation's basis: its own checkpoint decoded, else the push's (None: unjudged)."""
        decoded = {checkpoint: fields, None: None}
        for op in operations:
            text = op.checkpoint if op.checkpoint is not None else checkpoint
            if text not in decoded:
                try:
                    decoded[text] = self.engine.checkpoints.decode(text)
                except Refused as refusal:
                    refusal.fields.setdefault("op", op.index)
                    raise
            op.basis = decoded[text]

    def _push_with_retries(self, operations, attempt, checkpoint):
        """Run the push; after a deadlock or lock timeout (all undone), or a table or column
        that moved under it (followed first), run it again.

        Lock waits and moves at most PUSH_RETRIES times; deadlocks (Galera's certification
        failures among them: nothing waited) at most DEADLOCK_RETRIES; all within the
        request's budget.
        """
        began, waits, deadlocks = time.monotonic(), 0, 0
        while True:
            # another run may wait DB_WAIT_SECONDS for a lock, and its statements a little more
            over = time.monotonic() - began + self.db.config.db_wait_seconds \
                + STATEMENT_MARGIN_SECONDS > REQUEST_BUDGET_SECONDS
            try:
                try:
                    return self._push(operations, True, checkpoint, **attempt)
                except _GroupRejected:
                    # A multi-row insert failed; which row is unknown, and on SQLite the
                    # rows before it stay written. Roll back, then redo one by one.
                    return self._push(operations, False, checkpoint, **attempt)
            except SchemaMoved as moved:
                waits += 1
                if over or waits > self.push_retries:
                    raise
                self.engine.after_schema_moved(moved, again=waits > 1)
            except Deadlocked:
                deadlocks += 1
                if over or deadlocks > max(DEADLOCK_RETRIES, self.push_retries):
                    raise
                # apart, at random: two nodes' writers of one row do not meet again in step
                time.sleep(min(0.5, 0.01 * 2 ** deadlocks) * (0.5 + secrets.randbelow(100) / 100))
            except Retryable:
                waits += 1
                if over or waits > self.push_retries:
                    raise
                time.sleep(0.02 * (2 ** waits) * (1 + secrets.randbelow(100) / 100))
            self.retries += 1
            self.on_retry()

    def _replay(self, prior, request_hash, checkpoint):
        """The stored outcome of a batch pushed before, if the same operations came again."""
        stored_hash, response = prior
        if stored_hash != request_hash:
            raise Refused("batch_reused", "this device already pushed a different batch with this "
                          "batch_id; use a new batch_id for new operations")
        result = json.loads(response)
        # outcomes stored by versions that did not keep it
        result.setdefault("checkpoint", checkpoint)
        result["replayed"] = True
        return result

    def _push(self, operations, batched, checkpoint, device_id, batch_id, fields, on_conflict,
              request_hash, grant, conflict_level="column", on_reject="abort"):
        """The push's transaction: claim the batch id, check conflicts, apply, store the outcome."""
        conflicts, rejected = [], []
        push = _PushState(checkpoint, fields, device_id, batch_id, grant)
        with self.db.connection() as conn:
            with self._push_transaction(conn, operations, batched, batch_id, checkpoint,
                                        on_reject):
                if batch_id is not None:
                    try:
                        self.changelog.claim_batch(conn, device_id or "", batch_id, request_hash)
                    except DataRejected:
                        raise _BatchTaken() from None
                first = operations[0].table.name if operations else None
                push.push_id = uuid.uuid4().hex if checkpoint is not None else None
                with self.changelog.attributed(conn, device_id, batch_id, first, push.push_id):
                    if any(op.basis is not None for op in operations):
                        conflicts, push.before = self._conflicts(conn, operations, device_id,
                                                                 conflict_level)
                        # checked after reading: compaction publishes its mark before it
                        # deletes, so an entry compacted away under the conflict check shows
                        # here as 410
                        self._check_basis(conn, operations, grant)
                        if conflicts and on_conflict != "skip":
                            raise Refused("conflict", "%d operation(s) touch rows changed since "
                                          "your checkpoint; nothing was applied. Pull, then push "
                                          "again, or send \"on_conflict\": \"skip\""
                                          % len(conflicts), conflicts=conflicts)
                        skipped = {conflict["op"] for conflict in conflicts}
                        # the device holds what it meant to do, not what was done
                        push.skipped = bool(skipped)
                        operations = [op for op in operations if op.index not in skipped]
                    logged, missing = self._apply(conn, operations, batched, on_reject, first,
                                                  rejected)
                    if self.changelog.capture == "api":
                        self.changelog.record(conn, self._logged_keys(conn, logged), device_id,
                                              batch_id)
                result = {"success": True, "applied": len(operations) - len(rejected)}
                if rejected:
                    # a rule refused them (on_reject skip): the device holds what it meant to do
                    result["rejected"] = rejected
                    push.skipped = True
                if missing:
                    result["missing"] = [_op_ref(op) for op in missing]
                if conflicts:
                    result["conflicts"] = conflicts
                push.operations = operations
                # null without a checkpoint in the request: there is no pull position to carry on
                # from
                result["checkpoint"] = self._checkpoint_after_push(conn, push)
                if batch_id is not None:        # a retry is answered with exactly this outcome
                    self.changelog.finish_batch(conn, device_id or "", batch_id, result)
        return result

    def _push_transaction(self, conn, operations, batched, batch_id, checkpoint, on_reject="abort"):
        """The push's transaction; none of its own for a MySQL push that is certainly one statement.

        A plain push (no batch id, no checkpoint) whose operations make one
        statement (a multi-row INSERT that fits one statement, or a single
        insert, update or delete) is atomic by itself in autocommit mode, its
        triggers included: START TRANSACTION and COMMIT would add two round
        trips to the commonest push and change nothing. A bigger insert is sent
        as several statements, and an upsert may take two: those get a
        transaction. SQLite attributes changes with statements of its own.
        on_reject skip takes savepoints, which need a transaction.
        """
        if (self.db.autocommit_atomic and batched and batch_id is None and checkpoint is None
                and all(op.basis is None for op in operations)
                and on_reject == "abort" and self.changelog.capture == "triggers"):
            groups = list(itertools.islice(_group_operations(operations, batched), 2))
            if len(groups) == 1:
                group = groups[0]
                if (self.db.fits_one_statement([op.values.values() for op in group])
                        if isinstance(group, list)
                        else group.action in ("insert", "update", "delete")):
                    return contextlib.nullcontext()
        return self.db.transaction(conn)

    def _conflicts(self, conn, operations, device_id, level="column"):
        """Operations on rows others changed after their basis, or updates of rows that are gone.

        Each operation is judged against its basis (op.basis: its own checkpoint,
        else the push's; none: not judged). Column level: an update or upsert
        conflicts only when a column it sets was changed by someone else; row
        level: any change does. A delete or insert conflicts with any change; an
        increment never conflicts. A checkpoint judges only the tables it covers
        (from the position where the device's copy of each is whole): on another
        table, every row that is there is a conflict (pull that table first).
        """
        by_table = {}
        for op in operations:
            if None not in op.key:
                by_table.setdefault(op.table.name, []).append(op)
        conflicts, before = [], {}
        for table, ops in by_table.items():
            schema = self.engine.schemas[table]
            # a row outside the device's scope is not there for it: never shown, never touched
            found = self.engine.rows_for_keys(conn, schema, [op.key for op in ops], ops[0].scope,
                                              lock=True)
            texts = [row[0] if row else self.db.key_text(schema, op.key)
                     for op, row in zip(ops, found)]
            before[table] = {text: row[1] for text, row in zip(texts, found) if row}
            # {position: what others changed after it}, one look per position the ops are based on
            touched = {since: self.changelog.touched_by_others(
                conn, schema, set(texts), since, device_id, ops[0].scope)
                for since in {_judged_since(op.basis, table) for op in ops
                              if op.basis is not None} - {None}}
            # whether the row is there when the op runs: earlier ops count
            exists = {}
            for op, text in zip(ops, texts):
                row = before[table].get(text)
                there = exists.get(text, row is not None)
                if op.action == "increment":
                    continue                # it adds to what is there, whoever changed it
                if op.basis is None:        # no checkpoint: applied as sent
                    exists[text] = op.action != "delete" if op.action != "update" else there
                    continue
                since = _judged_since(op.basis, table)
                changed = touched.get(since, {})
                columns = _conflicting_columns(op, changed[text], level) if text in changed \
                    else None
                if since is None and row is not None:
                    # a table the checkpoint does not cover
                    columns = sorted(op.table.column_names)
                if row is None and (columns is not None or op.action == "update" and not there):
                    # a row gone, or outside the device's scope: every column, telling nothing
                    columns = sorted(op.table.column_names)
                if columns is not None or (op.action == "update" and not there):
                    conflicts.append({"op": op.index, "table": table, "key": _key_json(op),
                                      "columns": columns or [], "server_row": row})
                exists[text] = op.action != "delete" if op.action != "update" else there
        return sorted(conflicts, key=lambda conflict: conflict["op"]), before

    def _check_basis(self, conn, operations, grant):
        """Refused("expired") when a checkpoint can no longer judge a table the push writes.

        Each basis the operations name, for the tables of its operations: ahead
        of the log (a database restored from a backup), or a table whose history
        broke since the device's copy began, or whose entries after it were
        compacted away: the device pulls those tables again (reset_tables).
        """
        by_basis = {}
        for op in operations:
            if op.basis is not None:
                by_basis.setdefault(id(op.basis), (op.basis, {}))[1][op.table.name] = None
        broken = {}
        for fields, written in by_basis.values():
            # issued for another scope (the token's values changed, or another device's): it
            # says nothing of what this device saw, as a pull with it would say (Pulls._position)
            if any(table not in grant.tables for table in fields["t"]) \
                    or fields.get("c") != grant.fingerprint(fields["t"]):
                raise Refused("expired", "this checkpoint was issued for other rows than this "
                              "device's scope: pull again from \"since\": null, then push",
                              reset=True)
            tables = [table for table in written if table in fields["t"]]
            snapshot = self.changelog.read(conn, tables or list(fields["t"])[:1], 0, 0, grant)
            if fields["s"] > snapshot.head and self.db.catch_up(conn):     # a node behind: waits
                snapshot = self.changelog.read(conn, tables or list(fields["t"])[:1], 0, 0, grant)
            if fields["s"] > snapshot.head:
                raise _expired()
            since = dict(zip(fields["t"], _per_table(fields.get("a"), fields["t"], 0)))
            broken.update((table, None) for table in tables
                          if snapshot.tables.get(table, (0, None))[0] > since[table]
                          or snapshot.marks.get(table, 0) > max(fields["s"], since[table]))
        broken = list(broken)
        if broken:
            raise Refused("expired", "the history of %s cannot be continued from this checkpoint: "
                          "pull %s again (reset_tables), then push these operations without the "
                          "checkpoints they carry (no checkpoint can judge them: the device's "
                          "changes win), or with the new one after the user has seen the rows"
                          % ((", ".join(broken),) * 2),
                          reset=True, reset_tables=broken)

    def _apply(self, conn, operations, batched, on_reject, first, rejected):
        """Apply the operations in order, each by ACTIONS (runs of inserts as one statement):
        ([(operation, log code)] of what changed a row, [updates of rows that are not there]).
        With on_reject skip, an operation a rule refuses is set aside into `rejected`."""
        logged, missing, writing = [], [], first
        for group in _group_operations(operations, batched):
            table = (group[0] if isinstance(group, list) else group).table.name
            if table != writing:
                # the log gives the device only the rows of the table its statement writes: a
                # trigger of the shop's own writing another table is not it
                self.db.attribute_table(conn, table)
                writing = table
            if isinstance(group, list):
                self._insert_many(conn, group)
                logged.extend((op, "I") for op in group)
                continue
            method, code = ACTIONS[group.action]
            done = getattr(self, method)(conn, group) if on_reject == "abort" \
                else self._apply_or_set_aside(conn, group, method, rejected)
            if done:
                logged.append((group, code))
            elif done is not None and group.action in ("update", "increment"):
                missing.append(group)           # an update of a row that is not there changes nothing
        return logged, missing

    def _apply_or_set_aside(self, conn, op, method, rejected):
        """on_reject skip: apply one operation; if a rule refuses it, undo it alone and list it.

        Returns what the action returned, or None when the operation was set aside.
        """
        self.db.execute(conn, "SAVEPOINT cloudsync_op")
        try:
            done = getattr(self, method)(conn, op)
        except PushRejected as refused:
            if not refused.error.rule:
                raise
            self.db.execute(conn, "ROLLBACK TO SAVEPOINT cloudsync_op")
            # what the server holds (in the device's scope), for the device to take back
            found = None if None in op.key \
                else self.engine.rows_for_keys(conn, op.table, [op.key], op.scope)[0]
            rejected.append(dict(_op_ref(op), code="rejected", message=str(refused.error),
                                 server_row=found[1] if found else None))
            return None
        self.db.execute(conn, "RELEASE SAVEPOINT cloudsync_op")
        return done

    def _logged_keys(self, conn, logged):
        """CHANGE_CAPTURE=api: (table, op, key text) of a push's changes.

        A key is read back where the row exists.
        """
        entries, texts = [], {}
        by_table = {}
        for op, code in logged:
            if None not in op.key:          # a key the database generated is not known here
                by_table.setdefault(op.table.name, []).append(op)
        for table, ops in by_table.items():
            schema = self.engine.schemas[table]
            for op, found in zip(ops,
                                 self.engine.rows_for_keys(conn, schema, [op.key for op in ops],
                                                           ops[0].scope)):
                texts[op.index] = found[0] if found else self.db.key_text(schema, op.key)
        for op, code in logged:
            if op.index in texts:
                entries.append((op.table.name, code, texts[op.index]))
        return entries

    # -- the actions (ACTIONS) -----------------------------------------------------------

    def _insert_many(self, conn, group):
        """A multi-row INSERT; a refusal means redo one by one to find the row."""
        schema, names = group[0].table, list(group[0].values)
        sql = insert_sql(schema, names)
        try:
            if len(group) == 1:
                self.db.execute(conn, sql, tuple(group[0].values.values()))
            else:
                self.db.executemany(conn, sql, [tuple(op.values.values()) for op in group])
        except DataRejected:
            raise _GroupRejected() from None

    def _insert_one(self, conn, op):
        """Insert one row; True (a retried identical insert is a no-op)."""
        schema, names = op.table, list(op.values)
        sql = insert_sql(schema, names) if names else self.db.insert_defaults_sql(schema)
        try:
            self.db.execute(conn, sql, tuple(op.values.values()))
        except DataRejected as error:
            # a retried insert whose row is already there, holding exactly these values, is a no-op
            if error.duplicate and None not in op.key:
                found = self.engine.rows_for_keys(conn, schema, [op.key], op.scope)[0]
                if found is not None and _same_values(schema, op.values, found[1]):
                    return True
            raise PushRejected(op, error) from None
        return True

    def _upsert(self, conn, op):
        """Insert the row or set its columns; True."""
        try:
            self.db.upsert(conn, op.table, op.values, op.scope)
        except DataRejected as error:
            raise PushRejected(op, error) from None
        return True

    def _update(self, conn, op):
        """True when the row is there (an update that changes nothing finds it too)."""
        schema = op.table
        changes = {name: value for name, value in op.values.items()
                   if name not in schema.primary_key}
        try:
            if not changes:
                return bool(self.db.query(conn, *exists_sql(schema, op.key, op.scope)))
            return self.db.execute(conn, *update_sql(schema, changes, op.key, op.scope)) > 0
        except DataRejected as error:
            raise PushRejected(op, error) from None

    def _increment(self, conn, op):
        """Add the pushed numbers to the row's columns in the database; True if the row is there."""
        schema = op.table
        added = {name: value for name, value in op.values.items() if name not in schema.primary_key}
        try:
            return self.db.execute(conn, *increment_sql(schema, added, op.key, op.scope,
                                                        self.db.added_sql)) > 0
        except DataRejected as error:
            raise PushRejected(op, error) from None

    def _delete(self, conn, op):
        """Delete the row; True when it was there."""
        try:
            return self.db.execute(conn, *delete_sql(op.table, op.key, op.scope)) > 0
        except DataRejected as error:
            raise PushRejected(op, error) from None

    # -- The checkpoint a push returns ---------------------------------------------------
    # A device that pushes with its checkpoint gets back its next pull position:
    # the same checkpoint, which marks the push's own changes (its push id,
    # "x") when the device provably holds them, so that its next pull
    # leaves them out and it never pulls its own writes back. The argument:
    #
    # 1. Attribution. The log gives a change the push's device, batch and push
    #    id only when the statement that caused it was one of the push's own, on
    #    its table (ChangeLog.attributed, Database.attribute_table): a trigger of the
    #    shop's writing another table, or a foreign-key cascade, is another
    #    writer's change, and stays in the pull.
    # 2. Echoes. Each row the push wrote now holds exactly what the device
    #    sent, in the form a pull sends it (_echoes). A trigger of the shop's
    #    rewriting the row, a generated key, a default, a rounded value, an
    #    increment, or a skipped operation each break it: then the request's
    #    checkpoint comes back unmarked, and the next pull brings the server's
    #    version.
    # 3. Nothing else is left out. Every change of other writers after the
    #    checkpoint is still pulled, whenever it was numbered, and whatever
    #    changes the rows after the push is another change. A pull drops the
    #    mark once every change of the batch is behind its new checkpoint.
    #
    # A push without a checkpoint gets null: there is no pull position.

    def _checkpoint_after_push(self, conn, push):
        """Inside the push's transaction: the device's next pull position, or None."""
        fields = push.fields
        if push.checkpoint is None:
            return None
        if fields.get("scan") is not None or push.skipped or not self._echoes(conn, push):
            return push.checkpoint
        return self.engine.checkpoints.encode(dict(fields, x=push.push_id))

    def _echoes(self, conn, push):
        """Whether every row the push wrote holds exactly what the device sent it as."""
        operations = push.operations
        if any(None in op.key for op in operations):
            return False                    # the database chose a key the device does not know
        if any(op.action == "increment" for op in operations):
            return False                    # the device knows what it added, not the sum
        # each operation's row now (found as its statement found it) and its key as the log holds it
        logged, now = {}, {}
        for table in dict.fromkeys(op.table.name for op in operations):
            schema = self.engine.schemas[table]
            ops = [op for op in operations if op.table.name == table]
            found_rows = self.engine.rows_for_keys(conn, schema, [op.key for op in ops],
                                                   ops[0].scope)
            for op, found in zip(ops, found_rows):
                logged[op.index] = (table, found[0] if found else self.db.key_text(schema, op.key))
                now[logged[op.index]] = found[1] if found else None
        # what the device now holds: the rows before the push with its operations applied
        # (table, key text) -> {column: (pushed?, value)} or None
        expected = {}
        for op in operations:
            schema, key = op.table, logged[op.index]
            if key not in expected:
                row = push.before.get(schema.name, {}).get(key[1])
                expected[key] = None if row is None \
                    else {name: (False, value) for name, value in row.items()}
            row = expected[key]
            if op.action == "delete":
                expected[key] = None
            elif row is not None and op.action in ("update", "upsert"):
                if any(name not in op.sent for name in op.values):
                    return False            # a value the server filled in (the device's store)
                row.update((name, (True, op.sent[name])) for name in op.values)
            elif row is None and op.action in ("insert", "upsert"):
                # a column left out is null on the device; a default the database filled in is not
                expected[key] = {name: (name in op.values, op.sent.get(name))
                                 for name in schema.column_names}
        for key, row in expected.items():
            current = now[key]
            if (row is None) != (current is None):
                return False
            for name, (pushed, value) in (row or {}).items():
                if not (_as_json_value(current.get(name)) == value if pushed
                        else current.get(name) == value):
                    return False
        return True


class Operation:
    """One validated push operation: bound values and its primary key."""

    __slots__ = ("index", "table", "action", "values", "key", "sent", "scope", "checkpoint",
                 "basis")

    def __init__(self, index, table, action, values, key, sent=None, checkpoint=None):
        self.index = index
        self.table = table      # a TableSchema
        self.action = action
        self.values = values    # {column name: bound value}, in the order the client sent
        self.key = key          # tuple of primary-key values
        # {column name: value as the device holds it}
        self.sent = sent if sent is not None else values
        self.scope = None       # the device's TableScope on the table, if it has one (Row scopes)
        self.checkpoint = checkpoint  # the checkpoint the edit was based on, if it names its own
        self.basis = None       # the decoded checkpoint it is judged against (Pushes.push)


class _PushState:
    """What deciding a push's returned checkpoint needs to know about the push."""

    __slots__ = ("checkpoint", "fields", "device_id", "batch_id", "push_id", "before",
                 "operations", "skipped", "grant")

    def __init__(self, checkpoint, fields, device_id, batch_id, grant):
        self.checkpoint = checkpoint
        self.fields = fields        # the checkpoint decoded
        self.device_id = device_id
        self.batch_id = batch_id
        self.push_id = None         # marks the push's own changes in the log (with a checkpoint)
        self.before = {}            # table -> {key as logged: row} as they were before the push
        self.operations = []        # the operations applied
        self.skipped = False        # some operations were skipped as conflicts
        self.grant = grant          # what the request may do (Grants)


def _judged_since(fields, table):
    """The log position conflicts on `table` are judged from: where the device's copy of it is
    whole (its checkpoint's position, or the table's later new start), None when the checkpoint
    does not cover the table."""
    if table not in fields["t"]:
        return None
    position = fields["t"].index(table)
    return max(fields["s"], _per_table(fields.get("a"), fields["t"], 0)[position])


def _conflicting_columns(op, changed, level):
    """The columns that make `op` a conflict, given what others changed (None: any column).

    None when they do not.
    """
    every = sorted(op.table.column_names) if changed is None else sorted(changed)
    if level == "row" or op.action not in ("update", "upsert") or changed is None:
        return every
    overlap = sorted(name for name in changed
                     if name in op.values and name not in op.table.primary_key)
    return overlap or None


def _same_values(schema, pushed, row):
    """Whether an existing row is what inserting `pushed` would make: a retried insert.

    Every column the same: sent ones as sent, the others as their constant
    default (a column left out of a fuller row is not a retry of it); columns
    the database fills otherwise (a time, an expression) cannot be told.
    """
    return all(_same_value(schema.columns[name], value, row.get(name))
               for name, value in pushed.items()) \
        and all(_same_value(column, column.default[0], row.get(name))
                for name, column in schema.columns.items()
                if name not in pushed and column.default is not None and not column.generated)


def _same_value(column, pushed, stored):
    """Whether a stored value is the pushed one: compared as its type, text byte for byte."""
    if pushed is None or stored is None:
        return pushed is None and stored is None
    try:
        if isinstance(stored, (bytes, bytearray)):
            if not isinstance(pushed, (bytes, bytearray)):
                return False
            return bytes(pushed).ljust(column.octets or 0, b"\0") == bytes(stored)
        if isinstance(stored, float):
            return float(pushed) == stored
        if column.kind in ("date", "datetime", "timestamp") and not column.dates_as_text:
            if str(pushed).strip() == stored:
                return True                 # the same text (zero dates too)
            if column.kind == "date":
                return _parse_date(pushed) == _parse_date(stored)
            return _parse_datetime(pushed, column.fsp) == _parse_datetime(stored)
        if isinstance(stored, datetime.timedelta):
            return _parse_time(pushed, column.fsp) == stored
        if column.kind == "set":
            return set(filter(None, str(pushed).split(","))) \
                == set(filter(None, str(stored).split(",")))
        if column.kind in ("integer", "bit", "decimal") \
                or isinstance(stored, (int, decimal.Decimal)):
            if _NUMBER_TEXT.fullmatch(str(pushed)) and _NUMBER_TEXT.fullmatch(str(stored)):
                return decimal.Decimal(str(pushed).strip()) == decimal.Decimal(str(stored))
        text = pushed if isinstance(pushed, str) else str(pushed)
        return (text.rstrip(" ") if column.pads else text) == stored
    except (ValueError, ArithmeticError, TypeError):
        return False


def _refusal_of(rejected):
    """The answer to an operation the database refused: a user's rule, a clash, or a value."""
    op, error = rejected.op, rejected.error
    if error.rule:                      # a trigger of the shop's own refused it, with its own words
        return Refused("rejected", "operation %d (%s on %s) was refused by a rule of the database: "
                       "%s; nothing was applied" % (op.index, op.action, op.table.name, error),
                       op=op.index, rejected=[dict(_op_ref(op), code="rejected",
                                                   message=str(error))])
    return Refused("duplicate" if error.duplicate else "data_refused", "operation %d (%s on %s): %s"
                   % (op.index, op.action, op.table.name, error), op=op.index)


def _key_json(op):
    """An operation's row key as the protocol shows it."""
    return key_value(op.table, op.key)


def _op_ref(op):
    """An operation as answers name it: op, table, key."""
    return {"op": op.index, "table": op.table.name, "key": _key_json(op)}


def _group_operations(operations, batched=True):
    """Yield runs of 2+ inserts into one table with the same columns as lists, other ops alone."""
    run = []
    for op in operations:
        if run and op.action == "insert" and op.table is run[0].table \
                and list(op.values) == list(run[0].values):
            run.append(op)
            continue
        if run:
            yield run if len(run) > 1 else run[0]
        run = [op] if batched and op.action == "insert" else []
        if not run:
            yield op
    if run:
        yield run if len(run) > 1 else run[0]


# ---------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------
# Two modes. Seed mode (no `since`) sends the first `limit` rows of each
# table, as the original service did, from a cache validated against the
# change log with one indexed query. Sync mode (`since`: null or a
# checkpoint) pages through the tables in key order on a first sync, then
# reads the change log after the checkpoint, an index range on seq.


def _declared_row_bytes(schema):
    """The most bytes a row of `schema` holds as schema.size_sql counts them, from the lengths its
    column types declare (MySQL); None when a type declares none (MEDIUMTEXT, LONGBLOB, JSON)."""
    total = ROW_OVERHEAD_BYTES * len(schema.columns)
    for column in schema.columns.values():
        declared = column.declared.lower()
        sized = re.match(r"(var)?(char|binary)\((\d+)\)", declared)
        if sized:
            # utf8mb4 takes up to 4 bytes a character
            total += int(sized.group(3)) * (4 if sized.group(2) == "char" else 1)
        elif declared in DECLARED_MAX_BYTES:
            total += DECLARED_MAX_BYTES[declared]
        elif column.kind in ("enum", "set"):
            total += 4 * sum(len(member) + 1 for member in column.members)
        elif column.kind in ("text", "json", "binary", "other"):
            return None
        else:                               # numbers, dates, bits: their text is short
            total += 64
    return total


class Encoded:
    """A response body already encoded (JSON unless told), with its ETag.

    A gzipped copy is made on first use.
    """

    __slots__ = ("body", "version", "etag", "gzipped", "content_type", "rows")

    def __init__(self, body, version=None, content_type="application/json; charset=utf-8",
                 rows=None):
        self.body = body
        self.version = version
        self.etag = None
        self.gzipped = None
        self.content_type = content_type
        self.rows = rows or {}          # table -> rows in the body, for the metrics


class Pulls:
    """Pulls: the tables a request names, seed mode from a cache, sync mode from the change log."""

    def __init__(self, engine, max_bytes=4 << 20):
        self.engine = engine
        self.db = engine.db
        self.changelog = engine.changelog
        self.max_bytes = max_bytes          # PULL_MAX_BYTES: a page's rows stop at about this size
        self._bounds = weakref.WeakKeyDictionary()      # TableSchema -> _declared_row_bytes
        self._largest = {}                  # table -> the largest row's size seen (Pulls._fit)
        # (tables, limit) -> Encoded, validated by tables_version
        self._cache = collections.OrderedDict()
        self._cache_lock = threading.Lock()

    def check_tables(self, tables, grant):
        """Validate a pull's `tables` field through the grant; return the table names to read.

        Left out: every table the grant holds.
        """
        if tables is None:
            tables = grant.visible
            if not tables:
                raise Refused("no_tables", "no table was named and this device may use none"
                              if self.engine.allowed_tables else
                              "no table was named and ALLOWED_TABLES is empty")
        if not isinstance(tables, list):
            raise Refused("invalid_payload", "tables must be a list of table names")
        if not tables:
            raise Refused("no_tables", "tables is an empty list")
        for position, table in enumerate(tables):
            grant.table(table, "tables[%d]" % position)
        return list(dict.fromkeys(tables))

    # -- sync mode ---------------------------------------------------------------------

    def pull_changes(self, tables, since, limit, grant):
        """Sync-mode pull: changes after checkpoint `since` (None: everything).

        At most `limit` rows plus keys, only the rows the grant may see. A
        table whose history the checkpoint cannot continue is refused on its
        own (410, reset_tables, and the checkpoint to go on with); a column
        added with a constant default is announced (added_columns).
        """
        fields, tables = self._position(tables, since, grant)
        changes = {table: {"upserted": [], "deleted": []} for table in tables}
        answer = {"success": True, "changes": changes}
        with self.db.connection() as conn:
            if fields is None:
                # the scan starts past every change committed before it
                snapshot = self._read(conn, tables, 0, 0, grant)
                # the scan starts after every change up to the head is visible in the tables
                fields = {"t": tables, "s": snapshot.head, "scan": [0, None],
                          "f": [self.engine.fingerprint(table) for table in tables],
                          "a": [snapshot.head] * len(tables), "c": grant.fingerprint(tables)}
            else:
                scanning = fields.get("scan") is not None
                snapshot = self._read(conn, tables, _log_bounds(fields, tables),
                                      0 if scanning else limit + 1, grant, fields.get("x"))
                # ahead of the log: a cluster node behind the one that numbered the checkpoint
                # waits until it has caught up; else a database restored from a backup
                if fields["s"] > snapshot.head and self.db.catch_up(conn):
                    snapshot = self._read(conn, tables, _log_bounds(fields, tables),
                                          0 if scanning else limit + 1, grant, fields.get("x"))
                if fields["s"] > snapshot.head:
                    raise _expired()
                fields, added = self._continue(conn, fields, tables, snapshot)
                if added:
                    answer["added_columns"] = added
            if fields["scan"] is not None:
                scan_list = fields.get("r") or tables
                fields["scan"], has_more = self._scan_tables(conn, scan_list, fields["scan"],
                                                             limit, changes, grant)
                if fields["scan"] is None:
                    fields["r"] = None
                    has_more = bool(self._read(conn, tables, _log_bounds(fields, tables), 1, grant,
                                               fields.get("x")).entries)
            else:
                entries = snapshot.entries
                has_more = len(entries) > limit
                entries = _last_of_each_row(entries[:limit])
                taken = self._fetch_changed(conn, entries, changes, grant)
                if taken < len(entries):        # the page reached PULL_MAX_BYTES
                    has_more, entries = True, entries[:taken]
                # nothing more for this device: its checkpoint moves to the head, however quiet
                # its tables and stores are
                fields["s"] = entries[-1][2] if has_more else snapshot.head
                if not (has_more or snapshot.excluded_pending):
                    fields["x"] = None      # the push's own changes are all behind the checkpoint
        answer["checkpoint"] = self.engine.checkpoints.encode(fields)
        answer["has_more"] = has_more
        return answer

    def _read(self, conn, tables, since, limit, grant, exclude=None):
        """ChangeLog.read, after the numberer has numbered the changes of these tables that
        committed and wait (a pull never numbers: SyncEngine.number_now)."""
        snapshot = self.changelog.read(conn, tables, since, limit, grant, exclude, waiting=True)
        if not snapshot.waiting:
            return snapshot
        self.engine.number_now(conn)
        return self.changelog.read(conn, tables, since, limit, grant, exclude)

    def _position(self, tables, since, grant):
        """What a sync pull checks before any SQL: (checkpoint fields or None, tables);
        Refused when the checkpoint is not one for these tables, or for this scope."""
        fields = self.engine.checkpoints.decode(since) if since is not None else None
        if fields is not None and sorted(fields["t"]) == sorted(tables):
            # the same tables in another order: the checkpoint's order holds
            tables = fields["t"]
        if fields is not None and fields["t"] != tables:
            raise Refused("invalid_checkpoint", "this checkpoint was issued for tables %s; pull "
                          "the same tables with it, or start again with \"since\": null"
                          % ", ".join(fields["t"]))
        if fields is not None and fields.get("c") != grant.fingerprint(tables):
            raise Refused("expired", "this device's scope (the rows its token may see) changed "
                          "since this checkpoint: start again with \"since\": null to pull the "
                          "rows of its scope now", reset=True)
        return fields, tables

    def _continue(self, conn, fields, tables, snapshot):
        """(fields to go on with, {table: {added column: default}}), or Refused("expired").

        Per table: its history broke after the device's copy began (epoch), or
        entries it needs were compacted away, or its columns changed otherwise
        than by an added column with a constant default: that table starts
        again. A table not reached yet by the scan in progress just takes the
        table as it is now.
        """
        since = _per_table(fields.get("a"), tables, 0)
        known = _per_table(fields.get("f"), tables, None)
        scanning = fields.get("scan") is not None
        scan_list = fields.get("r") or tables
        untouched = set(scan_list[fields["scan"][0] + 1:]) if scanning else set()
        resets, added = [], {}
        for position, table in enumerate(tables):
            epoch = snapshot.tables.get(table, (0, None))[0]
            current = self.engine.fingerprint(table)
            if table in untouched:
                since[position], known[position] = max(since[position], epoch), current
            elif epoch > since[position] \
                    or snapshot.marks.get(table, 0) > max(fields["s"], since[position]):
                resets.append(table)
            elif known[position] != current:
                columns = self.engine.added_columns(conn, table, known[position])
                if columns is None:
                    resets.append(table)
                else:
                    known[position] = current
                    if columns:
                        added[table] = columns
        fields = dict(fields, a=since, f=known)
        if resets:
            raise self._reset(fields, tables, resets, snapshot.head)
        return fields, added

    def _reset(self, fields, tables, resets, head):
        """Refused("expired") naming the tables to pull again, with the checkpoint that does it.

        The device empties those tables and goes on with the checkpoint: its
        other tables continue from their position, the named ones are scanned
        from their start (with the rest of a scan that was in progress). A
        client that knows nothing of reset_tables starts again from null.
        """
        again = set(resets)
        if fields.get("scan") is not None:
            scan_list = fields.get("r") or tables
            again.update(scan_list[fields["scan"][0]:])
        since, known = list(fields["a"]), list(fields["f"])
        for position, table in enumerate(tables):
            if table in again:              # scanned from its start, from now on
                since[position], known[position] = head, self.engine.fingerprint(table)
        checkpoint = self.engine.checkpoints.encode(dict(
            fields, scan=[0, None], r=[table for table in tables if table in again], a=since,
            f=known, x=None))
        return Refused("expired", "the history of %s cannot be continued from this checkpoint "
                       "(the table was re-created, swapped, truncated or altered, or its changes "
                       "were compacted away): empty it and go on with this checkpoint, or start "
                       "again with \"since\": null" % ", ".join(resets), reset=True,
                       reset_tables=resets, checkpoint=checkpoint)

    def unchanged(self, tables, since, grant, head, quiet=None, highest=None):
        """A sync pull's answer without SQL when the log is where the checkpoint is (or past
        it: another instance or worker saw it later), or moved only by changes that are not
        the device's; else None.

        `head`: the log's as the watcher last saw it (Long polls), which also
        keeps the tables' epochs (SyncEngine.epochs) as current. `quiet(since,
        head, interest)`: LogWatcher.quiet_between, which knows what each of
        its looks saw move; the checkpoint then moves to the head. `highest`: the
        highest head this instance has seen since the log last went back; a
        checkpoint past it goes to the database (a log restored from a backup
        expires it there).
        """
        if since is None:
            return None
        fields, tables = self._position(tables, since, grant)
        if fields["s"] > head and (highest is None or fields["s"] > highest):
            return None
        if fields["s"] < head and (quiet is None or not quiet(
                fields["s"], head, {table: grant.scope(table).texts for table in tables})):
            return None
        if fields.get("scan") is not None or fields.get("x") \
                or _per_table(fields.get("f"), tables, None) \
                != [self.engine.fingerprint(table) for table in tables] \
                or any(since < self.engine.epochs.get(table, 0) for table, since
                       in zip(tables, _per_table(fields.get("a"), tables, 0))):
            return None
        return {"success": True, "changes": {table: {"upserted": [], "deleted": []}
                                             for table in tables},
                "checkpoint": since if fields["s"] >= head
                else self.engine.checkpoints.encode(dict(fields, s=head)), "has_more": False}

    def _scan_tables(self, conn, tables, scan, limit, changes, grant):
        """Initial sync: page through the tables in key order.

        Return (next scan position or None, has_more).
        The position is the last row's key in log form, which binds back to
        exactly that value (a binary key as hex, a SQLite REAL exactly).
        """
        index, last = scan
        budget, room = limit, self.max_bytes
        while index < len(tables):
            if budget == 0 or room <= 0:
                return [index, last], True
            schema = self.engine.schemas[tables[index]]
            scope = grant.scope(schema.name)
            after = None if last is None else self.db.key_bind(schema, last, ordered=True)
            count, size, cut = budget, None, False
            if not self._fits(schema, count, room):
                # the rows' sizes first: only those within the page's bytes are read
                count, size, cut = self._fit(conn, schema, count, room, lambda first: page_sql(
                    schema, after, first, scope, select=schema.size_sql))
                if cut and count == 0:
                    return [index, last], True      # its next row starts the next page
            rows = self.db.query(conn, *page_sql(schema, after, count, scope)) if count else []
            if rows:
                last = self.db.key_logged(schema, rows[-1])
                names = schema.column_names
                changes[schema.name]["upserted"].extend(
                    dict(zip(names, row)) for row in self.db.decode_rows(schema, rows))
            if cut:                                 # the rest of the table on the next page
                return [index, last], True
            # The table ended only where this read of it ended: rows committed since the sizes
            # were read may come before some measured ones, and push them past `count`.
            if len(rows) < count or not count:
                index, last = index + 1, None
            budget -= len(rows)
            room -= size if size is not None else self._bound(schema) * len(rows)
        return None, False

    def _bound(self, schema):
        """The most bytes a row of `schema` holds (as schema.size_sql counts them), from its
        declared types; None when some type sets none, or the database does not keep to them."""
        if not self.db.enforces_lengths:
            return None
        bound = self._bounds.get(schema)
        if bound is None:
            bound = self._bounds[schema] = _declared_row_bytes(schema) or -1
        return None if bound < 0 else bound

    def _fits(self, schema, count, room):
        """Whether `count` rows of `schema` stay within `room` bytes whatever they hold."""
        bound = self._bound(schema)
        return bound is not None and bound * count <= room

    def _fit(self, conn, schema, count, room, statement):
        """(how many of the next rows of `schema`, at most `count`, fit in `room` bytes; their
        bytes; whether rows were left out): `statement(n)` reads the first n rows' sizes. A
        page's first row goes alone if it must (`room` is the whole PULL_MAX_BYTES).

        The database reads a large value to measure it, so the sizes asked
        for are those of about as many rows as the room takes, judged by the
        largest row of the table seen so far, four times as many again while
        they all fit.
        """
        largest = self._largest.get(schema.name)
        asked = min(count, room // largest + 1 if largest else SIZES_FIRST_ASKED)
        while True:
            sizes = [int(row[-1]) for row in self.db.query(conn, *statement(asked))]
            if sizes:
                self._largest[schema.name] = max(largest or 0, max(sizes))
            if len(sizes) < asked or asked >= count or sum(sizes) > room:
                taken, size = _within(sizes, room, alone=room == self.max_bytes)
                # rows left out: measured and not taken, or not measured at all
                return taken, size, taken < len(sizes) or len(sizes) == asked and taken < count
            asked = min(count, asked * 4)

    def _fetch_changed(self, conn, entries, changes, grant):
        """Turn (table, row_key, seq) entries into current rows, or keys of deleted rows; return
        how many of the entries, from the first, were taken: those whose rows fit in
        PULL_MAX_BYTES (at least one).

        A row counts only when its key is, byte for byte, the logged one: after
        'abc' became 'ABC' (equal under a case-blind collation) the log holds a
        delete of 'abc', and a device must get that delete, not the 'ABC' row.
        A row outside the device's scope is not found either: it left the
        scope, and the device gets it as deleted.
        """
        parsed = []
        for table, row_key, _ in entries:
            text = _text(row_key)
            try:
                logged = self.db.parse_key(text)
            # written by an older version below the compaction mark: "expired" follows
            except ValueError:
                logged = None
            # rows with a NULL in their key are not synced
            parsed.append((_text(table), text, logged if logged and None not in logged else None))
        taken = self._taken_within(conn, parsed, grant)
        by_table = {}
        for table, text, logged in parsed[:taken]:
            if logged is not None:
                by_table.setdefault(table, []).append((text, logged))
        for table, items in by_table.items():
            schema = self.engine.schemas[table]
            found = self.engine.select_by_keys(conn, schema, [self.db.key_bind(schema, logged)
                                                              for _, logged in items],
                                               grant.scope(table))
            for text, logged in items:
                row = found.get(text)
                if row is not None:
                    changes[table]["upserted"].append(row)
                else:
                    changes[table]["deleted"].append(
                        key_value(schema, self.db.key_present(schema, logged)))
        return taken

    def _taken_within(self, conn, parsed, grant):
        """How many of these (table, key text, key) entries, from the first, have rows that fit
        in PULL_MAX_BYTES together (at least one): their sizes are read first where the tables'
        declared types do not bound them."""
        counts = collections.Counter(table for table, _, logged in parsed if logged is not None)
        if all(self._fits(self.engine.schemas[table], count, self.max_bytes)
               for table, count in counts.items()):
            return len(parsed)
        # the database reads a large value to measure it: sizes of a few entries first, then
        # four times as many while they fit (Pulls._fit)
        largest = max(self._largest.get(table, 0) for table in counts)
        start, room = 0, self.max_bytes
        asked = self.max_bytes // largest + 1 if largest else SIZES_FIRST_ASKED
        while start < len(parsed):
            chunk = parsed[start:start + asked]
            sizes = {}
            for table in {table for table, _, logged in chunk if logged is not None}:
                schema = self.engine.schemas[table]
                keys = list(dict.fromkeys(self.db.key_bind(schema, logged)
                                          for name, _, logged in chunk
                                          if name == table and logged is not None))
                for keys_chunk in _chunks(keys, 500):
                    for text, size in self.db.query(conn, *select_keyed_sql(
                            schema, keys_chunk, grant.scope(table), select=schema.size_sql)):
                        sizes[(table, _text(text))] = int(size)
                        self._largest[table] = max(self._largest.get(table, 0), int(size))
            # a key alone (a deleted row) counts as an empty row
            count, used = _within([sizes.get((table, text), ROW_OVERHEAD_BYTES)
                                   for table, text, _ in chunk], room, alone=start == 0)
            if count < len(chunk):
                return start + count
            start, room, asked = start + count, room - used, asked * 4
        return len(parsed)

    # -- seed mode ---------------------------------------------------------------------

    def seed_pull(self, tables, limit, grant):
        """A seed-mode pull as encoded JSON, served from cache while the log shows no change.

        One device's cached answer is served only to devices of the same scope.
        """
        schemas = self.engine.schemas
        key = (tuple(tables), limit, self.engine.schema_fingerprint,
               grant.fingerprint(tables))
        with self.db.connection() as conn:
            # Only what the change log sees can validate a cached answer: outside writes need
            # triggers, and a foreign-key cascade the cascade triggers cannot follow is not seen.
            version = None
            if self.changelog.capture == "triggers" \
                    and not any(schemas[table].cascaded for table in tables):
                version = self.changelog.tables_version(conn, [schemas[table] for table in tables],
                                                        self.engine.epochs)
            if version is not None:
                with self._cache_lock:
                    cached = self._cache.get(key)
                if cached is not None and cached.version == version:
                    return cached
            pages, counts, room, cut = [], {}, self.max_bytes, False
            for table in tables:
                schema, scope, count = schemas[table], grant.scope(table), limit
                if not self._fits(schema, count, room):
                    # the first rows' sizes: the answer holds those within PULL_MAX_BYTES
                    count, size, cut_here = self._fit(conn, schema, count, room, lambda first:
                                                      first_rows_sql(schema, first, scope,
                                                                     select=schema.size_sql))
                    cut = cut or cut_here
                    room -= size
                else:
                    room -= self._bound(schema) * count
                page = self.db.rows_as_json(conn, schema, count, scope) if count else (b"[]", 0)
                if page is None:
                    rows = self._read_rows(conn, [table], count, grant)[table]
                    page = (to_json_bytes(rows), len(rows))
                counts[table] = page[1]
                pages.append(to_json_bytes(table) + b":" + page[0])
        # a seed pull has no next page: has_more says the rows were cut at PULL_MAX_BYTES (sync
        # mode, "since", pages through everything)
        encoded = Encoded(b'{"success":true,"data":{%s},"limit":%d%s}' % (
            b",".join(pages), limit, b',"has_more":true' if cut else b""), version, rows=counts)
        if version is not None:
            # of the answer itself: a device cannot tell from it whether another store wrote
            encoded.etag = '"%s"' % hashlib.sha256(encoded.body).hexdigest()[:32]
            self._keep(key, encoded)
        return encoded

    def _keep(self, key, encoded):
        """Keep an encoded seed pull.

        The least recently used go first, so the cache stays within PULL_CACHE_BYTES.
        """
        if len(encoded.body) > PULL_CACHE_BYTES // 4:
            return                          # one huge answer would push out every other
        with self._cache_lock:
            self._cache[key] = encoded
            self._cache.move_to_end(key)
            # gzipped copies are made on first use, so they count when the next entry comes in
            size = sum(len(entry.body) + len(entry.gzipped or b"")
                       for entry in self._cache.values())
            while len(self._cache) > PULL_CACHE_ENTRIES or size > PULL_CACHE_BYTES:
                _, dropped = self._cache.popitem(last=False)
                size -= len(dropped.body) + len(dropped.gzipped or b"")

    def _read_rows(self, conn, tables, limit, grant):
        """The first `limit` rows of each table in key order (in the device's scope), decoded."""
        data = {}
        for table in tables:
            schema = self.engine.schemas[table]
            rows = self.db.query(conn, *first_rows_sql(schema, limit, grant.scope(table)))
            names = schema.column_names
            data[table] = [dict(zip(names, row)) for row in self.db.decode_rows(schema, rows)]
        return data


def _within(sizes, room, alone):
    """(how many of these rows, in order, fit in `room` bytes, their bytes). `alone`: the page is
    empty, and a first row larger than the room goes alone."""
    total = 0
    for count, size in enumerate(sizes):
        if total + size > room:
            if count == 0 and alone:
                return 1, size
            return count, total
        total += size
    return len(sizes), total


def _last_of_each_row(entries):
    """Log entries (table, row key, seq), oldest first, with only each row's last: a row is read
    once, as it is now. Every row left out of a page taken up to an entry has one after it."""
    last = {(table, key): seq for table, key, seq in entries}
    return [entry for entry in entries if last[entry[0], entry[1]] == entry[2]]


def parse_wait(value, read_timeout_seconds):
    """A pull's `wait` in seconds: None when absent, null or 0; at most MAX_WAIT_SECONDS and below
    READ_TIMEOUT_SECONDS (a larger one is capped); Refused("invalid_wait") when not a number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)) \
            or not isinstance(value, int) and not math.isfinite(value) or value < 0:
        raise Refused("invalid_wait", "wait must be a number of seconds of at least 0 (at most %d "
                      "is used)" % MAX_WAIT_SECONDS)
    # compared before any float(): a whole number of 400 digits is just "the most"
    return float(min(value, MAX_WAIT_SECONDS, read_timeout_seconds - 1)) or None


def parse_limit(value, cap):
    """A pull's `limit`: DEFAULT_PULL_LIMIT_ROWS when absent, at most `cap` (MAX_PULL_ROWS); a
    whole number of at least 1 (digits in a string too)."""
    if value is None:
        return DEFAULT_PULL_LIMIT_ROWS
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value):
        value = int(value)                     # the Node service took "500" too
    if isinstance(value, decimal.Decimal) and value.is_finite() \
            and value == value.to_integral_value():
        # a huge exponent must not be expanded into digits (1E+1000000)
        value = (cap if value > 0 else 0) if value.adjusted() > 6 else int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Refused("invalid_limit", "limit must be a whole number of at least 1")
    return min(value, cap)


# ---------------------------------------------------------------------------
# Operations: metrics, device fleet
# ---------------------------------------------------------------------------
# What an operator needs without reading code. Metrics and the device fleet
# are kept in memory on the request path (a lock and a few additions); the
# fleet reaches the database from the server's maintenance thread every
# MAINTAIN_INTERVAL_SECONDS, so a request never waits for it. A crash loses at
# most that last second of fleet statistics, never data.

METRICS_FROM_ZERO = ("cloudsync_conflicts_total", "cloudsync_replays_total",
                     "cloudsync_auth_failures_total", "cloudsync_database_unavailable_total",
                     "cloudsync_server_errors_total", "cloudsync_push_retries_total")
# others count as "other"
HTTP_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))


class Metrics:
    """Counters and latency histograms, rendered in the Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters = collections.Counter()      # (name, ((label, value), ...)) -> value
        # (route, status) -> [count per bucket..., beyond the last, sum]
        self._latency = {}
        self.changes = 0                            # goes up with every count (Workers: publish)
        # present before the first event, for rate() and alerts
        for name in METRICS_FROM_ZERO:
            self._counters[name, ()] = 0

    def count(self, name, amount=1, **labels):
        """Add to a counter."""
        with self._lock:
            self._counters[name, tuple(sorted(labels.items()))] += amount
            self.changes += 1

    def snapshot(self, gauges=()):
        """Every counter and histogram, and `gauges`, as JSON-ready lists (Workers: one worker's
        published metrics)."""
        with self._lock:
            return {"counters": [[name, [list(pair) for pair in labels], value]
                                 for (name, labels), value in self._counters.items()],
                    "latency": [[route, status, list(values)]
                                for (route, status), values in self._latency.items()],
                    "gauges": [[name, labels, value] for name, labels, value in gauges]}

    def absorb(self, snapshot):
        """Add a snapshot's counters and histograms to these (not its gauges)."""
        with self._lock:
            for name, labels, value in snapshot["counters"]:
                self._counters[name, tuple(tuple(pair) for pair in labels)] += value
            for route, status, values in snapshot["latency"]:
                mine = self._latency.setdefault((route, status), [0] * len(values))
                for index, value in enumerate(values):
                    mine[index] += value
            self.changes += 1

    @classmethod
    def summed(cls, snapshots):
        """(Metrics holding every snapshot's counters and histograms, their gauges added up by
        name and labels as [(name, labels, value)])."""
        metrics, gauges = cls(), collections.Counter()
        for snapshot in snapshots:
            metrics.absorb(snapshot)
            for name, labels, value in snapshot["gauges"]:
                gauges[name, tuple(sorted(labels.items()))] += value
        return metrics, [(name, dict(labels), value) for (name, labels), value in gauges.items()]

    def request(self, route, method, status, seconds):
        """Count one answered request and its duration.

        One lock, no sorting: this runs for every request.
        """
        # its bucket; +Inf past the last
        slot = bisect.bisect_left(LATENCY_BUCKETS_SECONDS, seconds)
        with self._lock:
            self.changes += 1
            self._counters["cloudsync_requests_total",
                           (("method", method), ("route", route), ("status", status))] += 1
            buckets = self._latency.get((route, status))
            if buckets is None:
                buckets = self._latency[route, status] = [0] * (len(LATENCY_BUCKETS_SECONDS) + 2)
            buckets[slot] += 1
            buckets[-1] += seconds

    def render(self, gauges=()):
        """The exposition text: every counter and histogram, plus (name, labels, value) gauges."""
        with self._lock:
            counters = sorted(self._counters.items())
            latency = {route: list(values) for route, values in self._latency.items()}
        samples = collections.defaultdict(list)
        for (name, labels), value in counters:
            samples[name].append("%s%s %s" % (name, _labels(labels), _number(value)))
        name = "cloudsync_request_duration_seconds"
        for (route, status), values in sorted(latency.items()):
            labels = (("route", route), ("status", status))
            cumulative = 0                  # kept per bucket, shown cumulative as the format asks
            for bound, count in zip(LATENCY_BUCKETS_SECONDS, values):
                cumulative += count
                samples[name].append("%s_bucket%s %d"
                                     % (name, _labels((("le", repr(bound)),) + labels), cumulative))
            total = cumulative + values[-2]
            samples[name].append("%s_bucket%s %d"
                                 % (name, _labels((("le", "+Inf"),) + labels), total))
            samples[name].append("%s_sum%s %s" % (name, _labels(labels), _number(values[-1])))
            samples[name].append("%s_count%s %d" % (name, _labels(labels), total))
        for name, labels, value in gauges:
            samples[name].append("%s%s %s" % (name, _labels(tuple(sorted(labels.items()))),
                                              _number(value)))
        lines = []
        for name in sorted(samples):
            kind, text = METRIC_HELP[name]
            lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)] + samples[name]
        return ("\n".join(lines) + "\n").encode("utf-8")


def _labels(pairs):
    """{a="1",b="2"} with values escaped as the text format asks."""
    if not pairs:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (key, str(value).replace("\\", "\\\\").replace('"', '\\"')
                                         .replace("\n", "\\n")) for key, value in pairs)


def _number(value):
    """A sample value as the text format writes it."""
    return repr(float(value)) if isinstance(value, float) else str(value)


DEVICE_FIELDS = ("device_id", "first_seen", "last_seen", "last_push", "last_pull", "checkpoint_seq",
                 "pushes", "pulls", "errors", "rejected", "failed", "pull_tables")


class _DeviceNote:
    """What DeviceFleet noted of one device since its last flush (times in epoch seconds)."""

    __slots__ = ("first", "last", "pushed", "pulled", "checkpoint_seq", "pushes", "pulls",
                 "errors", "rejected", "failed", "tables")
    COUNTS = ("pushes", "pulls", "errors", "rejected", "failed")

    def __init__(self, now):
        self.first = self.last = now
        self.pushed = self.pulled = self.checkpoint_seq = self.tables = None
        self.pushes = self.pulls = self.errors = self.rejected = self.failed = 0

    def row(self, device_id):
        """The values of DEVICE_FIELDS' upsert (Database.devices_upsert), times as UTC text."""
        times = [None if moment is None else time.strftime("%Y-%m-%d %H:%M:%S",
                                                             time.gmtime(moment))
                 for moment in (self.first, self.last, self.pushed, self.pulled)]
        return [device_id] + times + [self.checkpoint_seq] \
            + [getattr(self, name) for name in self.COUNTS] + [self.tables]

    def take_older(self, older):
        """Fold in a note made before this one (a flush that failed)."""
        self.first = older.first
        self.pushed, self.pulled = self.pushed or older.pushed, self.pulled or older.pulled
        if self.checkpoint_seq is None:
            self.checkpoint_seq, self.tables = older.checkpoint_seq, older.tables
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(older, name))


class DeviceFleet:
    """Per device: first and last seen, last push and pull, last pull checkpoint, pushes, pulls,
    and requests refused (4xx: a conflict, a 410 reset, a bad value) apart from requests that
    failed (5xx)."""

    def __init__(self, db):
        self.db = db
        self._lock = threading.Lock()
        self._unsaved = {}                  # device_id -> _DeviceNote

    def install(self, conn):
        """Create cloudsync_devices; idempotent."""
        self.db.execute(conn, self.db.devices_table())

    def seen(self, device_id, kind, checkpoint_seq=None, outcome="synced", tables=None):
        """Note a push or pull by a device and its outcome.

        The outcome: "synced", "rejected" (its request) or "failed" (ours).

        In memory; flush() saves it.
        """
        # formatted when saved: this runs for every push and pull
        now = time.time()
        with self._lock:
            note = self._unsaved.get(device_id)
            if note is None:
                note = self._unsaved[device_id] = _DeviceNote(now)
            note.last = now
            if outcome == "rejected":       # seen, but not synced
                note.errors += 1
                note.rejected += 1
            elif outcome != "synced":
                note.errors += 1
                note.failed += 1
            elif kind == "push":
                note.pushed = now
                note.pushes += 1
            else:
                note.pulled = now
                note.pulls += 1
                if checkpoint_seq is not None:
                    note.checkpoint_seq, note.tables = checkpoint_seq, tables

    def flush(self, conn):
        """Save what was noted since the last flush; on failure it is kept for the next one."""
        with self._lock:
            unsaved, self._unsaved = self._unsaved, {}
        if not unsaved:
            return
        try:
            with self.db.transaction(conn):
                # one statement for many devices (a fleet of 500 is seen every second)
                self.db.executemany(conn, self.db.devices_upsert(), [
                    note.row(device_id) for device_id, note in sorted(unsaved.items())])
        except Exception:
            with self._lock:                # merge back, newer notes first
                for device_id, note in unsaved.items():
                    newer = self._unsaved.get(device_id)
                    if newer is None:
                        self._unsaved[device_id] = note
                    else:
                        newer.take_older(note)
            raise

    def _lag(self, conn, device, head):
        """How many changes of the tables a device pulls were logged since its last checkpoint."""
        if device["checkpoint_seq"] is None:
            return None
        tables = [name for name in _text(device["pull_tables"] or "").split(",") if name]
        # pulled before cloudsync kept the tables: every table counts
        if not tables:
            return max(0, head - int(device["checkpoint_seq"]))
        return self.db.query(conn, 
            "SELECT COUNT(*) FROM (SELECT 1 FROM cloudsync_changes"
            " WHERE seq > ? AND table_name IN (%s) LIMIT ?) x" % ", ".join("?" for _ in tables),
            [device["checkpoint_seq"]] + tables + [LAG_COUNTED_UP_TO])[0][0]

    def devices(self, conn, head):
        """Every known device as a dict, with `lag`.

        `lag`: how many changes its last pull checkpoint is behind.
        """
        self.flush(conn)
        rows = self.db.query(conn, "SELECT %s FROM cloudsync_devices ORDER BY device_id"
                             % ", ".join(DEVICE_FIELDS))
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        found = []
        for row in rows:
            device = dict(zip(DEVICE_FIELDS, row))
            for name in ("first_seen", "last_seen", "last_push", "last_pull"):
                value = device[name]
                if isinstance(value, str):
                    value = datetime.datetime.fromisoformat(value)
                device[name] = value
            device["device_id"] = _text(device["device_id"])
            device["lag"] = self._lag(conn, device, head)
            device.pop("pull_tables")
            device["silent"] = (now - device["last_seen"]).total_seconds() > SILENT_DEVICE_SECONDS
            for name in ("first_seen", "last_seen", "last_push", "last_pull"):
                if device[name] is not None:
                    device[name] = device[name].strftime("%Y-%m-%dT%H:%M:%SZ")
            found.append(device)
        return found


# ---------------------------------------------------------------------------
# HTTP application
# ---------------------------------------------------------------------------


class App:
    """The WSGI app: a path router, the handlers, and the one place errors become responses."""

    def __init__(self, config, database=None, engine=None):
        self.config = config
        self.db = database or open_database(config)
        self.engine = engine or SyncEngine(self.db, config.allowed_tables, config.change_capture,
                                           config.row_scopes, config.read_only_columns,
                                           config.read_only_tables, config.insert_only_tables)
        self.pushes = Pushes(self.engine, config.max_value_bytes, config.push_retries)
        self.pulls = Pulls(self.engine, config.pull_max_bytes)
        # pulls read with at most all but PUSH_RESERVED_CONNECTIONS of the pool at once: however
        # many pulls a change wakes, a push finds a connection at once
        self._pull_readers = threading.BoundedSemaphore(
            max(1, config.db_pool_size - PUSH_RESERVED_CONNECTIONS))
        self.auth = Authenticator(config)
        self.metrics = Metrics()
        self.pushes.on_retry = lambda: self.metrics.count("cloudsync_push_retries_total")
        # in a worker (Workers): where the others' metrics are, and the line that wakes them
        self.share = None
        self.queued = None                  # serve: how many requests wait for a thread
        self.fleet = DeviceFleet(self.db)
        self.watcher = LogWatcher(self.engine, config.longpoll_max_waiters)
        self.engine.number_now = self.watcher.number_now
        self.routes = {
            "/health": {"GET": self.health},
            "/sync": {"POST": self.push},
            "/sync/push": {"POST": self.push},
            "/sync/pull": {"POST": self.pull},
            "/sync/status": {"GET": self.status},
            "/sync/devices": {"GET": self.devices},
            "/metrics": {"GET": self.metrics_text},
            "/openapi.json": {"GET": self.openapi},
        }
        self._openapi = None

    def start(self, progress=None):
        """Check every allowed table, install change capture; raise SchemaError, ChangeCaptureError
        or DatabaseUnavailable."""
        schemas = self.engine.migrate(progress)
        with self.db.connection() as conn:
            self.fleet.install(conn)
        return schemas

    # -- WSGI ----------------------------------------------------------------

    def __call__(self, environ, start_response):
        """The WSGI entry: route, answer, account; a Refused becomes its answer here."""
        began = time.perf_counter()
        request = Request(environ, self.config.max_body_bytes, self.config.max_json_depth)
        try:
            status, payload, headers = self._dispatch(request)
        except Refused as refusal:
            status, payload, headers = _answer(refusal)
        except Exception:
            log.exception("unhandled error on %s %s", _loggable(request.method, 20),
                          _loggable(request.path))
            status, payload, headers = _answer(Refused("internal", REFUSALS["internal"][2]))
        headers = headers + self._cors_headers(environ.get("HTTP_ORIGIN"))
        # no body: a preflight, or the device's copy is current
        if status in (204, 304):
            start_response("%d %s" % (status, http.HTTPStatus(status).phrase), headers)
            self._account(request, status, 0, began)
            return []
        encoded = payload if isinstance(payload, Encoded) else None
        body = encoded.body if encoded is not None else to_json_bytes(payload)
        headers = [("Content-Type", encoded.content_type if encoded is not None
                    else "application/json; charset=utf-8")] + headers
        if len(body) >= self.config.gzip_min_bytes:
            headers.append(("Vary", "Accept-Encoding"))
            if _accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING", "")):
                if encoded is not None and encoded.gzipped is not None:
                    body = encoded.gzipped
                else:
                    body = gzip.compress(body, compresslevel=5, mtime=0)
                    if encoded is not None:
                        encoded.gzipped = body
                headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("%d %s" % (status, http.HTTPStatus(status).phrase), headers)
        self._account(request, status, len(body), began)
        return [] if request.method == "HEAD" else [body]

    def _account(self, request, status, size, began):
        """After each request: metrics, the device fleet, and one access-log line."""
        seconds = time.perf_counter() - began
        metrics = self.metrics
        # labels come from a fixed set, so a client cannot make series without end
        method = request.method if request.method in HTTP_METHODS else "other"
        metrics.request(request.route, method, status, seconds)
        if request.auth_failed:
            metrics.count("cloudsync_auth_failures_total")
        if status == 503:
            metrics.count("cloudsync_database_unavailable_total")
        elif status == 500:
            metrics.count("cloudsync_server_errors_total")
        if request.device_id is not None and request.kind is not None:
            outcome = "synced" if status < 400 else "rejected" if status < 500 else "failed"
            self.fleet.seen(request.device_id, request.kind, request.checkpoint_seq, outcome,
                            request.tables)
        if access_log.isEnabledFor(logging.INFO):
            received = request.environ.get("CONTENT_LENGTH") or "0"
            fields = {"method": request.method[:20], "path": request.path[:200], "status": status,
                      "ms": round(seconds * 1000, 1), "device": request.device_id,
                      ("operations" if request.kind == "push" else "rows"): request.count,
                      "request_bytes": int(received) if received.isdigit() else None, "bytes": size}
            # escaped: a newline in a (percent-decoded) path must not start a fake log line
            access_log.info("%s %s %d %.1fms device=%s %s=%s request_bytes=%s bytes=%d",
                            _loggable(method), _loggable(request.path), status, seconds * 1000,
                            _loggable(request.device_id or "-"),
                            "operations" if request.kind == "push" else "rows",
                            "-" if request.count is None else request.count, received[:20], size,
                            extra={"fields": fields})

    def _cors_headers(self, origin):
        """Access-Control-* headers for a browser origin allowed by CORS_ORIGINS; none otherwise."""
        allowed = self.config.cors_origins
        if not allowed or not origin:
            return []
        if "*" in allowed:
            allow = "*"
        elif origin.rstrip("/") in allowed:
            allow = origin
        else:
            # the answer depends on the origin: caches must keep them apart
            return [("Vary", "Origin")]
        return [("Access-Control-Allow-Origin", allow), ("Vary", "Origin"),
                ("Access-Control-Expose-Headers", "ETag, Retry-After, WWW-Authenticate")]

    def _dispatch(self, request):
        """Route a request to its handler: 404, 405 with Allow, OPTIONS, authentication."""
        path = request.path.lower()           # Express routes ignore case
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]                  # and a trailing slash
        methods = self.routes.get(path)
        if methods is None:
            raise Refused("not_found", "no endpoint at %s" % path[:200])
        request.route = path
        allowed = ", ".join(sorted(set(methods) | {"OPTIONS"}
                                   | ({"HEAD"} if "GET" in methods else set())))
        if request.method == "OPTIONS":       # a CORS preflight (or a client asking what it may do)
            headers = [("Allow", allowed)]
            if any(name == "Access-Control-Allow-Origin"
                   for name, _ in self._cors_headers(request.environ.get("HTTP_ORIGIN"))):
                headers += [("Access-Control-Allow-Methods", allowed),
                            ("Access-Control-Allow-Headers", CORS_ALLOWED_HEADERS),
                            ("Access-Control-Max-Age", str(CORS_MAX_AGE_SECONDS))]
            return 204, None, headers
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            refusal = Refused("method_not_allowed", "%s takes %s" % (path, allowed))
            refusal.headers.append(("Allow", allowed))
            raise refusal
        if path.startswith("/sync") and path != "/sync/devices":
            # status is for monitoring too: ADMIN_TOKEN and METRICS_TOKEN read it, not only devices
            monitors = (self.config.admin_token, self.config.metrics_token) \
                if path == "/sync/status" else ()
            request.token = self.auth.identify(request, monitors)
            request.grant = self.engine.grant_for(request.token)
        result = handler(request)
        return result if len(result) == 3 else result + ([],)

    # -- handlers --------------------------------------------------------------

    def health(self, request):
        """Liveness: the process serves (answered by the server's loop itself, never waiting for a
        thread); and, without touching it, whether the database answered its last statement."""
        down_since = self.db.pool.down_since
        return 200, {"status": "Sync API running",
                     "database": "ok" if down_since is None else "not answering",
                     "database_down_seconds": None if down_since is None
                     else round(time.monotonic() - down_since, 1)}

    def push(self, request):
        """Apply a batch of operations in one transaction.

        Retry-safe with batch_id, conflict-aware with checkpoint.
        """
        fields = read_fields(request.json_object(), PUSH_FIELDS)
        device_id, batch_id, checkpoint = (fields["device_id"], fields["batch_id"],
                                           fields["checkpoint"])
        device_id = self._pushing_device(request, device_id)
        request.kind, request.device_id = "push", device_id
        sent = fields["operations"]
        if isinstance(sent, list) and len(sent) > self.config.max_operations:
            raise Refused("too_many_operations", "a push may hold at most %d operations; split "
                          "the batch into several pushes" % self.config.max_operations)
        operations = self.pushes.validate_operations(sent, request.grant)
        request_hash = None             # what a retry with the same batch id must match
        if batch_id is not None:
            # surrogatepass: a lone surrogate in a field nobody reads must not break the hash
            request_hash = hashlib.sha256(json.dumps(sent, sort_keys=True, default=str,
                                                     ensure_ascii=False)
                                          .encode("utf-8", "surrogatepass")).hexdigest()
        request.count = len(operations)
        try:
            result = self.pushes.push(operations, device_id, batch_id, checkpoint,
                                      fields["on_conflict"], request_hash, request.grant,
                                      fields["conflict_level"], fields["on_reject"])
            if result.get("replayed"):
                self.metrics.count("cloudsync_replays_total")
            else:
                for (table, action), count in collections.Counter(
                        (op.table.name, op.action) for op in operations).items():
                    self.metrics.count("cloudsync_operations_pushed_total", count, table=table,
                                       action=action)
            if result.get("conflicts"):
                self.metrics.count("cloudsync_conflicts_total", len(result["conflicts"]))
            if not result.get("replayed") and result["applied"]:
                # what it may have written: its tables, within the device's scope values
                scopes = {op.table.name: request.grant.scope(op.table.name).texts
                          for op in operations}
                self.watcher.poke({table: None if texts is None else set(texts)
                                   for table, texts in scopes.items()})
            return 200, result
        except Refused as refusal:
            if refusal.reason == "conflict":
                self.metrics.count("cloudsync_conflicts_total", len(refusal.fields["conflicts"]))
                self.watcher.forget()       # the device pulls next: from the database
            raise
        except DatabaseUnavailable as error:
            log.warning("push answered 503 (retry later): %s", error)
            raise Refused("push_unavailable", "the database is unavailable; retry later") from None
        except Exception:
            log.exception("push failed")
            raise Refused("push_failed", "the database failed; nothing was applied") from None

    @staticmethod
    def _pushing_device(request, device_id):
        """The device a push writes as: its token's (a device_id of another device is 403), or
        the device_id it sent when the server has no tokens."""
        token = request.token
        if token is None:
            return device_id
        if device_id is not None and device_id != token.device_id:
            log.warning("auth failure from %s: token of device %s used for device_id %s",
                        _loggable(request.environ.get("REMOTE_ADDR", "?")), token.device_id,
                        _loggable(device_id))
            raise Refused("forbidden", "this token belongs to device %r, not %r"
                            % (token.device_id, device_id))
        return token.device_id

    def pull(self, request):
        """Seed mode: rows of the requested tables. With `since`: changes after a checkpoint."""
        payload = request.json_object()
        fields = read_fields(payload, PULL_FIELDS)
        token = request.token
        request.kind = "pull"
        request.device_id = token.device_id if token is not None else fields["device_id"]
        grant = request.grant
        tables = self.pulls.check_tables(fields["tables"], grant)
        limit = parse_limit(fields["limit"], self.config.max_pull_rows)
        sync_mode, since = "since" in payload, fields["since"]
        wait = parse_wait(fields["wait"], self.config.read_timeout_seconds)
        if wait is not None and not sync_mode:
            raise Refused("invalid_wait", "wait is for sync-mode pulls: send it with \"since\"")
        for again in (False, True):
            try:
                if sync_mode:
                    waiter = request.device_id or request.environ.get("REMOTE_ADDR")
                    result = self._sync_pull(tables, since, limit, grant, wait, waiter)
                    result["limit"] = limit
                    pulled = self.engine.checkpoints.decode(result["checkpoint"])
                    request.checkpoint_seq, request.tables = pulled["s"], ",".join(pulled["t"])
                    counts = {table: len(change["upserted"]) + len(change["deleted"])
                              for table, change in result["changes"].items()}
                    self._count_pulled(request, counts)
                    return 200, result
                with self._pull_readers:
                    encoded = self.pulls.seed_pull(tables, limit, grant)
                self._count_pulled(request, encoded.rows)
                break
            except SchemaMoved as moved:
                # a table or column moved under the pull: followed, then the pull runs once more
                try:
                    self.engine.after_schema_moved(moved, again)
                except SchemaError:
                    log.exception("pull failed")
                    raise Refused("pull_failed", "the database failed while reading") from None
                except DatabaseUnavailable:
                    again = True
                if again:
                    raise Refused("pull_unavailable", "the database is unavailable; retry later") \
                        from None
            except DatabaseUnavailable:
                raise Refused("pull_unavailable",
                              "the database is unavailable; retry later") from None
            except Refused:
                raise
            except Exception:
                log.exception("pull failed")
                raise Refused("pull_failed", "the database failed while reading") from None
        if encoded.etag is None:
            return 200, encoded
        headers = [("ETag", encoded.etag), ("Cache-Control", "no-cache")]
        if encoded.etag in request.environ.get("HTTP_IF_NONE_MATCH", ""):
            return 304, None, headers
        return 200, encoded, headers

    def _sync_pull(self, tables, since, limit, grant, wait, waiter):
        """A sync-mode pull; with `wait`, one that finds nothing waits for a change (Long polls).

        `waiter`: who waits (the device, else the client's address), for its share of the slots.
        """
        watcher = self.watcher
        generation = watcher.generation
        interest = {table: grant.scope(table).texts for table in tables}
        known = watcher.known_head(interest)
        result = known is not None and self.pulls.unchanged(tables, since, grant, known,
                                                            watcher.quiet_between,
                                                            watcher.highest)
        if not result:
            result = self._read_pull(tables, since, limit, grant)
        # a first sync (since null) answers at once: the device learns its checkpoint first
        if not wait or since is None or result["has_more"] or any(
                change["upserted"] or change["deleted"] for change in result["changes"].values()):
            return result
        if not watcher.enter(waiter):
            self.metrics.count("cloudsync_longpoll_turned_away_total")
            return dict(result, retry_after=LONGPOLL_RETRY_AFTER_SECONDS)
        try:
            deadline = time.monotonic() + wait
            key = (tuple(tables), since, limit, grant.fingerprint(tables))
            while watcher.park(generation, deadline, interest):
                generation = watcher.generation
                result = watcher.shared(key, interest,
                                        lambda: self._read_pull(tables, since, limit, grant))
                if result["has_more"] or any(change["upserted"] or change["deleted"]
                                             for change in result["changes"].values()):
                    break
        finally:
            watcher.leave(waiter)
        return result

    def _read_pull(self, tables, since, limit, grant):
        """Pulls.pull_changes, within the pull readers' share of the pool."""
        with self._pull_readers:
            return self.pulls.pull_changes(tables, since, limit, grant)

    def demo_file(self, request):
        """`demo` only: a file of the web till (DEMO_FILES names every one; a request names
        none)."""
        name, content_type = DEMO_FILES[request.route]
        with open(os.path.join(HERE, name), "rb") as handle:
            body = handle.read()
        # read from disk at each request, and never kept by the browser: an edit shows at a reload
        return 200, Encoded(body, content_type=content_type), [
            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]

    def watch(self):
        """Start the watcher thread (serve does); return the function that stops it."""
        stop = threading.Event()
        threading.Thread(target=self.watcher.run, args=(stop,), name="cloudsync-watcher",
                         daemon=True).start()

        def stopped():
            stop.set()
            self.watcher.stop_looking()
        return stopped

    def openapi(self, request):
        """This API's OpenAPI 3.1 description."""
        if self._openapi is None:
            self._openapi = Encoded(to_json_bytes(OPENAPI))
        return 200, self._openapi

    def _count_pulled(self, request, counts):
        """Count pulled rows for the metrics and the access log."""
        request.count = sum(counts.values())
        for table, count in counts.items():
            if count:
                self.metrics.count("cloudsync_rows_pulled_total", count, table=table)

    def devices(self, request):
        """The device fleet as JSON, for the ADMIN_TOKEN."""
        self.auth.require(request, self.config.admin_token)
        try:
            with self.db.connection() as conn:
                # lag counts changes not numbered yet too
                self.engine.changelog.sequence(conn)
                devices = self.fleet.devices(conn, self.engine.changelog.head(conn))
        except DatabaseUnavailable:
            raise Refused("database_unavailable",
                          "the database is unavailable; retry later") from None
        return 200, {"success": True, "devices": self.with_scopes(devices)}

    def reload_settings(self):
        """SIGHUP: read the settings again and put the reloadable ones in force (with the
        tokens); log what reloaded and what needs a restart. A setting that no longer reads,
        or rules that do not fit the tables, change nothing (logged)."""
        if self.config.reload_from is not None:
            try:
                fresh = self.config.reload_from()
                if not _rules_wait(self.config, fresh):
                    self.engine.set_rules(fresh.read_only_columns, fresh.read_only_tables,
                                          fresh.insert_only_tables)
            except (ConfigError, SchemaError) as error:
                if self.share is None:      # else the master says it, once for every worker
                    log.error("SIGHUP: settings not reloaded, the running ones stay: %s", error)
            else:
                reloaded, restart = put_settings_in_force(self.config, fresh)
                config = self.config
                self.pushes.max_value_bytes = config.max_value_bytes
                self.pushes.push_retries = config.push_retries
                self.pulls.max_bytes = config.pull_max_bytes
                if self.share is None:      # else the master says it, once for every worker
                    log.info("%s", reload_said(reloaded, restart))
                logging.getLogger().setLevel(config.log_level)     # after: the line is said
        self.auth.reload(force=True)

    def with_scopes(self, devices):
        """The fleet's devices, each with the scopes of its token (None: no scope, or no token),
        and whether it was removed: tokens are in use and it has none any more."""
        scopes = {token.device_id: token.scope_text() or None for token in self.auth.tokens}
        removed = removed_devices(self.config.tokens_file)
        in_use = bool(self.auth.tokens) or bool(removed)
        return [dict(device, scope=scopes.get(device["device_id"]),
                     removed=in_use and device["device_id"] not in scopes,
                     removed_at=None if device["device_id"] in scopes
                     else removed.get(device["device_id"]))
                for device in devices]

    def metrics_text(self, request):
        """Prometheus metrics; needs METRICS_TOKEN or ADMIN_TOKEN if set, else what /sync* needs."""
        # with row scopes a device never reads them: they count every store's requests
        if self.config.metrics_token is not None or self.config.admin_token is not None \
                or self.config.row_scopes:
            self.auth.require(request, self.config.metrics_token, self.config.admin_token,
                              names=("METRICS_TOKEN", "ADMIN_TOKEN"))
        else:
            request.token = self.auth.identify(request)
        metrics, gauges = self.metrics, self.gauges()
        if self.share is not None:
            # every worker's, this one's published first: whichever worker answers the next
            # scrape, no count goes back
            self.share.publish(self)
            metrics, gauges = Metrics.summed(self.share.published())
            gauges.append(("cloudsync_workers", {}, self.share.count))
        gauges.append(("cloudsync_driver_info", {"driver": self.db.driver()}, 1))
        try:
            with self.db.connection() as conn:
                gauges.append(("cloudsync_change_log_head", {}, self.engine.changelog.head(conn)))
        except DatabaseUnavailable:
            pass                            # the other metrics still tell what is going on
        return 200, Encoded(metrics.render(gauges),
                            content_type="text/plain; version=0.0.4; charset=utf-8")

    def gauges(self):
        """This instance's gauges that add up across workers: [(name, labels, value)]."""
        gauges = [("cloudsync_longpoll_waiting", {}, self.watcher.waiting)]
        if self.queued is not None:
            gauges.append(("cloudsync_requests_queued", {}, self.queued()))
        pool = getattr(self.db, "pool", None)
        if pool is not None:
            gauges += [("cloudsync_pool_connections_in_use", {}, pool.in_use),
                       ("cloudsync_pool_connections_idle", {}, pool.idle_count)]
        return gauges

    def status(self, request):
        """A real database round trip, and the tables as the schema now describes them."""
        try:
            with self.db.connection() as conn:
                # the one round trip that proves the database answers
                head, _, version, _ = self.engine.changelog.position(conn)
            schemas = self.engine.refresh_schema()
        except DatabaseUnavailable as error:
            log.warning("status: database unavailable: %s", error)
            raise Refused("database_unavailable", "the database did not answer; retry later",
                          status="error") from None
        except SchemaError as error:
            raise Refused("schema_problem", str(error), status="error") from None
        # a device limited to some tables learns nothing of the others, not even their names; a
        # scoped one nothing of other stores' writes (the log's head counts them)
        grant = self.engine.grant_for(request.token)
        if grant.described is None or grant.described[0] is not schemas:
            shown = grant.visible
            grant.described = (schemas, to_json_bytes({
                "success": True, "status": "ok", "allowed_tables": shown,
                "backend": self.db.name, "driver": self.db.driver(), "version": __version__,
                "change_capture": self.engine.changelog.capture,
                "scope": {column: list(values) for column, values in grant.scopes.items()}
                if grant.scopes else None,
                "tables": {name: dict(schemas[name].describe(), rules=grant.tables[name].rules())
                           for name in shown}})[:-1])
        return 200, Encoded(grant.described[1] + b',"server_version":%s,"last_seq":%s}' % (
            to_json_bytes(version), to_json_bytes(None if grant.scoped else head)))


class Request:
    """The parts of a WSGI environ the handlers use, with a bounded body reader."""

    def __init__(self, environ, max_body_bytes, max_json_depth):
        self.environ = environ
        self.method = environ["REQUEST_METHOD"]
        self.path = environ.get("PATH_INFO") or "/"
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self.token = None                   # the DeviceToken that authenticated the request
        self.grant = None                   # what it may read and write (Grants), on /sync*
        # for the access log, metrics and device fleet, filled in by the handlers
        self.route = "other"
        self.device_id = None
        self.kind = None                    # "push" or "pull"
        self.count = None                   # operations pushed or rows pulled
        self.checkpoint_seq = None
        self.tables = None                  # the tables a sync-mode pull was for, comma-separated
        self.auth_failed = False

    def json_object(self):
        """The body as a JSON object; {} when empty (as the original service's express.json gave)."""
        payload = parse_json(self.decoded_body())
        _check_depth(payload, self.max_json_depth)
        if not isinstance(payload, dict):
            raise Refused("invalid_payload",
                          "the body must be a JSON object, not %s" % _json_type(payload))
        return payload

    def decoded_body(self):
        """The body, gunzipped when Content-Encoding says gzip.

        The limit holds for the unpacked size too.
        """
        body = self.body()
        encoding = self.environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "x-gzip"):
            raise Refused("unsupported_encoding", "Content-Encoding may be gzip or identity")
        # A gzip body may be several members one after the other (RFC 1952); anything else after the
        # end is refused, not ignored: the client did not send what it meant to.
        pieces, size, rest = [], 0, body
        while True:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                piece = inflater.decompress(rest, self.max_body_bytes + 1 - size)
            except zlib.error:
                raise Refused("invalid_request", "the body is not valid gzip") from None
            size += len(piece)
            pieces.append(piece)
            if size > self.max_body_bytes or inflater.unconsumed_tail:
                raise Refused("too_large", "the unpacked body is over the limit of %d bytes; split "
                                "the batch into smaller pushes" % self.max_body_bytes)
            if not inflater.eof:
                raise Refused("invalid_request", "the gzip body is truncated")
            rest = inflater.unused_data
            if not rest:
                return b"".join(pieces)
            if not rest.startswith(b"\x1f\x8b"):
                raise Refused("invalid_request",
                              "%d bytes follow the end of the gzip body" % len(rest))

    def body(self):
        """Read the request body; 413 before reading when it is declared too large."""
        environ = self.environ
        declared = environ.get("CONTENT_LENGTH") or ""
        stream = environ["wsgi.input"]
        if declared:
            try:
                length = int(declared)
            except ValueError:
                raise Refused("invalid_request", "Content-Length is not a number") from None
            if length > self.max_body_bytes:
                raise Refused("too_large", "the body is %d bytes; the limit is %d bytes, split "
                              "the batch into smaller pushes" % (length, self.max_body_bytes))
            return _read_exactly(stream, length)
        if environ.get("wsgi.input_terminated"):
            # a chunked body: read until the end, but never past the limit
            chunks, total = [], 0
            while True:
                chunk = stream.read(READ_CHUNK_BYTES)
                if not chunk:
                    return b"".join(chunks)
                total += len(chunk)
                if total > self.max_body_bytes:
                    raise Refused("too_large", "the body is over the limit of %d bytes, "
                                    "split the batch into smaller pushes" % self.max_body_bytes)
                chunks.append(chunk)
        return b""


def _check_depth(payload, limit):
    """400 when objects and lists nest deeper than `limit`."""
    level, current = 0, [payload] if type(payload) is dict or type(payload) is list else []
    while current:
        level += 1
        if level > limit:
            raise Refused("too_deep", "objects and lists nest deeper than %d levels" % limit)
        following = []
        for item in current:        # json.loads makes only exact dicts and lists
            for value in (item.values() if type(item) is dict else item):
                if type(value) is dict or type(value) is list:
                    following.append(value)
        current = following


def _read_exactly(stream, length):
    """Read a body of a declared length, at most READ_CHUNK_BYTES at a time."""
    chunks, remaining = [], length
    while remaining > 0:
        chunk = stream.read(min(remaining, READ_CHUNK_BYTES))
        if not chunk:
            raise Refused("invalid_request", "the body ended before Content-Length bytes arrived")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _answer(refusal):
    """The one place a refusal becomes an answer: (status, JSON body, headers), from REFUSALS."""
    status, error, _ = REFUSALS[refusal.reason]
    headers = list(refusal.headers)
    if status == 401:
        headers.append(("WWW-Authenticate", 'Bearer realm="cloudsync"'))
    elif status == 503:
        headers.append(("Retry-After", str(RETRY_AFTER_SECONDS)))
    # `code`: the REFUSALS key, stable once published: what a client switches on (the `error`
    # texts are the original service's, and one text may stand for several codes)
    return status, dict({"success": False, "error": error, "code": refusal.reason,
                         "detail": refusal.detail}, **refusal.fields), headers


def _accepts_gzip(header):
    """Whether Accept-Encoding lists gzip with a non-zero quality."""
    for part in header.lower().split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() in ("gzip", "x-gzip", "*"):
            quality = re.search(r"q\s*=\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)", params)
            # a malformed weight ("q=.", "q=1.2.3") reads as its valid prefix, or as no weight
            # at all
            return not quality or float(quality.group(1)) > 0
    return False


# -- request fields --------------------------------------------------------------
# What push and pull read from their JSON body, checked before anything runs,
# the way SETTINGS checks settings: (field, check, default). A field left
# out gets its default; a check takes (value, field) and returns the value
# (null, for most fields, means the same as left out) or raises Refused.
# Fields not named here are ignored, as the original service ignored them. The
# operations, the tables and the limit are checked against the schema and the
# settings by the engine and the handlers.


def read_fields(payload, fields):
    """{field: checked value} of a request body, per a PUSH_FIELDS-like table."""
    values = {}
    for field, check, default in fields:
        values[field] = check(payload[field], field) if field in payload else default
    return values


def _checked_id(value, field):
    """device_id / batch_id: null, or a non-empty string of at most MAX_ID_CHARS."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise Refused("invalid_payload", "%s must be a string of 1 to %d characters"
                      % (field, MAX_ID_CHARS))
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused("invalid_payload",
                          "%s is not valid Unicode (a lone surrogate)" % field) from None
    return value


def _checked_choice(*choices):
    """The check of a request field that is one of `choices` (on_conflict, conflict_level,
    on_reject: their meaning is in PUSH_FIELDS)."""
    def check(value, field):
        if value not in choices:
            raise Refused("invalid_payload", "%s must be %s" % (field, _either(choices, '"%s"')))
        return value
    return check


def _unchecked(value, field):
    """A field checked later, against the schema or the settings."""
    return value


PUSH_FIELDS = (
    ("device_id", _checked_id, None),
    ("batch_id", _checked_id, None),        # makes the push retry-safe
    ("checkpoint", _checked_checkpoint, None),  # makes it conflict-aware
    # conflicting operations: none applied (abort), or the others applied (skip)
    ("on_conflict", _checked_choice("abort", "skip"), "abort"),
    # an update conflicts when a column it sets changed (column), or anything of its row (row)
    ("conflict_level", _checked_choice("column", "row"), "column"),
    # an operation a rule of the database refuses: none applied (abort), or set aside (skip)
    ("on_reject", _checked_choice("abort", "skip"), "abort"),
    ("operations", _unchecked, None),       # Pushes.validate_operations
)
PULL_FIELDS = (
    ("device_id", _checked_id, None),
    ("tables", _unchecked, None),           # Pulls.check_tables
    ("since", _checked_checkpoint, None),   # present (even null): sync mode
    ("limit", _unchecked, None),            # parse_limit
    ("wait", _unchecked, None),             # parse_wait
)


def make_app(config):
    """An App for `config`, with its schema loaded (raises on a bad table)."""
    app = App(config)
    app.start()
    return app


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------




def _create_server(app, config, listener=None):
    """A waitress server for the app, already listening: OSError when the port is taken.

    `listener`: the socket the master bound (Workers), instead of binding HOST:PORT.
    """
    import waitress.server
    resizable = _resizable_pool()
    # waiting pulls never take the threads pushes and status need (Private APIs)
    threads = config.threads if resizable else config.threads + config.longpoll_max_waiters
    where = dict(host=config.host, port=config.port) if listener is None \
        else dict(sockets=[listener])
    server = waitress.server.create_server(
        app, threads=threads, **where,
        # /health is answered by the loop, whatever the threads wait on
        _dispatcher=_loop_dispatcher(threads, lambda command, path: path == "/health"
                                     and command in ("GET", "HEAD"),
                                     # a till waits to sell: pushes go ahead of queued pulls
                                     lambda command, path: command == "POST"
                                     and path in ("/sync/push", "/sync")),
        # waitress refuses an oversized declared body before reading any of it
        max_request_body_size=config.max_body_bytes, ident="cloudsync",
        # a fleet keeps a connection per device open (waitress's default is 100); poll(), not
        # select(), which cannot watch a descriptor numbered 1024 or more
        connection_limit=config.max_connections, asyncore_use_poll=True,
        clear_untrusted_proxy_headers=True,
        # a silent client is dropped after channel_timeout; waitress looks every cleanup_interval
        channel_timeout=config.read_timeout_seconds,
        cleanup_interval=max(1, min(30, config.read_timeout_seconds // 2)))
    limits = _ConnectionLimits(config.max_connections, config.max_connections_per_address)
    channel = _channel_class(config, limits)
    if channel is not None:
        server.channel_class = channel
        server.cloudsync_limits = limits
    set_count = _pool_resizer(server) if resizable else None
    if set_count is not None:
        app.watcher.resize = _with_spare_threads(set_count, config.threads)
    # waitress logs "Task queue depth is N" for every request that waits for a thread: under a
    # fleet's load, a line per request. The depth is the cloudsync_requests_queued gauge instead.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    queue = getattr(server.task_dispatcher, "queue", None)
    if queue is not None:
        app.queued = lambda: len(queue)
    return server


def _run(server, config, wake, on_stop=None):
    """Serve until SIGTERM (then let requests in progress finish) or Ctrl-C.

    SIGHUP reads the settings and the tokens file again (App.reload_settings).
    `on_stop`: called at SIGTERM, before the requests in progress are drained (it
    wakes the waiting pulls).
    """
    log.info("cloudsync %s listening on http://%s:%d", __version__, config.host, config.port)
    graceful = _graceful_stop_possible(server)
    if not graceful:
        log.warning("this waitress lacks the internals of a graceful stop: SIGTERM will cut off "
                    "requests in progress (their transactions roll back)")
    # Signal handlers only set flags and wake a loop: an exception raised inside waitress's
    # handlers would be caught there and logged, and the server would carry on.
    terminating = []

    def terminate(signum, frame):
        if not graceful:
            raise SystemExit(0)             # the public path: server.run() stops on it
        terminating.append(signum)
        server.pull_trigger()

    def hang_up(signum, frame):
        # the maintenance thread re-reads the tokens file at once
        wake.reload = True
        wake.set()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate)}
    if hasattr(signal, "SIGHUP"):
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hang_up)
    try:
        if graceful:
            if hasattr(server.task_dispatcher, "loop_answers"):
                server.task_dispatcher.loop_answers = True
            while not terminating:
                _serve_one_step(server, server.adj.asyncore_loop_timeout)
            if on_stop is not None:
                on_stop()
            _drain(server, config.shutdown_grace_seconds)
        else:
            server.run()                    # returns after SIGTERM or Ctrl-C
            log.info("stopped")
    except KeyboardInterrupt:
        server.task_dispatcher.shutdown()
        log.info("stopped")
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        server.close()


def _drain(server, grace_seconds):
    """After SIGTERM: close the listening socket, keep serving the open requests until answered."""
    log.info("SIGTERM: no new connections; finishing requests in progress (up to %d s)",
             grace_seconds)
    _stop_listening(server)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if not _requests_in_progress(server):
            break
        _serve_one_step(server, 0.05)
    else:
        log.warning("SIGTERM: requests still running after %d s are cut off (their transactions "
                    "roll back)", grace_seconds)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
    log.info("stopped")


def _create_demo_database(path, seed=False):
    """A SQLite file holding the example tables (schema-sqlite.sql); with `seed`, the web till's
    products too (demo/seed.sql, which keeps the rows already there)."""
    with open(os.path.join(HERE, "schema-sqlite.sql"), encoding="utf-8") as handle:
        script = handle.read()
    if seed:
        with open(os.path.join(HERE, "demo", "seed.sql"), encoding="utf-8") as handle:
            script += handle.read()
    conn = sqlite3.connect(path)
    try:
        conn.executescript(script)
    finally:
        conn.close()


def _maintain(app, config, stop, wake):
    """Server thread, every MAINTAIN_INTERVAL_SECONDS: re-read a changed tokens file, save the
    device fleet; compact every COMPACT_INTERVAL_SECONDS. (The watcher numbers changes and
    follows the tables: Long polls.)"""
    compact_due = 0.0
    while True:
        if getattr(wake, "reload", False):
            wake.reload = False
            app.reload_settings()
        else:
            app.auth.reload()
        try:
            with app.db.connection() as conn:
                if time.monotonic() >= compact_due:
                    compact_due = time.monotonic() + config.compact_interval_seconds
                    removed, _, upto = app.engine.changelog.compact(
                        conn, config.changelog_retention_days)
                    if removed:
                        log.info("compacted the change log: %d entries removed, up to seq %d",
                                 removed, upto)
                app.fleet.flush(conn)
        except DatabaseUnavailable:
            pass                            # requests report it; tried again next time
        except SchemaError as error:
            log.error("an allowed table cannot be synced any more: %s", error)
        except Exception:
            log.warning("change log maintenance failed; it is tried again later", exc_info=True)
        wake.wait(MAINTAIN_INTERVAL_SECONDS)
        wake.clear()
        if stop.is_set():
            return


# -- commands ---------------------------------------------------------------------
# Each command is a function (config, args) -> exit code. Exit codes: 0 done; 1 try
# again later (the database is unavailable, the port is taken: systemd restarts);
# 2 a configuration or schema problem (restarting will not fix it).

# what the demo always uses, whatever .env or the environment say: it must not need (or read)
# the operator's database, tables or tokens
DEMO_SETTINGS = {"DB_HOST": "", "ALLOWED_TABLES": ",".join(EXAMPLE_TABLES), "TOKENS": "",
                 "TOKENS_FILE": "", "ADMIN_TOKEN": "", "METRICS_TOKEN": "", "AUTH": "auto",
                 "HOST": "127.0.0.1", "CHANGE_CAPTURE": "triggers"}


def _serve_command(config, args):
    """`serve` and `demo`: check the tables, install change capture, serve the API (with
    WORKERS above 1, as the master of that many workers: Workers)."""
    if not _tune_allocator():
        log.info("not glibc: memory taken by large pulls may stay with the process")
    if args.command == "demo":
        _create_demo_database(config.db_path, seed=True)
    if config.worker_count > 1:
        return _Arbiter(config, args.command).run()
    app = _app_for(config, args.command)
    log.info("configuration: %s", config.describe())
    log.info("backend: %s, driver: %s", app.db.name, app.db.driver())
    try:
        # the port first: a taken one is found before anything changes
        server = _create_server(app, config)
    except (OSError, ValueError) as error:
        log.error("cannot start: cannot listen on %s:%d: %s%s", config.host, config.port, error,
                  _port_fix(config, error))
        return EXIT_RETRY
    try:
        schemas = app.start(progress=lambda message: log.info("migrate: %s", message))
    except BaseException:
        server.close()
        raise
    _tell_start(app, config, schemas)
    return _serve_app(app, config, server)


def _port_fix(config, error):
    """What to do about a port that cannot be listened on: which process holds it."""
    if getattr(error, "errno", None) == errno.EADDRINUSE:
        return ("; another process listens on port %d (`ss -ltnp 'sport = :%d'` names it): stop "
                "it, or set PORT" % (config.port, config.port))
    if getattr(error, "errno", None) == errno.EACCES:
        return "; ports below 1024 need privileges: set PORT=4000 and put a proxy in front"
    return ""


def _app_for(config, command):
    """The App `serve` (or `demo`, with the web till's files) runs."""
    app = App(config)
    if command == "demo":
        app.routes.update(dict.fromkeys(DEMO_FILES, {"GET": app.demo_file}))
    return app


def _tell_start(app, config, schemas):
    """Log what the server serves, and what an operator should know of its settings."""
    if schemas:
        log.info("tables: %s", ", ".join("%s (%s)" % (name, ", ".join(schema.primary_key))
                                         for name, schema in schemas.items()))
    else:
        log.warning("ALLOWED_TABLES is empty: every push and pull will be refused")
    if "pure Python" in app.db.driver():
        log.warning("mysql-connector-python's C extension did not load: rows decode several "
                    "times slower")
    if config.auth == "off" and config.host not in LOOPBACK_HOSTS:
        log.warning("AUTH=off on %s: ANYONE who can reach port %d can read and write the allowed "
                    "tables", config.host, config.port)
    elif not app.auth.required:
        log.info("no device tokens: open to local clients only (HOST=%s)", config.host)
    else:
        log.info("authentication: %d device token(s); the tokens file is re-read when it changes",
                 len(app.auth.tokens))
    if config.change_capture == "api":
        log.warning("CHANGE_CAPTURE=api: writes made outside cloudsync are not recorded and "
                    "devices will not see them")


def _serve_app(app, config, server, share=None):
    """Serve the started app until SIGTERM: its maintenance and watcher threads, then the
    server's loop (_run); save the device fleet's last second. `share`: a worker's (Workers)."""
    # from here on no statement waits on a database that stopped answering (the start-up's
    # migration may take longer: it runs before)
    app.db.bound_statements()
    stop, wake = threading.Event(), threading.Event()
    threading.Thread(target=_maintain, args=(app, config, stop, wake), name="cloudsync-maintenance",
                     daemon=True).start()
    app.watch()
    if share is not None:
        share.join(app, stop)
    _run(server, config, wake, on_stop=app.watcher.stop)
    stop.set()
    wake.set()
    try:
        with app.db.connection() as conn:
            app.fleet.flush(conn)           # the last second of device statistics
    except Exception:
        log.warning("could not save the device fleet at shutdown", exc_info=True)
    if share is not None:
        share.publish(app)                  # its last counts stay in the sum
    app.db.close()                          # SQLite folds its -wal file back in
    return 0


# -- workers: one port, several processes ------------------------------------------
# With WORKERS above 1, `serve` is a master in the manner of gunicorn's arbiter
# (_Arbiter). It checks the tables and installs change capture once, binds
# the port once, then forks the workers. Each worker is a whole instance on
# the shared listening socket (waitress takes pre-bound sockets): its own
# threads, pool, watcher and numberer, as two instances on one database are,
# with its share of the totals DB_POOL_SIZE, MAX_CONNECTIONS and
# LONGPOLL_MAX_WAITERS (Config.worker_share). A worker at its share of
# connections stops accepting, and the others take the new ones. What makes
# the workers one server (_WorkerShare, made before the first fork):
# - what one worker's watcher sees move in the log (after a push through it,
#   at once) it tells the others (a datagram each: the heads before and
#   after, the tables and scope values changed), which wake the long polls it
#   concerns without asking the database: a long poll in any worker wakes
#   within one look of the pushing worker, not one WATCH_INTERVAL_SECONDS;
# - /metrics sums every worker's counters: each publishes its own into its
#   slot of shared memory at most METRICS_SHARE_SECONDS after they change,
#   and the one answering publishes first and sums the slots, so whichever
#   worker answers, no count goes back; a worker started again in a slot
#   takes over the counts of the one before.
# The master forwards SIGHUP (tokens) and SIGTERM (every worker drains its
# requests in progress, then exits; the master last), and starts a worker
# that died again (WORKER_STABLE_SECONDS). A worker ends with its master
# (PR_SET_PDEATHSIG): one killed with SIGKILL leaves no worker holding the
# port. The seed cache, the device fleet's last second and the tokens are
# each worker's; `devices` and /sync/status read the database.

class _WorkerShare:
    """What the workers share, made by the master before it forks: the line on which a push in
    one wakes the others, and the shared memory holding each one's published metrics."""

    def __init__(self, count):
        self.count = count
        self.slot = None                    # the worker's own, once forked
        # a datagram socket pair per slot: any worker sends on its second end, the slot's worker
        # receives on the first
        self._line = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(count)]
        for _, sending in self._line:
            sending.setblocking(False)
        # anonymous and MAP_SHARED: the same pages in every forked worker. A slot: its version,
        # then two halves, each the length of its JSON and the JSON (_read)
        self._memory = mmap.mmap(-1, count * METRICS_SLOT_BYTES)
        self._half = (METRICS_SLOT_BYTES - 8) // 2
        self._published = None              # what the last publish saw change
        self._lock = threading.Lock()
        self._hearing = threading.Lock()    # taking a message in and applying it (_hear_now)

    def join(self, app, stop):
        """In a worker: a push tells the others, the others' pushes wake it, and its metrics are
        published until `stop` (two threads)."""
        app.watcher.tell_others = self.tell_others
        receiving = self._line[self.slot][0]
        with contextlib.suppress(OSError):
            while True:                     # told to the worker that held the slot before
                receiving.recv(WORKER_MESSAGE_BYTES, socket.MSG_DONTWAIT)
        app.watcher.hear_now = lambda: self._hear_now(app, receiving)
        threading.Thread(target=self._listen, args=(app, receiving), name="cloudsync-worker-line",
                         daemon=True).start()
        threading.Thread(target=self._publishing, args=(app, stop), name="cloudsync-metrics",
                         daemon=True).start()

    def adopt(self, app):
        """In a worker starting in its slot: take over the counts published there before."""
        snapshot = self._read(self.slot)
        if snapshot is not None:
            app.metrics.absorb(snapshot)
        self.publish(app)

    def tell_others(self, told):
        """Tell every other worker a move of the log or a push (LogWatcher.tell_others)."""
        message = to_json_bytes(told)
        if len(message) > WORKER_MESSAGE_BYTES:
            # "anything" instead of which tables and scope values: wakes more pulls, still right
            message = to_json_bytes([None if position == (3 if told[0] == "moved" else 1)
                                     else part for position, part in enumerate(told)])
        for slot, (_, sending) in enumerate(self._line):
            if slot != self.slot:
                try:
                    sending.send(message)
                except OSError:
                    # its queue is full: its own look, within WATCH_INTERVAL_SECONDS, sees it
                    pass

    def _listen(self, app, receiving):
        """The worker's thread hearing the others' looks and pushes."""
        while True:
            select.select([receiving], [], [])
            self._hear_now(app, receiving)

    def _hear_now(self, app, receiving):
        """Take in every message waiting: the listening thread, and a poll about to be answered
        from memory. A message is taken and applied under one lock: a poll never misses one
        that the thread has taken and not applied yet."""
        with self._hearing:
            while True:
                try:
                    message = receiving.recv(WORKER_MESSAGE_BYTES, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return
                try:
                    self._heard(app, message)
                except Exception:
                    # its own looks still see every move, within WATCH_INTERVAL_SECONDS
                    log.warning("a message of another worker was not understood", exc_info=True)

    @staticmethod
    def _heard(app, message):
        """One message of another worker."""
        told = json.loads(message)
        if told[0] == "pushed":
            app.watcher.heard_push(_unlisted(told[1]))
            return
        _, before, after, moved, began = told
        app.metrics.count("cloudsync_worker_wakeups_total")
        app.watcher.heard(before, after, _unlisted(moved), began)

    def _publishing(self, app, stop):
        """The worker's thread publishing its metrics when they changed."""
        while not stop.wait(METRICS_SHARE_SECONDS):
            self.publish(app, changed_only=True)

    def publish(self, app, changed_only=False):
        """Write this worker's counters and gauges into its slot."""
        gauges = app.gauges()
        mark = (app.metrics.changes, gauges)
        with self._lock:
            if changed_only and mark == self._published:
                return
            data = to_json_bytes(app.metrics.snapshot(gauges))
            if len(data) > self._half - 8:
                log.warning("this worker's metrics (%d bytes) do not fit in its shared slot; "
                            "/metrics shows its earlier counts", len(data))
                return
            base = self.slot * METRICS_SLOT_BYTES
            version = struct.unpack_from("<Q", self._memory, base)[0]
            # the half readers do not read; then the version says it is the one to read
            half = base + 8 + (version + 1) % 2 * self._half
            struct.pack_into("<Q", self._memory, half, len(data))
            self._memory[half + 8:half + 8 + len(data)] = data
            struct.pack_into("<Q", self._memory, base, version + 1)
            self._published = mark

    def published(self):
        """Every worker's last published metrics."""
        return [snapshot for snapshot in map(self._read, range(self.count))
                if snapshot is not None]

    def _read(self, slot):
        """A slot's last published metrics, or None (never written).

        A slot holds a version and two halves: a worker writes the half not
        in use, then counts the version up. A worker killed while writing
        leaves the half before in use; a read during a publish reads it
        whole, and reads again only when a publish ended meanwhile.
        """
        base = slot * METRICS_SLOT_BYTES
        for _ in range(100):
            version = struct.unpack_from("<Q", self._memory, base)[0]
            if not version:
                return None
            half = base + 8 + version % 2 * self._half
            length = min(struct.unpack_from("<Q", self._memory, half)[0], self._half - 8)
            data = self._memory[half + 8:half + 8 + length]
            if struct.unpack_from("<Q", self._memory, base)[0] == version:
                try:
                    return json.loads(data)
                except ValueError:
                    return None             # never: a half is read only once written whole
        return None


class _Arbiter:
    """The master of WORKERS workers: binds the port and starts them; starts again one that dies;
    forwards SIGHUP and SIGTERM, and ends when every worker has."""

    def __init__(self, config, command):
        self.config, self.command = config, command
        self.count = config.worker_count
        self.workers = {}                   # pid -> (slot, started at, monotonic)
        self.due = {}                       # slot -> when it starts again (monotonic)
        self.quick_deaths = collections.Counter()   # slot -> deaths in a row soon after start
        self.signals = []
        self.failed = None                  # a worker's exit code that ends the master too
        self.listener = self.share = None
        self.pipe = ()                      # set_wakeup_fd's: (read end, write end)

    def run(self):
        """Start everything, run until the workers are gone; the exit code."""
        config = self.config
        log.info("configuration: %s", config.describe())
        try:
            self.listener = _listening_socket(config)
        except OSError as error:
            log.error("cannot start: cannot listen on %s:%d: %s%s", config.host, config.port,
                      error, _port_fix(config, error))
            return EXIT_RETRY
        try:
            app = _app_for(config, self.command)
            log.info("backend: %s, driver: %s", app.db.name, app.db.driver())
            schemas = app.start(progress=lambda message: log.info("migrate: %s", message))
            _tell_start(app, config, schemas)
            app.db.close()                  # each worker opens its own: no connection is forked
        except BaseException:
            self.listener.close()
            raise
        share = config.worker_share()
        log.info("%d workers, each with %d threads, %d database connections, %d connections and "
                 "%d waiting pulls at most", self.count, share.threads, share.db_pool_size,
                 share.max_connections, share.longpoll_max_waiters)
        self.share = _WorkerShare(self.count)
        wakeup, woken = self.pipe = os.pipe()
        os.set_blocking(wakeup, False)
        os.set_blocking(woken, False)
        previous = {number: signal.signal(number, self._signalled) for number in
                    (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)}
        previous_fd = signal.set_wakeup_fd(woken)
        try:
            for slot in range(self.count):
                self._start(slot)
            return self._loop(wakeup)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for number, handler in previous.items():
                signal.signal(number, handler)
            os.close(wakeup)
            os.close(woken)
            self.listener.close()

    def _signalled(self, number, frame):
        self.signals.append(number)         # the loop acts on it (set_wakeup_fd wakes it)

    def _loop(self, wakeup):
        """Forward signals, restart workers that died; return once every worker ended."""
        stopping_at = None
        while True:
            now = time.monotonic()
            timeout = min([1.0] + [max(0.0, when - now) for when in self.due.values()])
            select.select([wakeup], [], [], timeout)
            try:
                os.read(wakeup, 512)
            except BlockingIOError:
                pass
            signals, self.signals = self.signals, []
            for number in signals:
                if number == signal.SIGHUP:
                    self._reload()
                    self._send(signal.SIGHUP)
                elif number in (signal.SIGTERM, signal.SIGINT) and stopping_at is None:
                    log.info("SIGTERM: the workers finish their requests in progress (up to %d s)",
                             self.config.shutdown_grace_seconds)
                    stopping_at = time.monotonic()
                    self.listener.close()       # the port stays only with the workers, who drain
                    self.due.clear()
                    self._send(signal.SIGTERM)
            self._reap(restart=stopping_at is None)
            if self.failed is not None and stopping_at is None:
                stopping_at = time.monotonic()
                self.listener.close()
                self.due.clear()
                self._send(signal.SIGTERM)
            if stopping_at is not None:
                if not self.workers:
                    log.info("stopped")
                    return self.failed or 0
                if time.monotonic() > stopping_at + self.config.shutdown_grace_seconds \
                        + WORKER_KILL_MARGIN_SECONDS:
                    log.warning("workers still running are killed")
                    self._send(signal.SIGKILL)
                continue
            for slot, when in list(self.due.items()):
                if time.monotonic() >= when:
                    del self.due[slot]
                    self._start(slot)

    def _send(self, number):
        """Send a signal to every worker."""
        for pid in self.workers:
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass                        # it just ended: _reap sees it

    def _reap(self, restart):
        """Collect ended workers; with `restart`, say when each starts again."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot, started = self.workers.pop(pid, (None, 0.0))
            if slot is None or not restart:
                continue
            code = os.waitstatus_to_exitcode(status)
            lived = time.monotonic() - started
            if code == EXIT_CONFIGURATION:
                # a setting or the schema: starting it again will not help (systemd will not
                # either); the others stop too
                log.error("worker %d (pid %d) cannot serve (exit code %d): stopping", slot, pid,
                          code)
                self.failed = code
                continue
            quick = self.quick_deaths[slot] = \
                self.quick_deaths[slot] + 1 if lived < WORKER_STABLE_SECONDS else 0
            delay = min(2 ** (quick - 1), WORKER_RESTART_MOST_SECONDS) if quick else 0
            log.warning("worker %d (pid %d) %s after %.0f s; it starts again in %d s", slot, pid,
                        "was killed by signal %d" % -code if code < 0 else "exited with %d" % code,
                        lived, delay)
            self.due[slot] = time.monotonic() + delay

    def _reload(self):
        """SIGHUP in the master: its settings too, so that a worker started later has them; the
        log line for all (each worker puts them in force itself)."""
        if self.config.reload_from is None:
            log.info("SIGHUP: the workers read the tokens file again")
            return
        try:
            fresh = self.config.reload_from()
            if _comparable(fresh.read_only_columns) != _comparable(self.config.read_only_columns) \
                    and not _rules_wait(self.config, fresh):
                # checked against the tables here too, through the running database settings: a
                # worker started later must not fail
                running = Config({name: getattr(self.config, name.lower()) for name in SETTING_NAMES})
                running.read_only_columns = fresh.read_only_columns
                checking = App(running)
                try:
                    checking.engine.load_schema()
                finally:
                    checking.db.close()
        except Exception as error:          # whatever it is, the running master and workers go on
            log.error("SIGHUP: settings not reloaded, the running ones stay: %s", error)
            return
        log.info("%s", reload_said(*put_settings_in_force(self.config, fresh)))
        logging.getLogger().setLevel(self.config.log_level)

    def _start(self, slot):
        """Fork the worker of `slot`."""
        sys.stdout.flush()
        sys.stderr.flush()
        master = os.getpid()
        # no signal runs the master's handlers in the worker between the fork and its own
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            self.workers[pid] = (slot, time.monotonic())
            log.info("worker %d started (pid %d)", slot, pid)
            return
        code = EXIT_RETRY
        try:
            signal.set_wakeup_fd(-1)
            for number in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(number, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C: KeyboardInterrupt
            # a reload while it starts is moot: it reads the tokens as it starts (_run handles
            # SIGHUP from then on)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            for descriptor in self.pipe:
                os.close(descriptor)
            _end_with_parent()
            if os.getppid() == master:      # else the master ended before the worker could know
                code = _exit_code_of(self.command, lambda: self._work(slot))
        except SystemExit as ended:
            code = ended.code if isinstance(ended.code, int) else 0
        except BaseException:
            log.exception("worker %d failed", slot)
        finally:
            logging.shutdown()
            os._exit(code)

    def _work(self, slot):
        """In the forked worker: start its app on the shared socket and serve until SIGTERM."""
        config = self.config.worker_share()
        share = self.share
        share.slot = slot
        app = _app_for(config, self.command)
        app.share = share
        app.start()                         # the master installed everything: found in place
        server = _create_server(app, config, self.listener)
        share.adopt(app)
        return _serve_app(app, config, server, share)


def _listening_socket(config):
    """The master's socket listening on HOST:PORT, as waitress binds one (SO_REUSEADDR)."""
    family, kind, protocol, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    return listener


def _end_with_parent():
    """Linux: the kernel sends this process SIGTERM when its parent (the master) ends."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)     # 1 is PR_SET_PDEATHSIG
    # not Linux, or no ctypes: a worker outlives a master killed with SIGKILL
    except Exception:
        pass



def _migrate_command(config, args):
    """`migrate`: cloudsync's tables and the triggers, as they should be; says what changed."""
    App(config).start(progress=lambda message: print(message, flush=True))
    return 0


def _alter_command(config, args):
    """`alter TABLE STATEMENT`: the operator's ALTER TABLE and the new triggers in one step."""
    app = App(config)
    app.start()
    try:
        app.engine.alter(args.table, args.statement,
                         progress=lambda message: print(message, flush=True))
    except DataRejected as error:
        raise ConfigError("the database refused the statement: %s." % error) from None
    print("%s altered; its change capture follows its new columns" % args.table)
    return 0


def _compact_command(config, args):
    """`compact`: drop log entries and batch ids older than the retention (or --older-than DAYS)."""
    days = config.changelog_retention_days if args.older_than is None else args.older_than
    if days < 0:
        raise ConfigError("--older-than takes a number of days, 0 or more.")
    if args.older_than is not None and days < config.changelog_retention_days:
        print("warning: devices that have not pulled since %s will get 410 (reset: true) on their "
              "next pull and pull every row again; a push they retry with a batch id older than "
              "that is applied again"
              % ("now" if days == 0 else "%d day(s) ago" % days), file=sys.stderr, flush=True)
    app = App(config)
    with app.db.connection() as conn:
        removed, batches, upto = app.engine.changelog.compact(
            conn, days, progress=lambda message: print(message, flush=True))
    print("removed %d change-log entries and %d batch ids older than %d day(s); checkpoints "
          "before seq %d now get 410" % (removed, batches, days, upto))
    return 0


def _check_command(config, args):
    """`check`: exit code 1 when something needs fixing."""
    return 1 if _check(config) else 0


def _check(config):
    """What is wrong with the configuration, database, tables, triggers and privileges, and the fix.

    Read-only: it changes nothing. Returns the number of problems found.
    """
    problems = []

    def ok(text):
        print("ok       " + text)

    def problem(text, fix):
        problems.append(text)
        print("PROBLEM  %s\n         fix: %s" % (text, fix))
    ok("configuration is valid (%s)" % ("MySQL/MariaDB %s@%s/%s" % (
        config.db_user, ",".join("%s:%d" % node for node in config.db_nodes()), config.db_name)
        if config.backend == "mysql" else "SQLite %s" % config.db_path))
    if config.backend == "sqlite" and not os.path.exists(config.db_path):
        problem("the SQLite file %s does not exist" % config.db_path,
                "set DB_PATH to your database file (cloudsync adds its tables to an existing "
                "database)")
        print("%d problem(s)" % len(problems))
        return len(problems)
    try:
        app = App(config)
    except ConfigError as error:
        problem(str(error), "change the settings named above")
        return len(problems)
    ok("authentication: %s" % ("%d device token(s)" % len(app.auth.tokens) if app.auth.required
                               else "no tokens, open to loopback clients only"
                               if config.auth == "auto" else "AUTH=off"))
    try:
        with app.db.connection() as conn:
            ok("database answers: %s" % app.db.server_version(conn))
            if "pure Python" in app.db.driver():
                problem("mysql-connector-python's C extension did not load (%s)" % app.db.driver(),
                        "pip install mysql-connector-python==9.5.0 (see requirements.txt)")
            schemas = {}
            for table in config.allowed_tables:
                try:
                    schemas[table] = app.db.introspect(conn, table)
                    ok("table %s: primary key (%s)"
                       % (table, ", ".join(schemas[table].primary_key)))
                except SchemaError as error:
                    problem(str(error), error.fix)
            if not config.allowed_tables:
                problem("ALLOWED_TABLES is empty: every push and pull is refused",
                        "list the tables devices sync")
            _check_scopes(app, conn, config, schemas, problem, ok)
            if "cloudsync_meta" not in app.db.table_names(conn):
                # nothing of cloudsync's is there yet: one problem, not one per table; migrate
                # refuses what is wrong above, so that comes first
                problem("cloudsync is not set up in this database yet (no tables of its own, "
                        "no triggers)", "%srun: %s migrate" % (
                            "after fixing the problems above, " if problems else "",
                            _own_command()))
            else:
                _check_capture(app, conn, config, schemas, problem, ok)
            if app.db.name == "mysql":
                _check_privileges(app, conn, config, problem, ok)
    except DatabaseUnavailable as error:
        problem("the database refused the connection: %s" % error.words,
                error.fix or "check DB_HOST, DB_PORT, DB_USER, DB_PASS and DB_NAME, and that the "
                "server runs")
    finally:
        app.db.close()
    print("%d problem(s)" % len(problems))
    return len(problems)


def _check_capture(app, conn, config, schemas, problem, ok):
    """check: each allowed table's triggers, and none left on tables no longer allowed."""
    installed = {name for name, _ in app.db.triggers(conn)}
    for table in schemas:
        missing = [event for event in ("ins", "upd", "del")
                   if _trigger_name(table, event) not in installed]
        if config.change_capture == "triggers" and missing:
            problem("table %s lacks change-capture triggers (%s)" % (table, ", ".join(missing)),
                    "run: %s migrate" % _own_command())
        elif config.change_capture == "api" and len(missing) < 3:
            problem("table %s still has triggers while CHANGE_CAPTURE=api" % table,
                    "run: %s migrate" % _own_command())
        elif config.change_capture == "triggers":
            _check_trigger_text(app, conn, schemas[table], problem)
    stale = app.engine.changelog.stale_triggers(conn, set(config.allowed_tables))
    for table in sorted(stale):
        problem("table %s is no longer in ALLOWED_TABLES, but cloudsync's triggers still record "
                "its changes" % table,
                "run: %s migrate (it removes them)" % _own_command())
    if not stale:
        ok("change capture (%s) is in place" % config.change_capture)


def _check_trigger_text(app, conn, schema, problem):
    """check: a table's triggers are the ones its columns ask for now (not made for others)."""
    try:
        schema = app.engine.with_table_settings({schema.name: schema})[schema.name]
    except SchemaError:
        return                              # reported with the settings
    existing = app.db.trigger_definitions(conn, schema.name)
    if any(existing.get(_trigger_name(schema.name, event))
           != app.db.stored_trigger(app.db.trigger_sql(schema, event))
           for event in app.db.trigger_events(schema)):
        problem("table %s: its change-capture triggers were made for other columns (its columns "
                "changed since): the shop's writes to it may fail, and devices may miss which "
                "columns changed" % schema.name,
                "a running server makes them again within %s s by itself; without one, run: %s "
                "migrate (use %s alter TABLE \"ALTER TABLE ...\" to change a table in one step)"
                % (SCHEMA_LOOK_SECONDS, _own_command(), _own_command()))


def _check_scopes(app, conn, config, schemas, problem, ok):
    """check: each ROW_SCOPES column exists, and an index starts with it (pulls read ranges)."""
    for table, name in config.row_scopes:
        schema = schemas.get(table)
        if schema is None:
            continue
        try:
            app.engine.with_table_settings({table: schema})
        except SchemaError as error:
            problem(str(error), "change ROW_SCOPES, or the table")
            continue
        if any(columns[:1] == (name,) for columns in app.db.index_columns(conn, table)):
            ok("table %s is scoped by %s, and an index starts with it" % (table, name))
        else:
            problem("table %s is scoped by %s, but no index starts with %s: each device's pull "
                    "reads the whole table" % (table, name, name),
                    "CREATE INDEX %s ON %s (%s)" % (app.db.quote("%s_by_%s" % (table, name)),
                                                    schema.quoted, app.db.quote(name)))
    # a token without a value for a scoped table's column may not use that table (fail closed):
    # said here, where an operator looks, rather than as a 403 on the device
    for token in app.auth.tokens:
        unusable = [(table, name) for table, name in config.row_scopes
                    if name not in token.scopes and (token.tables is None or table in token.tables)]
        if unusable:
            problem("the token of device %s has no scope value for %s: it cannot sync %s"
                    % (token.device_id, ", ".join(sorted({name for _, name in unusable})),
                       ", ".join(table for table, _ in unusable)),
                    "%s token rotate %s --scope %s=VALUE (VALUE * for every row), or --tables "
                    "without those tables" % (_own_command(), token.device_id, unusable[0][1]))


def _own_command():
    """How this operator runs cloudsync ('.venv/bin/python cloudsync.py'), for check's fixes."""
    python = sys.executable if not sys.executable.startswith(os.getcwd() + os.sep) \
        else os.path.relpath(sys.executable)
    script = os.path.relpath(os.path.join(HERE, "cloudsync.py")) if HERE.startswith(os.getcwd()) \
        else os.path.join(HERE, "cloudsync.py")
    return "%s %s" % (python, script)


def _check_privileges(app, conn, config, problem, ok):
    """The privileges the database user lacks for serve and migrate."""
    granted = _mysql_privileges(app.db, conn, config.db_name)
    needed = ["SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "INDEX", "ALTER"] + (
        ["TRIGGER"] if config.change_capture == "triggers" else [])
    missing = [name for name in needed if name not in granted and "ALL PRIVILEGES" not in granted]
    if missing:
        problem("the database user lacks %s on %s (cloudsync creates its own tables%s)" % (
            ", ".join(missing), config.db_name, " and triggers" if "TRIGGER" in missing else ""),
            "GRANT %s ON `%s`.* TO the user%s" % (
                ", ".join(missing), config.db_name,
                ", or set CHANGE_CAPTURE=api" if missing == ["TRIGGER"] else ""))
    else:
        ok("the database user has the privileges cloudsync needs on %s" % config.db_name)
    if config.change_capture == "triggers" and "PROCESS" not in granted \
            and "ALL PRIVILEGES" not in granted:
        problem("the database user lacks PROCESS: a TRUNCATE TABLE of an allowed table is not "
                "seen (InnoDB's table ids show it), and devices keep the rows it removed",
                "GRANT PROCESS ON *.* TO the user")


def _mysql_privileges(db, conn, database):
    """The privileges SHOW GRANTS gives the current user on `database` (or on every database)."""
    granted = set()
    for (line,) in db.query(conn, "SHOW GRANTS"):
        found = re.match(r"GRANT (.+?) ON (\S+) TO ", _text(line))
        if not found:
            continue
        scope = found.group(2).replace("`", "")
        if scope in ("*.*", "%s.*" % database) or scope.replace("\\_", "_") == "%s.*" % database:
            granted.update(part.strip() for part in found.group(1).split(","))
    return granted


def _devices_command(config, args):
    """`devices`: the fleet as a table of at most 100 columns, or as JSON (--json)."""
    app = App(config)
    app.engine.load_schema()
    with app.db.connection() as conn:
        app.fleet.install(conn)
        app.engine.changelog.sequence(conn)
        devices = app.with_scopes(app.fleet.devices(conn, app.engine.changelog.head(conn)))
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    now = datetime.datetime.now(datetime.timezone.utc)
    print("  %-17s %-10s %9s %9s %9s %6s %6s %6s %8s %6s" % (
        "device", "scope", "seen", "pushed", "pulled", "lag", "pushes", "pulls", "rejected",
        "failed"))
    for device in devices:
        print("%s %-17s %-10s %9s %9s %9s %6s %6s %6s %8s %6s" % (
            "x" if device["removed"] else "!" if device["silent"] else " ",
            device["device_id"][:17],
            _scope_shown(device["scope"], 10),
            _ago(device["last_seen"], now), _ago(device["last_push"], now),
            _ago(device["last_pull"], now),
            "-" if device["lag"] is None else device["lag"], device["pushes"], device["pulls"],
            device["rejected"], device["failed"]))
    silent = sum(1 for device in devices if device["silent"] and not device["removed"])
    removed = sum(1 for device in devices if device["removed"])
    print("%d device(s); %d silent for more than a day (!); %d removed: no token any more (x)"
          % (len(devices), silent, removed))
    print("seen, pushed, pulled: how long ago; lag: changes of its tables its last pull is behind;")
    print("rejected: answered 4xx (conflicts, resets, bad values); failed: answered 5xx")
    return 0


def _scope_shown(scope, width):
    """A token's scopes cut to `width` characters for a table ('-' for none)."""
    if not scope:
        return "-"
    return scope if len(scope) <= width else scope[:width - 1] + "~"


def _ago(moment, now):
    """'12s', '5m', '3h', '2d' since an ISO time ('-' for none): short enough for a narrow table."""
    if moment is None:
        return "-"
    seconds = (now - datetime.datetime.fromisoformat(moment.replace("Z", "+00:00"))).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s ago" % (seconds // size, unit)
    return "%ds ago" % max(0, seconds)


def _log_command(config, args):
    """`log`: the change log, newest last: the last --tail entries, or those after --since N."""
    app = App(config)
    app.engine.load_schema()
    with app.db.connection() as conn:
        app.engine.changelog.sequence(conn)
        if args.since is not None:
            rows = app.engine.changelog.entries(conn, args.device, args.table, args.since,
                                                args.limit)
        else:
            rows = app.engine.changelog.entries(conn, args.device, args.table, limit=args.tail,
                                                newest=True)
    print("%-8s %-26s %-16s %-6s %-24s %-16s %s"
          % ("seq", "time", "table", "op", "key", "device", "batch"))
    for seq, table, row_key, op, device_id, batch_id, changed_at in rows:
        print("%-8d %-26s %-16s %-6s %-24s %-16s %s" % (
            seq, _text(changed_at), _text(table), CHANGE_OPS.get(_text(op), op), _text(row_key),
            _text(device_id) or "-", _text(batch_id) or "-"))
    return 0


def _token_command(config, args):
    """`token add|rotate|remove|list`: device tokens in TOKENS_FILE.

    A running server picks changes up.
    """
    if args.token_command == "list":
        print("%-24s %-30s %-20s %s" % ("device", "tables", "created", "scope"))
        for token, created in [(token, "(TOKENS)") for token in config.tokens] + [
                (token, token.created or "-") for token in read_tokens_file(config.tokens_file)]:
            print("%-24s %-30s %-20s %s" % (token.device_id,
                                            ",".join(token.tables) if token.tables is not None
                                            else "all tables", created,
                                            token.scope_text() or "-"))
        for device_id, when in sorted(removed_devices(config.tokens_file).items()):
            print("%-24s %-30s %-20s %s" % (device_id, "(removed: no token)", when, "-"))
        return 0
    if not config.tokens_file:
        raise ConfigError("TOKENS_FILE is empty: set it to the file that keeps the device tokens.")
    if args.token_command == "remove":
        remove_token(config.tokens_file, args.device_id)
        print("device %s has no token any more; a server using %s refuses it within a second"
              % (args.device_id, config.tokens_file))
        return 0
    tables = None
    if args.tables is not None:
        tables = [name.strip() for name in args.tables.split(",") if name.strip()]
        unknown = sorted(set(tables) - set(config.allowed_tables))
        if unknown or not tables:
            raise ConfigError("--tables names %s, not in ALLOWED_TABLES."
                              % (", ".join(unknown) or "no table"))
    scopes = None
    if args.scope:
        scopes = {}
        for written in args.scope:
            try:
                column, values = parse_scope(written, "--scope")
            except ValueError as error:
                raise ConfigError("%s." % error) from None
            if column in scopes:
                raise ConfigError("--scope %s is given twice; list its values once: "
                                  "--scope %s=7,8." % (column, column))
            scopes[column] = values
        used = {column for _, column in config.row_scopes}
        if used and not set(scopes) & used:
            log.warning("--scope names %s, which no ROW_SCOPES table uses (%s)",
                        ", ".join(sorted(scopes)), ", ".join(sorted(used)))
    # the scoped tables this token would reach, and those its scopes leave it no row of
    scoped = [(table, column) for table, column in config.row_scopes
              if tables is None or table in tables]
    unusable = [table for table, column in scoped if column not in (scopes or {})]
    if args.token_command == "add" and scoped and not scopes:
        raise ConfigError("ROW_SCOPES scopes %s: give device %s the values it syncs, e.g. "
                          "--scope %s=7 (--scope %s=* for a device that sees every row), or "
                          "--tables without those tables."
                          % (", ".join("%s by %s" % pair for pair in scoped), args.device_id,
                             scoped[0][1], scoped[0][1]))
    make = add_token if args.token_command == "add" else rotate_token
    secret = make(config.tokens_file, args.device_id, tables, scopes)
    # the explanation on stderr, the token alone on stdout: TOKEN=$(cloudsync.py token add till-01)
    if args.token_command == "rotate":
        print("the old token stops working within a second on a running server", file=sys.stderr)
    if unusable and scopes:
        print("device %s has no --scope value for %s: it may not sync %s" % (
            args.device_id, ", ".join(sorted({config_column for table, config_column in scoped
                                              if table in unusable})),
            ", ".join(unusable)), file=sys.stderr)
    print("Token for device %s (shown once; only its hash is kept in %s):"
          % (args.device_id, config.tokens_file), file=sys.stderr)
    print(secret)
    return 0


COMMANDS = {"serve": _serve_command, "demo": _serve_command, "migrate": _migrate_command,
            "alter": _alter_command, "compact": _compact_command, "check": _check_command,
            "devices": _devices_command, "log": _log_command, "token": _token_command}


def _arguments():
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog="cloudsync",
                                     description="Sync server for offline-first devices.")
    parser.add_argument("--env-file", default=None,
                        help="settings file (default: .env in the working directory, if there is "
                             "one; a file named here must exist; \"\" for none)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve the sync API (the default)")
    demo = commands.add_parser("demo", help="serve the example tables from a local SQLite file, "
                                            "with nothing of yours")
    demo.add_argument("--db", default="cloudsync-demo.db",
                      help="SQLite file (created with the example tables)")
    commands.add_parser("migrate",
                        help="create cloudsync's tables and install the change-capture triggers")
    alter = commands.add_parser("alter", help="run an ALTER TABLE of an allowed table and make its "
                                              "triggers again in the same step (no write fails, "
                                              "none goes unrecorded)")
    alter.add_argument("table", help="the allowed table the statement changes")
    alter.add_argument("statement", help="the statement, quoted: \"ALTER TABLE sales ADD COLUMN "
                                         "payment VARCHAR(20)\"")
    compact = commands.add_parser("compact", help="remove change-log entries older than "
                                                  "CHANGELOG_RETENTION_DAYS")
    compact.add_argument("--older-than", type=int, metavar="DAYS",
                         help="remove entries older than this many days instead (0: everything "
                              "up to now)")
    commands.add_parser("check", help="check settings, database, tables, triggers and privileges; "
                                      "exit 1 when something needs fixing")
    devices = commands.add_parser("devices",
                                  help="the device fleet: last seen, pushes, pulls, refusals, lag")
    devices.add_argument("--json", action="store_true", help="print the fleet as JSON")
    audit = commands.add_parser("log",
                                help="print the change log (the audit trail), newest entries last")
    audit.add_argument("--device", help="only changes made by this device")
    audit.add_argument("--table", help="only changes to this table")
    audit.add_argument("--tail", type=int, default=20, metavar="N",
                       help="the newest N entries (default 20)")
    audit.add_argument("--since", type=int, metavar="SEQ",
                       help="instead: the entries after this sequence number")
    audit.add_argument("--limit", type=int, default=1000,
                       help="with --since: at most this many (default 1000)")
    token = commands.add_parser("token", help="device tokens: add, rotate, remove, list")
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION")
    token_commands.required = True
    for name, text in (("add", "generate a token for a device that has none, print it once, "
                               "store its hash"),
                       ("rotate", "replace a device's token (the old one stops working), print "
                                  "the new one once")):
        action = token_commands.add_parser(name, help=text)
        action.add_argument("device_id", help="the device the token belongs to")
        action.add_argument("--tables", help="comma-separated tables this device may sync "
                                             "(default: all allowed; rotate: as before)")
        action.add_argument("--scope", action="append", metavar="COLUMN=V[,V]",
                            help="the rows of ROW_SCOPES tables this device syncs: those whose "
                                 "COLUMN holds one of the values (store_id=7,8; store_id=* for "
                                 "every row); repeat for several columns (rotate: as before)")
    remove = token_commands.add_parser("remove", help="take a device's token away (a lost device)")
    remove.add_argument("device_id", help="the device whose token goes")
    token_commands.add_parser("list", help="list the devices that have tokens, their tables and "
                                           "when each was made (never the tokens)")
    return parser


def _settings_file(args):
    """The .env file a command reads, and whether it was named (then it must exist)."""
    if args.env_file is not None:
        return args.env_file, bool(args.env_file)
    if args.command == "demo":
        return None, False                  # the demo reads nothing of the operator's
    return ".env", False


def _early_log_format(args):
    """LOG_FORMAT before the settings are validated: start-up errors are JSON too when asked."""
    value = os.environ.get("LOG_FORMAT")
    path, _ = _settings_file(args)
    if value is None and path and os.path.exists(path):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(path, encoding="utf-8") as handle:
                value = parse_dotenv(handle.read(), os.environ)[0].get("LOG_FORMAT")
    return "json" if (value or "").strip().lower() == "json" else "text"


def _fail(command, message, code):
    """Log why a command cannot go on, named after the command; return its exit code."""
    log.error("%s: %s", "cannot start" if command in ("serve", "demo") else command, message)
    return code


def main(argv=None):
    """Command-line entry point.

    Commands: serve (the default), demo, migrate, alter, compact, check, devices, log, token.
    """
    args = _arguments().parse_args(argv)
    args.command = args.command or "serve"
    configure_logging(_early_log_format(args), logging.INFO)
    path, named = _settings_file(args)
    try:
        config = load_config(path, overrides=dict(DEMO_SETTINGS, DB_PATH=args.db)
                             if args.command == "demo" else None, required=named)
    except ConfigError as error:
        return _fail(args.command, error, EXIT_CONFIGURATION)
    configure_logging(config.log_format, config.log_level)
    # SIGHUP reads the same sources again (App.reload_settings)
    config.reload_from = lambda: load_config(path, overrides=dict(
        DEMO_SETTINGS, DB_PATH=args.db) if args.command == "demo" else None, required=named)
    try:
        return _exit_code_of(args.command, lambda: COMMANDS[args.command](config, args))
    # `cloudsync.py log | head`: the reader has what it wanted
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _exit_code_of(command, run):
    """run()'s exit code, or the one its error calls for (said in the log)."""
    try:
        return run()
    except SchemaError as error:
        # the fix `check` gives for the same problem
        return _fail(command, "%s; %s" % (error, error.fix), EXIT_CONFIGURATION)
    except (ConfigError, ChangeCaptureError) as error:
        return _fail(command, error, EXIT_CONFIGURATION)
    except DatabaseUnavailable as error:
        return _fail(command, "the database is unavailable: %s" % error,
                     EXIT_CONFIGURATION if error.lasting else EXIT_RETRY)


# ---------------------------------------------------------------------------
# Data: cloudsync's own tables, metric help
# ---------------------------------------------------------------------------
# The DDL of the tables cloudsync keeps beside the user's (each database class
# returns its own: log_tables(), devices_table(), devices_upsert()), and the
# help text of every metric.

MYSQL_LOG_TABLES = (
    "CREATE TABLE IF NOT EXISTS cloudsync_meta ("
    " name VARCHAR(64) NOT NULL PRIMARY KEY,"
    " value VARCHAR(255) NOT NULL"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS cloudsync_pending ("
    " id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,"
    " table_name VARCHAR(64) NOT NULL,"
    " row_key TEXT NOT NULL,"
    " op CHAR(1) NOT NULL,"
    " device_id VARCHAR(128) NULL,"
    " batch_id VARCHAR(128) NULL,"
    " changed_at DATETIME(6) NOT NULL,"
    " scope VARBINARY(1020) NULL,"
    " columns MEDIUMTEXT NULL,"
    " push_id CHAR(32) NULL,"
    " KEY cloudsync_pending_by_table (table_name)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS cloudsync_changes ("
    " seq BIGINT NOT NULL PRIMARY KEY,"
    " table_name VARCHAR(64) NOT NULL,"
    " row_key TEXT NOT NULL,"
    " op CHAR(1) NOT NULL,"
    " device_id VARCHAR(128) NULL,"
    " batch_id VARCHAR(128) NULL,"
    " changed_at DATETIME(6) NOT NULL,"
    " scope VARBINARY(1020) NULL,"
    " columns MEDIUMTEXT NULL,"
    " push_id CHAR(32) NULL,"
    " KEY cloudsync_changes_by_row (table_name, row_key(255), seq),"
    " KEY cloudsync_changes_by_table (table_name, seq),"
    " KEY cloudsync_changes_by_scope (table_name, scope, seq)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    # ids compared byte for byte: under any MySQL collation 'b1 ' would be the same batch as 'b1'
    "CREATE TABLE IF NOT EXISTS cloudsync_batches ("
    " device_id VARBINARY(512) NOT NULL,"
    " batch_id VARBINARY(512) NOT NULL,"
    " request_hash CHAR(64) NOT NULL,"
    " response MEDIUMTEXT NULL,"
    " created_at DATETIME(6) NOT NULL,"
    " PRIMARY KEY (device_id, batch_id)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS cloudsync_tables ("
    " table_name VARCHAR(64) NOT NULL PRIMARY KEY,"
    " fingerprint VARCHAR(64) NOT NULL,"
    " epoch BIGINT NOT NULL DEFAULT 0,"
    " identity TEXT NULL"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS cloudsync_schemas ("
    " fingerprint VARCHAR(64) NOT NULL PRIMARY KEY,"
    " table_name VARCHAR(64) NOT NULL,"
    " description MEDIUMTEXT NOT NULL"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS cloudsync_compacted ("
    " table_name VARCHAR(64) NOT NULL,"
    " scope VARBINARY(1020) NOT NULL,"
    " upto BIGINT NOT NULL,"
    " PRIMARY KEY (table_name, scope)"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
)
SQLITE_LOG_TABLES = (
    "CREATE TABLE IF NOT EXISTS cloudsync_meta ("
    " name TEXT NOT NULL PRIMARY KEY,"
    " value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cloudsync_changes ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " table_name TEXT NOT NULL,"
    " row_key TEXT NOT NULL,"
    " op TEXT NOT NULL,"
    " device_id TEXT,"
    " batch_id TEXT,"
    " changed_at TEXT NOT NULL,"
    " scope TEXT,"
    " columns TEXT,"
    " push_id TEXT)",
    "CREATE INDEX IF NOT EXISTS cloudsync_changes_by_row"
    " ON cloudsync_changes (table_name, row_key, seq)",
    "CREATE INDEX IF NOT EXISTS cloudsync_changes_by_table ON cloudsync_changes (table_name, seq)",
    "CREATE INDEX IF NOT EXISTS cloudsync_changes_by_scope"
    " ON cloudsync_changes (table_name, scope, seq)",
    # the push in progress, read by the triggers: SQLite has no session variables
    "CREATE TABLE IF NOT EXISTS cloudsync_context ("
    " id INTEGER PRIMARY KEY CHECK (id = 1),"
    " device_id TEXT,"
    " batch_id TEXT,"
    " table_name TEXT,"
    " push_id TEXT)",
    "INSERT OR IGNORE INTO cloudsync_context (id) VALUES (1)",
    "CREATE TABLE IF NOT EXISTS cloudsync_batches ("
    " device_id TEXT NOT NULL,"
    " batch_id TEXT NOT NULL,"
    " request_hash TEXT NOT NULL,"
    " response TEXT,"
    " created_at TEXT NOT NULL,"
    " PRIMARY KEY (device_id, batch_id))",
    "CREATE TABLE IF NOT EXISTS cloudsync_tables ("
    " table_name TEXT NOT NULL PRIMARY KEY,"
    " fingerprint TEXT NOT NULL,"
    " epoch INTEGER NOT NULL DEFAULT 0,"
    " identity TEXT)",
    "CREATE TABLE IF NOT EXISTS cloudsync_schemas ("
    " fingerprint TEXT NOT NULL PRIMARY KEY,"
    " table_name TEXT NOT NULL,"
    " description TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cloudsync_compacted ("
    " table_name TEXT NOT NULL,"
    " scope TEXT NOT NULL,"
    " upto INTEGER NOT NULL,"
    " PRIMARY KEY (table_name, scope))",
)
MYSQL_DEVICES_TABLE = (
    "CREATE TABLE IF NOT EXISTS cloudsync_devices ("
    " device_id VARBINARY(512) NOT NULL PRIMARY KEY,"
    " first_seen DATETIME NOT NULL,"
    " last_seen DATETIME NOT NULL,"
    " last_push DATETIME NULL,"
    " last_pull DATETIME NULL,"
    " checkpoint_seq BIGINT NULL,"
    " pushes BIGINT NOT NULL DEFAULT 0,"
    " pulls BIGINT NOT NULL DEFAULT 0,"
    " errors BIGINT NOT NULL DEFAULT 0,"
    " rejected BIGINT NOT NULL DEFAULT 0,"
    " failed BIGINT NOT NULL DEFAULT 0,"
    " pull_tables TEXT NULL"
    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin")
SQLITE_DEVICES_TABLE = (
    "CREATE TABLE IF NOT EXISTS cloudsync_devices ("
    " device_id TEXT NOT NULL PRIMARY KEY,"
    " first_seen TEXT NOT NULL,"
    " last_seen TEXT NOT NULL,"
    " last_push TEXT,"
    " last_pull TEXT,"
    " checkpoint_seq INTEGER,"
    " pushes INTEGER NOT NULL DEFAULT 0,"
    " pulls INTEGER NOT NULL DEFAULT 0,"
    " errors INTEGER NOT NULL DEFAULT 0,"
    " rejected INTEGER NOT NULL DEFAULT 0,"
    " failed INTEGER NOT NULL DEFAULT 0,"
    " pull_tables TEXT)")
# Several instances flush into one row: counts add up, times keep the latest.
_DEVICES_INSERT = (
    "INSERT INTO cloudsync_devices"
    " (device_id, first_seen, last_seen, last_push, last_pull, checkpoint_seq,"
    " pushes, pulls, errors, rejected, failed, pull_tables)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
MYSQL_DEVICES_UPSERT = (
    _DEVICES_INSERT
    + " ON DUPLICATE KEY UPDATE"
    " pull_tables = IFNULL(VALUES(pull_tables), pull_tables),"
    " last_seen = GREATEST(last_seen, VALUES(last_seen)),"
    " last_push = GREATEST(IFNULL(last_push, VALUES(last_push)),"
    " IFNULL(VALUES(last_push), last_push)),"
    " last_pull = GREATEST(IFNULL(last_pull, VALUES(last_pull)),"
    " IFNULL(VALUES(last_pull), last_pull)),"
    " checkpoint_seq = GREATEST(IFNULL(checkpoint_seq, VALUES(checkpoint_seq)),"
    " IFNULL(VALUES(checkpoint_seq), checkpoint_seq)),"
    " pushes = pushes + VALUES(pushes),"
    " pulls = pulls + VALUES(pulls),"
    " errors = errors + VALUES(errors),"
    " rejected = rejected + VALUES(rejected),"
    " failed = failed + VALUES(failed)")
SQLITE_DEVICES_UPSERT = (
    _DEVICES_INSERT
    + " ON CONFLICT (device_id) DO UPDATE SET"
    " pull_tables = coalesce(excluded.pull_tables, pull_tables),"
    " last_seen = max(last_seen, excluded.last_seen),"
    " last_push = max(coalesce(last_push, excluded.last_push),"
    " coalesce(excluded.last_push, last_push)),"
    " last_pull = max(coalesce(last_pull, excluded.last_pull),"
    " coalesce(excluded.last_pull, last_pull)),"
    " checkpoint_seq = max(coalesce(checkpoint_seq, excluded.checkpoint_seq),"
    " coalesce(excluded.checkpoint_seq, checkpoint_seq)),"
    " pushes = pushes + excluded.pushes,"
    " pulls = pulls + excluded.pulls,"
    " errors = errors + excluded.errors,"
    " rejected = rejected + excluded.rejected,"
    " failed = failed + excluded.failed")

METRIC_HELP = {
    "cloudsync_requests_total": ("counter", "HTTP requests answered, by route, method and status"),
    "cloudsync_request_duration_seconds": ("histogram", "time to answer a request, by route and status"),
    "cloudsync_longpoll_waiting": ("gauge", "pulls waiting for a change now (\"wait\")"),
    "cloudsync_longpoll_turned_away_total": ("counter",
                                             "pulls that asked to wait when LONGPOLL_MAX_WAITERS were"),
    "cloudsync_operations_pushed_total": ("counter", "push operations applied, by table and action"),
    "cloudsync_rows_pulled_total": ("counter", "rows and deleted keys sent by pulls, by table"),
    "cloudsync_conflicts_total": ("counter", "push operations refused or skipped as conflicts"),
    "cloudsync_replays_total": ("counter", "pushes answered from a stored batch outcome"),
    "cloudsync_auth_failures_total": ("counter", "requests refused for a missing or wrong token"),
    "cloudsync_database_unavailable_total": ("counter", "requests answered 503 because the database failed"),
    "cloudsync_server_errors_total": ("counter", "requests answered 500 (the database refused or failed; see the log)"),
    "cloudsync_push_retries_total": ("counter", "pushes run again after a deadlock or lock timeout"),
    "cloudsync_pool_connections_in_use": ("gauge", "database connections lent to requests now"),
    "cloudsync_pool_connections_idle": ("gauge", "open database connections waiting in the pool"),
    "cloudsync_change_log_head": ("gauge", "the newest sequence number given out (the current checkpoint)"),
    "cloudsync_driver_info": ("gauge", "the database driver in use (1)"),
    "cloudsync_workers": ("gauge", "server processes sharing the port (WORKERS above 1)"),
    "cloudsync_requests_queued": ("gauge", "requests received and waiting for a free thread"),
    "cloudsync_worker_wakeups_total": ("counter",
                                       "moves of the change log another worker's watcher told "
                                       "(WORKERS above 1)"),
}


# ---------------------------------------------------------------------------
# Data: the API description
# ---------------------------------------------------------------------------
# Big data goes last, as bottle.py keeps its HTTP codes and templates at the
# end. OPENAPI is the single source of truth for clients, served as GET
# /openapi.json. What repeats is generated when the module loads: each route's
# error answers from REFUSALS (the catalogue the HTTP section answers from), so
# the two cannot drift; HEAD from GET; OPTIONS (a CORS preflight) everywhere;
# /sync as push's alias. A test checks that every route App knows is described
# here, and CI runs schemathesis against a live server with it.

# The refusals each route may answer (a reason, or (reason, schema) when its
# answer carries more required fields on that route), in the order described.
_BODY_REFUSALS = ("invalid_json", "invalid_request", "invalid_payload", "too_deep")
ROUTE_REFUSALS = {
    ("/metrics", "get"): ("unauthorized",),
    ("/sync/status", "get"): ("unauthorized", ("schema_problem", "StatusError"), "internal",
                              ("database_unavailable", "StatusError")),
    ("/sync/devices", "get"): ("unauthorized", "internal", "database_unavailable"),
    ("/sync/push", "post"): _BODY_REFUSALS + (
        "invalid_operation", "invalid_table", "invalid_action", "unknown_column", "missing_key", "invalid_value",
        "invalid_checkpoint", "data_refused", "unauthorized", "forbidden", "read_only_table",
        "table_not_permitted", "out_of_scope", "insert_only_table", "read_only_column",
        "batch_id_required", "duplicate", "conflict", "batch_reused", "expired", "too_large", "too_many_operations", "value_too_large",
        "unsupported_encoding", "rejected", "push_failed", "internal", "push_unavailable"),
    ("/sync/pull", "post"): _BODY_REFUSALS + (
        "invalid_table", "no_tables", "invalid_limit", "invalid_wait", "invalid_checkpoint", "unauthorized",
        "table_not_permitted",
        "expired", "too_large", "unsupported_encoding", "pull_failed", "internal", "pull_unavailable"),
}
# a reason's answer with more required fields everywhere
REFUSAL_SCHEMAS = {"expired": "ExpiredError"}
# sent with every such answer
STATUS_HEADERS = {401: "WWW-Authenticate", 405: "Allow", 503: "Retry-After"}

OPENAPI = {
    "openapi": "3.1.0",
    "info": {
        "title": "cloudsync",
        "version": __version__,
        "summary": "Sync server for offline-first devices.",
        "description": (
            "All request and response bodies are JSON (UTF-8), except GET /metrics. The server "
            "does not look at "
            "the request Content-Type: every request body is parsed as JSON, and an empty body "
            "counts as {}.\n\n"
            "Every error is a JSON object {\"success\": false, \"error\": \"...\", \"code\": "
            "\"...\", \"detail\": \"...\"}, sometimes "
            "with more fields (op, conflicts, reset, reset_tables, status). `code` is the "
            "machine-readable reason (Error.code lists them; a published code never changes), "
            "`error` a short title; `detail` says what was "
            "wrong. Fields are only ever added: clients must ignore fields they do not know.\n\n"
            "HTTP details that apply to every path: an unknown path is a 404 JSON error; a known "
            "path with a "
            "method it does not take is a 405 JSON error with an Allow header (checked before "
            "authentication). "
            "HEAD works wherever GET does (same status and headers, no body). Paths ignore case "
            "and one trailing "
            "slash (/SYNC/push/). Request bodies may be sent with Content-Encoding: gzip (or "
            "x-gzip, identity); "
            "any other Content-Encoding is a 415, and the MAX_BODY_BYTES limit (default 10 MiB) "
            "applies to the "
            "unpacked size too (413). Responses of GZIP_MIN_BYTES (default 1024) bytes or more "
            "carry "
            "Vary: Accept-Encoding, and are gzipped (Content-Encoding: gzip) when the request's "
            "Accept-Encoding "
            "allows gzip. Request bodies nested deeper than MAX_JSON_DEPTH (default 16) are a "
            "400.\n\n"
            "Authentication: with device tokens configured, every /sync* request needs "
            "Authorization: Bearer "
            "<token> (401 with WWW-Authenticate: Bearer otherwise); with none configured (the "
            "server then listens "
            "on loopback only, or runs with AUTH=off) no token is needed. /sync/devices takes "
            "ADMIN_TOKEN instead, "
            "/metrics METRICS_TOKEN or ADMIN_TOKEN when set. /health, /openapi.json and OPTIONS "
            "are always "
            "open.\n\n"
            "CORS: every path answers a preflight OPTIONS request with 204; the "
            "Access-Control-Allow-* headers "
            "are present only when the request's Origin is allowed."
        ),
        "license": {"name": "MIT", "identifier": "MIT"},
    },
    "tags": [
        {"name": "sync", "description": "Pushing and pulling rows."},
        {"name": "operations", "description": "Liveness, readiness, monitoring."},
        {"name": "meta", "description": "This description, CORS."},
    ],
    "servers": [{"url": "/", "description": "where this document was fetched from (HOST and PORT; put TLS in "
                                            "front when devices reach it over a network)"}],
    "security": [{"deviceToken": []}, {}],
    "paths": {
        "/health": {
            "get": {
                "operationId": "health",
                "tags": ["operations"],
                "summary": "Liveness: answered by the server's loop without touching the database, "
                           "with whether the database answered last.",
                "security": [{}],
                "responses": {
                    "200": {
                        "description": "The server is running.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}},
                    },
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["meta"],
                "summary": "This OpenAPI description.",
                "security": [{}],
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "headers": {"Vary": {"$ref": "#/components/headers/Vary"},
                                    "Content-Encoding": {"$ref": "#/components/headers/Content-Encoding"}},
                        "content": {"application/json": {"schema": {
                            "type": "object",
                            "required": ["openapi", "info", "paths"],
                            "properties": {"openapi": {"type": "string", "pattern": "^3\\.1\\.\\d+$"}},
                        }}},
                    },
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["operations"],
                "summary": "Counters and gauges in the Prometheus text exposition format 0.0.4.",
                "description": "With METRICS_TOKEN or ADMIN_TOKEN set, one of them is needed; with neither, "
                               "/metrics is protected like /sync* (a device token when tokens are "
                               "configured).",
                "security": [{"metricsToken": []}, {"adminToken": []}, {"deviceToken": []}, {}],
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "headers": {"Vary": {"$ref": "#/components/headers/Vary"},
                                    "Content-Encoding": {"$ref": "#/components/headers/Content-Encoding"}},
                        "content": {"text/plain; version=0.0.4; charset=utf-8": {"schema": {"type": "string"}}},
                    },
                },
            },
        },
        "/sync/status": {
            "get": {
                "operationId": "status",
                "tags": ["operations"],
                "summary": "Readiness: a database round trip, and the allowed tables as the database describes them.",
                "description": "Re-reads the tables' columns and keys (at most once a second), so an ALTER TABLE "
                               "shows without a restart. A device token limited to some tables "
                               "sees only those. "
                               "ADMIN_TOKEN and METRICS_TOKEN read it too (monitoring).",
                "security": [{"deviceToken": []}, {"adminToken": []}, {"metricsToken": []}, {}],
                "responses": {
                    "200": {
                        "description": "The database answered.",
                        "headers": {"Vary": {"$ref": "#/components/headers/Vary"},
                                    "Content-Encoding": {"$ref": "#/components/headers/Content-Encoding"}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}},
                    },
                },
            },
        },
        "/sync/devices": {
            "get": {
                "operationId": "devices",
                "tags": ["operations"],
                "summary": "Every device that has pushed or pulled: when, how far behind, how many pushes and errors.",
                "description": "Needs ADMIN_TOKEN, whatever else is configured: without ADMIN_TOKEN set the "
                               "endpoint is off (401).",
                "security": [{"adminToken": []}],
                "responses": {
                    "200": {
                        "description": "The devices, in device_id order.",
                        "headers": {"Vary": {"$ref": "#/components/headers/Vary"},
                                    "Content-Encoding": {"$ref": "#/components/headers/Content-Encoding"}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Devices"}}},
                    },
                },
            },
        },
        "/sync/push": {
            "post": {
                "operationId": "push",
                "tags": ["sync"],
                "summary": "Apply a batch of operations in one transaction: all or nothing.",
                "description": (
                    "Every operation is checked (table, action, columns, key, value types) before "
                    "the first "
                    "statement runs; no error answer applies anything, whatever the size of the "
                    "push. With "
                    "`batch_id` a retry returns exactly the first outcome (its checkpoint "
                    "included) with "
                    "`replayed: true`. With `checkpoint`, operations on rows changed since it are "
                    "conflicts: 409 "
                    "(on_conflict abort) or skipped and listed (on_conflict skip). The checkpoint "
                    "a push returns "
                    "assumes the device already holds the rows it pushed, as it sent them: apply "
                    "operations "
                    "locally before (or as) you push them, or keep the checkpoint of your last "
                    "pull.\n\n"
                    "With ROW_SCOPES, an insert or update that puts a row outside the token's "
                    "scope values is 403 Out of scope; an insert without the scope column gets "
                    "the token's value when it has only one; updates and deletes of rows outside "
                    "the scope find nothing (missing), and no answer shows such a row."
                ),
                "requestBody": {"$ref": "#/components/requestBodies/Push"},
                "responses": {
                    "200": {"$ref": "#/components/responses/PushApplied"},
                },
            },
        },
        "/sync/pull": {
            "post": {
                "operationId": "pull",
                "tags": ["sync"],
                "summary": "Rows of the requested tables (seed mode), or the changes after a checkpoint (sync mode).",
                "description": (
                    "Without a `since` field: seed mode, the first `limit` rows of each table in "
                    "primary-key order "
                    "(answer `data`). Unchanged answers are served from memory with an ETag (when "
                    "CHANGE_CAPTURE=triggers); If-None-Match with that ETag gives 304 and no "
                    "body.\n\n"
                    "With a `since` field (null for a first sync, else the `checkpoint` of the "
                    "previous answer): "
                    "sync mode, at most `limit` upserted rows plus deleted keys per answer "
                    "(answer `changes`, "
                    "`checkpoint`, `has_more`). Call again with the new checkpoint while "
                    "`has_more` is true. "
                    "A checkpoint belongs to the list of tables it was pulled with.\n\n"
                    "With ROW_SCOPES, both modes return only the rows whose scope column holds "
                    "one of the token's scope values; a row that leaves the scope arrives as "
                    "deleted, one that enters it as upserted. When the token's scope changes, a "
                    "pull from an older checkpoint is 410 with reset: true."
                ),
                "parameters": [{
                    "name": "If-None-Match",
                    "in": "header",
                    "required": False,
                    "description": "Seed mode: the ETag of an earlier answer; 304 when the answer is unchanged.",
                    "schema": {"type": "string"},
                }],
                "requestBody": {
                    "required": False,
                    "description": "An empty body is taken as {} (every allowed table, seed mode).",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PullRequest"}}},
                },
                "responses": {
                    "200": {
                        "description": "Seed mode (`data`) or sync mode (`changes`).",
                        "headers": {
                            "ETag": {"description": "Seed mode with CHANGE_CAPTURE=triggers: the answer's version.",
                                     "schema": {"type": "string", "pattern": "^\"[0-9a-f]{32}\"$"}},
                            "Cache-Control": {"description": "`no-cache`, with ETag.",
                                              "schema": {"type": "string", "const": "no-cache"}},
                            "Vary": {"$ref": "#/components/headers/Vary"},
                            "Content-Encoding": {"$ref": "#/components/headers/Content-Encoding"},
                        },
                        "content": {"application/json": {"schema": {"oneOf": [
                            {"$ref": "#/components/schemas/SeedPull"},
                            {"$ref": "#/components/schemas/ChangesPull"},
                        ]}}},
                    },
                    "304": {
                        "description": "Seed mode: If-None-Match holds the current ETag. No body.",
                        "headers": {
                            "ETag": {"schema": {"type": "string"}},
                            "Cache-Control": {"schema": {"type": "string", "const": "no-cache"}},
                        },
                    },
                },
            },
        },
    },
    "components": {
        "securitySchemes": {
            "deviceToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "A device token (`cloudsync.py token add DEVICE`), bound to a device id and "
                               "optionally to tables. Needed on /sync* only when tokens are "
                               "configured.",
            },
            "adminToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "ADMIN_TOKEN: for /sync/devices, /metrics and /sync/status.",
            },
            "metricsToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "METRICS_TOKEN: for /metrics and /sync/status (monitoring).",
            },
        },
        "headers": {
            "Retry-After": {"description": "Seconds to wait before retrying.",
                            "schema": {"type": "integer", "minimum": 0}},
            "WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer realm=\"cloudsync\""}},
            "Vary": {"description": "`Accept-Encoding` on bodies of GZIP_MIN_BYTES or more.",
                     "schema": {"type": "string"}},
            "Content-Encoding": {"description": "`gzip` when the body is gzipped (Accept-Encoding allowed it).",
                                 "schema": {"type": "string", "const": "gzip"}},
            "Allow": {"description": "The methods the path takes.", "schema": {"type": "string"}},
        },
        "responses": {
            "Preflight": {
                "description": "CORS preflight answered, without authentication (no body). The "
                               "Access-Control-Allow-* headers are sent only when Origin is "
                               "allowed; without them "
                               "the browser refuses the request.",
                "headers": {
                    "Access-Control-Allow-Origin": {"schema": {"type": "string"}},
                    "Access-Control-Allow-Methods": {"schema": {"type": "string"}},
                    "Access-Control-Allow-Headers": {"schema": {"type": "string"}},
                    "Access-Control-Max-Age": {"schema": {"type": "integer", "minimum": 0}},
                    "Vary": {"schema": {"type": "string"}},
                },
            },
            "PushApplied": {
                "description": "Applied (or replayed).",
                "headers": {"Vary": {"$ref": "#/components/headers/Vary"},
                            "Content-Encoding": {"$ref": "#/components/headers/Content-Encoding"}},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PushResult"}}},
            },
        },
        "parameters": {
            "Origin": {"name": "Origin", "in": "header", "required": False, "schema": {"type": "string"},
                       "description": "The page's origin; the CORS headers are sent only when it is allowed."},
            "Access-Control-Request-Method": {"name": "Access-Control-Request-Method", "in": "header",
                                              "required": False, "schema": {"type": "string"}},
            "Access-Control-Request-Headers": {"name": "Access-Control-Request-Headers", "in": "header",
                                               "required": False, "schema": {"type": "string"}},
        },
        "requestBodies": {
            "Push": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PushRequest"}}},
            },
        },
        "schemas": {
            "Value": {
                "description": "A column value in its pulled form: DECIMAL as an exact string (\"12.50\"), "
                               "MySQL dates ISO 8601 (TIMESTAMP in UTC), TIME "
                               "\"[-]HH:MM:SS[.ffffff]\", SQLite "
                               "dates as stored, binary as base64, SET members in the column's "
                               "order, JSON as a "
                               "string, booleans stored as 1/0; a float no JSON number holds as "
                               "\"Infinity\", "
                               "\"-Infinity\" or \"NaN\". Pushing a pulled value back changes "
                               "nothing.",
                "type": ["string", "integer", "number", "boolean", "null"],
            },
            "Row": {
                "description": "One row: column name to value, every column of the table.",
                "type": "object",
                "additionalProperties": {"$ref": "#/components/schemas/Value"},
            },
            "Key": {
                "description": "A row's primary key: its value, or {column: value} for a composite key.",
                "anyOf": [
                    {"$ref": "#/components/schemas/Value"},
                    {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Value"}},
                ],
            },
            "Checkpoint": {
                "description": "Opaque and signed: a string this server returned (`cs1.<payload>.<mac>`).",
                "type": "string",
                "pattern": "^cs1\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+$",
            },
            "Id": {"type": "string", "minLength": 1, "maxLength": 128},
            "Error": {
                "type": "object",
                "required": ["success", "error", "code", "detail"],
                "properties": {
                    "success": {"const": False},
                    "error": {"type": "string", "description": "Short and stable: what kind of error "
                                                               "(one text may stand for several codes)."},
                    "code": {"type": "string", "enum": sorted(REFUSALS),
                             "description": "What a client switches on: the refusal's code, never "
                                            "changed once published (docs/protocol.md, The API)."},
                    "detail": {"type": "string", "description": "What exactly was wrong."},
                    "op": {"type": "integer", "minimum": 0,
                           "description": "The index of the operation concerned (push errors)."},
                    "conflicts": {"type": "array", "items": {"$ref": "#/components/schemas/Conflict"}},
                    "rejected": {"type": "array", "items": {"$ref": "#/components/schemas/Rejection"},
                                 "description": "With 422: the operations a rule of the database refused."},
                    "reset": {"const": True, "description": "With 410: start again from `since: null`, "
                                                            "or, with reset_tables, pull those tables again."},
                    "reset_tables": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                     "description": "With 410: only these tables start again; the "
                                                    "others continue."},
                    "checkpoint": {"$ref": "#/components/schemas/Checkpoint",
                                   "description": "With 410 and reset_tables on a pull: empty those "
                                                  "tables and pull on with this checkpoint."},
                    "status": {"const": "error", "description": "GET /sync/status errors."},
                },
            },
            "ExpiredError": {
                "allOf": [{"$ref": "#/components/schemas/Error"}],
                "required": ["reset"],
            },
            "StatusError": {
                "allOf": [{"$ref": "#/components/schemas/Error"}],
                "required": ["status"],
            },
            "Health": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"const": "Sync API running"},
                    "database": {"enum": ["ok", "not answering"],
                                 "description": "whether the database answered the last statement "
                                                "(the watcher makes one every 0.25 s); /health itself "
                                                "never waits for it"},
                    "database_down_seconds": {"type": ["number", "null"], "minimum": 0},
                },
            },
            "Status": {
                "type": "object",
                "required": ["success", "status", "allowed_tables", "backend", "server_version", "driver",
                             "version", "change_capture", "last_seq", "tables"],
                "properties": {
                    "success": {"const": True},
                    "status": {"const": "ok"},
                    "allowed_tables": {"type": "array", "items": {"type": "string"}},
                    "backend": {"enum": ["mysql", "sqlite"]},
                    "server_version": {"type": "string", "examples": ["MySQL 10.11.19-MariaDB-0+deb12u1"]},
                    "driver": {"type": "string", "examples": ["mysql-connector-python 9.5.0 (C extension)"]},
                    "version": {"type": "string", "description": "cloudsync's version."},
                    "change_capture": {"enum": ["triggers", "api"]},
                    "last_seq": {"type": ["integer", "null"], "minimum": 0,
                                 "description": "The newest change-log number; null for a device with a "
                                                "row scope (it would count other stores' writes)."},
                    "scope": {"type": ["object", "null"],
                              "additionalProperties": {"type": "array", "items": {"type": "string"}},
                              "description": "The token's scope values per scope column; null without "
                                             "a token or without scopes."},
                    "tables": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["primary_key", "columns", "types", "rules"],
                            "properties": {
                                "primary_key": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                "columns": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                "types": {"type": "object", "additionalProperties": {"type": "string"},
                                          "description": "Each column's type as the database declares it."},
                                "scope": {"type": "string", "description": "The table's scope column."},
                                "rules": {
                                    "type": "object",
                                    "required": ["read_only", "insert_only", "read_only_columns", "actions"],
                                    "description": "What pushes of this device meet on the table.",
                                    "properties": {
                                        "read_only": {"type": "boolean"},
                                        "insert_only": {"type": "boolean"},
                                        "read_only_columns": {"type": "array", "items": {"type": "string"}},
                                        "actions": {"type": "array", "items": {"enum": [
                                            "insert", "update", "delete", "upsert", "increment"]}},
                                    },
                                },
                            },
                        },
                    },
                },
            },
            "Devices": {
                "type": "object",
                "required": ["success", "devices"],
                "properties": {
                    "success": {"const": True},
                    "devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
                },
            },
            "Device": {
                "type": "object",
                "required": ["device_id", "first_seen", "last_seen", "last_push", "last_pull", "checkpoint_seq",
                             "lag", "pushes", "errors"],
                "properties": {
                    "device_id": {"type": "string"},
                    "first_seen": {"type": "string", "format": "date-time", "description": "UTC, whole seconds."},
                    "last_seen": {"type": "string", "format": "date-time"},
                    "last_push": {"type": ["string", "null"], "format": "date-time",
                                  "description": "null: never pushed."},
                    "last_pull": {"type": ["string", "null"], "format": "date-time",
                                  "description": "null: never pulled."},
                    "checkpoint_seq": {"type": ["integer", "null"], "minimum": 0,
                                       "description": "The sequence number of the device's newest checkpoint; "
                                                      "null: no sync-mode pull yet."},
                    "lag": {"type": ["integer", "null"], "minimum": 0,
                            "description": "Changes numbered after checkpoint_seq (last_seq - checkpoint_seq)."},
                    "pushes": {"type": "integer", "minimum": 0},
                    "pulls": {"type": "integer", "minimum": 0},
                    "silent": {"type": "boolean", "description": "Not seen for more than a day."},
                    "scope": {"type": ["string", "null"],
                              "description": "The row scopes of the device's token (store_id=7,8; "
                                             "store_id=* for every row); null: none."},
                    "errors": {"type": "integer", "minimum": 0, "description": "Answers of 400 or more "
                                                                             "(rejected + failed)."},
                    "rejected": {"type": "integer", "minimum": 0,
                                 "description": "Requests answered 4xx: conflicts, 410 resets, bad values."},
                    "failed": {"type": "integer", "minimum": 0, "description": "Requests answered 5xx."},
                    "removed": {"type": "boolean",
                                "description": "Tokens are in use and this device has none any "
                                               "more (token remove): its requests are refused."},
                    "removed_at": {"type": ["string", "null"], "format": "date-time",
                                   "description": "When `token remove` took its token away; null: "
                                                  "not removed, or not by token remove."},
                },
            },
            "Operation": {
                "type": "object",
                "required": ["table", "action", "data"],
                "properties": {
                    "table": {"type": "string", "description": "A table in ALLOWED_TABLES."},
                    "action": {"enum": ["insert", "update", "delete", "upsert", "increment"],
                               "description": "increment adds data's numbers to the row's columns "
                                              "in the database (needs batch_id; never a "
                                              "conflict)."},
                    "data": {
                        "type": "object",
                        "description": "Column values; must hold every primary-key column (an insert may leave "
                                       "out a key the database generates). Update sets the given "
                                       "columns; delete "
                                       "needs only the key.",
                        "additionalProperties": {"$ref": "#/components/schemas/Value"},
                    },
                    "checkpoint": {
                        "description": "The checkpoint this edit was based on (what its user "
                                       "saw): the operation's conflicts are judged from it. "
                                       "Absent or null: the push's checkpoint. A client that "
                                       "pulls while edits wait keeps each edit's own.",
                        "anyOf": [{"$ref": "#/components/schemas/Checkpoint"}, {"type": "null"}],
                    },
                },
            },
            "PushRequest": {
                "type": "object",
                "required": ["operations"],
                "properties": {
                    "device_id": {
                        "description": "With a token: absent, null or the token's device id (else 403).",
                        "anyOf": [{"$ref": "#/components/schemas/Id"}, {"type": "null"}],
                    },
                    "batch_id": {
                        "description": "Makes the push retry-safe: the same device_id + batch_id is applied once.",
                        "anyOf": [{"$ref": "#/components/schemas/Id"}, {"type": "null"}],
                    },
                    "checkpoint": {
                        "description": "The device's last pulled checkpoint: turns on conflict "
                                       "detection for operations without their own, and the "
                                       "answer's checkpoint is the device's next pull position.",
                        "anyOf": [{"$ref": "#/components/schemas/Checkpoint"}, {"type": "null"}],
                    },
                    "on_conflict": {"enum": ["abort", "skip"], "default": "abort"},
                    "conflict_level": {
                        "enum": ["column", "row"], "default": "column",
                        "description": "column: an update conflicts only when a column it sets "
                                       "was changed since the checkpoint by someone else; row: "
                                       "when anything of its row was.",
                    },
                    "on_reject": {
                        "enum": ["abort", "skip"], "default": "abort",
                        "description": "skip: operations a rule of the database refuses are "
                                       "left out and listed under rejected; the others apply.",
                    },
                    "operations": {
                        "type": "array",
                        "description": "At most MAX_OPERATIONS (default 10000) operations, applied in order.",
                        "items": {"$ref": "#/components/schemas/Operation"},
                    },
                },
            },
            "OpRef": {
                "type": "object",
                "required": ["op", "table", "key"],
                "properties": {
                    "op": {"type": "integer", "minimum": 0},
                    "table": {"type": "string"},
                    "key": {"$ref": "#/components/schemas/Key"},
                },
            },
            "Rejection": {
                "allOf": [{"$ref": "#/components/schemas/OpRef"}],
                "required": ["code", "message"],
                "properties": {
                    "code": {"const": "rejected", "description": "A rule of the database refused it."},
                    "message": {"type": "string", "description": "The rule's own message."},
                    "server_row": {
                        "description": "on_reject skip: the row as the server holds it (null: it has "
                                       "none); a device that applied the operation locally takes it back.",
                        "anyOf": [{"$ref": "#/components/schemas/Row"}, {"type": "null"}],
                    },
                },
            },
            "Conflict": {
                "type": "object",
                "required": ["op", "table", "key", "server_row"],
                "properties": {
                    "op": {"type": "integer", "minimum": 0},
                    "table": {"type": "string"},
                    "key": {"$ref": "#/components/schemas/Key"},
                    "columns": {"type": "array", "items": {"type": "string"},
                                "description": "The columns that make it a conflict: changed "
                                               "since the checkpoint by someone else (and, at "
                                               "column level, set by the operation)."},
                    "server_row": {
                        "description": "The row as the server has it now; null when it is gone.",
                        "anyOf": [{"$ref": "#/components/schemas/Row"}, {"type": "null"}],
                    },
                },
            },
            "PushResult": {
                "type": "object",
                "required": ["success", "applied", "checkpoint"],
                "properties": {
                    "success": {"const": True},
                    "applied": {"type": "integer", "minimum": 0,
                                "description": "Operations run (skipped conflicts are not counted)."},
                    "missing": {"type": "array", "items": {"$ref": "#/components/schemas/OpRef"},
                                "description": "Updates and increments whose row does not exist "
                                               "(nothing changed)."},
                    "conflicts": {"type": "array", "items": {"$ref": "#/components/schemas/Conflict"},
                                  "description": "on_conflict skip: the operations skipped."},
                    "rejected": {"type": "array", "items": {"$ref": "#/components/schemas/Rejection"},
                                 "description": "on_reject skip: the operations a rule of the "
                                                "database refused (not applied)."},
                    "checkpoint": {
                        "description": "The device's next pull position, assuming it holds the rows it pushed; "
                                       "null when the request had no checkpoint.",
                        "anyOf": [{"$ref": "#/components/schemas/Checkpoint"}, {"type": "null"}],
                    },
                    "replayed": {"const": True, "description": "This batch_id was applied before; nothing changed."},
                },
            },
            "PullRequest": {
                "type": "object",
                "properties": {
                    "device_id": {
                        "description": "Ties the pull to a device in the fleet statistics when no token does.",
                        "anyOf": [{"$ref": "#/components/schemas/Id"}, {"type": "null"}],
                    },
                    "tables": {
                        "description": "Tables to pull, each in ALLOWED_TABLES (and the token's tables); absent "
                                       "or null: every allowed table (the token's).",
                        "anyOf": [{"type": "array", "items": {"type": "string"}, "minItems": 1}, {"type": "null"}],
                    },
                    "limit": {
                        "description": "Most rows per table (seed mode) or rows plus deleted keys per answer (sync "
                                       "mode). Default 1000; larger values are capped at "
                                       "MAX_PULL_ROWS (5000). A "
                                       "string of digits is taken too.",
                        "anyOf": [
                            {"type": "integer", "minimum": 1},
                            {"type": "string", "pattern": "^0*[1-9][0-9]*$", "maxLength": 12},
                            {"type": "null"},
                        ],
                    },
                    "since": {
                        "description": "Present: sync mode. null for a first sync, else the `checkpoint` of the "
                                       "previous answer.",
                        "anyOf": [{"$ref": "#/components/schemas/Checkpoint"}, {"type": "null"}],
                    },
                    "wait": {
                        "description": "Sync mode only: when nothing changed after `since`, wait up to this "
                                       "many seconds (at most 25) for a change before answering.",
                        "anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}],
                    },
                },
            },
            "SeedPull": {
                "type": "object",
                "required": ["success", "data", "limit"],
                "properties": {
                    "success": {"const": True},
                    "data": {
                        "type": "object",
                        "description": "Table name to its first `limit` rows in primary-key order.",
                        "additionalProperties": {"type": "array", "items": {"$ref": "#/components/schemas/Row"}},
                    },
                    "limit": {"type": "integer", "minimum": 1, "description": "The limit used."},
                    "has_more": {"const": True,
                                 "description": "Present when rows were left out at PULL_MAX_BYTES: pull "
                                                "in sync mode (`since`) to get every row."},
                },
            },
            "ChangesPull": {
                "type": "object",
                "required": ["success", "changes", "checkpoint", "has_more", "limit"],
                "properties": {
                    "success": {"const": True},
                    "changes": {
                        "type": "object",
                        "description": "Every requested table, changed or not.",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["upserted", "deleted"],
                            "properties": {
                                "upserted": {"type": "array", "items": {"$ref": "#/components/schemas/Row"},
                                             "description": "Rows to insert or replace, as they are now."},
                                "deleted": {"type": "array", "items": {"$ref": "#/components/schemas/Key"},
                                            "description": "Keys of rows to delete."},
                            },
                        },
                    },
                    "checkpoint": {"$ref": "#/components/schemas/Checkpoint"},
                    "has_more": {"type": "boolean",
                                 "description": "Pull again with `checkpoint` at once (the page reached "
                                                "`limit` rows or PULL_MAX_BYTES)."},
                    "added_columns": {
                        "type": "object",
                        "description": "Columns added to a table since `since`, each with the value "
                                       "every row holds in it: add them locally (nothing is pulled again).",
                        "additionalProperties": {"type": "object"},
                    },
                    "limit": {"type": "integer", "minimum": 1, "description": "The limit used."},
                    "retry_after": {"type": "integer", "minimum": 1,
                                    "description": "With wait, when LONGPOLL_MAX_WAITERS pulls already wait: "
                                                   "this one did not; ask again after this many seconds."},
                },
            },
        },
    },
}


def _error_responses(refusals):
    """OpenAPI responses for these refusal reasons: one per status, its description and schema from REFUSALS."""
    by_status = {}
    for entry in refusals:
        reason, schema = entry if isinstance(entry, tuple) else (entry, REFUSAL_SCHEMAS.get(entry, "Error"))
        status, error, when = REFUSALS[reason]
        by_status.setdefault(status, []).append(("`%s`: %s" % (error, when), schema))
    responses = {}
    for status, entries in sorted(by_status.items()):
        schemas = {schema for _, schema in entries}
        response = {"description": "; ".join(dict.fromkeys(text for text, _ in entries)) + ".",
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/" + (schemas.pop() if len(schemas) == 1 else "Error")}}}}
        if status in STATUS_HEADERS:
            header = STATUS_HEADERS[status]
            response["headers"] = {header: {"$ref": "#/components/headers/" + header}}
        responses[str(status)] = response
    return responses


def _head_of(document, path, get):
    """The HEAD operation of a GET one: the same answers and headers, without bodies."""
    responses = {}
    for code, response in get["responses"].items():
        if "$ref" in response:
            response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        responses[code] = {"description": "As GET, without the body. " + response["description"]}
        if "headers" in response:
            responses[code]["headers"] = response["headers"]
    head = {"operationId": get["operationId"] + "Head", "tags": get["tags"],
            "summary": "GET %s without the body." % path, "responses": responses}
    if "security" in get:
        head["security"] = get["security"]
    return head


def _complete_openapi(document):
    """Add what is generated: error answers, HEAD, OPTIONS on every path, /sync as push's alias."""
    paths = document["paths"]
    for (path, method), refusals in ROUTE_REFUSALS.items():
        paths[path][method]["responses"].update(_error_responses(refusals))
    for name, reason in (("NotFound", "not_found"), ("MethodNotAllowed", "method_not_allowed")):
        # any path: described once, as components
        document["components"]["responses"][name] = next(iter(_error_responses([reason]).values()))
    paths["/sync"] = {"post": dict(paths["/sync/push"]["post"], operationId="pushAlias", deprecated=True,
                                   summary="The old alias of POST /sync/push: the same request and answers.")}
    for path, item in paths.items():
        if "get" in item:
            item["head"] = _head_of(document, path, item["get"])
        name = "".join(part.capitalize() for part in re.split(r"[^a-z]+", path) if part)
        item["options"] = {
            "operationId": "preflight" + name, "tags": ["meta"], "summary": "CORS preflight.", "security": [{}],
            "parameters": [{"$ref": "#/components/parameters/" + header} for header in
                           ("Origin", "Access-Control-Request-Method", "Access-Control-Request-Headers")],
            "responses": {"204": {"$ref": "#/components/responses/Preflight"}}}
    return document


_complete_openapi(OPENAPI)


if __name__ == "__main__":
    sys.exit(main())
