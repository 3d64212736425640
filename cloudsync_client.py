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
- ``_cloudsync_state``: the pull checkpoint per table set, stored in the same
  transaction as the pulled rows, so a crash never skips or doubles a change.

``sync()`` pushes first, then pulls. Guarantees:

- Rows are pulled only while the outbox is empty, so a pull never overwrites
  a local change that the server has not seen yet.
- Conflicts: the server wins. A push carries the device's checkpoint; when the
  server answers 409 Conflict, every outbox operation on a conflicting row is
  dropped, the row takes the server's value (``server_row``; null: deleted),
  and the remaining operations are pushed with a new batch id.
- An operation the server refuses for itself (4xx naming one operation) is
  dropped with a warning, so the device is never blocked; the tables are then
  pulled again from scratch, because the local row holds what the server refused.
- 5xx answers and network errors stop the sync (``sync()`` returns False); the
  next sync sends the same batch again.
- 410 (checkpoint expired): the rest of the outbox is pushed without conflict
  detection (the device's changes win), then the tables are wiped and pulled
  again from ``since: null``.
"""

import contextlib
import gzip
import json
import logging
import sqlite3
import urllib.error
import urllib.request
import uuid

__all__ = ["Client", "SyncError"]

log = logging.getLogger("cloudsync_client")

# Errors the server gives for one operation of a push; only these may drop an operation.
# (Validation errors name the operation only in `detail`, so without an `op` field the
# client isolates it by pushing one operation at a time.)
PER_OPERATION_ERRORS = {"Invalid operation", "Invalid table", "Invalid action", "Unknown column", "Missing key",
                        "Invalid value", "Value too large", "Sync failed", "Read-only table", "Table not permitted",
                        "Payload too large"}     # (the last: one operation alone is over the body limit)


class SyncError(Exception):
    """The server refused the sync for a reason retrying will not fix (token, device id, configuration)."""


def _quote(name):
    return '"%s"' % name.replace('"', '""')


class Client:
    """One device: a local SQLite store of `tables`, synced with a cloudsync server at `url`."""

    def __init__(self, path, url, tables, device_id, token=None, batch_size=500, pull_limit=1000, timeout=30):
        # tables: {name: (columns, primary-key columns)}, in a fixed order (a checkpoint belongs to one list)
        self.url, self.device_id, self.token = url.rstrip("/"), device_id, token
        self.tables = {name: (list(columns), list(key)) for name, (columns, key) in tables.items()}
        self.batch_size, self.pull_limit, self.timeout = batch_size, pull_limit, timeout
        self.last_report = None         # what the last sync() did: pushed, conflicts, dropped, pulled
        self.db = sqlite3.connect(path, isolation_level=None)     # transactions are explicit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")                  # a committed batch id survives a power cut
        with self._transaction():
            for name, (columns, key) in self.tables.items():
                # untyped columns: values stay exactly as the server sends them ("12.50" stays text)
                self.db.execute("CREATE TABLE IF NOT EXISTS %s (%s, PRIMARY KEY (%s))" % (
                    _quote(name), ", ".join(map(_quote, columns)), ", ".join(map(_quote, key))))
            self.db.execute("CREATE TABLE IF NOT EXISTS _cloudsync_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                            " tbl TEXT NOT NULL, action TEXT NOT NULL, row_key TEXT NOT NULL, data TEXT NOT NULL,"
                            " batch_id TEXT)")
            self.db.execute("CREATE TABLE IF NOT EXISTS _cloudsync_state (name TEXT PRIMARY KEY, value TEXT)")

    def close(self):
        """Close the local database."""
        self.db.close()

    # -- local store ------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _key(self, table, key):
        """A key (value, dict of key columns, or row) as the list of key values."""
        names = self.tables[table][1]
        if isinstance(key, dict):
            return [key[name] for name in names]
        if len(names) != 1:
            raise ValueError("table %s has a composite key: pass {column: value}" % table)
        return [key]

    def _where(self, table):
        return " AND ".join("%s = ?" % _quote(name) for name in self.tables[table][1])

    def _put(self, table, row):
        columns = [name for name in row if name in self.tables[table][0]]   # ignore columns unknown here
        self.db.execute("INSERT OR REPLACE INTO %s (%s) VALUES (%s)" % (
            _quote(table), ", ".join(map(_quote, columns)), ", ".join("?" for _ in columns)),
            [row[name] for name in columns])

    def _remove(self, table, key):
        self.db.execute("DELETE FROM %s WHERE %s" % (_quote(table), self._where(table)), self._key(table, key))

    def _queue(self, table, action, data):
        key = json.dumps(self._key(table, data))
        self.db.execute("INSERT INTO _cloudsync_outbox (tbl, action, row_key, data) VALUES (?, ?, ?, ?)",
                        (table, action, key, json.dumps(data)))

    def insert(self, table, row):
        """Insert a row locally and queue it for the server."""
        with self._transaction():
            columns = list(row)
            self.db.execute("INSERT INTO %s (%s) VALUES (%s)" % (
                _quote(table), ", ".join(map(_quote, columns)), ", ".join("?" for _ in columns)), list(row.values()))
            self._queue(table, "insert", row)

    def update(self, table, key, changes):
        """Set `changes` on the row with `key` locally and queue it; LookupError if the row is not here."""
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
        names = [name for name in row if name not in self.tables[table][1]]
        with self._transaction():
            self.db.execute("INSERT INTO %s (%s) VALUES (%s) ON CONFLICT DO %s" % (
                _quote(table), ", ".join(map(_quote, row)), ", ".join("?" for _ in row),
                "UPDATE SET " + ", ".join("%s = excluded.%s" % (_quote(n), _quote(n)) for n in names)
                if names else "NOTHING"), list(row.values()))
            self._queue(table, "upsert", row)

    def delete(self, table, key):
        """Delete the row with `key` locally and queue the delete."""
        with self._transaction():
            self._remove(table, key)
            self._queue(table, "delete", dict(zip(self.tables[table][1], self._key(table, key))))

    def rows(self, table):
        """Every local row of `table` as dicts, in key order."""
        cursor = self.db.execute("SELECT * FROM %s ORDER BY %s" % (
            _quote(table), ", ".join(map(_quote, self.tables[table][1]))))
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def pending(self):
        """How many local operations the server has not acknowledged yet."""
        return self.db.execute("SELECT COUNT(*) FROM _cloudsync_outbox").fetchone()[0]

    # -- state ------------------------------------------------------------------

    def _state(self, name):
        row = self.db.execute("SELECT value FROM _cloudsync_state WHERE name = ?",
                              (name + " " + json.dumps(list(self.tables)),)).fetchone()
        return row[0] if row else None

    def _set_state(self, name, value):
        self.db.execute("INSERT OR REPLACE INTO _cloudsync_state (name, value) VALUES (?, ?)",
                        (name + " " + json.dumps(list(self.tables)), value))

    @property
    def checkpoint(self):
        """The stored pull position for this client's table list (None: pull everything)."""
        return self._state("checkpoint")

    # -- HTTP -------------------------------------------------------------------

    def _post(self, path, body):
        """POST JSON; return (status, answer), or (None, None) when the server could not be reached."""
        headers = {"Content-Type": "application/json", "Accept-Encoding": "gzip"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        request = urllib.request.Request(self.url + path, json.dumps(body).encode("utf-8"), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, encoding, raw = response.status, response.headers.get("Content-Encoding"), response.read()
        except urllib.error.HTTPError as error:
            status, encoding, raw = error.code, error.headers.get("Content-Encoding"), error.read()
        except OSError as error:                    # refused, reset, timed out: the answer may be lost
            log.warning("%s: %s; will retry", path, error)
            return None, None
        try:
            return status, json.loads(gzip.decompress(raw) if encoding == "gzip" else raw)
        except ValueError:                          # a proxy's HTML error page, a cut-off body
            return (status if status >= 500 else None), None

    # -- sync -------------------------------------------------------------------

    def sync(self):
        """Push the outbox, then pull until up to date; True when done, False when it must be retried later."""
        report = {"pushed": 0, "conflicts": [], "dropped": [], "pulled": 0}
        self.last_report = report
        return self._push(report) and self._pull(report)

    def _batch(self, size):
        """The pending batch (batch_id, [(seq, operation)]), marked in the local DB before it is sent."""
        with self._transaction():
            rows = self.db.execute("SELECT seq, tbl, action, data, batch_id FROM _cloudsync_outbox"
                                   " WHERE batch_id IS NOT NULL ORDER BY seq").fetchall()
            if not rows:
                batch_id = str(uuid.uuid4())
                self.db.execute("UPDATE _cloudsync_outbox SET batch_id = ? WHERE seq IN (SELECT seq FROM"
                                " _cloudsync_outbox ORDER BY seq LIMIT ?)", (batch_id, size))
                rows = self.db.execute("SELECT seq, tbl, action, data, batch_id FROM _cloudsync_outbox"
                                       " WHERE batch_id = ? ORDER BY seq", (batch_id,)).fetchall()
        if not rows:
            return None, []
        return rows[0][4], [(seq, {"table": tbl, "action": action, "data": json.loads(data)})
                            for seq, tbl, action, data, _ in rows]

    def _unmark(self):
        """Forget the pending batch id: its operations go out again under a new one (only when not applied)."""
        self.db.execute("UPDATE _cloudsync_outbox SET batch_id = NULL")

    def _push(self, report):
        size = self.batch_size
        while True:
            batch_id, batch = self._batch(size)
            if not batch:
                return True
            checkpoint = self.checkpoint
            body = {"device_id": self.device_id, "batch_id": batch_id, "on_conflict": "abort",
                    "operations": [operation for _, operation in batch]}
            if checkpoint is not None:      # without one the server cannot detect conflicts
                body["checkpoint"] = checkpoint
            status, answer = self._post("/sync/push", body)
            error = (answer or {}).get("error")
            if status == 200:
                with self._transaction():
                    self.db.execute("DELETE FROM _cloudsync_outbox WHERE batch_id = ?", (batch_id,))
                    # README: the returned checkpoint is the next pull position; it skips the push's own
                    # changes only when the server proved this device holds them (the local table does)
                    if checkpoint is not None and answer.get("checkpoint"):
                        self._set_state("checkpoint", answer["checkpoint"])
                report["pushed"] += len(batch)
            elif status == 409 and error == "Conflict":
                self._take_server_rows(batch, answer["conflicts"], report)
            elif status == 410 or (status == 400 and error == "Invalid checkpoint"):
                # unpushed changes can no longer be checked for conflicts: push them plainly (same batch
                # id: it may have been applied already), then pull everything again
                log.warning("checkpoint refused (%s): pushing without conflict detection, then resyncing", error)
                with self._transaction():
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
                log.warning("server refused %s on %s (%s: %s); dropped", operation["action"], operation["table"],
                            error, answer.get("detail"))
                report["dropped"].append(dict(operation, error=error))
                with self._transaction():
                    self.db.execute("DELETE FROM _cloudsync_outbox WHERE seq = ?", (seq,))
                    self._unmark()
                    self._set_state("reset", "1")   # the local row holds what the server refused
            elif status is None or status >= 500 or status == 429:
                log.warning("push failed (%s %s); batch %s is kept for the next sync", status, error, batch_id)
                return False
            else:
                raise SyncError("push refused: %s %s: %s" % (status, error, (answer or {}).get("detail")))

    def _take_server_rows(self, batch, conflicts, report):
        """Server wins: drop every queued operation on a conflicting row and store the server's row."""
        with self._transaction():
            for conflict in conflicts:
                table, server_row = conflict["table"], conflict["server_row"]
                key = self._key(table, conflict["key"])
                # by index (always progress), and by key: later operations on the row would only conflict again
                self.db.execute("DELETE FROM _cloudsync_outbox WHERE seq = ? OR (tbl = ? AND row_key = ?)",
                                (batch[conflict["op"]][0], table, json.dumps(key)))
                if server_row is None:
                    self._remove(table, dict(zip(self.tables[table][1], key)))
                else:
                    self._put(table, server_row)
                report["conflicts"].append(conflict)
            self._unmark()                          # the rest goes out as a new batch

    def _pull(self, report):
        tables = list(self.tables)
        while True:
            since = None if self._state("reset") else self.checkpoint
            status, answer = self._post("/sync/pull", {"tables": tables, "since": since, "limit": self.pull_limit})
            error = (answer or {}).get("error")
            if since is not None and (status == 410 or (status == 400 and error == "Invalid checkpoint")):
                log.warning("checkpoint refused (%s): pulling every row again", error)
                with self._transaction():
                    self._set_state("reset", "1")
                continue
            if status != 200:
                if status is None or status >= 500 or status == 429:
                    return False
                raise SyncError("pull refused: %s %s: %s" % (status, error, (answer or {}).get("detail")))
            with self._transaction():
                if self.pending():
                    return False                    # a local write came in since the push: push it first
                if since is None:
                    # from scratch: rows deleted meanwhile are never listed, so start from an empty copy
                    for table in tables:
                        self.db.execute("DELETE FROM %s" % _quote(table))
                    self._set_state("reset", None)
                for table, change in answer["changes"].items():
                    for row in change["upserted"]:
                        self._put(table, row)
                    for key in change["deleted"]:
                        self._remove(table, key)
                    report["pulled"] += len(change["upserted"]) + len(change["deleted"])
                self._set_state("checkpoint", answer["checkpoint"])
            if not answer["has_more"]:
                return True
