"""cloudsync_client: a reference device-side client for the cloudsync protocol (standard library only).

The device keeps a local SQLite file holding copies of the synced tables and
the client's own bookkeeping (tables named ``_cloudsync_*``):

- ``_cloudsync_outbox``: local changes not yet acknowledged by the server, in
  the order they were made. Each local write changes the local table and
  appends to the outbox in ONE transaction, so neither is lost without the other.
- the pending batch: outbox rows sent (or about to be sent) are marked with
  their ``batch_id`` BEFORE the request goes out, and removed only after a
  200 (or a replayed 200). A crash or a lost answer therefore retries the
  same operations with the same batch id, and the server applies them once.
- ``_cloudsync_dead``: dead letters, the operations the server refused and
  the conflicts nobody resolved, each with the server's answer. Nothing a
  device wrote ever disappears without a trace: the app shows them, fixes
  and resends them (``resend``), or lets them go (``discard``).
- ``_cloudsync_state``: the pull checkpoint per table set (stored in the same
  transaction as the pulled rows, so a crash never skips or doubles a
  change) and the tables' schema as the server described it.

``sync()`` pushes first, then pulls, and returns a ``SyncResult`` that is
false when something needs the user's attention (offline, refused
operations, unresolved conflicts). Guarantees:

- Each outbox operation keeps the checkpoint its edit was based on, and the
  push sends it with the operation, so the device pulls whenever it likes
  (the long poll runs while edits wait): the server judges every edit against
  what its user saw, and a pulled row is shown with the device's edits not
  yet acknowledged made again on top (never overwritten by the pull).
- Conflicts: a push carries the device's checkpoint. On ``409 Conflict`` the
  app's ``on_conflict(local_op, server_row)`` decides, for each conflicting
  operation: ``"server"`` (take the server's row), ``"mine"`` (send it again,
  over the server's row), or a dict (a merged row, sent as an upsert). Without
  a hook, or when it returns None, the server's row is taken and the local
  operation becomes a dead letter: kept, not dropped.
- Increments (``increment(table, key, {"qty": -2})``) are sent as increments:
  the server adds them in the database, so every device's increment counts
  once, and they never conflict. The local row shows the server's value plus
  this device's increments not pushed yet, also after a conflict.
- An operation the server refuses for itself (a 4xx naming one operation)
  becomes a dead letter, so the device is never blocked; the tables are then
  pulled again from scratch, because the local row holds what the server refused.
- 5xx answers and network errors stop the sync (offline); the next sync sends
  the same batch again.
- 410 (checkpoint expired): the rest of the outbox is pushed without conflict
  detection (the device's changes win), then the tables are wiped and pulled
  again from ``since: null``.
- Thread-safe: the app may write while ``sync()`` runs in a background thread.
- Built from the server's schema (pass table names, or None for every table
  the token allows): a column the server gains is added locally, and the
  tables are pulled again. Decimals written locally take the server's form
  ("3.5" is kept as "3.50" for a DECIMAL(12,2)), so a value never changes form.
"""

import contextlib
import decimal
import gzip
import http.client
import json
import logging
import random
import re
import socket
import sqlite3
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid

__all__ = ["Client", "SyncError", "SyncResult"]

log = logging.getLogger("cloudsync_client")

# Errors the server gives for one operation of a push; only these may set an operation aside.
# (Validation errors name the operation only in `detail`, so without an `op` field the
# client isolates it by pushing one operation at a time.)
PER_OPERATION_ERRORS = {"Invalid operation", "Invalid table", "Invalid action", "Unknown column", "Missing key",
                        "Invalid value", "Value too large", "Sync failed", "Read-only table", "Table not permitted",
                        "Rejected", "Out of scope", "Insert-only table", "Read-only column",
                        "Payload too large"}     # (the last: one operation alone is over the body limit)
CONFLICT_CHOICES = ("server", "mine")


class SyncError(Exception):
    """The server refused the sync for a reason retrying will not fix (token, device id, configuration)."""


class SyncResult:
    """What one sync() did; false when something needs the user's attention."""

    def __init__(self):
        self.pushed = 0             # operations the server acknowledged
        self.pulled = 0             # rows and deleted keys taken from the server
        self.conflicts = []         # the server's conflict entries (op, table, key, server_row)
        self.rejected = []          # dead letters this sync made (refused operations, unresolved conflicts)
        self.offline = False        # the server could not be reached (or failed): try again later
        self.reason = None          # why, when offline
        self.up_to_date = False     # the pull reached the server's newest changes (no write came in meanwhile)

    def __bool__(self):
        return not self.offline and not self.rejected

    def __repr__(self):
        return "SyncResult(pushed=%d, pulled=%d, conflicts=%d, rejected=%d, offline=%s)" % (
            self.pushed, self.pulled, len(self.conflicts), len(self.rejected), self.offline)

    def report(self):
        """The result as a dict, as `last_report` keeps it (with `dropped`, its name before 2026-12 for the
        refused operations among `rejected`)."""
        return {"pushed": self.pushed, "pulled": self.pulled, "conflicts": self.conflicts,
                "rejected": self.rejected, "offline": self.offline, "reason": self.reason,
                "up_to_date": self.up_to_date,
                "dropped": [entry for entry in self.rejected if entry["error"] != "Conflict"]}


def _quote(name):
    return '"%s"' % name.replace('"', '""')


class Client:
    """One device: a local SQLite store of `tables`, synced with a cloudsync server at `url`.

    tables: {name: (columns, key columns)} declared by the app; or a list of
    table names, or None for every table the server lets this device sync,
    described by the server itself (GET /sync/status; the first start needs
    the server once).
    """

    def __init__(self, path, url, tables=None, device_id=None, token=None, batch_size=500, pull_limit=1000,
                 timeout=30, on_conflict=None, on_change=None):
        self.url, self.device_id, self.token = url.rstrip("/"), device_id, token
        self.batch_size, self.pull_limit, self.timeout = batch_size, pull_limit, timeout
        self.on_conflict = on_conflict      # (local_op, server_row) -> "server", "mine", a merged row, or None
        self.on_change = on_change          # (table, upserted rows, deleted keys) after pulled rows are stored
        self.last_report = None             # what the last sync() did, as a dict
        self._lock = threading.RLock()      # every use of the local database; sync() may run in another thread
        self._syncing = threading.Lock()    # one sync at a time
        self._written = threading.Event()   # the app wrote: run_forever pushes
        self._stop = None
        self._polling = None                        # run_forever's long poll, which stop() cuts
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # transactions explicit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")                  # a committed batch id survives a power cut
        with self._transaction():
            self.db.execute("CREATE TABLE IF NOT EXISTS _cloudsync_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                            " tbl TEXT NOT NULL, action TEXT NOT NULL, row_key TEXT NOT NULL, data TEXT NOT NULL,"
                            " batch_id TEXT)")
            if "force" not in self._columns("_cloudsync_outbox"):
                # operations sent over the server's version of their row (conflict resolved "mine")
                self.db.execute("ALTER TABLE _cloudsync_outbox ADD COLUMN force INTEGER NOT NULL DEFAULT 0")
            if "basis" not in self._columns("_cloudsync_outbox"):
                # the checkpoint each edit was based on: the server judges its conflicts from there
                self.db.execute("ALTER TABLE _cloudsync_outbox ADD COLUMN basis TEXT")
            self.db.execute("CREATE TABLE IF NOT EXISTS _cloudsync_state (name TEXT PRIMARY KEY, value TEXT)")
            self.db.execute("CREATE TABLE IF NOT EXISTS _cloudsync_dead (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                            " tbl TEXT NOT NULL, action TEXT NOT NULL, data TEXT NOT NULL, status INTEGER,"
                            " error TEXT, detail TEXT, answer TEXT, at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)")
        if isinstance(tables, dict):
            self.tables = {name: (list(columns), list(key)) for name, (columns, key) in tables.items()}
            self.types = {}
        else:
            self._load_schema(tables)
        with self._transaction():
            for name, (columns, key) in self.tables.items():
                self._create_table(name, columns, key)

    def close(self):
        """Close the local database."""
        with self._lock:
            self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- schema -----------------------------------------------------------------

    def _load_schema(self, names, refresh=False):
        """Tables from the server's description (kept locally, so later starts work offline)."""
        stored = None if refresh else self._raw_state("schema")
        if stored is None:
            status, answer = self._get("/sync/status")
            if status != 200:
                raise SyncError("the server's description of the tables is needed once (%s); %s" % (
                    "it cannot be reached" if status is None else "GET /sync/status answered %s" % status,
                    "start with the server reachable, or declare the tables" if status is None
                    else (answer or {}).get("detail", "")))
            described = answer["tables"]
            wanted = list(described) if names is None else list(names)
            missing = [name for name in wanted if name not in described]
            if missing:
                raise SyncError("the server does not sync %s" % ", ".join(missing))
            stored = json.dumps({name: described[name] for name in wanted})
            with self._transaction():
                self._set_raw_state("schema", stored)
        schema = json.loads(stored)
        self.tables = {name: (table["columns"], table["primary_key"]) for name, table in schema.items()}
        self.types = {name: table.get("types", {}) for name, table in schema.items()}

    def _create_table(self, name, columns, key):
        # untyped columns: values stay exactly as the server sends them ("12.50" stays text)
        self.db.execute("CREATE TABLE IF NOT EXISTS %s (%s, PRIMARY KEY (%s))" % (
            _quote(name), ", ".join(map(_quote, columns)), ", ".join(map(_quote, key))))
        for column in columns:
            if column not in self._columns(name):
                self.db.execute("ALTER TABLE %s ADD COLUMN %s" % (_quote(name), _quote(column)))

    def _columns(self, table):
        return [row[1] for row in self.db.execute("SELECT * FROM pragma_table_info(?)", (table,))]

    def _learn_columns(self, changes):
        """The server sent columns this device does not have: learn the new schema and add them; True if so."""
        unknown = {table: [name for name in change["upserted"][0] if name not in self.tables[table][0]]
                   for table, change in changes.items() if change["upserted"]}
        unknown = {table: names for table, names in unknown.items() if names}
        if not unknown:
            return False
        log.warning("the server's tables have new columns (%s): adding them here and pulling the tables again",
                    ", ".join("%s.%s" % (table, name) for table, names in unknown.items() for name in names))
        try:
            self._load_schema(list(self.tables), refresh=True)
        except SyncError:                   # declared tables on a server that does not describe them to us
            for table, names in unknown.items():
                columns, key = self.tables[table]
                self.tables[table] = (columns + names, key)
        with self._transaction():
            for name, (columns, key) in self.tables.items():
                self._create_table(name, columns, key)
            self._set_state("reset", "1")   # rows pulled before the new columns lack them: pull all again
        return True

    def _add_columns(self, added):
        """A pull's `added_columns` ({table: {column: default}}): added here, every row holding the default;
        nothing is pulled again."""
        with self._transaction():
            for table, columns in added.items():
                if table not in self.tables:
                    continue
                names, key = self.tables[table]
                for name, default in columns.items():
                    if name in names:
                        continue
                    self.db.execute("ALTER TABLE %s ADD COLUMN %s" % (_quote(table), _quote(name)))
                    self.db.execute("UPDATE %s SET %s = ?" % (_quote(table), _quote(name)), (default,))
                    names = names + [name]
                self.tables[table] = (names, key)
            schema = json.loads(self._raw_state("schema") or "{}")
            for table, (names, key) in self.tables.items():
                if table in schema:
                    schema[table]["columns"] = names
            self._set_raw_state("schema", json.dumps(schema))
        with contextlib.suppress(SyncError):        # their types, when the server describes them
            self._load_schema(list(self.tables), refresh=True)

    def _local_form(self, table, row):
        """Values as the server sends them back: a DECIMAL(p,s) as text with s decimals, so one value keeps one
        form before and after a sync."""
        types, formed = self.types.get(table, {}), {}
        for name, value in row.items():
            if name not in self.tables[table][0]:
                raise ValueError("table %s has no column %r (its columns: %s)" % (
                    table, name, ", ".join(self.tables[table][0])))
            found = re.match(r"(?i)(decimal|numeric)\s*\(\s*\d+\s*,\s*(\d+)\s*\)", types.get(name, ""))
            if found and isinstance(value, (int, float, str, decimal.Decimal)) and not isinstance(value, bool):
                with contextlib.suppress(decimal.InvalidOperation, ValueError):
                    value = format(decimal.Decimal(str(value).strip()).quantize(
                        decimal.Decimal(1).scaleb(-int(found.group(2))), rounding=decimal.ROUND_HALF_UP), "f")
            formed[name] = value
        return formed

    # -- local store ------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self):
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _table(self, table):
        if table not in self.tables:
            raise ValueError("this client does not sync table %r (it syncs %s)" % (table, ", ".join(self.tables)))
        return self.tables[table]

    def _key(self, table, key):
        """A key (value, dict of key columns, or row) as the list of key values."""
        names = self._table(table)[1]
        if isinstance(key, dict):
            return [key[name] for name in names]
        if len(names) != 1:
            raise ValueError("table %s has a composite key: pass {column: value}" % table)
        return [key]

    def _where(self, table):
        return " AND ".join("%s = ?" % _quote(name) for name in self.tables[table][1])

    def _put(self, table, row):
        columns = [name for name in row if name in self.tables[table][0]]
        self.db.execute("INSERT OR REPLACE INTO %s (%s) VALUES (%s)" % (
            _quote(table), ", ".join(map(_quote, columns)), ", ".join("?" for _ in columns)),
            [row[name] for name in columns])

    def _remove(self, table, key):
        self.db.execute("DELETE FROM %s WHERE %s" % (_quote(table), self._where(table)), self._key(table, key))

    def _queue(self, table, action, data, force=False):
        key = json.dumps(self._key(table, data))
        # what the user saw when making the edit: the checkpoint of the copy it was made on
        basis = None if force else self.checkpoint
        self.db.execute("INSERT INTO _cloudsync_outbox (tbl, action, row_key, data, force, basis)"
                        " VALUES (?, ?, ?, ?, ?, ?)", (table, action, key, json.dumps(data), int(force), basis))
        self._written.set()                         # run_forever pushes it now

    def insert(self, table, row):
        """Insert a row locally and queue it for the server."""
        row = self._local_form(table, row)
        with self._transaction():
            columns = list(row)
            self.db.execute("INSERT INTO %s (%s) VALUES (%s)" % (
                _quote(table), ", ".join(map(_quote, columns)), ", ".join("?" for _ in columns)), list(row.values()))
            self._queue(table, "insert", row)

    def update(self, table, key, changes):
        """Set `changes` on the row with `key` locally and queue it; LookupError if the row is not here."""
        changes = self._local_form(table, changes)
        if set(changes) & set(self.tables[table][1]):
            raise ValueError("an update cannot change the key: delete the row and insert it again")
        data = dict(zip(self.tables[table][1], self._key(table, key)), **changes)
        with self._transaction():
            cursor = self.db.execute("UPDATE %s SET %s WHERE %s" % (
                _quote(table), ", ".join("%s = ?" % _quote(name) for name in changes), self._where(table)),
                list(changes.values()) + self._key(table, key))
            if cursor.rowcount == 0:
                raise LookupError("%s has no row %r" % (table, key))
            self._queue(table, "update", data)

    def upsert(self, table, row):
        """Insert the row, or set the given columns on it if its key exists; queue it."""
        row = self._local_form(table, row)
        names = [name for name in row if name not in self.tables[table][1]]
        with self._transaction():
            self._upsert_locally(table, row, names)
            self._queue(table, "upsert", row)

    def _upsert_locally(self, table, row, names):
        self.db.execute("INSERT INTO %s (%s) VALUES (%s) ON CONFLICT DO %s" % (
            _quote(table), ", ".join(map(_quote, row)), ", ".join("?" for _ in row),
            "UPDATE SET " + ", ".join("%s = excluded.%s" % (_quote(n), _quote(n)) for n in names)
            if names else "NOTHING"), list(row.values()))

    def increment(self, table, key, deltas):
        """Add `deltas` ({column: number}) to the row with `key`, locally and, as an increment, on the server.

        The server adds them in the database, so increments from several devices all count (two tills
        selling the last units of a product); the local row shows the server's value plus this device's
        increments not pushed yet. LookupError if the row is not here.
        """
        deltas = self._local_form(table, deltas)
        if not deltas or set(deltas) & set(self.tables[table][1]):
            raise ValueError("an increment adds to columns other than the key")
        data = dict(zip(self.tables[table][1], self._key(table, key)), **deltas)
        with self._transaction():
            if not self._add_locally(table, data):
                raise LookupError("%s has no row %r" % (table, key))
            self._queue(table, "increment", data)

    def _add_locally(self, table, data):
        """Add an increment's numbers to the local row; False when the row is not here."""
        key = [data[name] for name in self.tables[table][1]]
        added = {name: value for name, value in data.items() if name not in self.tables[table][1]}
        cursor = self.db.execute("SELECT %s FROM %s WHERE %s" % (
            ", ".join(map(_quote, added)), _quote(table), self._where(table)), key)
        row = cursor.fetchone()
        if row is None:
            return False
        sums = {}
        for (name, delta), current in zip(added.items(), row):
            if isinstance(delta, str) or isinstance(current, str):     # a DECIMAL, kept exact in its form
                total = decimal.Decimal(str(current or 0)) + decimal.Decimal(str(delta))
                sums[name] = self._local_form(table, {name: format(total, "f")})[name]
            else:
                sums[name] = (current or 0) + delta
        self.db.execute("UPDATE %s SET %s WHERE %s" % (
            _quote(table), ", ".join("%s = ?" % _quote(name) for name in sums), self._where(table)),
            list(sums.values()) + key)
        return True

    def delete(self, table, key):
        """Delete the row with `key` locally and queue the delete."""
        with self._transaction():
            self._remove(table, key)
            self._queue(table, "delete", dict(zip(self.tables[table][1], self._key(table, key))))

    def rows(self, table):
        """Every local row of `table` as dicts, in key order."""
        self._table(table)
        with self._lock:
            cursor = self.db.execute("SELECT * FROM %s ORDER BY %s" % (
                _quote(table), ", ".join(map(_quote, self.tables[table][1]))))
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor]

    def get(self, table, key):
        """The local row with this key (a value, or {column: value} for a composite key), or None."""
        values = self._key(table, key)
        with self._lock:
            cursor = self.db.execute("SELECT * FROM %s WHERE %s" % (_quote(table), self._where(table)), values)
            row = cursor.fetchone()
            return None if row is None else dict(zip([column[0] for column in cursor.description], row))

    def pending(self):
        """How many local operations the server has not acknowledged yet."""
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM _cloudsync_outbox").fetchone()[0]

    # -- dead letters -------------------------------------------------------------

    def dead_letters(self):
        """Operations the server refused, and conflicts nobody resolved: each with the server's answer."""
        with self._lock:
            rows = self.db.execute("SELECT id, tbl, action, data, status, error, detail, answer, at"
                                   " FROM _cloudsync_dead ORDER BY id").fetchall()
        return [{"id": number, "table": table, "action": action, "data": json.loads(data), "status": status,
                 "error": error, "detail": detail, "answer": json.loads(answer) if answer else None, "at": at}
                for number, table, action, data, status, error, detail, answer, at in rows]

    def resend(self, letter_id, data=None):
        """Apply a dead letter locally again (with corrected `data` if given) and queue it; it leaves the list."""
        with self._transaction():
            found = self.db.execute("SELECT tbl, action, data FROM _cloudsync_dead WHERE id = ?",
                                    (letter_id,)).fetchone()
            if found is None:
                raise LookupError("no dead letter %r" % letter_id)
            table, action, stored = found
            data = self._local_form(table, json.loads(stored) if data is None else data)
            if action == "delete":
                self._remove(table, data)
            else:
                self._upsert_locally(table, data, [name for name in data if name not in self.tables[table][1]])
            self._queue(table, action, data)
            self.db.execute("DELETE FROM _cloudsync_dead WHERE id = ?", (letter_id,))

    def discard(self, letter_id):
        """Let a dead letter go (the user decided the server's version stands)."""
        with self._transaction():
            self.db.execute("DELETE FROM _cloudsync_dead WHERE id = ?", (letter_id,))

    def _bury(self, operation, status, answer, result):
        """Keep an operation the sync could not apply, with the server's answer."""
        entry = {"table": operation["table"], "action": operation["action"], "data": operation["data"],
                 "status": status, "error": (answer or {}).get("error"), "detail": (answer or {}).get("detail")}
        self.db.execute("INSERT INTO _cloudsync_dead (tbl, action, data, status, error, detail, answer)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)", (entry["table"], entry["action"], json.dumps(entry["data"]),
                                                          status, entry["error"], entry["detail"], json.dumps(answer)))
        result.rejected.append(entry)

    # -- state ------------------------------------------------------------------

    def _raw_state(self, name):
        with self._lock:
            row = self.db.execute("SELECT value FROM _cloudsync_state WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _set_raw_state(self, name, value):
        self.db.execute("INSERT OR REPLACE INTO _cloudsync_state (name, value) VALUES (?, ?)", (name, value))

    def _state(self, name):
        return self._raw_state(name + " " + json.dumps(list(self.tables)))

    def _set_state(self, name, value):
        self._set_raw_state(name + " " + json.dumps(list(self.tables)), value)

    @property
    def checkpoint(self):
        """The stored pull position for this client's table list (None: pull everything)."""
        return self._state("checkpoint")

    # -- HTTP -------------------------------------------------------------------

    def _post(self, path, body, timeout=None):
        """POST JSON; return (status, answer), or (None, None) when the server could not be reached."""
        return self._request(path, json.dumps(body).encode("utf-8"), timeout)

    def _get(self, path):
        return self._request(path, None)

    def _headers(self, data):
        headers = {"Accept-Encoding": "gzip"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        return headers

    def _request(self, path, data, timeout=None):
        request = urllib.request.Request(self.url + path, data, self._headers(data),
                                         method="POST" if data is not None else "GET")
        self._unreachable = None
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                status, encoding, raw = response.status, response.headers.get("Content-Encoding"), response.read()
        except urllib.error.HTTPError as error:
            status, encoding, raw = error.code, error.headers.get("Content-Encoding"), error.read()
        except OSError as error:                    # refused, reset, timed out: the answer may be lost
            self._unreachable = str(getattr(error, "reason", None) or error)
            return None, None
        return self._decoded(status, encoding, raw)

    @staticmethod
    def _decoded(status, encoding, raw):
        try:
            return status, json.loads(gzip.decompress(raw) if encoding == "gzip" else raw)
        except ValueError:                          # a proxy's HTML error page, a cut-off body
            return (status if status >= 500 else None), None

    def _long_poll(self, body, timeout):
        """_post of a waiting pull on a connection of its own, which stop() cuts: run_forever ends
        within a second of stop() however long the server would wait."""
        parts = urllib.parse.urlsplit(self.url + "/sync/pull")
        connection = (http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection)(
            parts.hostname, parts.port, timeout=timeout)
        data = json.dumps(body).encode("utf-8")
        self._unreachable = None
        self._polling = connection
        try:
            if self._stop is not None and self._stop.is_set():
                return None, None
            connection.request("POST", parts.path + ("?" + parts.query if parts.query else ""), data,
                               self._headers(data))
            response = connection.getresponse()
            status, encoding, raw = response.status, response.getheader("Content-Encoding"), response.read()
        except (OSError, http.client.HTTPException) as error:      # cut by stop(), or the server went away
            self._unreachable = str(error) or type(error).__name__
            return None, None
        finally:
            self._polling = None
            connection.close()
        return self._decoded(status, encoding, raw)

    def _offline(self, result, what, status):
        result.offline = True
        result.reason = "the server could not be reached (%s)" % self._unreachable if status is None \
            else "the server answered %s" % status
        log.warning("%s: %s; %d operation(s) kept for the next sync", what, result.reason, self.pending())
        return False

    # -- sync -------------------------------------------------------------------

    def sync(self, _first=None):
        """Push the outbox, then pull until up to date. The SyncResult is false when something needs attention:
        offline (try again later), refused operations or unresolved conflicts (see dead_letters())."""
        with self._syncing:
            result = SyncResult()
            try:
                if self._push(result):
                    self._pull(result, _first)
            finally:
                self.last_report = result.report()
            return result

    def _batch(self, size):
        """The pending batch (batch_id, force, [(seq, operation)]), marked in the local DB before it is sent.

        Operations resolved "mine" after a conflict go out in batches of their own, without the checkpoint.
        """
        with self._transaction():
            rows = self.db.execute("SELECT seq, tbl, action, data, batch_id, force, basis FROM _cloudsync_outbox"
                                   " WHERE batch_id IS NOT NULL ORDER BY seq").fetchall()
            if not rows:
                first = self.db.execute("SELECT force FROM _cloudsync_outbox ORDER BY seq LIMIT 1").fetchone()
                if first is None:
                    return None, False, []
                batch_id = str(uuid.uuid4())
                self.db.execute("UPDATE _cloudsync_outbox SET batch_id = ? WHERE seq IN (SELECT seq FROM"
                                " _cloudsync_outbox WHERE force = ? AND seq < coalesce((SELECT MIN(seq) FROM"
                                " _cloudsync_outbox WHERE force <> ?), 1 << 62) ORDER BY seq LIMIT ?)",
                                (batch_id, first[0], first[0], size))
                rows = self.db.execute("SELECT seq, tbl, action, data, batch_id, force, basis FROM"
                                       " _cloudsync_outbox WHERE batch_id = ? ORDER BY seq", (batch_id,)).fetchall()
        # each operation names the checkpoint it was based on (the server judges its conflicts from
        # there), unless it is the push's own
        checkpoint = None if rows[0][5] else self.checkpoint
        return rows[0][4], bool(rows[0][5]), [
            (seq, dict({"table": tbl, "action": action, "data": json.loads(data)},
                       **({"checkpoint": basis} if basis is not None and basis != checkpoint
                          and checkpoint is not None else {})))
            for seq, tbl, action, data, _, _, basis in rows]

    def _unmark(self):
        """Forget the pending batch id: its operations go out again under a new one (only when not applied)."""
        self.db.execute("UPDATE _cloudsync_outbox SET batch_id = NULL")

    def _push(self, result):
        size = self.batch_size
        while True:
            batch_id, force, batch = self._batch(size)
            if not batch:
                return True
            checkpoint = None if force else self.checkpoint
            # a rule of the database refusing one operation does not hold back the others: each
            # refused one comes back with the server's row (a dead letter here, the row taken back)
            body = {"device_id": self.device_id, "batch_id": batch_id, "on_conflict": "abort",
                    "on_reject": "skip", "operations": [operation for _, operation in batch]}
            if checkpoint is not None:      # without one the server cannot detect conflicts
                body["checkpoint"] = checkpoint
            status, answer = self._post("/sync/push", body)
            error = (answer or {}).get("error")
            if status == 200:
                changed = {}
                with self._transaction():
                    self.db.execute("DELETE FROM _cloudsync_outbox WHERE batch_id = ?", (batch_id,))
                    for entry in answer.get("rejected") or []:
                        _, operation = batch[entry["op"]]
                        self._bury(operation, 422, dict(entry, error="Rejected", detail=entry.get("message")),
                                   result)
                        self._take(entry["table"], entry["key"], entry.get("server_row"), changed)
                    for entry in answer.get("missing") or []:
                        # an update or increment of a row the server does not have: never dropped silently
                        _, operation = batch[entry["op"]]
                        self._bury(operation, 200, dict(entry, error="Missing", detail=(
                            "the server has no such row: it was deleted (the next pull removes it here),"
                            " or was never there")), result)
                    # docs/protocol.md: the returned checkpoint is the next pull position; it skips the push's own
                    # changes only when the server proved this device holds them (the local table does).
                    # A replay's was computed from the first attempt's checkpoint: not necessarily ours.
                    if checkpoint is not None and answer.get("checkpoint") and not answer.get("replayed"):
                        self._set_state("checkpoint", answer["checkpoint"])
                self._changed(changed)
                result.pushed += len(batch)
            elif status == 409 and error == "Conflict":
                self._resolve(batch, answer, result)
            elif status == 410 or (status == 400 and error == "Invalid checkpoint"):
                # the checkpoint can no longer judge these changes: they go without conflict detection (same
                # batch id, nothing of it was applied), and the pull then answers which tables to pull again
                log.warning("checkpoint refused (%s): pushing without conflict detection, then resyncing", error)
                with self._transaction():
                    self.db.execute("UPDATE _cloudsync_outbox SET force = 1, basis = NULL WHERE batch_id = ?",
                                    (batch_id,))
                    if not (answer or {}).get("reset_tables"):
                        self._set_state("checkpoint", None)
            elif status == 409 and error == "Batch id reused":
                with self._transaction():           # not ours; nothing of this batch was applied under it
                    self._unmark()
            elif status == 413 and error in ("Payload too large", "Too many operations") and len(batch) > 1:
                size = max(1, len(batch) // 2)
                with self._transaction():
                    self._unmark()
            elif status is not None and 400 <= status < 500 and ("op" in answer or error in PER_OPERATION_ERRORS):
                if "op" not in answer and len(batch) > 1:
                    size = 1                        # which operation is unknown: send them one at a time
                    with self._transaction():
                        self._unmark()
                    continue
                seq, operation = batch[answer.get("op", 0)]
                log.warning("server refused %s on %s (%s: %s); kept as a dead letter", operation["action"],
                            operation["table"], error, answer.get("detail"))
                with self._transaction():
                    self._bury(operation, status, answer, result)
                    self.db.execute("DELETE FROM _cloudsync_outbox WHERE seq = ?", (seq,))
                    self._unmark()
                    self._set_state("reset", "1")   # the local row holds what the server refused
            elif status is None or status >= 500 or status == 429:
                return self._offline(result, "push of batch %s" % batch_id, status)
            else:
                raise SyncError("push refused: %s %s: %s" % (status, error, (answer or {}).get("detail")))

    def _wipe(self, table):
        """Inside a local transaction: empty the local copy of a table pulled again from its start,
        keeping this device's edits not acknowledged yet (made again on the empty table: a row
        only this device has stays; the pull brings the others, and _rebase their edits)."""
        self.db.execute("DELETE FROM %s" % _quote(table))
        for action, data in self.db.execute("SELECT action, data FROM _cloudsync_outbox WHERE tbl = ?"
                                            " ORDER BY seq", (table,)).fetchall():
            self._make_again(table, action, json.loads(data))

    def _make_again(self, table, action, data):
        """One outbox operation applied to the local copy once more (after a pull replaced its row)."""
        if action == "delete":
            self._remove(table, data)
        elif action == "increment":
            self._add_locally(table, data)
        elif action == "update":
            self._update_locally(table, data)
        else:
            self._upsert_locally(table, data, [name for name in data if name not in self.tables[table][1]])

    def _rebase(self, table, upserted, deleted):
        """Inside a local transaction, after pulled rows were stored: this device's edits still in the
        outbox are made again on top of them (the server judges each against the checkpoint it was based
        on when it is pushed). (upserted, deleted) as the local table now holds them."""
        names = self.tables[table][1]
        pending = {}
        for row_key, action, data in self.db.execute("SELECT row_key, action, data FROM _cloudsync_outbox"
                                                     " WHERE tbl = ? ORDER BY seq", (table,)).fetchall():
            pending.setdefault(row_key, []).append((action, json.loads(data)))
        if not pending:
            return upserted, deleted
        rows, gone = [], []
        for pulled in list(upserted) + list(deleted):
            key = self._key(table, pulled)
            edits = pending.get(json.dumps(key))
            for action, data in edits or ():
                self._make_again(table, action, data)
            row = self.get(table, dict(zip(names, key)))
            if row is not None:
                rows.append(row)
            else:
                gone.append(key[0] if len(key) == 1 else dict(zip(names, key)))
        return rows, gone

    def _update_locally(self, table, data):
        """Set an update's columns on the local row, if it is here."""
        names = self.tables[table][1]
        changes = {name: value for name, value in data.items() if name not in names}
        if changes:
            self.db.execute("UPDATE %s SET %s WHERE %s" % (
                _quote(table), ", ".join("%s = ?" % _quote(name) for name in changes), self._where(table)),
                list(changes.values()) + [data[name] for name in names])

    def _take(self, table, key, server_row, changed):
        """Inside a local transaction: the server's row (None: it has none) replaces the local one, with this
        device's increments not pushed yet on top."""
        key = self._key(table, key)
        if server_row is None:
            self._remove(table, dict(zip(self.tables[table][1], key)))
            changed.setdefault(table, ([], []))[1].append(key[0] if len(key) == 1
                                                          else dict(zip(self.tables[table][1], key)))
            return
        self._put(table, server_row)
        for (data,) in self.db.execute("SELECT data FROM _cloudsync_outbox WHERE tbl = ? AND row_key = ? AND"
                                       " action = 'increment' ORDER BY seq", (table, json.dumps(key))).fetchall():
            self._add_locally(table, json.loads(data))          # the server's value plus ours
        changed.setdefault(table, ([], []))[0].append(server_row)

    def _resolve(self, batch, answer, result):
        """A 409 Conflict: for each conflicting operation, what on_conflict decides (by default: the server's row
        is taken and the operation kept as a dead letter); the rest goes out again as a new batch."""
        changed = {}
        with self._transaction():
            for conflict in answer["conflicts"]:
                table, server_row = conflict["table"], conflict["server_row"]
                key = self._key(table, conflict["key"])
                seq, operation = batch[conflict["op"]]
                # pending increments are not resolved away: they never conflict, and still count
                later = self.db.execute("SELECT seq, action, data FROM _cloudsync_outbox WHERE tbl = ? AND"
                                        " row_key = ? AND seq <> ? AND action <> 'increment' ORDER BY seq",
                                        (table, json.dumps(key), seq))
                # by index (always progress), and by key: later operations on the row would only conflict again
                operations = [(seq, operation)] + [(number, {"table": table, "action": action,
                                                             "data": json.loads(data)})
                                                   for number, action, data in later.fetchall()]
                choice = self.on_conflict(operation, server_row) if self.on_conflict else None
                for number, _ in operations:
                    self.db.execute("DELETE FROM _cloudsync_outbox WHERE seq = ?", (number,))
                if choice == "mine":
                    # the device's row as it is now goes over the server's (or its absence, for a delete);
                    # a column with increments still pending is left to them (sent, it would count twice)
                    mine = self.get(table, dict(zip(self.tables[table][1], key)))
                    for (data,) in self.db.execute(
                            "SELECT data FROM _cloudsync_outbox WHERE tbl = ? AND row_key = ? AND"
                            " action = 'increment'", (table, json.dumps(key))).fetchall():
                        for name in json.loads(data):
                            if mine is not None and name not in self.tables[table][1]:
                                mine.pop(name, None)
                    self._queue(table, "delete" if mine is None else "upsert",
                                dict(zip(self.tables[table][1], key)) if mine is None else mine, force=True)
                else:
                    if server_row is None:
                        self._remove(table, dict(zip(self.tables[table][1], key)))
                    else:
                        self._put(table, server_row)
                        for (data,) in self.db.execute(
                                "SELECT data FROM _cloudsync_outbox WHERE tbl = ? AND row_key = ? AND"
                                " action = 'increment' ORDER BY seq", (table, json.dumps(key))).fetchall():
                            self._add_locally(table, json.loads(data))     # the server's value plus ours
                    changed.setdefault(table, ([], []))[0 if server_row is not None else 1].append(
                        server_row if server_row is not None else conflict["key"])
                    if isinstance(choice, dict):        # a merged row: sent over the server's one
                        merged = self._local_form(table, choice)
                        self._upsert_locally(table, merged, [n for n in merged if n not in self.tables[table][1]])
                        self._queue(table, "upsert", merged, force=True)
                    elif choice is None:
                        for _, kept in operations:
                            self._bury(kept, 409, dict(conflict, error="Conflict",
                                                       detail="changed on the server since this device pulled"),
                                       result)
                result.conflicts.append(conflict)
            self._unmark()                          # the rest goes out as a new batch
        self._changed(changed)

    # -- staying in sync --------------------------------------------------------------

    def run_forever(self, wait=25, stop=None, max_backoff=60):
        """Keep this device in sync until `stop` (a threading.Event) is set, or stop() is called.

        Long-polls the server (pulls that wait up to `wait` seconds for a change), so a change
        elsewhere arrives within about a second; pushes the outbox as soon as the app writes (a
        thread of its own). After a failure it waits, longer each time (up to `max_backoff`
        seconds, with jitter: a fleet coming back does not return all at once). A SyncError
        (a refusal that retrying cannot fix) ends the loop by raising it. It returns within a
        second of stop() (or of `stop` being set and stop() called), a push in progress
        finished first.
        """
        self._stop = stop = stop or threading.Event()
        pusher = threading.Thread(target=self._push_when_written, args=(stop,), name="cloudsync-client-push",
                                  daemon=True)
        pusher.start()
        failures, first = 0, None
        try:
            while not stop.is_set():
                result = self.sync(first)
                first = None
                if result.offline:
                    failures += 1
                    stop.wait(min(max_backoff, 0.5 * 2 ** min(failures, 16)) * random.uniform(0.5, 1.5))
                    continue
                failures = 0
                since = self.checkpoint
                if since is None:
                    continue
                answer = self._long_poll({"device_id": self.device_id, "tables": list(self.tables), "since": since,
                                          "limit": self.pull_limit, "wait": wait}, timeout=wait + 15)
                if stop.is_set():
                    break
                if answer[0] == 200 and answer[1].get("retry_after"):
                    stop.wait(answer[1]["retry_after"] * random.uniform(0.5, 1.5))   # the server is full
                first = (since, answer)             # the next sync stores it, if nothing moved meanwhile
        finally:
            stop.set()
            self._written.set()
            pusher.join()

    def stop(self):
        """End run_forever within a second, even during a long poll (a push in progress ends
        first: it is never cut)."""
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
            self._written.set()
            polling = self._polling
            sock = getattr(polling, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)     # the waiting pull returns at once
                except OSError:
                    pass                                # it just ended

    def _push_when_written(self, stop):
        """run_forever's other thread: push as soon as the app writes."""
        while not stop.is_set():
            self._written.wait()
            self._written.clear()
            if stop.is_set():
                return
            try:
                self.sync()
            except SyncError:
                log.warning("push refused; run_forever's own sync reports it", exc_info=True)
            except Exception:
                log.warning("push failed; tried again at the next write or sync", exc_info=True)

    def _changed(self, changed):
        if self.on_change:
            for table, (upserted, deleted) in changed.items():
                self.on_change(table, upserted, deleted)

    def _pull(self, result, first=None):
        tables = list(self.tables)
        while True:
            since = None if self._state("reset") else self.checkpoint
            if first is not None and since is not None and first[0] == since:
                status, answer = first[1]           # a long poll's answer, for this very checkpoint
            else:
                status, answer = self._post("/sync/pull", {"device_id": self.device_id, "tables": tables,
                                                           "since": since, "limit": self.pull_limit})
            first = None
            error = (answer or {}).get("error")
            if since is not None and (status == 410 or (status == 400 and error == "Invalid checkpoint")):
                again = (answer or {}).get("reset_tables")
                if again and answer.get("checkpoint"):
                    # only these tables start again: emptied here, and the checkpoint goes on with them
                    log.warning("checkpoint refused (%s): pulling %s again", error, ", ".join(again))
                    with self._transaction():
                        for table in again:
                            if table in self.tables:
                                self._wipe(table)
                        self._set_state("checkpoint", answer["checkpoint"])
                    continue
                log.warning("checkpoint refused (%s): pulling every row again", error)
                with self._transaction():
                    self._set_state("reset", "1")
                continue
            if status != 200:
                if status is None or status >= 500 or status == 429:
                    return self._offline(result, "pull", status)
                raise SyncError("pull refused: %s %s: %s" % (status, error, (answer or {}).get("detail")))
            if answer.get("added_columns"):
                self._add_columns(answer["added_columns"])
            if self._learn_columns(answer["changes"]):
                continue
            changed = {}
            with self._transaction():
                if since is None:
                    # from scratch: rows deleted meanwhile are never listed, so start from an empty copy
                    for table in tables:
                        self._wipe(table)
                    self._set_state("reset", None)
                for table, change in answer["changes"].items():
                    for row in change["upserted"]:
                        self._put(table, row)
                    for key in change["deleted"]:
                        self._remove(table, key)
                    result.pulled += len(change["upserted"]) + len(change["deleted"])
                    if change["upserted"] or change["deleted"]:
                        changed[table] = self._rebase(table, change["upserted"], change["deleted"])
                self._set_state("checkpoint", answer["checkpoint"])
            self._changed(changed)
            if not answer["has_more"]:
                result.up_to_date = True
                return True
