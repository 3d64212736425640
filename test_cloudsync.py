"""Tests for cloudsync: every behaviour on both backends, fresh databases per test.

MySQL/MariaDB tests use CLOUDSYNC_TEST_DB_HOST/PORT/USER/PASS (default
127.0.0.1:3306, root, empty password) and create a throwaway database per
test. Without a server they skip, unless CLOUDSYNC_REQUIRE_MYSQL=1.

Contents, in the order of the banners below (a test keeps this list true):
first what every section needs, then one section for each section of
cloudsync.py, in its order (a test goes where its main subject is), then what
spans the whole system: the reference clients, faults, benchmarks, Galera.
   1. Fixtures and helpers: fresh databases on both backends, requests, devices, live servers
   2. Constants and errors
   3. .env parser
   4. Logs
   5. Identifiers and values
   6. Authentication
   7. Grants and row scopes: what one request may read and write
   8. Binding: client values as their column's type
   9. Checkpoints
  10. Configuration
  11. SQL builders, compared as text (no database)
  12. Private APIs, each with its public fallback
  13. Database layer
  14. Change capture
  15. Sync engine: the tables and their rows, the live schema
  16. Long polls: one watcher per instance
  17. Push
  18. Pull
  19. Operations: metrics, device fleet
  20. HTTP application
  21. Command line, and workers
  22. Data: cloudsync's own tables, metric help, the API description
  23. The reference client (cloudsync_client.py) against a live server
  24. The JavaScript client and the web till: Node's test runner, headless Chromium
  25. Reliability: faults and load against live servers (a private MariaDB)
  26. Benchmarks: smoke runs so that the scripts cannot rot (figures are not checked)
  27. Galera: a cluster of three MariaDB nodes

No test reads the checkout's .env, tokens file or the environment's
cloudsync settings (the autouse fixture _hermetic).
"""

import argparse
import atexit
import base64
import bisect
import collections
import gzip
import hashlib
import http.client
import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import wsgiref.util
import wsgiref.validate

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import cloudsync
import cloudsync_client
import reliability_cloudsync

HERE = os.path.dirname(os.path.abspath(__file__))
MYSQL = {
    "host": os.environ.get("CLOUDSYNC_TEST_DB_HOST", "127.0.0.1"),
    "port": int(os.environ.get("CLOUDSYNC_TEST_DB_PORT", "3306")),
    "user": os.environ.get("CLOUDSYNC_TEST_DB_USER", "root"),
    "password": os.environ.get("CLOUDSYNC_TEST_DB_PASS", ""),
}
REQUIRE_MYSQL = os.environ.get("CLOUDSYNC_REQUIRE_MYSQL") == "1"

# Extra tables beside the example schema: a composite key, binary data, a
# table without a primary key, and one with a CHECK constraint.
EXTRA_MYSQL = """
CREATE TABLE stock_moves (shop VARCHAR(20), sku VARCHAR(20), qty INT NOT NULL, PRIMARY KEY (shop, sku)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
CREATE TABLE attachments (id INT AUTO_INCREMENT PRIMARY KEY, body BLOB, taken_on DATE) ENGINE=InnoDB;
CREATE TABLE no_key (id INT, note TEXT) ENGINE=InnoDB;
"""
EXTRA_SQLITE = """
CREATE TABLE stock_moves (shop TEXT, sku TEXT, qty INTEGER NOT NULL, PRIMARY KEY (shop, sku));
CREATE TABLE attachments (id INTEGER PRIMARY KEY, body BLOB, taken_on DATE);
CREATE TABLE no_key (id INTEGER, note TEXT);
"""
TABLES = cloudsync.EXAMPLE_TABLES + ("stock_moves", "attachments")


# ---------------------------------------------------------------------------
# Fixtures and helpers: fresh databases on both backends, requests, devices, live servers
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _hermetic(tmp_path_factory, monkeypatch):
    """No test reads the operator's settings: each runs in an empty directory of its own (no .env,
    tokens file or SQLite file of the checkout: README's `cp sample.env .env` changes nothing), with
    no cloudsync setting in its environment."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    for name in cloudsync.SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _root_logging_as_it_was():
    """cloudsync.main() points the root logger at the stderr of its test (configure_logging),
    which pytest closes after it: every test leaves the root logger as it found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _mysql_connect(database=None):
    import mysql.connector
    return mysql.connector.connect(database=database, autocommit=True, charset="utf8mb4",
                                   connection_timeout=3, **MYSQL)


@pytest.fixture(scope="session")
def mysql_server():
    """Connection settings for a reachable MySQL/MariaDB, or a skip (a failure when required)."""
    try:
        _mysql_connect().close()
    except Exception as error:
        reason = "MySQL/MariaDB not reachable at %(host)s:%(port)s" % MYSQL + " (%s)" % error
        if REQUIRE_MYSQL:
            pytest.fail(reason + " and CLOUDSYNC_REQUIRE_MYSQL=1")
        pytest.skip(reason)
    yield MYSQL
    _MYSQL_POOL.close()         # the pool's databases dropped, and every drop done


class Backend:
    """A fresh database with the example tables, and a second connection to it."""

    pool_key = admin = first = None     # a MySQL database of _MYSQL_POOL: its key, connection, snapshot

    def __init__(self, kind, settings, raw_connect, cleanup):
        self.kind = kind
        self.settings = settings
        self._raw_connect = raw_connect
        self._cleanup = cleanup
        self._conn = None

    def config(self, **overrides):
        """A Config for this database; overrides are setting names."""
        values = dict(self.settings, ALLOWED_TABLES=",".join(TABLES), TOKENS_FILE="")
        values.update(overrides)
        return cloudsync.load_config(env_file=None, environ={}, overrides=values)

    def sql(self, statement, params=()):
        """Run SQL on an outside connection (another program writing to the database)."""
        if self._conn is None:
            self._conn = self._raw_connect()
        if self.kind == "mysql":
            cursor = self._conn.cursor()
            cursor.execute(statement.replace("?", "%s"), params)
            rows = cursor.fetchall() if cursor.with_rows else []
            cursor.close()
            return rows
        return self._conn.execute(statement, params).fetchall()

    def rows(self, table):
        """Every row of a table, in key order, as tuples."""
        return [tuple(row) for row in self.sql("SELECT * FROM %s ORDER BY 1, 2" % table)]

    def close(self):
        if self._conn is not None:
            self._conn.close()
        self._cleanup()


def _ram_directory():
    """A directory of this session on a RAM file system (/dev/shm when it is a tmpfs), removed when the
    session ends; None when there is none."""
    global _RAM_ROOT
    if _RAM_ROOT is None:
        _RAM_ROOT = ""
        try:
            with open("/proc/mounts") as mounts:
                ram = any(fields[1:3] == ["/dev/shm", "tmpfs"] for fields in (line.split() for line in mounts))
            if ram and os.access("/dev/shm", os.W_OK):
                _RAM_ROOT = tempfile.mkdtemp(prefix="cloudsync-tests-", dir="/dev/shm")
                atexit.register(_remove_ram_directory, _RAM_ROOT, os.getpid())
        except OSError:
            pass
    return _RAM_ROOT or None


def _remove_ram_directory(path, pid):
    if os.getpid() == pid:      # not in a process a test forked (a worker), which exits before the session
        shutil.rmtree(path, True)


_RAM_ROOT = None


def _fresh_database(kind, statements, directory, request, pooled=False):
    """A new database holding `statements`, as a Backend: a SQLite file, or a MySQL database.

    The SQLite file is in a directory of its own on a RAM file system when there is one (else in
    `directory`): cloudsync's synchronous=FULL makes each commit an fsync, and on a disk those were
    most of the SQLite tests' time; no test can see where the file is but through DB_PATH.
    `pooled`: a MySQL database the `app` fixture starts at once, with nothing else run on it
    before; it may come from _MYSQL_POOL (see there: what it guarantees), as a database that
    cloudsync already migrated with the `app` fixture's settings. Any other is made here and dropped.
    """
    if kind == "sqlite":
        ram = _ram_directory()
        home = tempfile.mkdtemp(prefix="db-", dir=ram) if ram else str(directory)
        path = os.path.join(home, "test.db")
        conn = sqlite3.connect(path)
        for statement in statements:
            conn.execute(statement)
        conn.commit()
        conn.close()
        return Backend("sqlite", {"DB_HOST": "", "DB_PATH": path}, lambda: sqlite3.connect(path, isolation_level=None),
                       (lambda: shutil.rmtree(home, True)) if ram else (lambda: None))
    request.getfixturevalue("mysql_server")
    key = tuple(statements) if pooled else None
    taken = _MYSQL_POOL.take(key) if pooled else None
    if taken is not None:
        name, admin, first = taken
    else:
        name, first = "cloudsync_test_%s" % uuid.uuid4().hex[:12], None
        admin = _mysql_connect()
        cursor = admin.cursor()
        cursor.execute("CREATE DATABASE %s CHARACTER SET utf8mb4" % name)
        cursor.execute("USE %s" % name)
        for statement in statements:
            cursor.execute(statement)
        cursor.close()

    def done():
        if made.admin is None:
            return                  # closed already
        made.admin = None
        if made.first is None or not _MYSQL_POOL.give_back(key, name, admin, made.first):
            _MYSQL_POOL.drop(name, admin)
    made = Backend("mysql", {"DB_HOST": MYSQL["host"], "DB_PORT": str(MYSQL["port"]), "DB_USER": MYSQL["user"],
                             "DB_PASS": MYSQL["password"], "DB_NAME": name}, lambda: _mysql_connect(name), done)
    made.pool_key, made.admin, made.first = key, admin, first
    return made


class _MySQLPool:
    """MySQL databases the `app` fixture uses again, test after test; and DROP DATABASE on a thread.

    A database is pooled under the statements that made it, and only for the `app` fixture ("the
    WSGI app on the fresh database, started": the example tables, App(backend.config()).start(),
    nothing run on the database before that start: `_app_starts_it_first`). What a test that takes
    one gets is the database a fresh one would be right after that first start:

    - it was made by CREATE DATABASE and exactly these statements, and started once by cloudsync
      with the same default settings; App.start() on it again changes nothing in it (its triggers
      and tables are there as it made them, and their identities as it recorded them);
    - its structure (tables, columns, indexes, foreign keys, checks, views, routines, events,
      triggers with their statements, modes and creation times, the InnoDB table ids) is the one
      right after that first start, or it is not used again: a test's ALTER, DROP, TRUNCATE or
      trigger made again gets the database dropped at its end;
    - every row of every table is what it was right after that first start: the rows of the
      example tables deleted (FOREIGN_KEY_CHECKS=0: no cascade), then cloudsync's own tables
      emptied (after: the example tables' deletes fire its triggers) and their rows of right after
      the first start put back from a snapshot, in one transaction; then each AUTO_INCREMENT
      counter back to its value then (ALTER TABLE t AUTO_INCREMENT, which keeps the table's id;
      never TRUNCATE, which cloudsync sees, by the server's count and the table ids, as a table
      whose history starts again), so cloudsync_pending ids and seq numbers start as on a fresh one;
    - no connection of the last test is left on it (if one is, it is dropped instead), and the
      connection the fixture holds meanwhile is, as for a fresh database, one idle connection
      whose default database it is.

    What is not as on a fresh database, and what no test can tell but by remembering an earlier
    test: the database's name, cloudsync's random instance id and secret, the times the catalogue
    keeps (a table's CREATE_TIME, which the counter reset moves, a trigger's CREATED), the time
    cloudsync recorded with each table's identity, and InnoDB's row-count statistics. Every other
    database (a test's own statements, other fixtures, other settings, SQLite) is made fresh.

    Drops run on a thread of their own, so no teardown waits for one; the session's end drops the
    databases of the pool and waits for every drop (nothing is left behind but by a killed run).
    """

    def __init__(self):
        self._idle = collections.defaultdict(list)     # key -> [(name, admin connection, snapshot)]
        self._lock = threading.Lock()
        self._drops = []
        self._dropper = None
        self._failures = []
        self._closed = False
        self.counts = collections.Counter()     # databases made, reused, and why one was not given back

    def take(self, key):
        """(name, admin connection, snapshot) of an idle database made for `key`, or None."""
        with self._lock:
            if self._idle[key]:
                self.counts["reused"] += 1
                return self._idle[key].pop()
        self.counts["made"] += 1
        return None

    @staticmethod
    def catalogue(cursor):
        """The structure of the connection's database, as sorted rows of information_schema, with the
        InnoDB table ids and the triggers' creation times (what cloudsync takes a table's identity from)."""
        found = []
        for columns, table, where in _CATALOGUE:
            cursor.execute("SELECT %s FROM information_schema.%s WHERE %s = DATABASE()" % (columns, table, where))
            found.append(sorted(map(tuple, cursor.fetchall()), key=repr))
        cursor.execute("SELECT NAME, TABLE_ID FROM information_schema.INNODB_SYS_TABLES"
                       " WHERE NAME LIKE CONCAT(REPLACE(DATABASE(), '_', '\\_'), '/%')")
        found.append(sorted(map(tuple, cursor.fetchall()), key=repr))
        return found

    def snapshot(self, made):
        """What the pool keeps of a database right after the first start: its structure, its base
        tables, cloudsync's rows, the AUTO_INCREMENT counters."""
        cursor = made.admin.cursor()
        structure = self.catalogue(cursor)
        cursor.execute("SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES"
                       " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE'")
        counters = dict(cursor.fetchall())
        rows = {}
        for table in counters:
            cursor.execute("SELECT * FROM `%s`" % table)
            held = cursor.fetchall()
            if held:
                rows[table] = ([column[0] for column in cursor.description], held)
        cursor.close()
        # cloudsync's tables emptied last: deleting the example tables' rows fires its triggers
        tables = sorted(counters, key=lambda table: (table.startswith("cloudsync_"), table))
        return {"structure": structure, "tables": tables, "rows": rows, "counters": counters}

    def give_back(self, key, name, admin, first):
        """Put the database back as it was right after its first start, and keep it for the next
        test: True; False (the caller drops it) when its structure is not the same any more, a
        connection is left on it, or anything fails."""
        try:
            cursor = admin.cursor()
            for _ in range(40):         # the test's connections close (COM_QUIT) as the server gets to it
                cursor.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                               " WHERE DB = DATABASE() AND ID <> CONNECTION_ID()")
                if cursor.fetchall()[0][0] == 0:
                    break
                time.sleep(0.005)
            else:
                self.counts["left connected"] += 1
                return False
            if self.catalogue(cursor) != first["structure"]:
                self.counts["changed"] += 1
                return False
            tables = first["tables"]
            cursor.execute(" UNION ALL ".join("SELECT '%s', EXISTS (SELECT 1 FROM `%s`)" % (table, table)
                                              for table in tables))
            held = {table for table, some in cursor.fetchall() if some}
            cursor.execute("SET SESSION FOREIGN_KEY_CHECKS = 0")
            cursor.execute("START TRANSACTION")
            try:
                for table in tables:
                    if table in held or table.startswith("cloudsync_"):
                        cursor.execute("DELETE FROM `%s`" % table)
                for table, (columns, rows) in first["rows"].items():
                    cursor.executemany("INSERT INTO `%s` (%s) VALUES (%s)" % (
                        table, ", ".join("`%s`" % column for column in columns), ", ".join(["%s"] * len(columns))),
                        rows)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            finally:
                cursor.execute("SET SESSION FOREIGN_KEY_CHECKS = 1")
            cursor.execute("SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES"
                           " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE'")
            for table, counter in cursor.fetchall():
                if counter != first["counters"].get(table):
                    cursor.execute("ALTER TABLE `%s` AUTO_INCREMENT = %d" % (table, first["counters"][table]))
            cursor.close()
        except Exception as error:
            self.counts["failed: %s" % type(error).__name__] += 1
            return False
        with self._lock:
            self._idle[key].append((name, admin, first))
        return True

    def drop(self, name, admin):
        """Drop a database on the dropping thread (at once after close: at the session's end)."""
        try:
            admin.close()
        except Exception:
            pass
        with self._lock:
            self._drops.append(name)
            now = self._closed
            if not now and self._dropper is None:
                self._dropper = threading.Thread(target=self._drop_all, name="drop-test-databases", daemon=True)
                self._dropper.start()
        if now:
            self._drop_all()

    def _drop_all(self):
        conn = None
        while True:
            with self._lock:
                if not self._drops:
                    self._dropper = None
                    break
                name = self._drops.pop(0)
            try:
                conn = conn or _mysql_connect()
                conn.cursor().execute("DROP DATABASE IF EXISTS %s" % name)
            except Exception as error:
                self._failures.append("%s: %s" % (name, error))
                conn = None
        if conn is not None:
            conn.close()

    def close(self):
        """Drop the idle databases, and wait until every drop is done."""
        with self._lock:
            self._closed = True
            idle = [entry for entries in self._idle.values() for entry in entries]
            self._idle.clear()
        for name, admin, _ in idle:
            self.drop(name, admin)
        while True:
            with self._lock:
                dropper = self._dropper
            if dropper is None:
                break
            dropper.join()
        assert not self._failures, "test databases not dropped: %s" % self._failures


# what _MySQLPool.catalogue compares: (columns, information_schema table, its column naming the database)
_CATALOGUE = [
    ("DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME", "SCHEMATA", "SCHEMA_NAME"),
    ("TABLE_NAME, TABLE_TYPE, ENGINE, ROW_FORMAT, TABLE_COLLATION, CREATE_OPTIONS, TABLE_COMMENT", "TABLES",
     "TABLE_SCHEMA"),
    ("TABLE_NAME, COLUMN_NAME, ORDINAL_POSITION, COLUMN_DEFAULT, IS_NULLABLE, COLUMN_TYPE, CHARACTER_SET_NAME,"
     " COLLATION_NAME, COLUMN_KEY, EXTRA, GENERATION_EXPRESSION, COLUMN_COMMENT", "COLUMNS", "TABLE_SCHEMA"),
    ("TABLE_NAME, INDEX_NAME, NON_UNIQUE, SEQ_IN_INDEX, COLUMN_NAME, COLLATION, SUB_PART, INDEX_TYPE,"
     " INDEX_COMMENT", "STATISTICS", "TABLE_SCHEMA"),
    ("CONSTRAINT_NAME, TABLE_NAME, REFERENCED_TABLE_NAME, UNIQUE_CONSTRAINT_NAME, UPDATE_RULE, DELETE_RULE",
     "REFERENTIAL_CONSTRAINTS", "CONSTRAINT_SCHEMA"),
    ("CONSTRAINT_NAME, TABLE_NAME, COLUMN_NAME, ORDINAL_POSITION, REFERENCED_TABLE_NAME, REFERENCED_COLUMN_NAME",
     "KEY_COLUMN_USAGE", "TABLE_SCHEMA"),
    ("CONSTRAINT_NAME, TABLE_NAME, CHECK_CLAUSE", "CHECK_CONSTRAINTS", "CONSTRAINT_SCHEMA"),
    ("TRIGGER_NAME, EVENT_MANIPULATION, EVENT_OBJECT_TABLE, ACTION_ORDER, ACTION_STATEMENT, ACTION_TIMING,"
     " CREATED, SQL_MODE, DEFINER, CHARACTER_SET_CLIENT, COLLATION_CONNECTION, DATABASE_COLLATION", "TRIGGERS",
     "TRIGGER_SCHEMA"),
    ("TABLE_NAME, VIEW_DEFINITION", "VIEWS", "TABLE_SCHEMA"),
    ("ROUTINE_NAME, ROUTINE_TYPE, ROUTINE_DEFINITION, CREATED, LAST_ALTERED", "ROUTINES", "ROUTINE_SCHEMA"),
    ("EVENT_NAME, EVENT_DEFINITION, STATUS, CREATED, LAST_ALTERED", "EVENTS", "EVENT_SCHEMA"),
]
_MYSQL_POOL = _MySQLPool()

# fixtures that run no code on a database, nor change what cloudsync does, before the `app` fixture's start
_HARMLESS_FIXTURES = {"app", "backend", "request", "tmp_path", "tmp_path_factory", "monkeypatch", "caplog",
                      "capsys", "capfd", "mysql_server", "_hermetic", "_root_logging_as_it_was"}


def _app_starts_it_first(request):
    """Whether the only thing run on this test's `backend` before the test is the `app` fixture's start:
    the test asks for `app`, and for no fixture but harmless ones and its own parameters."""
    if "app" not in request.fixturenames:
        return False
    fixtures = {name for name, value in globals().items() if isinstance(value, type(backend))}
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    return all(name in _HARMLESS_FIXTURES or (name in params and name not in fixtures)
               for name in request.fixturenames)


def _example_database(kind, directory, request, pooled=False):
    """A fresh database of this kind with the example tables and the extra test tables."""
    script = open(os.path.join(HERE, "schema-%s.sql" % kind)).read() + (EXTRA_SQLITE if kind == "sqlite" else EXTRA_MYSQL)
    return _fresh_database(kind, [statement for statement in script.split(";") if "CREATE" in statement],
                           directory, request, pooled)


@pytest.fixture(params=["sqlite", "mysql"])
def backend(request, tmp_path):
    """A fresh database on each backend with the example tables and the extra test tables (on MySQL,
    for the `app` fixture alone, one of _MYSQL_POOL)."""
    made = _example_database(request.param, tmp_path, request, pooled=_app_starts_it_first(request))
    yield made
    made.close()


def started(backend, **settings):
    """An App on the backend's database with these settings, started."""
    application = cloudsync.App(backend.config(**settings))
    application.start()
    return application


@pytest.fixture
def app(backend):
    """The WSGI app on the fresh database, started (on MySQL, a database of _MYSQL_POOL: as fresh)."""
    application = started(backend)
    if backend.kind == "mysql" and backend.pool_key is not None and backend.first is None:
        backend.first = _MYSQL_POOL.snapshot(backend)       # its first start: what the pool puts back
    yield application
    application.db.close()


def _not_json(name):
    raise AssertionError("the response holds %s, which is not JSON" % name)


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        """The body as strict JSON (RFC 8259): Infinity or NaN would fail here, as in JSON.parse."""
        return json.loads(self.body, parse_constant=_not_json)


def call(application, method, path, body=None, raw=None, headers=None, content_length=None):
    """Call the app through wsgiref's validator, without a socket."""
    data = raw if raw is not None else (json.dumps(body).encode("utf-8") if body is not None else b"")
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": io.BytesIO(data),
                    "CONTENT_LENGTH": str(len(data)) if content_length is None else content_length,
                    "CONTENT_TYPE": "application/json", "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1"})
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
    captured = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = dict(response_headers)
        return lambda chunk: None
    result = wsgiref.validate.validator(application)(environ, start_response)
    try:
        payload = b"".join(result)
    finally:
        result.close()
    return Response(captured["status"], captured["headers"], payload)


def push(application, operations, **fields):
    return call(application, "POST", "/sync/push", dict(fields, operations=operations))


def pull(application, **fields):
    return call(application, "POST", "/sync/pull", fields)


def op(action, table="sales", **data):
    return {"table": table, "action": action, "data": data}


def _call_unvalidated(application, method, path):
    """Call the app without wsgiref's validator (which warns on unusual methods)."""
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "wsgi.input": io.BytesIO(b""),
                    "CONTENT_LENGTH": "0", "REMOTE_ADDR": "127.0.0.1"})
    return b"".join(application(environ, lambda status, headers, exc_info=None: None))


class Device:
    """A device following the README's client loop, keeping rows by table and key."""

    def __init__(self, application, tables, limit=1000, device_id="device"):
        self.app = application
        self.tables = tables
        self.limit = limit
        self.device_id = device_id
        self.checkpoint = None
        self.rows = {table: {} for table in tables}
        self.pages = 0

    def key(self, table, row_or_key):
        names = self.app.engine.schemas[table].primary_key
        if isinstance(row_or_key, dict):
            return tuple(str(row_or_key[name]) for name in names)
        return (str(row_or_key),)

    def sync(self):
        while True:
            response = pull(self.app, tables=self.tables, since=self.checkpoint, limit=self.limit)
            if response.status == 410:          # as README says: empty what it names, go on
                body = response.json
                for table in body.get("reset_tables") or self.tables:
                    self.rows[table] = {}
                self.checkpoint = body.get("checkpoint") if body.get("reset_tables") else None
                self.resets = getattr(self, "resets", []) + [body.get("reset_tables")]
                continue
            assert response.status == 200, response.body
            body = response.json
            for table, columns in (body.get("added_columns") or {}).items():
                for row in self.rows[table].values():       # a column added: every row has its default
                    for name, default in columns.items():
                        row.setdefault(name, default)
            for table, change in body["changes"].items():
                for row in change["upserted"]:
                    self.rows[table][self.key(table, row)] = row
                for key in change["deleted"]:
                    self.rows[table].pop(self.key(table, key), None)
            self.checkpoint = body["checkpoint"]
            self.pages += 1
            if not body["has_more"]:
                return self

    def push(self, operations, **fields):
        return push(self.app, operations, device_id=self.device_id, **fields)


def server_rows(application, table):
    data = pull(application, tables=[table], limit=5000).json["data"][table]
    device = Device(application, [table])
    return {device.key(table, row): row for row in data}


def log_entries(application, **filters):
    with application.db.connection() as conn:
        application.engine.changelog.sequence(conn)
        rows = application.engine.changelog.entries(conn, **filters)
    return [(cloudsync._text(table), cloudsync._text(key), cloudsync._text(op), device, batch)
            for _, table, key, op, device, batch, _ in rows]


def until(check, seconds=10):
    """Wait for `check` to hold (a bound on how long a test may hang, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "waited %d s" % seconds
        time.sleep(0.02)


def _eventually(check, seconds=5):
    """Poll `check` until it is true (a running server reads a changed tokens file within a second)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


TILL_TOKEN = "till-secret-token"
OFFICE_TOKEN = "office-secret-token"
ADMIN = "admin-secret-token"


def bearer(token):
    return {"Authorization": "Bearer " + token}


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The demo's tables (schema-sqlite.sql) as the client describes them: columns, primary key.
DEMO_TABLES = {
    "sales": (["id", "customer_id", "total", "note", "sold_at", "store_id"], ["id"]),
    "products": (["id", "name", "price", "barcode", "updated_at"], ["id"]),
    "customers": (["id", "name", "phone", "updated_at", "store_id"], ["id"]),
}


class LiveServer:
    """A cloudsync process on a free loopback port, started and answering; `db` is its SQLite file."""

    def __init__(self, tmp_path, args=("--env-file", "", "serve"), script=None, **settings):
        self.db = str(tmp_path / "server.db")
        if "DB_PATH" not in settings and "DB_HOST" not in settings:
            # the demo's tables in a file of the test's; `serve`, so that the settings given here count
            # (the demo command ignores tokens and tables by design)
            cloudsync._create_demo_database(self.db)
            settings = dict({"DB_PATH": self.db, "ALLOWED_TABLES": ",".join(cloudsync.EXAMPLE_TABLES)}, **settings)
        self.log = str(tmp_path / "server.log")    # a file: a full pipe would stall the server
        self.port = _free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        env = {name: value for name, value in os.environ.items() if name not in cloudsync.SETTING_NAMES}
        # one process unless a test asks for workers (Command line, and workers)
        env.update(dict(dict(HOST="127.0.0.1", PORT=str(self.port), COMPACT_INTERVAL_SECONDS="3600", WORKERS="1"),
                        **settings))
        self.env = env
        self.cwd = str(tmp_path)
        self.process = subprocess.Popen([sys.executable, script or os.path.join(HERE, "cloudsync.py")]
                                        + [arg.format(db=self.db) for arg in args], cwd=self.cwd, env=env,
                                        stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        self.process.kill()
        pytest.fail("server did not start: %s" % open(self.log, errors="replace").read())

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)

    def rows(self, table):
        """The server's rows of `table`, read with a sync-mode pull from null (as a new device would)."""
        rows, since = [], None
        while True:
            request = urllib.request.Request(self.url + "/sync/pull", json.dumps(
                {"tables": [table], "since": since, "limit": 1000}).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.loads(response.read())
            rows.extend(answer["changes"][table]["upserted"])
            since = answer["checkpoint"]
            if not answer["has_more"]:
                return sorted(rows, key=lambda row: [row[name] for name in DEMO_TABLES.get(table, ([], ["id"]))[1]])

    def changes_of(self, table, key):
        """How many times the server's change log recorded a change of this row."""
        with sqlite3.connect(self.db) as conn:
            return conn.execute("SELECT COUNT(*) FROM cloudsync_changes WHERE table_name = ? AND row_key = ?",
                                (table, json.dumps([key], separators=(",", ":")))).fetchone()[0]


@pytest.fixture
def demo_server(tmp_path):
    """`python cloudsync.py demo` on a free port, as the README starts it."""
    server = LiveServer(tmp_path, args=("demo",), MAX_BODY_BYTES="100000")
    yield server.url
    server.stop()


def _cli(arguments, env, cwd=None, **options):
    """cloudsync.py run as an operator runs it; (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "cloudsync.py")] + list(arguments),
                            env=dict({name: value for name, value in os.environ.items()
                                      if name not in cloudsync.SETTING_NAMES}, **env),
                            cwd=cwd, capture_output=True, text=True, timeout=60, **options)
    return result.returncode, result.stdout, result.stderr


def _status_with(url, token):
    request = urllib.request.Request(url + "/sync/status", headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:                             # not listening (yet)
        return None


def _http(url, method, path, body=None, timeout=30):
    """(status, JSON answer) of one request."""
    request = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _hold_the_database(backend):
    """Another program holds a write lock on sales (MySQL: the row s1; SQLite: the database)."""
    if backend.kind == "mysql":
        holder = _mysql_connect(backend.settings["DB_NAME"])
        cursor = holder.cursor()
        cursor.execute("START TRANSACTION")
        cursor.execute("SELECT * FROM sales WHERE id = 's1' FOR UPDATE")
        cursor.fetchall()
    else:
        holder = sqlite3.connect(backend.settings["DB_PATH"], isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    return holder


def _require(found, missing):
    """Go on when `found`; else skip (a developer's machine) or fail (CI) saying what is missing."""
    if found:
        return
    reason = "%s; .ci/run installs it" % missing
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI is set: required)")
    pytest.skip(reason)


# The tables of a schema probe; the defects it found are tested one each, in the
# sections of the code they were in.
PROBE_TABLES = {
    # a secondary unique key
    "uq": ("CREATE TABLE uq (id INT PRIMARY KEY, code VARCHAR(10) UNIQUE, name VARCHAR(20)) ENGINE=InnoDB",
           "CREATE TABLE uq (id INT PRIMARY KEY, code TEXT UNIQUE, name TEXT)"),
    # rows deleted by a foreign-key cascade (InnoDB fires no trigger for them)
    "shops": ("CREATE TABLE shops (id INT PRIMARY KEY, name VARCHAR(20)) ENGINE=InnoDB",
              "CREATE TABLE shops (id INT PRIMARY KEY, name TEXT)"),
    "shop_notes": ("CREATE TABLE shop_notes (id INT PRIMARY KEY, shop_id INT NOT NULL, note TEXT, FOREIGN KEY "
                   "(shop_id) REFERENCES shops (id) ON DELETE CASCADE) ENGINE=InnoDB",
                   "CREATE TABLE shop_notes (id INT PRIMARY KEY, shop_id INT NOT NULL REFERENCES shops (id) "
                   "ON DELETE CASCADE, note TEXT)"),
    # a binary key, a utf8mb3 key
    "bin_keys": ("CREATE TABLE bin_keys (k VARBINARY(16) PRIMARY KEY, note VARCHAR(20)) ENGINE=InnoDB",
                 "CREATE TABLE bin_keys (k BLOB PRIMARY KEY, note TEXT)"),
    "mb3": ("CREATE TABLE mb3 (id VARCHAR(20) CHARACTER SET utf8mb3 PRIMARY KEY, note VARCHAR(20)) ENGINE=InnoDB",
            "CREATE TABLE mb3 (id TEXT PRIMARY KEY, note TEXT)"),
    # the shop's own rule, in a BEFORE trigger
    "guarded": ("CREATE TABLE guarded (id INT PRIMARY KEY, qty INT NOT NULL) ENGINE=InnoDB",
                "CREATE TABLE guarded (id INT PRIMARY KEY, qty INT NOT NULL)"),
    "docs": ("CREATE TABLE docs (id INT PRIMARY KEY, body MEDIUMTEXT) ENGINE=InnoDB",
             "CREATE TABLE docs (id INT PRIMARY KEY, body TEXT)"),
    "real_values": ("CREATE TABLE real_values (id INT PRIMARY KEY, r DOUBLE, d DECIMAL(12,2)) ENGINE=InnoDB",
                    "CREATE TABLE real_values (id INT PRIMARY KEY, r REAL, d DECIMAL(12,2))"),
}
GUARD_TRIGGERS = {
    "mysql": ["CREATE TRIGGER guarded_stock BEFORE INSERT ON guarded FOR EACH ROW BEGIN IF NEW.qty < 0 THEN "
              "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'stock cannot go below 0'; END IF; END",
              "CREATE TRIGGER guarded_stock_upd BEFORE UPDATE ON guarded FOR EACH ROW BEGIN IF NEW.qty < 0 THEN "
              "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'stock cannot go below 0'; END IF; END"],
    "sqlite": ["CREATE TRIGGER guarded_stock BEFORE INSERT ON guarded WHEN NEW.qty < 0 BEGIN "
               "SELECT RAISE(ABORT, 'stock cannot go below 0'); END",
               "CREATE TRIGGER guarded_stock_upd BEFORE UPDATE ON guarded WHEN NEW.qty < 0 BEGIN "
               "SELECT RAISE(ABORT, 'stock cannot go below 0'); END"],
}


@pytest.fixture
def probe(backend):
    """The app on a database that also holds the probe's own tables."""
    for mysql_ddl, sqlite_ddl in PROBE_TABLES.values():
        backend.sql(mysql_ddl if backend.kind == "mysql" else sqlite_ddl)
    for statement in GUARD_TRIGGERS[backend.kind]:
        backend.sql(statement)
    application = started(backend, ALLOWED_TABLES=",".join(TABLES + tuple(PROBE_TABLES)))
    yield application
    application.db.close()


# Tables of a shop chain and a field team: orders scoped by an integer store,
# visits by a text region inside a composite key, jobs by a technician through
# a foreign key that cascades, notes scoped without an index (for `check`),
# and a shared catalogue. Each device's token carries its scope values.

SCOPED_MYSQL = [
    "CREATE TABLE techs (name VARCHAR(20) PRIMARY KEY) ENGINE=InnoDB",
    "CREATE TABLE orders (id INT PRIMARY KEY, store_id INT NULL, total DECIMAL(10,2), note VARCHAR(40),"
    " KEY orders_by_store (store_id, id)) ENGINE=InnoDB",
    "CREATE TABLE visits (region VARCHAR(20) NOT NULL, day DATE NOT NULL, who VARCHAR(40),"
    " PRIMARY KEY (region, day)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE jobs (id INT PRIMARY KEY, tech VARCHAR(20) NULL, what VARCHAR(40), KEY jobs_by_tech (tech),"
    " FOREIGN KEY (tech) REFERENCES techs (name) ON UPDATE CASCADE ON DELETE CASCADE) ENGINE=InnoDB",
    "CREATE TABLE catalogue (id INT PRIMARY KEY, name VARCHAR(40)) ENGINE=InnoDB",
    "CREATE TABLE notes (id INT PRIMARY KEY, store_id INT, body TEXT) ENGINE=InnoDB",
]
SCOPED_SQLITE = [
    "CREATE TABLE techs (name TEXT PRIMARY KEY)",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, store_id INTEGER, total DECIMAL(10,2), note TEXT)",
    "CREATE INDEX orders_by_store ON orders (store_id, id)",
    "CREATE TABLE visits (region TEXT NOT NULL, day DATE NOT NULL, who TEXT, PRIMARY KEY (region, day))",
    "CREATE TABLE jobs (id INTEGER PRIMARY KEY, tech TEXT REFERENCES techs (name) ON UPDATE CASCADE"
    " ON DELETE CASCADE, what TEXT)",
    "CREATE INDEX jobs_by_tech ON jobs (tech)",
    "CREATE TABLE catalogue (id INTEGER PRIMARY KEY, name TEXT)",
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, store_id INTEGER, body TEXT)",
]
SCOPED_TABLES = "orders,visits,jobs,catalogue,notes,techs"
ROW_SCOPES = "orders.store_id,visits.region,jobs.tech,notes.store_id"
SCOPED_TOKENS = "; ".join([
    "till7 t7 scope.store_id=7 scope.region=north scope.tech=ann",
    "till8 t8 scope.store_id=8 scope.region=south scope.tech=bob",
    "both tb scope.store_id=7,8", "office to scope.store_id=* scope.region=* scope.tech=*", "bare tn",
    "cat tc scope.tech=cat"])
# token -> the stores (orders.store_id) its device sees; None: every row
STORES_OF = {"t7": {7}, "t8": {8}, "tb": {7, 8}, "to": None}


@pytest.fixture(params=["sqlite", "mysql"])
def scoped_backend(request, tmp_path):
    """A fresh database on each backend holding the scoped tables."""
    made = _fresh_database(request.param, SCOPED_SQLITE if request.param == "sqlite" else SCOPED_MYSQL,
                           tmp_path, request)
    if request.param == "sqlite":
        made.sql("PRAGMA foreign_keys = ON")     # the outside writer's cascades, as SQLite needs
    yield made
    made.close()


def scoped_config(backend, **settings):
    return backend.config(**dict(dict(ALLOWED_TABLES=SCOPED_TABLES, ROW_SCOPES=ROW_SCOPES,
                                      TOKENS=SCOPED_TOKENS), **settings))


@pytest.fixture
def scoped(scoped_backend):
    """The app with ROW_SCOPES and the scoped tokens, started."""
    application = cloudsync.App(scoped_config(scoped_backend))
    application.start()
    yield application
    application.db.close()


def as_device(token):
    return {"Authorization": "Bearer " + token}


def spull(application, token, **fields):
    return call(application, "POST", "/sync/pull", fields, headers=as_device(token))


def spush(application, token, operations, **fields):
    return call(application, "POST", "/sync/push", dict(fields, operations=operations), headers=as_device(token))


def sync_to_end(application, token, tables, since=None, limit=1000):
    """Pull from `since` until has_more is false: ({table: {key: row}}, {table: [deleted keys]}, checkpoint)."""
    upserted, deleted = {table: {} for table in tables}, {table: [] for table in tables}
    while True:
        answer = spull(application, token, tables=tables, since=since, limit=limit)
        assert answer.status == 200, answer.json
        for table, change in answer.json["changes"].items():
            for row in change["upserted"]:
                upserted[table][_row_key(table, row)] = row
            deleted[table].extend(change["deleted"])
        since = answer.json["checkpoint"]
        if not answer.json["has_more"]:
            return upserted, deleted, since


def _row_key(table, row):
    return (row["region"], row["day"]) if table == "visits" else row["id"]


def seed_orders(backend, *rows):
    for row in rows:
        backend.sql("INSERT INTO orders (id, store_id, total, note) VALUES (?, ?, ?, ?)", row)


# Shoppers edited by several tills (phone at one, points at another), stock
# counted down by increments, a ledger only appended to, a credit limit only
# the office sets, and the shop's own rules as triggers of the database.

SHOP_MYSQL = [
    "CREATE TABLE shoppers (id INT PRIMARY KEY, name VARCHAR(40), phone VARCHAR(20), points INT NOT NULL DEFAULT 0,"
    " credit_limit DECIMAL(10,2) NOT NULL DEFAULT 100.00, note TEXT) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE stock (product_id VARCHAR(10), store_id INT, qty DECIMAL(12,3) NOT NULL DEFAULT 0,"
    " sold INT NOT NULL DEFAULT 0, ratio DOUBLE, label VARCHAR(20), PRIMARY KEY (product_id, store_id)) ENGINE=InnoDB",
    "CREATE TABLE ledger (id INT PRIMARY KEY, amount DECIMAL(10,2), memo VARCHAR(40)) ENGINE=InnoDB",
    "CREATE TRIGGER stock_not_negative BEFORE UPDATE ON stock FOR EACH ROW BEGIN IF NEW.qty < 0 THEN"
    " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'stock cannot go below 0'; END IF; END",
    "CREATE TRIGGER ledger_positive BEFORE INSERT ON ledger FOR EACH ROW BEGIN IF NEW.amount <= 0 THEN"
    " SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'a ledger amount is positive'; END IF; END",
]
SHOP_SQLITE = [
    "CREATE TABLE shoppers (id INTEGER PRIMARY KEY, name TEXT, phone TEXT, points INTEGER NOT NULL DEFAULT 0,"
    " credit_limit DECIMAL(10,2) NOT NULL DEFAULT 100.00, note TEXT)",
    "CREATE TABLE stock (product_id TEXT, store_id INTEGER, qty DECIMAL(12,3) NOT NULL DEFAULT 0,"
    " sold INTEGER NOT NULL DEFAULT 0, ratio REAL, label TEXT, PRIMARY KEY (product_id, store_id))",
    "CREATE TABLE ledger (id INTEGER PRIMARY KEY, amount DECIMAL(10,2), memo TEXT)",
    "CREATE TRIGGER stock_not_negative BEFORE UPDATE ON stock WHEN NEW.qty < 0"
    " BEGIN SELECT RAISE(ABORT, 'stock cannot go below 0'); END",
    "CREATE TRIGGER ledger_positive BEFORE INSERT ON ledger WHEN NEW.amount <= 0"
    " BEGIN SELECT RAISE(ABORT, 'a ledger amount is positive'); END",
]
SHOP_SETTINGS = dict(ALLOWED_TABLES="shoppers,stock,ledger", INSERT_ONLY_TABLES="ledger",
                     READ_ONLY_COLUMNS="shoppers.credit_limit")


@pytest.fixture(params=["sqlite", "mysql"])
def shop_backend(request, tmp_path):
    """A fresh database on each backend holding the shop tables and their rules."""
    made = _fresh_database(request.param, SHOP_SQLITE if request.param == "sqlite" else SHOP_MYSQL, tmp_path,
                           request)
    made.sql("INSERT INTO shoppers (id, name, phone, points) VALUES (1, 'Ann', '555-0100', 10)")
    made.sql("INSERT INTO stock (product_id, store_id, qty, sold) VALUES ('p1', 7, 5.000, 0)")
    yield made
    made.close()


@pytest.fixture
def shop(shop_backend):
    application = started(shop_backend, **SHOP_SETTINGS)
    yield application
    application.db.close()


def test_table_of_contents_lists_every_section():
    source = open(os.path.abspath(__file__), encoding="utf-8").read()
    banners = re.findall(r"^# -{70,}\n# (.+)\n# -{70,}$", source, re.M)
    listed = re.findall(r"^ +\d+\. (.+)$", __doc__, re.M)
    assert listed == banners


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(HERE, "README.md")).read()
    ci = open(os.path.join(HERE, ".ci", "run")).read().strip().splitlines()[-1]
    assert "    " + ci + "\n" in readme


def test_the_tests_ignore_the_checkouts_env_and_tokens_file(tmp_path):
    # README's first steps (cp sample.env .env, token add) made test_checkpoint_of_another_database_is_400
    # fail with 401: it read the tokens file of the working directory.
    for name in ("cloudsync.py", "cloudsync_client.py", "test_cloudsync.py", "reliability_cloudsync.py",
                 "schema-sqlite.sql", "schema-mysql.sql", "sample.env"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    (tmp_path / ".env").write_text(open(os.path.join(HERE, "sample.env")).read() + "\nTOKENS=till-01 secret\n")
    (tmp_path / "cloudsync.tokens").write_text("till-02 sha256:%s\n" % hashlib.sha256(b"other").hexdigest())
    env = dict(os.environ, ADMIN_TOKEN="admin-secret-token-0123456789", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_cloudsync.py",
                             "-k", "checkpoint_of_another_database_is_400 or device_fleet_needs_the_admin_token"],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


# ---------------------------------------------------------------------------
# Constants and errors
# ---------------------------------------------------------------------------


def test_every_refusal_carries_its_code_and_409s_tell_apart(app):
    # Three 409s share two English texts; a client switches on `code`, never on `error`.
    assert push(app, [op("insert", id="d1")]).status == 200
    duplicate = push(app, [op("insert", id="d9", note="1"), op("insert", id="d9", note="2")])
    assert (duplicate.status, duplicate.json["code"]) == (409, "duplicate")
    checkpoint = pull(app, tables=["sales"], since=None).json["checkpoint"]
    assert push(app, [op("update", id="d1", total="2.00")], device_id="office").status == 200
    conflict = push(app, [op("update", id="d1", total="3.00")], device_id="till", checkpoint=checkpoint)
    assert (conflict.status, conflict.json["code"]) == (409, "conflict")
    assert push(app, [op("insert", id="d2")], device_id="till", batch_id="b1").status == 200
    reused = push(app, [op("insert", id="d3")], device_id="till", batch_id="b1")
    assert (reused.status, reused.json["code"]) == (409, "batch_reused")
    for response in (call(app, "GET", "/nowhere"), call(app, "POST", "/sync/push", raw=b"{"),
                     push(app, [op("insert", table="nope", id=1)])):
        assert response.status >= 400 and response.json["code"] in cloudsync.REFUSALS, response.json
    codes = cloudsync.OPENAPI["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    assert codes == sorted(cloudsync.REFUSALS)


# ---------------------------------------------------------------------------
# .env parser
# ---------------------------------------------------------------------------


DOTENV_CASES = [
    # (text, expected values, expected problem line numbers)
    ("A=1", {"A": "1"}, []),
    ("A = 1 ", {"A": "1"}, []),
    ("# comment\n\nA=1\n", {"A": "1"}, []),
    ("export A=1", {"A": "1"}, []),
    ("A='x y'", {"A": "x y"}, []),
    ("A='x\\ny'", {"A": "x\\ny"}, []),
    ("A='it\\'s'", {"A": "it's"}, []),
    ('A="x\\ny"', {"A": "x\ny"}, []),
    ('A="say \\"hi\\""', {"A": 'say "hi"'}, []),
    ('A="tab\\tend"', {"A": "tab\tend"}, []),
    ("A=x # comment", {"A": "x"}, []),
    ("A=x#not-a-comment", {"A": "x#not-a-comment"}, []),
    ("A='x' # comment", {"A": "x"}, []),
    ("A=", {"A": ""}, []),
    ("A=1\nB=${A}2", {"A": "1", "B": "12"}, []),
    ('A=1\nB="${A}2"', {"A": "1", "B": "12"}, []),
    ("A=1\nB='${A}2'", {"A": "1", "B": "${A}2"}, []),
    ("B=${MISSING:-fallback}", {"B": "fallback"}, []),
    ("B=${FROM_ENV}", {"B": "env"}, []),
    ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}, []),
    ("\ufeffA=1", {"A": "1"}, []),
    ('A="line1\nline2"\nB=3', {"A": "line1\nline2", "B": "3"}, []),
    ("A=ünïcødé ☕", {"A": "ünïcødé ☕"}, []),
    ("A=1\nnot a setting\nB=2", {"A": "1", "B": "2"}, [2]),
    ("=novalue", {}, [1]),
    ("A='unterminated", {}, [1]),
    ('A="x" trailing', {}, [1]),
    ("A=1\nA=2", {"A": "2"}, []),
    ('A=1\nB="\\${A}"', {"A": "1", "B": "${A}"}, []),
    ('A="open\nB=2', {"B": "2"}, [1]),
]


@pytest.mark.parametrize("text,expected,problem_lines", DOTENV_CASES)
def test_dotenv_parser(text, expected, problem_lines):
    values, problems = cloudsync.parse_dotenv(text, environ={"FROM_ENV": "env"})
    assert values == expected
    assert [number for number, _ in problems] == problem_lines


# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------


def test_client_strings_cannot_forge_a_log_line(backend, caplog):
    token = "t" * 40
    application = started(backend, TOKENS="till " + token)
    caplog.set_level(logging.INFO)
    forged = "till\n2026-12-01 00:00:00 WARNING cloudsync: forged"
    response = call(application, "POST", "/sync/push", {"device_id": forged, "operations": []},
                    headers={"Authorization": "Bearer " + token})
    assert response.status == 403
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(cloudsync.TextLogFormatter("%(levelname)s %(message)s"))
    for record in caplog.records:
        assert "\n" not in handler.format(record), record.getMessage()
    assert any("till\\n2026" in record.getMessage() for record in caplog.records)
    application.db.close()


def test_access_log_line_per_request(app, caplog):
    caplog.set_level(logging.INFO, logger="cloudsync.access")
    push(app, [op("insert", id="s1")], device_id="till")
    line, = [record for record in caplog.records if record.name == "cloudsync.access"]
    assert "POST /sync/push 200" in line.getMessage() and "device=till" in line.getMessage()
    assert line.fields["operations"] == 1 and line.fields["status"] == 200 and line.fields["bytes"] > 0


def test_json_log_lines_carry_fields_and_no_secrets():
    record = logging.LogRecord("cloudsync.access", logging.INFO, __file__, 1, "POST /sync/push 200", (), None)
    record.fields = {"status": 200, "device": "till"}
    entry = json.loads(cloudsync.JSONLogFormatter().format(record))
    assert entry["level"] == "INFO" and entry["status"] == 200 and entry["device"] == "till"
    config = cloudsync.load_config(None, environ={"ADMIN_TOKEN": "adm1n", "METRICS_TOKEN": "m3trics"})
    assert "adm1n" not in config.describe() and "m3trics" not in config.describe()


def test_text_access_log_is_one_line_per_request(app, caplog):
    """PATH_INFO is percent-decoded: /x%0aFAKE must not forge a second log line in LOG_FORMAT=text."""
    caplog.set_level(logging.INFO, logger="cloudsync.access")
    _call_unvalidated(app, "GET", "/sync/status\n2026-01-01 00:00:00,000 INFO cloudsync.access: POST /sync/push 200")
    line, = [record for record in caplog.records if record.name == "cloudsync.access"]
    assert "\n" not in line.getMessage()


# ---------------------------------------------------------------------------
# Identifiers and values
# ---------------------------------------------------------------------------


INJECTIONS = [
    "sales; DROP TABLE products",
    "sales`; DROP TABLE products; --",
    'sales"; DROP TABLE products; --',
    "sales' OR '1'='1",
    "`sales`",
    "SALES",
    "sales ",
]


@pytest.mark.parametrize("name", INJECTIONS)
def test_injection_in_table_name_rejected(app, backend, name):
    response = push(app, [{"table": name, "action": "insert", "data": {"id": "1"}}])
    assert response.status == 400 and response.json["error"] == "Invalid table"
    assert pull(app, tables=[name]).status == 400
    assert backend.sql("SELECT COUNT(*) FROM products")[0][0] == 0


@pytest.mark.parametrize("name", INJECTIONS[:5] + ["id`, `note", 'id", "note', "id) VALUES ('x'); --"])
def test_injection_in_column_name_rejected(app, backend, name):
    response = push(app, [op("insert", **{"id": "s1", name: "x"})])
    assert response.status == 400 and response.json["error"] == "Unknown column"
    assert backend.rows("sales") == []
    assert backend.sql("SELECT COUNT(*) FROM products")[0][0] == 0


def test_unicode_round_trip(app):
    text = "Grüße, 東京, emoji 🧾☕, RTL שלום, \u0000-free"
    assert push(app, [op("insert", "customers", id="ü-1", name=text)]).status == 200
    row = pull(app, tables=["customers"]).json["data"]["customers"][0]
    assert row["id"] == "ü-1" and row["name"] == text


def test_decimal_date_null_encoding(app, backend):
    push(app, [op("insert", id="s1", total=12.5, sold_at="2026-11-26 09:30:00", note=None),
               op("insert", id="s2", total="1234567890.99"),
               op("insert", "attachments", id=1, body="AAEC/w==", taken_on="2026-01-31")])
    data = pull(app, tables=["sales", "attachments"]).json["data"]
    first, second = data["sales"]
    assert first["total"] == "12.50" and second["total"] == "1234567890.99"
    # MySQL writes ISO 8601; SQLite has no date type and gives back the text as stored, so that
    # the pulled value, pushed back, leaves the row byte for byte as it was
    assert first["sold_at"] == ("2026-11-26T09:30:00" if backend.kind == "mysql" else "2026-11-26 09:30:00")
    assert first["note"] is None and first["customer_id"] is None
    attachment = data["attachments"][0]
    assert attachment == {"id": 1, "body": "AAEC/w==", "taken_on": "2026-01-31"}


def test_integers_come_out_as_numbers(app):
    push(app, [op("insert", "product_stock", product_id="p1", store_id=1, qty=42)])
    assert pull(app, tables=["product_stock"]).json["data"]["product_stock"] == [{"product_id": "p1", "store_id": 1,
                                                                              "qty": 42}]


# Each type goes into a table of its own three times: as a value, as the whole
# primary key, and inside a composite key. Each table then goes through push,
# seed pull, sync pull (paged), push-back of the pulled rows (update, upsert and
# a retried insert: the stored values must not change), an update by the pulled
# key with a checkpoint (no false conflict), an outside writer's change (a real
# conflict), a delete by the pulled key, and the sync pull that delivers the
# deletes as exactly the keys the device holds.

# (name, column type, [(pushed, pulled)], usable as a key)
MYSQL_TYPES = [
    ("tinyint", "TINYINT", [(-128, -128), (0, 0), (127, 127)], True),
    ("tinyint_u", "TINYINT UNSIGNED", [(0, 0), (255, 255)], True),
    ("smallint", "SMALLINT", [(-32768, -32768), (32767, 32767)], True),
    ("mediumint", "MEDIUMINT", [(-8388608, -8388608), (8388607, 8388607)], True),
    ("int", "INT", [(-2147483648, -2147483648), (2147483647, 2147483647), ("17", 17)], True),
    ("int_u", "INT UNSIGNED", [(0, 0), (4294967295, 4294967295)], True),
    ("bigint", "BIGINT", [(-(2 ** 63), -(2 ** 63)), (2 ** 63 - 1, 2 ** 63 - 1)], True),
    ("bigint_u", "BIGINT UNSIGNED", [(0, 0), (2 ** 64 - 1, 2 ** 64 - 1)], True),
    ("dec0", "DECIMAL(10,0)", [("-9999999999", "-9999999999"), (42, "42"), ("7", "7")], True),
    ("dec2", "DECIMAL(12,2)", [("12.50", "12.50"), (7.5, "7.50"), ("-0.01", "-0.01"),
                               ("9999999999.99", "9999999999.99")], True),
    ("dec65", "DECIMAL(65,30)", [("12345678901234567890123456789012345.123456789012345678901234567890",
                                  "12345678901234567890123456789012345.123456789012345678901234567890"),
                                 ("-0.000000000000000000000000000001", "-0.000000000000000000000000000001")], True),
    ("float", "FLOAT", [(1.5, 1.5), (0.1, 0.1), (-3.4e38, -3.4e38)], False),
    # MariaDB's DOUBLE keeps no negative zero: -0.0 is stored, and pulled, as 0.0
    ("double", "DOUBLE", [(1e300, 1e300), (-0.0, 0.0), (5e-324, 5e-324), (0.1, 0.1),
                          (2.2250738585072014e-308, 2.2250738585072014e-308), ("1e-5", 1e-5)], False),
    ("date", "DATE", [("2026-11-26", "2026-11-26"), ("1000-01-01", "1000-01-01"),
                      ("9999-12-31", "9999-12-31")], True),
    ("datetime", "DATETIME", [("2026-11-26 09:30:00", "2026-11-26T09:30:00"),
                              ("2026-11-26T23:59:59", "2026-11-26T23:59:59")], True),
    ("datetime3", "DATETIME(3)", [("2026-11-26 09:30:00.5", "2026-11-26T09:30:00.500000"),
                                  ("2026-11-26 09:30:00", "2026-11-26T09:30:00")], True),
    ("datetime6", "DATETIME(6)", [("2026-11-26T09:30:00.123456", "2026-11-26T09:30:00.123456"),
                                  ("1000-01-01 00:00:00.000001", "1000-01-01T00:00:00.000001")], True),
    ("timestamp", "TIMESTAMP NULL", [("2026-11-26 09:30:00", "2026-11-26T09:30:00")], True),
    ("timestamp3", "TIMESTAMP(3) NULL", [("2026-11-26 09:30:00.5", "2026-11-26T09:30:00.500000"),
                                         ("2038-01-19T03:14:07", "2038-01-19T03:14:07")], True),
    ("time", "TIME", [("09:30:00", "09:30:00"), ("-838:59:59", "-838:59:59"), ("838:59:59", "838:59:59")], True),
    ("time3", "TIME(3)", [("-00:00:00.5", "-00:00:00.500000"), ("12:00:00.250", "12:00:00.250000"),
                          ("00:00:00", "00:00:00")], True),
    ("year", "YEAR", [(2026, 2026), (1901, 1901), (2155, 2155)], True),
    ("bit1", "BIT(1)", [(0, 0), (1, 1)], True),
    ("bit64", "BIT(64)", [(0, 0), (2 ** 64 - 1, 2 ** 64 - 1), (5, 5)], True),
    ("boolean", "BOOLEAN", [(True, 1), (False, 0)], True),
    ("enum", "ENUM('red','green','it''s')", [("red", "red"), ("it's", "it's"), ("green", "green")], True),
    ("set", "SET('red','green','blue')", [("blue,red", "red,blue"), ("", ""), ("green", "green")], True),
    ("json", "JSON", [('{"a": 1}', '{"a": 1}'), ("[1, 2]", "[1, 2]")], False),
    ("char", "CHAR(5)", [("ab", "ab"), ("ab c", "ab c"), ("é", "é")], True),
    ("char_pad", "CHAR(5)", [("pad  ", "pad")], False),
    ("utf8mb3", "VARCHAR(20) CHARACTER SET utf8mb3", [("x", "x"), ("é東", "é東")], True),
    ("utf8mb4", "VARCHAR(20) CHARACTER SET utf8mb4", [("🧾☕", "🧾☕"), ("a\\b\"c\n\u0001", "a\\b\"c\n\u0001"),
                                                       ("Tea Time", "Tea Time")], True),
    ("latin1", "VARCHAR(20) CHARACTER SET latin1", [("café", "café")], True),
    ("text", "TEXT", [("x" * 300, "x" * 300), ("", "")], False),
    ("longtext", "LONGTEXT", [('{"not": "json"}', '{"not": "json"}')], False),
    ("binary", "BINARY(4)", [("AQIDBA==", "AQIDBA=="), ("/////w==", "/////w==")], True),
    ("binary_pad", "BINARY(4)", [("AQI=", "AQIAAA==")], False),
    ("zero_date", "DATE", [("0000-00-00", "0000-00-00"), ("2026-00-10", "2026-00-10")], True),
    ("zero_datetime", "DATETIME(3)", [("0000-00-00 00:00:00", "0000-00-00T00:00:00")], True),
    ("offset", "DATETIME", [("2026-01-01T02:00:00+02:00", "2026-01-01T00:00:00"),
                            ("2026-01-01T05:00:00.000Z", "2026-01-01T05:00:00")], True),
    ("varbinary", "VARBINARY(16)", [("AP8=", "AP8="), ("gA==", "gA=="), ("", "")], True),
    ("blob", "BLOB", [("//79/A==", "//79/A==")], False),
]
SQLITE_TYPES = [
    ("integer", "INTEGER", [(-(2 ** 63), -(2 ** 63)), (2 ** 63 - 1, 2 ** 63 - 1), ("5", 5)], True),
    ("real", "REAL", [(1e300, 1e300), (5e-324, 5e-324), (0.1, 0.1), ("2.5", 2.5)], False),
    ("numeric", "NUMERIC", [("7.1", "7.1"), ("1234567890.05", "1234567890.05"), ("7", "7"), ("70.0", "70")], True),
    ("dec2", "DECIMAL(12,2)", [("12.50", "12.50"), (7.5, "7.50"), ("-0.01", "-0.01"), (12, "12.00")], True),
    ("text", "TEXT", [("a", "a"), ("é🧾\u0001\"\\", "é🧾\u0001\"\\"), ("", ""), ("abc ", "abc ")], True),
    ("varchar", "VARCHAR(20)", [("Tea Time", "Tea Time"), ("5", "5")], True),
    ("blob", "BLOB", [("//79/A==", "//79/A=="), ("", "")], True),
    ("date", "DATE", [("2026-11-26", "2026-11-26")], True),
    ("datetime", "DATETIME", [("2026-11-26 09:30:00", "2026-11-26 09:30:00"),
                              ("2026-11-26T09:30:00.5", "2026-11-26T09:30:00.5")], True),
    ("time", "TIME", [("09:30:00", "09:30:00"), ("-00:00:00.5", "-00:00:00.5")], True),
    ("boolean", "BOOLEAN", [(True, 1), (False, 0)], True),
    ("untyped", "", [("x", "x"), (5, 5)], True),
]
MATRIX_ROLES = ("value", "key", "composite")


def _matrix_tables(kind):
    """(table, role, type name, column type, values) for every matrix case of a backend."""
    types = MYSQL_TYPES if kind == "mysql" else SQLITE_TYPES
    return [("m_%s_%s" % (name, role[0]), role, name, column_type, values)
            for name, column_type, values, keyable in types for role in MATRIX_ROLES
            if role == "value" or keyable]


def _matrix_ddl(kind, table, role, column_type):
    suffix = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4" if kind == "mysql" else ""
    note = "VARCHAR(20)" if kind == "mysql" else "TEXT"
    if role == "value":
        return "CREATE TABLE %s (id INT PRIMARY KEY, v %s, note %s)%s" % (table, column_type, note, suffix)
    if role == "key":
        return "CREATE TABLE %s (k %s NOT NULL PRIMARY KEY, note %s)%s" % (table, column_type, note, suffix)
    return "CREATE TABLE %s (a INT NOT NULL, k %s NOT NULL, note %s, PRIMARY KEY (a, k))%s" % (
        table, column_type, note, suffix)


def _matrices_made_on_first_use(request, tmp_path_factory):
    """For each backend, made on first use: one database holding every matrix table, served by one app."""
    made = {}
    yield lambda kind: made[kind] if kind in made else made.setdefault(
        kind, _make_matrix(kind, request, tmp_path_factory))
    for application, backend, _ in made.values():
        application.db.close()
        backend.close()


@pytest.fixture(scope="module")
def matrices(request, tmp_path_factory):
    """The matrix databases the type tests share."""
    yield from _matrices_made_on_first_use(request, tmp_path_factory)


@pytest.fixture(params=["sqlite", "mysql"])
def matrix(request, matrices):
    """The matrix database of one backend."""
    return matrices(request.param)


def _make_matrix(kind, request, tmp_path_factory):
    tables = _matrix_tables(kind)
    extra = ["CREATE TABLE m_generated (id INT PRIMARY KEY, v INT, g INT AS (v * 2) VIRTUAL,"
             " s INT AS (v + 1) STORED, d VARCHAR(10) DEFAULT 'dflt') ENGINE=InnoDB" if kind == "mysql" else
             "CREATE TABLE m_generated (id INT PRIMARY KEY, v INT, g INT GENERATED ALWAYS AS (v * 2) VIRTUAL,"
             " s INT GENERATED ALWAYS AS (v + 1) STORED, d TEXT DEFAULT 'dflt')"]
    made = _fresh_database(kind, [_matrix_ddl(kind, table, role, column_type)
                                  for table, role, _, column_type, _ in tables] + extra,
                           tmp_path_factory.mktemp("matrix"), request)
    names = [table for table, _, _, _, _ in tables] + ["m_generated"]
    application = cloudsync.App(made.config(ALLOWED_TABLES=",".join(names)))
    application.start()
    return application, made, {table: (role, values) for table, role, _, _, values in tables}


def _stored(backend, table):
    """Every stored value of a table, exactly: the storage type and repr (floats by their bits)."""
    rows = backend.sql("SELECT * FROM %s" % table)
    return sorted(tuple((type(value).__name__, value.hex() if isinstance(value, float) else repr(value))
                        for value in row) for row in rows)


def _sync_all(application, table, since=None):
    """The client loop with a small page, from `since`: (upserted, deleted, checkpoint)."""
    upserted, deleted = [], []
    for _ in range(100):                    # a first sync that never ends is a failure, not a hang
        response = pull(application, tables=[table], since=since, limit=2)
        assert response.status == 200, response.body
        body = response.json
        upserted += body["changes"][table]["upserted"]
        deleted += body["changes"][table]["deleted"]
        since = body["checkpoint"]
        if not body["has_more"]:
            return upserted, deleted, since
    raise AssertionError("has_more is still true after 100 pages")


def _json_key(row, role):
    """The key a device holds for a pulled row, as comparable text."""
    key = row["id"] if role == "value" else row["k"] if role == "key" else {"a": row["a"], "k": row["k"]}
    return json.dumps(key, sort_keys=True)


def _matrix_rows(role, values):
    rows = []
    for position, (pushed, _) in enumerate(values):
        if role == "value":
            rows.append({"id": position + 1, "v": pushed, "note": "n%d" % position})
        elif role == "key":
            rows.append({"k": pushed, "note": "n%d" % position})
        else:
            rows += [{"a": a, "k": pushed, "note": "n%d-%d" % (position, a)} for a in (1, 2)]
    if role == "value":
        rows.append({"id": len(values) + 1, "v": None, "note": "null"})
    return rows


def _key_of(row, role):
    return {"id": row["id"]} if role == "value" else {"k": row["k"]} if role == "key" else \
        {"a": row["a"], "k": row["k"]}


def _matrix_cases():
    cases = []
    for kind in ("sqlite", "mysql"):
        for table, role, _, _, _ in _matrix_tables(kind):
            cases.append(pytest.param(kind, table, id="%s-%s" % (kind, table)))
    return cases


@pytest.mark.parametrize("kind,table", _matrix_cases())
def test_every_type_survives_every_step(matrices, kind, table):
    application, backend, cases = matrices(kind)
    _every_step(application, backend, kind, table, *cases[table])


def _every_step(application, backend, kind, table, role, values):
    """Push, pull (seed and paged sync), push back, update, conflict, delete: see the comment above MYSQL_TYPES."""
    rows = _matrix_rows(role, values)
    # push
    response = push(application, [op("insert", table, **row) for row in rows], device_id="till")
    assert response.status == 200, response.body
    stored = _stored(backend, table)
    # seed pull and sync pull (paged) give the same rows, each value in its pulled form
    seed = pull(application, tables=[table]).json["data"][table]
    synced, deleted, checkpoint = _sync_all(application, table)
    assert deleted == []
    assert sorted(map(json.dumps, seed)) == sorted(map(json.dumps, synced))
    column = "v" if role == "value" else "k"
    expected = [pulled for _, pulled in values] + ([None] if role == "value" else [])
    pulled_values = [row[column] for row in seed]
    assert sorted(map(json.dumps, pulled_values)) == sorted(map(json.dumps, [
        value for value in expected for _ in range(2 if role == "composite" else 1)]))
    pulled_keys = sorted(_json_key(row, role) for row in seed)
    # the pulled rows pushed back (update, upsert, a retried insert) leave every stored byte as it was
    for action in ("update", "upsert", "insert"):
        response = push(application, [op(action, table, **row) for row in seed], checkpoint=checkpoint, device_id="till")
        assert response.status == 200 and not response.json.get("missing"), (action, response.body)
        assert _stored(backend, table) == stored, action
    # an update by the pulled key with a fresh checkpoint is no conflict and finds its row
    synced, _, checkpoint = _sync_all(application, table, checkpoint)
    response = push(application, [op("update", table, **dict(_key_of(row, role), note="upd"))
                                  for row in seed], checkpoint=checkpoint, device_id="till")
    assert response.status == 200 and not response.json.get("missing"), response.body
    assert {row[-1] for row in backend.sql("SELECT note FROM %s" % table)} == {"upd"}
    changed, deleted, checkpoint = _sync_all(application, table, checkpoint)
    assert deleted == [] and sorted(_json_key(row, role) for row in changed) == pulled_keys
    assert all(row["note"] == "upd" for row in changed)
    # another program changes one row: an update by the device now is a conflict
    backend.sql("UPDATE %s SET note = 'outside' WHERE %s" % (table, "id = 1" if role == "value" else
                                                             "note = 'upd' LIMIT 1" if kind == "mysql" else
                                                             "rowid = (SELECT MIN(rowid) FROM %s)" % table))
    response = push(application, [op("update", table, **dict(_key_of(row, role), note="mine")) for row in seed],
                    checkpoint=checkpoint, device_id="till")
    assert response.status == 409 and len(response.json["conflicts"]) == 1, response.body
    changed, deleted, checkpoint = _sync_all(application, table, checkpoint)
    assert [row["note"] for row in changed] == ["outside"] and deleted == []
    assert _json_key(changed[0], role) in pulled_keys
    # delete by the pulled key; the deletes reach a device as exactly the keys it holds
    response = push(application, [op("delete", table, **_key_of(row, role)) for row in seed],
                    checkpoint=checkpoint, device_id="till")
    assert response.status == 200 and not response.json.get("conflicts"), response.body
    assert backend.sql("SELECT COUNT(*) FROM %s" % table)[0][0] == 0
    upserted, deleted, _ = _sync_all(application, table, checkpoint)
    assert upserted == []
    assert sorted(json.dumps(key, sort_keys=True) for key in deleted) == pulled_keys


def test_generated_columns_and_defaults_are_pulled_and_never_written(matrix):
    application, backend, _ = matrix
    assert push(application, [op("insert", "m_generated", id=1, v=20)]).status == 200
    row = pull(application, tables=["m_generated"]).json["data"]["m_generated"][0]
    assert row == {"id": 1, "v": 20, "g": 40, "s": 21, "d": "dflt"}
    stored = _stored(backend, "m_generated")
    for action in ("update", "upsert", "insert"):
        assert push(application, [op(action, "m_generated", **row)]).status == 200, action
        assert _stored(backend, "m_generated") == stored
    # a value sent for a generated column is not written: the database computes it
    assert push(application, [op("update", "m_generated", id=1, v=5, g=999)]).status == 200
    assert pull(application, tables=["m_generated"]).json["data"]["m_generated"][0]["g"] == 10


class OverHTTP:
    """A WSGI app that hands every request to a live server over a real socket, so every helper works there too."""

    def __init__(self, url):
        self.url = url

    def __call__(self, environ, start_response):
        import http.client
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {name[5:].replace("_", "-").title(): value for name, value in environ.items()
                   if name.startswith("HTTP_") and name != "HTTP_HOST"}
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        connection = http.client.HTTPConnection(self.url.split("//")[1], timeout=30)
        try:
            connection.request(environ["REQUEST_METHOD"], environ["PATH_INFO"], body, headers)
            response = connection.getresponse()
            payload = response.read()
            start_response("%d %s" % (response.status, response.reason or "-"),
                           [(name, value) for name, value in response.getheaders()
                            if name.lower() not in ("connection", "transfer-encoding", "date", "server")])
        finally:
            connection.close()
        return [payload]


HOSTILE_TYPED_VALUES = ["2026-02-30", "25:61:61", "not base64!", "1e400", "-1e-400", "NaN", "9" * 70, "red,purple",
                  "\x00", "a\nb", "🧾", {"a": 1}, [1], 2 ** 64, -(2 ** 63) - 1, 1.5, True, "", " ", "0x10"]


def test_every_type_and_hostile_values_over_http_against_a_live_server(backend, tmp_path):
    """The schema probe, committed: invented tables of every type, through a real server process."""
    kind = backend.kind
    tables = _matrix_tables(kind)
    for table, role, _, column_type, _ in tables:
        backend.sql(_matrix_ddl(kind, table, role, column_type))
    settings = dict(backend.settings, ALLOWED_TABLES=",".join(table for table, *_ in tables), TOKENS_FILE="",
                    LOG_LEVEL="WARNING")
    server = LiveServer(tmp_path, args=("--env-file", "", "serve"), **settings)
    try:
        proxy = OverHTTP(server.url)
        for table, role, _, _, values in tables:
            _every_step(proxy, backend, kind, table, role, values)
        generator = random.Random(10)
        for _ in range(200):
            table, role, _, _, values = generator.choice(tables)
            names = {"value": ["id", "v", "note"], "key": ["k", "note"], "composite": ["a", "k", "note"]}[role]
            data = {name: generator.choice(HOSTILE_TYPED_VALUES + [pushed for pushed, _ in values] + [1, 2])
                    for name in names if generator.random() < 0.9}
            before = _stored(backend, table)
            response = push(proxy, [op(generator.choice(["insert", "update", "delete", "upsert"]), table, **data)])
            assert response.status < 500, response.body
            if response.status >= 400:
                assert _stored(backend, table) == before, response.body
        assert "Traceback" not in open(server.log, errors="replace").read()
    finally:
        server.stop()


def test_values_another_program_wrote_never_break_a_pull(probe, backend):
    if backend.kind == "sqlite":
        backend.sql("INSERT INTO real_values VALUES (1, 9e999, 1e300)")      # +Infinity and a 301-digit decimal
        backend.sql("INSERT INTO real_values VALUES (2, -9e999, 2.675)")
    else:
        backend.sql("INSERT INTO real_values VALUES (1, 1e308, 9999999999.99)")
    for body in ({"tables": ["real_values"]}, {"tables": ["real_values"], "since": None}):
        response = call(probe, "POST", "/sync/pull", body)
        assert response.status == 200
        rows = response.json["data" if "since" not in body else "changes"]["real_values"]
        rows = rows if "since" not in body else rows["upserted"]
        if backend.kind == "sqlite":
            assert rows[0]["r"] == "Infinity" and rows[1]["r"] == "-Infinity"
            assert rows[0]["d"] == "1" + "0" * 300 + ".00" and rows[1]["d"] == "2.675"


def test_a_number_of_thousands_of_digits_is_refused_in_plain_words(app):
    response = call(app, "POST", "/sync/push", raw=b'{"operations": [{"table": "sales", "action": "insert",'
                                                   b' "data": {"id": ' + b"9" * 5000 + b'}}]}')
    assert response.status == 400 and "thousands of digits" in response.json["detail"]
    assert "set_int_max_str_digits" not in response.body.decode()


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("line,message", [
    ("till-01 sha256:%s tables=" % ("a" * 64), "tables= names no table"),
    ("till-01 sha256:%s" % ("a" * 63), "exactly 64 hex digits"),
])
def test_unsafe_tokens_file_lines_stop_the_start(backend, tmp_path, line, message):
    path = tmp_path / "tokens"
    path.write_text(line + "\n")
    with pytest.raises(cloudsync.ConfigError, match=re.escape(message)):
        cloudsync.App(backend.config(TOKENS_FILE=str(path)))


@pytest.fixture
def secured(backend, tmp_path):
    """An app with tokens: till-1 (plain, in TOKENS), office (hashed, in a file, limited to products and sales)."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# device  hash  tables\noffice %s tables=products,sales\n"
                           % cloudsync.hash_token(OFFICE_TOKEN))
    application = cloudsync.App(backend.config(TOKENS="till-1 " + TILL_TOKEN, TOKENS_FILE=str(tokens_file),
                                               READ_ONLY_TABLES="products"))
    application.start()
    yield application
    application.db.close()


AUTH_CASES = [
    # (method, path, headers, status)
    ("GET", "/health", {}, 200),
    ("GET", "/sync/status", {}, 401),
    ("POST", "/sync/pull", {}, 401),
    ("POST", "/sync/push", {"Authorization": "Basic dGlsbDpzZWNyZXQ="}, 401),
    ("POST", "/sync/push", bearer("wrong"), 401),
    ("POST", "/sync", bearer(""), 401),
    ("GET", "/sync/status", bearer(TILL_TOKEN), 200),
    ("GET", "/sync/status", bearer(OFFICE_TOKEN), 200),
    ("POST", "/sync/pull", bearer(TILL_TOKEN), 200),
]


@pytest.mark.parametrize("method,path,headers,status", AUTH_CASES)
def test_authentication(secured, method, path, headers, status):
    body = {} if method == "POST" else None
    response = call(secured, method, path, body, headers=headers)
    assert response.status == status
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="cloudsync"'
        assert response.json["success"] is False and response.json["error"] == "Unauthorized"


def test_auth_failure_logged_without_token(secured, caplog):
    call(secured, "POST", "/sync/pull", {}, headers=bearer("guess-" + TILL_TOKEN))
    assert "auth failure from 127.0.0.1" in caplog.text
    assert TILL_TOKEN not in caplog.text


def test_push_takes_device_from_token(secured):
    response = call(secured, "POST", "/sync/push", {"operations": [op("insert", id="s1")]}, headers=bearer(TILL_TOKEN))
    assert response.status == 200
    assert log_entries(secured)[0][3] == "till-1"


def test_push_for_another_device_is_403(secured, backend):
    response = call(secured, "POST", "/sync/push", {"device_id": "till-2", "operations": [op("insert", id="s1")]},
                    headers=bearer(TILL_TOKEN))
    assert response.status == 403 and "till-1" in response.json["detail"]
    assert backend.rows("sales") == []


def test_open_server_only_on_loopback(backend):
    with pytest.raises(cloudsync.ConfigError, match="not a loopback address.*AUTH=off"):
        cloudsync.App(backend.config(HOST="0.0.0.0"))
    assert cloudsync.App(backend.config(HOST="0.0.0.0", AUTH="off")).auth.required is False
    with pytest.raises(cloudsync.ConfigError, match="AUTH=off, but device tokens"):
        cloudsync.App(backend.config(AUTH="off", TOKENS="a b"))
    with pytest.raises(cloudsync.ConfigError, match="READ_ONLY_TABLES names nope"):
        backend.config(READ_ONLY_TABLES="nope")


def test_token_command_stores_only_hash(tmp_path, capsys):
    tokens_file = tmp_path / "tokens"
    os.environ["TOKENS_FILE"] = str(tokens_file)
    try:
        assert cloudsync.main(["--env-file", "", "token", "add", "till-7"]) == 0
    finally:
        del os.environ["TOKENS_FILE"]
    token = capsys.readouterr().out.strip().splitlines()[-1]
    stored = tokens_file.read_text()
    assert len(token) >= 40 and token not in stored and cloudsync.hash_token(token) in stored
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o600"
    config = cloudsync.load_config(None, environ={}, overrides={"TOKENS_FILE": str(tokens_file)})
    assert cloudsync.read_tokens_file(config.tokens_file)[0].device_id == "till-7"


def test_token_add_rotate_remove_take_effect_on_a_running_server(tmp_path):
    tokens = str(tmp_path / "cloudsync.tokens")
    first = cloudsync.add_token(tokens, "till-01", ["sales"])
    server = LiveServer(tmp_path, TOKENS_FILE=tokens)
    env = {"DB_PATH": server.db, "ALLOWED_TABLES": ",".join(cloudsync.EXAMPLE_TABLES), "TOKENS_FILE": tokens}
    try:
        assert _status_with(server.url, first) == 200
        code, out, _ = _cli(["--env-file", "", "token", "add", "till-02"], env)
        second = out.split()[-1]
        assert code == 0 and _eventually(lambda: _status_with(server.url, second) == 200)
        code, _, err = _cli(["--env-file", "", "token", "add", "till-01"], env)
        assert code == 2 and "token rotate till-01" in err          # one token a device, never two
        code, out, _ = _cli(["--env-file", "", "token", "rotate", "till-01"], env)
        rotated = [line for line in out.splitlines() if len(line) > 30 and " " not in line][0]
        assert code == 0 and _eventually(lambda: _status_with(server.url, first) == 401)
        assert _status_with(server.url, rotated) == 200
        code, _, _ = _cli(["--env-file", "", "token", "remove", "till-02"], env)
        assert code == 0 and _eventually(lambda: _status_with(server.url, second) == 401)
        code, out, _ = _cli(["--env-file", "", "token", "list"], env)
        assert "till-01" in out and "sales" in out and rotated not in out
        assert re.search(r"till-02\s+\(removed: no token\)\s+\d{4}-\d\d-\d\dT", out)
        assert re.search(r"till-01\s+sales\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", out)
        assert oct(os.stat(tokens).st_mode & 0o777) == "0o600"
    finally:
        server.stop()


def test_sighup_rereads_the_tokens_file(tmp_path):
    tokens = tmp_path / "cloudsync.tokens"
    old, new = "a" * 43, "b" * 43
    tokens.write_text("till-01 %s\n" % cloudsync.hash_token(old))
    server = LiveServer(tmp_path, TOKENS_FILE=str(tokens))
    try:
        assert _status_with(server.url, old) == 200
        # rewritten in place, same size, same time: only a SIGHUP tells the server
        stat = os.stat(tokens)
        with open(tokens, "r+") as handle:
            handle.write("till-01 %s\n" % cloudsync.hash_token(new))
        os.utime(tokens, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        time.sleep(1.5)
        assert _status_with(server.url, old) == 200
        server.process.send_signal(signal.SIGHUP)
        assert _eventually(lambda: _status_with(server.url, new) == 200)
        assert _status_with(server.url, old) == 401
    finally:
        server.stop()


@pytest.mark.parametrize("setting", ["ADMIN_TOKEN", "METRICS_TOKEN"])
def test_a_monitoring_token_reads_status_and_metrics(backend, setting):
    application = started(backend, TOKENS="till " + TILL_TOKEN, **{setting: ADMIN})
    assert call(application, "GET", "/sync/status", headers=bearer(ADMIN)).status == 200
    assert call(application, "GET", "/metrics", headers=bearer(ADMIN)).status == 200
    assert call(application, "GET", "/sync/status", headers=bearer("wrong")).status == 401
    assert call(application, "POST", "/sync/pull", {}, headers=bearer(ADMIN)).status == 401   # not a device
    application.db.close()


def test_row_scopes_without_tokens_stop_the_start(scoped_backend):
    with pytest.raises(cloudsync.ConfigError, match="no device token is configured"):
        cloudsync.App(scoped_config(scoped_backend, TOKENS=""))


@pytest.mark.parametrize("line,message", [
    ("till sha256:%s scope.store_id=" % ("a" * 64), "is not a scope"),
    ("till sha256:%s scope.store_id=7 scope.store_id=8" % ("a" * 64), "given twice"),
    ("till sha256:%s scope.=7" % ("a" * 64), "is not a scope"),
])
def test_a_bad_scope_in_the_tokens_file_names_its_line(tmp_path, line, message):
    path = tmp_path / "tokens"
    path.write_text("# tills\n" + line + "\n")
    with pytest.raises(cloudsync.ConfigError, match="line 2: .*%s" % message):
        cloudsync.read_tokens_file(str(path))


def test_the_tokens_setting_is_written_as_the_tokens_file_is(tmp_path):
    line = "till-07 sha256:%s tables=sales,products scope.store_id=7,8" % ("ab" * 32)
    (tmp_path / "tokens").write_text(line + "\n")
    from_file, = cloudsync.read_tokens_file(str(tmp_path / "tokens"))
    from_setting, other = cloudsync.load_config(None, environ={"TOKENS": line + "; office secret"}).tokens
    assert (from_file.device_id, from_file.digest, from_file.tables, from_file.scopes) == \
        (from_setting.device_id, from_setting.digest, from_setting.tables, from_setting.scopes)
    assert other.device_id == "office" and other.scopes == {}


# ---------------------------------------------------------------------------
# Grants and row scopes: what one request may read and write
# ---------------------------------------------------------------------------


def test_read_only_table_refuses_push(secured, backend):
    backend.sql("INSERT INTO products (id, name) VALUES ('p1', 'Tea')")
    response = call(secured, "POST", "/sync/push", {"operations": [op("insert", id="s1"),
                    op("update", "products", id="p1", name="Free tea")]}, headers=bearer(TILL_TOKEN))
    assert response.status == 403 and response.json["error"] == "Read-only table" and response.json["op"] == 1
    assert backend.rows("sales") == []
    pulled = call(secured, "POST", "/sync/pull", {"tables": ["products"]}, headers=bearer(TILL_TOKEN))
    assert pulled.json["data"]["products"][0]["name"] == "Tea"


def test_token_limited_to_tables(secured, backend):
    response = call(secured, "POST", "/sync/push", {"operations": [op("insert", "customers", id="c1")]},
                    headers=bearer(OFFICE_TOKEN))
    assert response.status == 403 and response.json["error"] == "Table not permitted"
    assert call(secured, "POST", "/sync/pull", {"tables": ["customers"]}, headers=bearer(OFFICE_TOKEN)).status == 403
    everything = call(secured, "POST", "/sync/pull", {}, headers=bearer(OFFICE_TOKEN)).json
    assert set(everything["data"]) == {"products", "sales"}


def test_status_shows_a_limited_device_only_its_tables(secured):
    status = call(secured, "GET", "/sync/status", headers=bearer(OFFICE_TOKEN)).json
    assert status["allowed_tables"] == ["sales", "products"] and sorted(status["tables"]) == ["products", "sales"]
    assert len(call(secured, "GET", "/sync/status", headers=bearer(TILL_TOKEN)).json["tables"]) == len(TABLES)


def test_a_token_naming_a_table_no_longer_allowed_keeps_the_others(backend, tmp_path, caplog):
    tokens = tmp_path / "tokens"
    tokens.write_text("office %s tables=products,sales\n" % cloudsync.hash_token(OFFICE_TOKEN))
    application = started(backend, ALLOWED_TABLES="sales", TOKENS_FILE=str(tokens))
    assert "names products, which is not in ALLOWED_TABLES: ignored" in caplog.text
    assert call(application, "POST", "/sync/pull", {"tables": ["sales"]}, headers=bearer(OFFICE_TOKEN)).status == 200
    application.db.close()


def _readme_setting(name):
    """The value README's Row scopes example gives a setting (NAME=... at the start of a line)."""
    text = open(os.path.join(HERE, "docs", "protocol.md"), encoding="utf-8").read()
    return re.search(r"^%s=(\S+)$" % name, text[text.index("### Row scopes"):], re.M).group(1)


def test_readme_row_scopes_example_works_as_shown_on_the_example_schema(backend, tmp_path):
    tokens = str(tmp_path / "cloudsync.tokens")
    token = cloudsync.add_token(tokens, "till-07", scopes={"store_id": ["7"]})
    settings = dict(ALLOWED_TABLES=_readme_setting("ALLOWED_TABLES"), ROW_SCOPES=_readme_setting("ROW_SCOPES"),
                    TOKENS_FILE=tokens)
    env = dict(backend.settings, **settings)
    assert _cli(["--env-file", "", "migrate"], env)[0] == 0
    code, out, _ = _cli(["--env-file", "", "check"], env)
    assert code == 0 and "0 problem(s)" in out, out              # every scoped table has its index
    application = started(backend, **settings)
    backend.sql("INSERT INTO product_stock (product_id, store_id, qty) VALUES ('p1', 7, 10), ('p1', 8, 10)")
    # README's increment, as it is written there
    text = open(os.path.join(HERE, "docs", "protocol.md"), encoding="utf-8").read()
    increment = json.loads(re.search(r'`(\{"table": "product_stock", "action": "increment",[^`]*\})`',
                                     text.replace("\n", " ")).group(1))
    answer = call(application, "POST", "/sync/push", {"batch_id": "b1", "operations": [increment]},
                  headers=bearer(token))
    assert answer.status == 200, answer.body
    assert sorted(backend.rows("product_stock")) == [("p1", 7, 8), ("p1", 8, 10)]
    answer = call(application, "POST", "/sync/push", {"batch_id": "b2", "operations": [
        dict(increment, data=dict(increment["data"], store_id=8))]}, headers=bearer(token))
    # another store's row is not there for this till: missing, and untouched
    assert answer.status == 200 and [entry["op"] for entry in answer.json["missing"]] == [0]
    assert sorted(backend.rows("product_stock")) == [("p1", 7, 8), ("p1", 8, 10)]
    application.db.close()


def test_seed_pull_shows_each_device_its_own_rows_and_never_shares_a_cached_answer(scoped_backend, scoped):
    seed_orders(scoped_backend, (1, 7, "1.00", "a"), (2, 8, "2.00", "b"), (3, 7, "3.00", "c"), (4, None, "4.00", "d"))
    scoped_backend.sql("INSERT INTO catalogue (id, name) VALUES (1, 'tea')")
    seen, etags = {}, {}
    for token, stores in STORES_OF.items():
        for _ in range(2):                      # the second answer comes from the cache
            answer = spull(scoped, token, tables=["orders", "catalogue"])
            assert answer.status == 200
            seen[token] = sorted(row["id"] for row in answer.json["data"]["orders"])
            assert [row["id"] for row in answer.json["data"]["catalogue"]] == [1]
            etags.setdefault(token, answer.headers["ETag"])
            assert answer.headers["ETag"] == etags[token]
    assert seen == {"t7": [1, 3], "t8": [2], "tb": [1, 2, 3], "to": [1, 2, 3, 4]}
    assert len(set(etags.values())) == len(etags)
    assert call(scoped, "POST", "/sync/pull", {"tables": ["orders", "catalogue"]},
                headers=dict(as_device("t7"), **{"If-None-Match": etags["t7"]})).status == 304
    # another store's ETag is not this device's answer
    answer = call(scoped, "POST", "/sync/pull", {"tables": ["orders", "catalogue"]},
                  headers=dict(as_device("t8"), **{"If-None-Match": etags["t7"]}))
    assert answer.status == 200 and [row["id"] for row in answer.json["data"]["orders"]] == [2]


def test_a_token_without_a_value_for_a_scoped_table_may_not_use_it(scoped_backend, scoped):
    seed_orders(scoped_backend, (1, 7, "1.00", "a"))
    answer = spull(scoped, "tn", since=None)
    assert answer.status == 200 and sorted(answer.json["changes"]) == ["catalogue", "techs"]
    for fields in ({"tables": ["orders"]}, {"tables": ["orders"], "since": None}, {"tables": ["jobs", "catalogue"]}):
        answer = spull(scoped, "tn", **fields)
        assert (answer.status, answer.json["error"]) == (403, "Table not permitted")
    answer = spush(scoped, "tn", [op("insert", "catalogue", id=5, name="x"), op("insert", "orders", id=9, store_id=7)])
    assert (answer.status, answer.json["error"], answer.json["op"]) == (403, "Table not permitted", 1)
    assert scoped_backend.rows("catalogue") == []
    status = call(scoped, "GET", "/sync/status", headers=as_device("tn")).json
    assert status["allowed_tables"] == ["catalogue", "techs"]
    full = call(scoped, "GET", "/sync/status", headers=as_device("to")).json
    assert full["tables"]["orders"]["scope"] == "store_id" and "scope" not in full["tables"]["catalogue"]


def test_rows_that_move_between_stores_reach_devices_as_deletes_and_upserts(scoped_backend, scoped):
    seed_orders(scoped_backend, (1, 7, "1.00", "a"), (2, 8, "2.00", "b"), (3, 7, "3.00", "c"))
    first = {token: sync_to_end(scoped, token, ["orders"]) for token in ("t7", "t8", "to")}
    assert sorted(first["t7"][0]["orders"]) == [1, 3] and sorted(first["t8"][0]["orders"]) == [2]
    # another program moves a row, adds one, deletes one, edits one
    scoped_backend.sql("UPDATE orders SET store_id = 8 WHERE id = 1")
    seed_orders(scoped_backend, (5, 7, "5.00", "e"), (6, 9, "6.00", "f"))
    scoped_backend.sql("DELETE FROM orders WHERE id = 3")
    scoped_backend.sql("UPDATE orders SET note = 'B' WHERE id = 2")
    after = {token: sync_to_end(scoped, token, ["orders"], since=first[token][2], limit=1)
             for token in ("t7", "t8", "to")}
    assert sorted(after["t7"][0]["orders"]) == [5] and sorted(after["t7"][1]["orders"]) == [1, 3]
    # store 8 hears of the row that came in and the one that changed, never of 3, 5 or 6
    assert sorted(after["t8"][0]["orders"]) == [1, 2] and after["t8"][1]["orders"] == []
    assert after["t8"][0]["orders"][1]["store_id"] == 8
    assert sorted(after["to"][0]["orders"]) == [1, 2, 5, 6] and after["to"][1]["orders"] == [3]
    # a device of both stores moves a row back: store 7 gets it, store 8 loses it
    assert spush(scoped, "tb", [op("update", "orders", id=1, store_id=7)]).status == 200
    again = {token: sync_to_end(scoped, token, ["orders"], since=after[token][2]) for token in ("t7", "t8")}
    assert sorted(again["t7"][0]["orders"]) == [1] and again["t7"][1]["orders"] == []
    assert again["t8"][0]["orders"] == {} and again["t8"][1]["orders"] == [1]
    # to null and back: only the office sees the row while it belongs to no store
    scoped_backend.sql("UPDATE orders SET store_id = NULL WHERE id = 5")
    assert sync_to_end(scoped, "t7", ["orders"], since=again["t7"][2])[1]["orders"] == [5]


def test_a_text_scope_inside_a_composite_key_is_matched_byte_for_byte(scoped_backend, scoped):
    for region, day, who in (("north", "2026-12-01", "ann"), ("North", "2026-12-02", "eve"),
                             ("south", "2026-12-01", "bob")):
        scoped_backend.sql("INSERT INTO visits (region, day, who) VALUES (?, ?, ?)", (region, day, who))
    rows, _, since = sync_to_end(scoped, "t7", ["visits"])
    assert sorted(rows["visits"]) == [("north", "2026-12-01")]
    # the key itself moves to another region: a delete of the old key for north, the row for south
    _, _, south = sync_to_end(scoped, "t8", ["visits"])
    scoped_backend.sql("UPDATE visits SET region = 'south', day = '2026-12-03' WHERE who = 'ann'")
    upserted, deleted, _ = sync_to_end(scoped, "t7", ["visits"], since=since)
    assert upserted["visits"] == {} and deleted["visits"] == [{"region": "north", "day": "2026-12-01"}]
    upserted, deleted, _ = sync_to_end(scoped, "t8", ["visits"], since=south)
    assert sorted(upserted["visits"]) == [("south", "2026-12-03")] and deleted["visits"] == []


OUT_OF_SCOPE_PUSHES = [
    # (token, the operation after a valid insert, expected status, error)
    ("t7", op("insert", "orders", id=10, store_id=8), 403, "Out of scope"),
    ("t7", op("insert", "orders", id=10, store_id="8"), 403, "Out of scope"),
    ("t7", op("upsert", "orders", id=10, store_id=9, note="x"), 403, "Out of scope"),
    ("t7", op("update", "orders", id=1, store_id=8), 403, "Out of scope"),
    ("t7", op("update", "orders", id=1, store_id=None), 403, "Out of scope"),
    ("tb", op("insert", "orders", id=10, note="which store?"), 403, "Out of scope"),
    ("t7", op("insert", "visits", region="south", day="2026-12-01"), 403, "Out of scope"),
    ("t7", op("insert", "visits", region="North", day="2026-12-01"), 403, "Out of scope"),
    ("t7", op("insert", "orders", id=2, store_id=7), 409, "Sync failed"),     # the key is another store's
    ("t7", op("upsert", "orders", id=2, store_id=7, note="mine"), 409, "Sync failed"),
    ("t7", op("upsert", "orders", id=2, note="mine"), 409, "Sync failed"),
    ("t7", op("insert", "catalogue", id=1, name="again"), 409, "Sync failed"),
]


@pytest.mark.parametrize("token,operation,status,error", OUT_OF_SCOPE_PUSHES)
def test_a_push_outside_the_devices_scope_is_refused_and_nothing_is_applied(scoped_backend, scoped, token,
                                                                          operation, status, error):
    seed_orders(scoped_backend, (1, 7, "1.00", "a"), (2, 8, "2.00", "b"))
    scoped_backend.sql("INSERT INTO catalogue (id, name) VALUES (1, 'tea')")
    before = {table: scoped_backend.rows(table) for table in ("orders", "visits", "catalogue")}
    answer = spush(scoped, token, [op("insert", "orders", id=20, store_id=7), operation])
    assert (answer.status, answer.json["error"], answer.json.get("op")) == (status, error, 1)
    assert {table: scoped_backend.rows(table) for table in before} == before
    assert "mine" not in answer.body.decode() and "2.00" not in answer.body.decode()


def test_updates_and_deletes_of_another_stores_row_find_nothing_and_show_nothing(scoped_backend, scoped):
    seed_orders(scoped_backend, (1, 7, "1.00", "a"), (2, 8, "2.00", "secret"))
    answer = spush(scoped, "t7", [op("update", "orders", id=2, note="mine"), op("delete", "orders", id=2),
                                  op("update", "orders", id=1, note="ok")])
    assert answer.status == 200 and answer.json["missing"] == [{"op": 0, "table": "orders", "key": 2}]
    assert scoped_backend.rows("orders")[1][3] == "secret" and scoped_backend.rows("orders")[0][3] == "ok"
    # with a checkpoint, the conflict answer names the op but shows no row of store 8
    _, _, since = sync_to_end(scoped, "t7", ["orders"])
    scoped_backend.sql("UPDATE orders SET note = 'changed' WHERE id = 2")
    answer = spush(scoped, "t7", [op("update", "orders", id=2, note="mine")], checkpoint=since)
    assert answer.status == 409 and answer.json["conflicts"] == [
        {"op": 0, "table": "orders", "key": 2, "columns": ["id", "note", "store_id", "total"], "server_row": None}]
    answer = spush(scoped, "t7", [op("update", "orders", id=2, note="mine")], checkpoint=since, on_conflict="skip")
    assert answer.status == 200 and "changed" not in answer.body.decode()
    assert scoped_backend.rows("orders")[1][3] == "changed"


def test_an_insert_without_the_scope_column_gets_the_tokens_only_value(scoped_backend, scoped):
    _, _, since = sync_to_end(scoped, "t7", ["orders"])
    answer = spush(scoped, "t7", [op("insert", "orders", id=30, note="no store"),
                                  op("upsert", "orders", id=31, note="no store")], checkpoint=since)
    assert answer.status == 200 and scoped_backend.rows("orders") == [
        (30, 7, None, "no store"), (31, 7, None, "no store")]
    # the device does not hold store_id yet: its checkpoint stays, and its next pull brings the rows
    assert answer.json["checkpoint"] == since
    upserted, _, _ = sync_to_end(scoped, "t7", ["orders"], since=since)
    assert {key: row["store_id"] for key, row in upserted["orders"].items()} == {30: 7, 31: 7}


def test_a_push_inside_the_scope_moves_the_checkpoint_as_before(scoped_backend, scoped):
    _, _, since = sync_to_end(scoped, "t7", ["orders"])
    answer = spush(scoped, "t7", [op("insert", "orders", id=40, store_id=7, total="1.50", note="n")],
                   checkpoint=since, device_id="till7", batch_id="b1")
    assert answer.status == 200 and answer.json["checkpoint"] != since
    assert sync_to_end(scoped, "t7", ["orders"], since=answer.json["checkpoint"])[0]["orders"] == {}


def test_a_changed_scope_makes_the_next_pull_start_again(scoped_backend, tmp_path):
    tokens_file = str(tmp_path / "tokens")
    secret = cloudsync.add_token(tokens_file, "till", scopes={"store_id": ("7",)})
    config = scoped_config(scoped_backend, TOKENS="", TOKENS_FILE=tokens_file)
    application = cloudsync.App(config)
    application.start()
    try:
        seed_orders(scoped_backend, (1, 7, "1.00", "a"), (2, 8, "2.00", "b"))
        rows, _, since = sync_to_end(application, secret, ["orders"])
        assert sorted(rows["orders"]) == [1]
        secret = cloudsync.rotate_token(tokens_file, "till", scopes={"store_id": ("8",)})
        application.auth.reload(force=True)
        answer = spull(application, secret, tables=["orders"], since=since)
        assert (answer.status, answer.json["error"], answer.json["reset"]) == (410, "Checkpoint expired", True)
        assert sorted(sync_to_end(application, secret, ["orders"])[0]["orders"]) == [2]
        # rotating without --scope keeps the scope
        secret = cloudsync.rotate_token(tokens_file, "till")
        assert "scope.store_id=8" in open(tokens_file).read()
    finally:
        application.db.close()


def test_foreign_key_cascades_move_and_delete_rows_between_scopes(scoped_backend, scoped):
    for name in ("ann", "bob"):
        scoped_backend.sql("INSERT INTO techs (name) VALUES (?)", (name,))
    for job, tech in ((1, "ann"), (2, "ann"), (3, "bob")):
        scoped_backend.sql("INSERT INTO jobs (id, tech, what) VALUES (?, ?, 'fix')", (job, tech))
    start = {token: sync_to_end(scoped, token, ["jobs"]) for token in ("t7", "t8", "tc", "to")}
    assert sorted(start["t7"][0]["jobs"]) == [1, 2] and start["tc"][0]["jobs"] == {}
    scoped_backend.sql("UPDATE techs SET name = 'cat' WHERE name = 'ann'")     # ON UPDATE CASCADE
    scoped_backend.sql("DELETE FROM techs WHERE name = 'bob'")                 # ON DELETE CASCADE
    after = {token: sync_to_end(scoped, token, ["jobs"], since=start[token][2]) for token in start}
    assert after["t7"][0]["jobs"] == {} and sorted(after["t7"][1]["jobs"]) == [1, 2]
    assert {key: row["tech"] for key, row in after["tc"][0]["jobs"].items()} == {1: "cat", 2: "cat"}
    assert after["t8"][0]["jobs"] == {} and after["t8"][1]["jobs"] == [3]
    assert sorted(after["to"][0]["jobs"]) == [1, 2] and after["to"][1]["jobs"] == [3]


# the property: steps by devices and by plain SQL, interleaved with pulls
SCOPE_DEVICES = ("t7", "t8", "tb", "to")
SCOPE_STORES = st.sampled_from([7, 8, 9, None])
SCOPE_IDS = st.integers(1, 6)
SCOPE_STEP = st.one_of(
    st.tuples(st.just("sql_insert"), SCOPE_IDS, SCOPE_STORES),
    st.tuples(st.just("sql_move"), SCOPE_IDS, SCOPE_STORES),
    st.tuples(st.just("sql_delete"), SCOPE_IDS, st.none()),
    st.tuples(st.just("push_insert"), SCOPE_IDS, SCOPE_STORES, st.sampled_from(SCOPE_DEVICES)),
    st.tuples(st.just("push_move"), SCOPE_IDS, SCOPE_STORES, st.sampled_from(SCOPE_DEVICES)),
    st.tuples(st.just("push_delete"), SCOPE_IDS, st.none(), st.sampled_from(SCOPE_DEVICES)),
    st.tuples(st.just("pull"), st.integers(1, 3), st.none(), st.sampled_from(SCOPE_DEVICES)),
)


def _in_scope(token, store):
    return STORES_OF[token] is None or store in STORES_OF[token]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(SCOPE_STEP, min_size=10, max_size=40))
@example(steps=[("sql_insert", 1, 7), ("pull", 1, None, "t7"), ("sql_move", 1, 8), ("sql_insert", 2, 7),
                ("pull", 1, None, "t7"), ("push_move", 1, 7, "tb"), ("pull", 1, None, "t8"),
                ("sql_move", 1, None), ("pull", 1, None, "t7"), ("push_delete", 1, None, "to")])
def test_property_scoped_devices_hold_exactly_their_stores_rows(scoped_backend, scoped, steps):
    scoped_backend.sql("DELETE FROM orders")
    held = {token: {} for token in SCOPE_DEVICES}           # what each device holds: id -> store
    since = {token: None for token in SCOPE_DEVICES}

    def pull_once(token, limit):
        answer = spull(scoped, token, tables=["orders"], since=since[token], limit=limit)
        if answer.status == 410:
            held[token], since[token] = {}, None             # the device starts again
            return True
        assert answer.status == 200, answer.json
        change = answer.json["changes"]["orders"]
        for row in change["upserted"]:
            # a device never holds, even for a moment, a row outside its scope
            assert _in_scope(token, row["store_id"]), (token, row)
            held[token][row["id"]] = row["store_id"]
        for key in change["deleted"]:
            held[token].pop(key, None)
        since[token] = answer.json["checkpoint"]
        return answer.json["has_more"]

    for step in steps:
        kind, key, store = step[:3]
        if kind == "sql_insert":
            scoped_backend.sql("DELETE FROM orders WHERE id = ?", (key,))
            scoped_backend.sql("INSERT INTO orders (id, store_id, note) VALUES (?, ?, 'sql')", (key, store))
        elif kind == "sql_move":
            scoped_backend.sql("UPDATE orders SET store_id = ? WHERE id = ?", (store, key))
        elif kind == "sql_delete":
            scoped_backend.sql("DELETE FROM orders WHERE id = ?", (key,))
        elif kind == "pull":
            pull_once(step[3], key)
        else:
            token = step[3]
            before = scoped_backend.rows("orders")
            data = {"id": key} if kind == "push_delete" else {"id": key, "store_id": store}
            action = {"push_insert": "upsert", "push_move": "update", "push_delete": "delete"}[kind]
            answer = spush(scoped, token, [op(action, "orders", **data)])
            assert answer.status in (200, 403, 409), answer.json
            if answer.status != 200:
                assert scoped_backend.rows("orders") == before
            elif kind != "push_delete" and not _in_scope(token, store):
                raise AssertionError("a push outside the scope was applied: %r" % (step,))
    server = {row[0]: row[1] for row in scoped_backend.rows("orders")}
    for token in SCOPE_DEVICES:
        while pull_once(token, 1000):
            pass
        assert held[token] == {key: store for key, store in server.items() if _in_scope(token, store)}, token


LEDGER_AND_COLUMN_REFUSALS = [
    # (operation, status, error, extra fields of the answer)
    (op("update", "ledger", id=1, memo="changed"), 403, "Insert-only table", {"op": 1}),
    (op("delete", "ledger", id=1), 403, "Insert-only table", {"op": 1}),
    (op("upsert", "ledger", id=1, memo="changed"), 403, "Insert-only table", {"op": 1}),
    (op("insert", "shoppers", id=2, name="Bo", credit_limit="900.00"), 403, "Read-only column",
     {"op": 1, "column": "credit_limit"}),
    (op("update", "shoppers", id=1, credit_limit="900.00"), 403, "Read-only column",
     {"op": 1, "column": "credit_limit"}),
    (op("upsert", "shoppers", id=1, name="Ann", credit_limit="100.00"), 403, "Read-only column",
     {"op": 1, "column": "credit_limit"}),
]


@pytest.mark.parametrize("operation,status,error,fields", LEDGER_AND_COLUMN_REFUSALS)
def test_ledgers_take_only_inserts_and_read_only_columns_are_never_set(shop_backend, shop, operation, status,
                                                                      error, fields):
    shop_backend.sql("INSERT INTO ledger (id, amount, memo) VALUES (1, 5.00, 'sale')")
    before = shop_backend.rows("ledger"), shop_backend.rows("shoppers")
    answer = push(shop, [op("insert", "ledger", id=2, amount="1.00"), operation])
    assert (answer.status, answer.json["error"]) == (status, error)
    assert {name: answer.json[name] for name in fields} == fields
    assert (shop_backend.rows("ledger"), shop_backend.rows("shoppers")) == before


def test_what_ledgers_and_read_only_columns_still_allow(shop_backend, shop):
    answer = push(shop, [op("insert", "ledger", id=3, amount="2.50", memo="sale"),
                         op("insert", "shoppers", id=2, name="Bo"),
                         op("update", "shoppers", id=1, phone="1"),
                         op("delete", "shoppers", id=2, name="Bo", credit_limit="100.00")])
    assert answer.status == 200, answer.json
    shop_backend.sql("INSERT INTO shoppers (id, name) VALUES (3, 'Cy')")
    row = [row for row in pull(shop, tables=["shoppers"]).json["data"]["shoppers"] if row["id"] == 3][0]
    assert row["credit_limit"] == "100.00"                  # the database's default


# A scoped till with a valid token tries every path to another store's rows.
# The grant built for each request decides every operation (Grant.decide), and
# every statement carries its scope.

# -- a scoped till against another store ----------------------------------------------

HOSTILE_SQLITE = [
    "CREATE TABLE orders (id TEXT PRIMARY KEY, store_id INTEGER NOT NULL, qty INTEGER, price DECIMAL(10,2),"
    " note TEXT)",
    "CREATE INDEX orders_by_store ON orders (store_id)",
    "CREATE TABLE ledger (id TEXT PRIMARY KEY, region TEXT NOT NULL, amount INTEGER, note TEXT)",
    "CREATE INDEX ledger_by_region ON ledger (region)",
    "CREATE TABLE catalog (id INTEGER PRIMARY KEY, name TEXT)",
]
HOSTILE_MYSQL = [
    "CREATE TABLE orders (id VARCHAR(20) PRIMARY KEY, store_id INT NOT NULL, qty INT, price DECIMAL(10,2),"
    " note VARCHAR(60), KEY orders_by_store (store_id)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE ledger (id VARCHAR(20) PRIMARY KEY, region VARCHAR(20) NOT NULL, amount INT, note VARCHAR(60),"
    " KEY ledger_by_region (region)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    "CREATE TABLE catalog (id INT PRIMARY KEY, name VARCHAR(60)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
]
HOSTILE_SETTINGS = dict(ALLOWED_TABLES="orders,ledger,catalog", ROW_SCOPES="orders.store_id,ledger.region",
                        READ_ONLY_COLUMNS="orders.price", INSERT_ONLY_TABLES="ledger", READ_ONLY_TABLES="catalog",
                        TOKENS="till t7 scope.store_id=7 scope.region=north; office to scope.store_id=* "
                               "scope.region=*")
MY_STORE, MY_REGION = 7, "north"
OTHER_STORES = [8, 70, -7, 0]
OTHER_REGIONS = ["north ", "North", "south", "nort", ""]


@pytest.fixture(params=["sqlite", "mysql"])
def hostile(request, tmp_path):
    """A shop chain's tables and an app with a till of store 7 (region north) and the office."""
    backend = _fresh_database(request.param, HOSTILE_SQLITE if request.param == "sqlite" else HOSTILE_MYSQL,
                              tmp_path, request)
    application = started(backend, **HOSTILE_SETTINGS)
    yield application, backend
    application.db.close()
    backend.close()


def _mine(table, row):
    """Whether a row (as the database holds it) is in the till's scope, byte for byte."""
    return row[1] == (MY_STORE if table == "orders" else MY_REGION)


def _others(backend):
    """Every row the till may not touch: other stores' and regions', and the whole catalog."""
    rows = {}
    for table in ("orders", "ledger", "catalog"):
        for row in backend.sql("SELECT * FROM %s" % table):
            if table == "catalog" or not _mine(table, row):
                rows[table, row[0]] = tuple(row)
    return rows


def test_an_increment_of_the_scope_column_cannot_move_a_row_to_another_store(hostile):
    application, backend = hostile
    backend.sql("INSERT INTO orders (id, store_id, qty) VALUES ('o1', 7, 1)")
    for added in (1, -7, 0, "1"):
        response = spush(application, "t7", [op("increment", "orders", id="o1", store_id=added)],
                         batch_id=str(uuid.uuid4()))
        assert response.status == 403 and response.json["error"] == "Out of scope", response.body
    assert backend.sql("SELECT store_id, qty FROM orders") == [(7, 1)]
    # an update doing the same was always refused; an increment of another column is fine
    assert spush(application, "t7", [op("update", "orders", id="o1", store_id=8)]).status == 403
    assert spush(application, "t7", [op("increment", "orders", id="o1", qty=2)], batch_id="b").status == 200
    assert backend.sql("SELECT store_id, qty FROM orders") == [(7, 3)]


def test_a_region_with_a_trailing_space_or_another_case_is_another_store(hostile):
    application, backend = hostile
    _, _, since = sync_to_end(application, "t7", ["ledger"])
    for number, region in enumerate(("north ", "North", "north")):
        backend.sql("INSERT INTO ledger (id, region, amount) VALUES (?, ?, 1)", ("l%d" % number, region))
    backend.sql("DELETE FROM ledger")
    upserted, deleted, _ = sync_to_end(application, "t7", ["ledger"], since)
    # the till hears only of its own region's row, never the key of 'north ' or 'North'
    assert deleted["ledger"] == ["l2"] and upserted["ledger"] == {}


def _answers_of(application, token, operations, **fields):
    response = spush(application, token, operations, **fields)
    return response.status, {key: value for key, value in response.json.items() if key != "detail"}


def test_another_stores_changed_row_is_answered_as_a_key_nobody_holds(hostile):
    application, backend = hostile
    backend.sql("INSERT INTO orders (id, store_id, qty, note) VALUES ('theirs', 8, 1, 'secret')")
    _, _, checkpoint = sync_to_end(application, "t7", ["orders"])
    backend.sql("UPDATE orders SET qty = 2, note = 'secret 2' WHERE id = 'theirs'")     # changed since
    for action, data in (("delete", {}), ("update", {"qty": 5}), ("upsert", {"qty": 5})):
        for on_conflict in ("abort", "skip"):
            answers = [_answers_of(application, "t7", [op(action, "orders", id=key, **data)],
                                   checkpoint=checkpoint, on_conflict=on_conflict)
                       for key in ("theirs", "nobody-has-it")]
            for _, answer in answers:           # a checkpoint marks its push (a random id): no clue
                if answer.get("checkpoint"):
                    answer["checkpoint"] = dict(application.engine.checkpoints.decode(answer["checkpoint"]),
                                                x=None)
            shown = json.dumps(answers)
            assert "secret" not in shown
            theirs, nobodys = answers
            if action != "upsert":
                assert theirs == (nobodys[0], json.loads(json.dumps(nobodys[1]).replace("nobody-has-it", "theirs")))
    assert backend.sql("SELECT qty, note FROM orders WHERE id = 'theirs'") == [(2, "secret 2")]


@pytest.mark.parametrize("where", ["push", "operation"])
def test_a_push_judged_from_a_checkpoint_of_another_scope_is_410_never_applied(scoped, scoped_backend, where):
    """Store 8's till holding store 7's checkpoint (or its own, issued before its scope changed)
    must not have its edits judged from what another scope saw."""
    _, _, theirs = sync_to_end(scoped, "t7", ["orders"])
    _, _, mine = sync_to_end(scoped, "t8", ["orders"])
    insert = op("insert", "orders", id=80, store_id=8, total="1.00")
    own = spush(scoped, "t8", [insert], checkpoint=mine)
    assert own.status == 200, own.json
    edit = op("update", "orders", id=80, note="till 8")
    answer = spush(scoped, "t8", [edit], checkpoint=theirs) if where == "push" \
        else spush(scoped, "t8", [dict(edit, checkpoint=theirs)], checkpoint=mine)
    assert answer.status == 410 and answer.json["code"] == "expired" and answer.json["reset"] is True
    assert [row[3] for row in scoped_backend.rows("orders") if row[0] == 80] == [None]


def test_a_scoped_device_cannot_tell_whether_other_stores_are_busy(hostile):
    application, backend = hostile
    backend.sql("INSERT INTO orders (id, store_id, qty) VALUES ('mine', 7, 1), ('theirs', 8, 1)")
    seen = []
    for step in range(3):
        status = call(application, "GET", "/sync/status", headers=as_device("t7"))
        seed = spull(application, "t7", tables=["orders", "ledger"])
        seen.append((status.json, seed.headers.get("ETag"), seed.body))
        # another store works
        backend.sql("INSERT INTO orders (id, store_id, qty) VALUES (?, 8, 1)", ("other-%d" % step,))
        backend.sql("UPDATE orders SET qty = qty + 1 WHERE id = 'theirs'")
        spush(application, "to", [op("insert", "orders", id="office-%d" % step, store_id=9)])
        # a device unaware of the others finds the same answers, its seed pull still current (304)
        again = spull(application, "t7", tables=["orders", "ledger"])
        assert call(application, "POST", "/sync/pull", {"tables": ["orders", "ledger"]},
                    headers=dict(as_device("t7"), **{"If-None-Match": again.headers["ETag"]})).status == 304
    assert all(entry == seen[0] for entry in seen), seen
    assert seen[0][0]["last_seq"] is None and seen[0][0]["scope"] == {"store_id": ["7"], "region": ["north"]}


STATUS_RULES = {
    "orders": {"read_only": False, "insert_only": False, "read_only_columns": ["price"],
               "actions": ["insert", "update", "delete", "upsert", "increment"]},
    "ledger": {"read_only": False, "insert_only": True, "read_only_columns": [], "actions": ["insert"]},
    "catalog": {"read_only": True, "insert_only": False, "read_only_columns": [], "actions": []},
}


def test_status_tells_a_device_its_scope_and_each_tables_rules(hostile):
    application, _ = hostile
    status = call(application, "GET", "/sync/status", headers=as_device("t7")).json
    assert {name: table["rules"] for name, table in status["tables"].items()} == STATUS_RULES
    office = call(application, "GET", "/sync/status", headers=as_device("to")).json
    assert office["scope"] == {"store_id": ["*"], "region": ["*"]} and isinstance(office["last_seq"], int)


def test_a_device_limited_to_some_tables_learns_nothing_of_the_others(backend):
    application = started(backend, TOKENS="till t1 tables=sales")
    try:
        probes = {}
        for table in ("products", "no_such_table", "cloudsync_meta", "item_sales"):
            for data in ({"id": "x"}, {"no_column": 1}, {}, {"quantity": "a lot"}):
                response = call(application, "POST", "/sync/push", {"operations": [op("update", table, **data)]},
                                headers=as_device("t1"))
                answer = response.json
                probes.setdefault((json.dumps(data)), set()).add(
                    (response.status, answer["error"], answer["detail"].replace(json.dumps(table), "T")))
            response = call(application, "POST", "/sync/pull", {"tables": [table]}, headers=as_device("t1"))
            probes.setdefault("pull", set()).add(
                (response.status, response.json["error"], response.json["detail"].replace(json.dumps(table), "T")))
        assert all(len(answers) == 1 for answers in probes.values()), probes
        status = call(application, "GET", "/sync/status", headers=as_device("t1")).json
        assert status["allowed_tables"] == ["sales"] and list(status["tables"]) == ["sales"]
    finally:
        application.db.close()


# The hostile tenant as a property: a till of store 7 (region north) sends random operations of
# every action, with keys and values of every JSON type, other stores' keys, and text that
# differs only by a trailing space or its case, while the office writes in every store.

HOSTILE_SCOPE_VALUES = [MY_STORE, "7", 7.0, True, None, [7]] + OTHER_STORES + ["8"]
HOSTILE_REGION_VALUES = [MY_REGION, None, 7, ["north"]] + OTHER_REGIONS
HOSTILE_NUMBERS = [1, -2, "3", "x", None, True, [1], {"n": 1}, 10 ** 30, 2.5]


def _hostile_key(data, backend, table):
    known = [row[0] for row in backend.sql("SELECT id FROM %s" % table)]
    hostile = ["new-%d" % data.draw(st.integers(0, 5)), 0, 1, True, None, [1], {"id": 1}, "", " "]
    key = data.draw(st.sampled_from(known if known and data.draw(st.booleans()) else hostile + known))
    if isinstance(key, str) and key and data.draw(st.booleans()):
        key = data.draw(st.sampled_from([key.upper(), key + " ", " " + key, key.lower()]))
    return key


def _hostile_operation(data, backend):
    table = data.draw(st.sampled_from(["orders", "ledger", "catalog", "orders"]))
    action = data.draw(st.sampled_from(["update", "delete", "insert", "increment", "upsert"]))
    payload = {"id": _hostile_key(data, backend, table)}
    if table == "orders":
        for column, pool in (("store_id", HOSTILE_SCOPE_VALUES), ("qty", HOSTILE_NUMBERS),
                             ("price", ["9.99", 1]), ("note", ["mine", "x" * 3])):
            if data.draw(st.booleans()):
                payload[column] = data.draw(st.sampled_from(pool))
    elif table == "ledger":
        for column, pool in (("region", HOSTILE_REGION_VALUES), ("amount", HOSTILE_NUMBERS)):
            if data.draw(st.booleans()):
                payload[column] = data.draw(st.sampled_from(pool))
    elif data.draw(st.booleans()):
        payload["name"] = "changed"
    return op(action, table, **payload)


def _office_write(data, backend, counter):
    table = data.draw(st.sampled_from(["orders", "ledger", "catalog"]))
    marker = "@M%d@" % counter
    kind = data.draw(st.sampled_from(["insert", "insert", "update", "move", "delete"]))
    keys = [row[0] for row in backend.sql("SELECT id FROM %s" % table)]
    if kind != "insert" and not keys:
        kind = "insert"
    if table == "catalog":
        if kind == "insert":
            backend.sql("INSERT INTO catalog (id, name) VALUES (?, ?)", (counter, marker))
        elif kind == "delete":
            backend.sql("DELETE FROM catalog WHERE id = ?", (data.draw(st.sampled_from(keys)),))
        else:
            backend.sql("UPDATE catalog SET name = ? WHERE id = ?", (marker, data.draw(st.sampled_from(keys))))
        return
    scope_column, values = ("store_id", [MY_STORE] + OTHER_STORES) if table == "orders" \
        else ("region", [MY_REGION] + OTHER_REGIONS)
    amount = "qty" if table == "orders" else "amount"
    if kind == "insert":
        # half of the office's rows are the till's own: those it may touch, and must not overreach from
        mine = data.draw(st.booleans())
        backend.sql("INSERT INTO %s (id, %s, %s, note) VALUES (?, ?, 1, ?)" % (table, scope_column, amount),
                    ("k%d" % counter, values[0] if mine else data.draw(st.sampled_from(values[1:])), marker))
    elif kind == "delete":
        backend.sql("DELETE FROM %s WHERE id = ?" % table, (data.draw(st.sampled_from(keys)),))
    elif kind == "move":
        backend.sql("UPDATE %s SET %s = ?, note = ? WHERE id = ?" % (table, scope_column),
                    (data.draw(st.sampled_from(values)), marker, data.draw(st.sampled_from(keys))))
    else:
        backend.sql("UPDATE %s SET %s = %s + 1, note = ? WHERE id = ?" % (table, amount, amount),
                    (marker, data.draw(st.sampled_from(keys))))


class _HostileWatch:
    """What the till may ever learn: keys and office markers of rows that were in its scope."""

    def __init__(self, backend):
        self.backend = backend
        self.keys = {"orders": set(), "ledger": set(), "catalog": set()}
        self.markers = set()

    def note_mine(self):
        for table in ("orders", "ledger", "catalog"):
            for row in self.backend.sql("SELECT * FROM %s" % table):
                if table == "catalog" or _mine(table, row):
                    self.keys[table].add(row[0])
                    self.markers.update(str(value) for value in row if str(value).startswith("@M"))

    def check_answer(self, body, all_markers):
        text = body.decode("utf-8")
        leaked = [marker for marker in all_markers - self.markers if marker in text]
        assert not leaked, (leaked, text[:500])


def _hostile_pull(application, watch, copy, since, all_markers):
    while True:
        response = spull(application, "t7", tables=["orders", "ledger", "catalog"], since=since, limit=3)
        assert response.status in (200, 410), response.body
        watch.check_answer(response.body, all_markers)
        if response.status == 410:
            copy.clear()
            since = None
            continue
        for table, change in response.json["changes"].items():
            for row in change["upserted"]:
                if table != "catalog":
                    assert (row["store_id"] == MY_STORE) if table == "orders" else (row["region"] == MY_REGION), row
                copy[table, row["id"]] = row
            for key in change["deleted"]:
                assert key in watch.keys[table], (table, key)
                copy.pop((table, key), None)
        since = response.json["checkpoint"]
        if not response.json["has_more"]:
            return since


def _server_scope(backend):
    rows = {}
    for table, columns in (("orders", ("id", "store_id", "qty", "note")), ("ledger", ("id", "region", "amount", "note")),
                           ("catalog", ("id", "name"))):
        for row in backend.sql("SELECT %s FROM %s" % (", ".join(columns), table)):
            if table == "catalog" or _mine(table, row):
                rows[table, row[0]] = dict(zip(columns, row))
    return rows


def _hostile_run(application, backend, data, steps):
    """One history; assertion errors are the property failing."""
    for table in ("orders", "ledger", "catalog"):
        backend.sql("DELETE FROM %s" % table)
    watch = _HostileWatch(backend)
    copy, since, counter, markers = {}, None, 0, set()
    for _ in range(steps):
        counter += 1
        if data.draw(st.booleans()):
            _office_write(data, backend, counter)
            markers.add("@M%d@" % counter)
            watch.note_mine()
            continue
        operations = [_hostile_operation(data, backend) for _ in range(data.draw(st.sampled_from([1, 1, 2, 3])))]
        others = _others(backend)
        prices = dict(backend.sql("SELECT id, price FROM orders"))
        ledger = {row[0]: tuple(row) for row in backend.sql("SELECT * FROM ledger")}
        fields = {"batch_id": str(uuid.uuid4()), "on_conflict": data.draw(st.sampled_from(["abort", "skip"]))}
        if since is not None and data.draw(st.booleans()):
            fields["checkpoint"] = since
        response = spush(application, "t7", operations, **fields)
        assert response.status < 500, response.body
        watch.check_answer(response.body, markers)
        for conflict in response.json.get("conflicts") or []:
            row = conflict["server_row"]
            assert row is None or row.get("store_id", MY_STORE) == MY_STORE, conflict
        assert _others(backend) == others, operations                    # no other store's row changed
        after = dict(backend.sql("SELECT id, price FROM orders"))
        assert all(after[key] == price for key, price in prices.items() if key in after), \
            operations                                                  # nor a read-only column
        assert {key: row for key, row in ((row[0], tuple(row)) for row in backend.sql("SELECT * FROM ledger"))
                if key in ledger} == ledger, operations                 # nor a row of the insert-only table
        watch.note_mine()
        since = _hostile_pull(application, watch, copy, since, markers)
        status = call(application, "GET", "/sync/status", headers=as_device("t7"))
        watch.check_answer(status.body, markers)
    since = _hostile_pull(application, watch, copy, since, markers)
    server = _server_scope(backend)
    assert sorted(copy) == sorted(server)
    for key, row in server.items():
        assert {name: copy[key][name] for name in row} == row, key


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_a_hostile_scoped_device_never_reaches_another_store(hostile, data):
    application, backend = hostile
    _hostile_run(application, backend, data, steps=12)


@pytest.mark.parametrize("removed", [check.__name__ for check in cloudsync.DECISIONS])
def test_without_any_one_decision_the_hostile_property_fails(hostile, monkeypatch, removed):
    # each check of Grant.decide is needed: without it, the property finds a way past
    application, backend = hostile
    monkeypatch.setattr(cloudsync, "DECISIONS", tuple(check for check in cloudsync.DECISIONS
                                                      if check.__name__ != removed))
    from hypothesis import Phase

    @settings(max_examples=400, deadline=None, phases=[Phase.generate], database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        _hostile_run(application, backend, data, steps=16)
    with pytest.raises(AssertionError):
        run()


# ---------------------------------------------------------------------------
# Binding: client values as their column's type
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["utf8mb3 key", "binary key as number", "binary value as number",
                                  "sqlite key of 2**63", "not base64"])
def test_what_a_client_sent_is_a_4xx_naming_the_op(probe, backend, case):
    operation, needs = {
        "utf8mb3 key": (op("update", "mb3", id="🧾", note="x"), "mysql"),
        "binary key as number": (op("update", "bin_keys", k=5, note="x"), None),
        "binary value as number": (op("insert", "attachments", id=9, body=12), None),
        "sqlite key of 2**63": (op("update", "product_stock", product_id="p1", store_id=1, qty=2 ** 63), "sqlite"),
        "not base64": (op("insert", "bin_keys", k="not base64!", note="x"), None),
    }[case]
    if needs is not None and needs != backend.kind:
        pytest.skip("a %s case" % needs)
    checkpoint = pull(probe, tables=["sales"], since=None).json["checkpoint"]
    for fields in ({}, {"checkpoint": checkpoint} if operation["table"] == "sales" else {}):
        response = push(probe, [op("insert", id="ok"), operation], **fields)
        assert 400 <= response.status < 500 and response.json["op"] == 1, response.body
        assert backend.sql("SELECT COUNT(*) FROM sales")[0][0] == 0


def test_sqlite_key_of_2_63_with_a_checkpoint_is_400(probe, backend):
    if backend.kind != "sqlite":
        pytest.skip("SQLite integers end at 2**63 - 1")
    checkpoint = pull(probe, tables=["uq"], since=None).json["checkpoint"]
    response = push(probe, [op("update", "uq", id=2 ** 63, name="x")], checkpoint=checkpoint)
    assert response.status == 400 and response.json["op"] == 0


def test_a_float_column_refuses_what_no_double_holds(probe, backend):
    for value in ("1e400", "-1e400", "1e-400", "NaN", "Infinity"):
        response = push(probe, [op("insert", "real_values", id=1, r=value)])
        assert response.status == 400 and response.json["error"] == "Invalid value", value
    assert push(probe, [op("insert", "real_values", id=1, r=1e308)]).status == 200
    assert backend.sql("SELECT COUNT(*) FROM real_values")[0][0] == 1


KEY_FORMS = [
    # (backend, column type, key sent, why refused) -- a key the database would store as another value
    ("mysql", "BINARY(16)", "Szc=", "padded with zero bytes"),
    ("mysql", "DECIMAL(20,6)", "1.0000004", "stored rounded"),
    ("mysql", "DATETIME(3)", "2026-01-01T00:00:00.0006", "stored cut"),
    ("mysql", "TIME(2)", "01:00:00.006", "stored cut"),
    ("mysql", "SMALLINT", 1.4, "whole numbers"),
    ("sqlite", "INTEGER", 1.5, "whole numbers"),
    ("sqlite", "INTEGER", "abc", "whole numbers"),
    ("sqlite", "INTEGER", "9223372036854775808", "out of range"),
]


@pytest.mark.parametrize("kind,column_type,key,why", KEY_FORMS)
def test_a_key_the_database_would_store_otherwise_is_refused(backend, kind, column_type, key, why):
    if backend.kind != kind:
        pytest.skip("a %s case" % kind)
    backend.sql("CREATE TABLE odd_keys (k %s NOT NULL PRIMARY KEY, note VARCHAR(20))" % column_type)
    application = started(backend, ALLOWED_TABLES="odd_keys")
    for action in ("insert", "upsert", "update", "delete"):
        response = push(application, [op(action, "odd_keys", k=key, note="x")])
        assert response.status == 400 and why in response.json["detail"], (action, response.body)
    assert backend.sql("SELECT COUNT(*) FROM odd_keys")[0][0] == 0
    application.db.close()


@pytest.mark.parametrize("column_type,value", [
    ("TINYINT", 1.7), ("BIT(12)", 1.5), ("INT", "abc"), ("INT", "1.5"), ("INT", {"a": 1}),
    ("TIME", 3600), ("DATE", 20261126), ("DATETIME", 1.5),
])
def test_a_value_the_database_would_change_is_refused(backend, column_type, value):
    if backend.kind == "sqlite" and column_type in ("BIT(12)", "TIME", "DATE", "DATETIME"):
        pytest.skip("SQLite keeps dates as sent and has no BIT")
    backend.sql("CREATE TABLE odd_values (id INT PRIMARY KEY, v %s)" % column_type)
    application = started(backend, ALLOWED_TABLES="odd_values")
    response = push(application, [op("insert", "odd_values", id=1, v=value)])
    assert response.status == 400 and response.json["error"] == "Invalid value", response.body
    assert backend.sql("SELECT COUNT(*) FROM odd_values")[0][0] == 0
    application.db.close()


@pytest.mark.parametrize("number", [1 << 63, (1 << 64) + 5, -(1 << 63) - 1, 10 ** 20 - 1])
def test_integer_beyond_64_bits_is_400(app, backend, number):
    response = push(app, [op("upsert", "product_stock", product_id="p1", store_id=1, qty=number)])
    assert response.status == 400, response.body
    assert backend.rows("product_stock") == []


HOSTILE_VALUES = [
    (b'{"id": "a", "total": 1e400}', "out of range"),
    (b'{"id": "a", "total": "1E+999999"}', "total"),
    (b'{"id": "a", "total": "not a number"}', "total"),
    (b'{"id": "a", "total": "12345678901234567890.12"}', "operation 0"),
    (b'{"id": "a", "note": "\\ud800"}', "not valid Unicode"),
    (b'{"id": "\\udfff"}', "not valid Unicode"),
]


@pytest.mark.parametrize("data,detail", HOSTILE_VALUES)
def test_hostile_values_are_400_and_pull_still_works(app, backend, data, detail):
    raw = b'{"operations": [{"table": "sales", "action": "insert", "data": ' + data + b'}]}'
    response = call(app, "POST", "/sync/push", raw=raw)
    assert response.status == 400, response.body
    assert detail in response.json["detail"]
    assert backend.rows("sales") == []
    assert pull(app, tables=["sales"]).status == 200


def test_integer_far_beyond_64_bits_names_its_column(app, backend):
    response = push(app, [op("insert", "product_stock", product_id="p", store_id=1, qty=10 ** 30)])
    assert response.status == 400 and "qty" in response.json["detail"]


def test_wrong_type_detail_names_column(app, backend):
    # SQLite would keep text in an INTEGER column; both backends refuse it, naming the column
    response = push(app, [op("insert", "product_stock", product_id="p", store_id=1, qty="abc")])
    assert response.status == 400 and "'qty'" in response.json["detail"]


def test_decimal_rounds_half_up_on_both_backends(app):
    push(app, [op("insert", id="a", total="12.345"), op("insert", id="b", total=0.125)])
    totals = [row["total"] for row in pull(app, tables=["sales"]).json["data"]["sales"]]
    assert totals == ["12.35", "0.13"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


MATRIX_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from(["2026-11-26", "2026-11-26T09:30:00.5", "2026-02-30", "-838:59:59", "25:61:61", "AP8=",
                     "not base64!", "1e400", "-1e-400", "-0", "NaN", "Infinity", "9" * 70, "0." + "1" * 40,
                     "red,blue", "purple", "🧾", "\x00", "a\nb", "é", " ", "", "{\"a\": 1}", "[1,", "0x10"]),
    st.sampled_from([2 ** 63, 2 ** 64, 2 ** 64 - 1, -(2 ** 63) - 1, 1e300, 5e-324, -0.0, 0.1, True, False]),
    st.integers(min_value=-(2 ** 65), max_value=2 ** 65))


@pytest.fixture(scope="module")
def fuzz_matrices(request, tmp_path_factory):
    """Matrix databases of the fuzz tests' own, whose random rows stay out of the type tests' way."""
    yield from _matrices_made_on_first_use(request, tmp_path_factory)


def _matrix_snapshot(backend, tables):
    return [_stored(backend, table) for table in tables]


@pytest.mark.parametrize("kind", ["sqlite", "mysql"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_every_type_never_5xx_and_refusals_change_nothing(fuzz_matrices, kind, data):
    application, backend, cases = fuzz_matrices(kind)
    tables = data.draw(st.lists(st.sampled_from(sorted(cases)), min_size=1, max_size=3, unique=True))
    operations = []
    clean = data.draw(st.booleans())        # half the pushes hold only values of each column's own type
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        table = data.draw(st.sampled_from(tables))
        role, values = cases[table]
        own = st.sampled_from([pushed for pushed, _ in values])
        typed = own if clean else own | MATRIX_VALUES
        small = st.integers(min_value=1, max_value=5)
        small = small if clean else small | MATRIX_VALUES
        columns = {"value": {"id": small, "v": typed}, "key": {"k": typed},
                   "composite": {"a": small, "k": typed}}[role]
        row = {name: data.draw(strategy) for name, strategy in columns.items()
               if clean or data.draw(st.integers(0, 9))}
        if data.draw(st.booleans()):
            row["note"] = data.draw(st.text(max_size=8) if clean else MATRIX_VALUES)
        operations.append({"table": table, "action": data.draw(st.sampled_from(["insert", "update", "delete",
                                                                                "upsert"])), "data": row})
    fields = {"operations": operations}
    if data.draw(st.booleans()):
        fields["checkpoint"] = pull(application, tables=tables, since=None).json["checkpoint"]
        fields["on_conflict"] = data.draw(st.sampled_from(["abort", "skip"]))
    if data.draw(st.booleans()):
        fields["batch_id"] = data.draw(st.text(min_size=1, max_size=8))
        fields["device_id"] = "fuzz"
    before = _matrix_snapshot(backend, tables)
    response = call(application, "POST", "/sync/push", fields)
    assert response.status < 500, response.body
    assert response.json["success"] is (response.status == 200)
    if response.status >= 400:
        assert _matrix_snapshot(backend, tables) == before, response.body
    for body in ({"tables": tables}, {"tables": tables, "since": None, "limit": 3}):
        pulled = call(application, "POST", "/sync/pull", body)
        assert pulled.status == 200, pulled.body
        assert pulled.json["success"] is True


# A careless client sends every JSON type in every field: every value is
# turned into its column's type before it meets SQL (bind_value).

TEXT_KEY_IDS = ["abc", "0", "0abc", "1", "x 1", "00"]


@pytest.mark.parametrize("sent,survivors", [
    (0, ["abc", "0abc", "1", "x 1", "00"]),             # MySQL compared 'abc' = 0 as numbers: every row
    (1, ["abc", "0", "0abc", "x 1", "00"]),
    (True, ["abc", "0", "0abc", "x 1", "00"]),          # a boolean is the 1 the database stored for it
    ("0", ["abc", "0abc", "1", "x 1", "00"]),
    (-0.0, TEXT_KEY_IDS[:]),                            # "-0.0" names no row
])
def test_a_number_sent_for_a_text_key_names_only_the_row_with_that_text(app, backend, sent, survivors):
    for key in TEXT_KEY_IDS:
        backend.sql("INSERT INTO sales (id, total) VALUES (?, 1)", (key,))
    response = push(app, [op("delete", id=sent)])
    assert response.status == 200, response.body
    assert sorted(row[0] for row in backend.sql("SELECT id FROM sales")) == sorted(survivors)


def test_a_number_for_a_text_key_updates_only_its_row(app, backend):
    for key in TEXT_KEY_IDS:
        backend.sql("INSERT INTO sales (id, total) VALUES (?, 1)", (key,))
    assert push(app, [op("update", id=0, note="hit")]).status == 200
    assert push(app, [op("upsert", id=0, note="hit again")]).status == 200
    assert dict(backend.sql("SELECT id, note FROM sales WHERE note IS NOT NULL")) == {"0": "hit again"}


def test_text_that_is_no_number_never_matches_a_decimal_key(backend):
    backend.sql("CREATE TABLE prices (amount DECIMAL(14,2) PRIMARY KEY, label VARCHAR(10))")
    for amount in ("0.00", "1.50", "12345678901.25"):
        backend.sql("INSERT INTO prices VALUES (?, 'x')", (amount,))
    application = started(backend, ALLOWED_TABLES="prices")
    try:
        for sent in ("abc", "", "1.5abc", [1], {"a": 1}):
            response = push(application, [op("delete", "prices", amount=sent)])
            assert response.status == 400 and response.json["error"] == "Invalid value", (sent, response.body)
        # exact: 12345678901.25 is not the double it would be compared as
        assert push(application, [op("delete", "prices", amount="12345678901.250000001")]).status == 400
        assert push(application, [op("delete", "prices", amount="1.5")]).status == 200
        assert sorted(cloudsync.decimal.Decimal(str(row[0])) for row in backend.sql("SELECT amount FROM prices")) \
            == [0, cloudsync.decimal.Decimal("12345678901.25")]
    finally:
        application.db.close()


@pytest.mark.parametrize("sent", ["2026-13-45x", "abc", "", 20261126, "26/11/2026"])
def test_text_that_is_no_date_never_meets_a_mysql_date_key(backend, sent):
    if backend.kind != "mysql":
        pytest.skip("MySQL only: SQLite compares text with text")
    backend.sql("CREATE TABLE days (day DATE PRIMARY KEY, note VARCHAR(10))")
    backend.sql("INSERT INTO days VALUES ('0000-00-00', 'zero'), ('2026-11-26', 'day')")
    application = started(backend, ALLOWED_TABLES="days")
    try:
        response = push(application, [op("delete", "days", day=sent)])
        assert response.status == 400 and response.json["error"] == "Invalid value"
        assert len(backend.sql("SELECT * FROM days")) == 2
    finally:
        application.db.close()


# Every JSON type a client could send as a key: none may change a row it does not name.
HOSTILE_KEYS = [0, 1, -1, 2 ** 70, True, False, None, "", " ", "0", "1", "1.0", "abc", "ABC", "abc ",
                [1], {"a": 1}, 1.5, 0.0, -0.0, 10.0, 1e-10]
KEY_TABLE_ACTIONS = ("update", "delete", "upsert", "increment")


def _key_table_cases():
    cases = []
    for kind in ("sqlite", "mysql"):
        for name, column_type, values, keyable in (MYSQL_TYPES if kind == "mysql" else SQLITE_TYPES):
            if keyable:
                cases.append(pytest.param(kind, name, column_type, values, id="%s-%s" % (kind, name)))
    return cases


@pytest.fixture(scope="module")
def key_tables(request, tmp_path_factory):
    """Per backend, made on first use: a database with a table per key type, and its app."""
    made = {}

    def make(kind):
        if kind not in made:
            types = [(name, column_type) for name, column_type, _, keyable in
                     (MYSQL_TYPES if kind == "mysql" else SQLITE_TYPES) if keyable]
            suffix = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4" if kind == "mysql" else ""
            backend = _fresh_database(kind, ["CREATE TABLE kt_%s (k %s NOT NULL PRIMARY KEY, n INT, note %s)%s"
                                              % (name, column_type, "VARCHAR(20)" if kind == "mysql" else "TEXT",
                                                 suffix) for name, column_type in types],
                                      tmp_path_factory.mktemp("keys"), request)
            application = cloudsync.App(backend.config(ALLOWED_TABLES=",".join("kt_" + name for name, _ in types)))
            application.start()
            made[kind] = (application, backend)
        return made[kind]
    yield make
    for application, backend in made.values():
        application.db.close()
        backend.close()


@pytest.mark.parametrize("kind,name,column_type,values", _key_table_cases())
def test_a_key_of_any_json_type_changes_at_most_the_row_it_names(key_tables, kind, name, column_type, values):
    application, backend = key_tables(kind)
    table = "kt_" + name
    backend.sql("DELETE FROM %s" % table)
    rows = [{"k": pushed, "n": 1, "note": "row%d" % position} for position, (pushed, _) in enumerate(values)]
    assert push(application, [op("insert", table, **row) for row in rows]).status == 200
    before = _stored(backend, table)
    for action in KEY_TABLE_ACTIONS:
        for sent in HOSTILE_KEYS:
            data = {"k": sent, "n": 5} if action in ("increment", "update") else {"k": sent, "note": "hit"}
            if action == "delete":
                data = {"k": sent}
            response = push(application, [op(action, table, **data)], batch_id=str(uuid.uuid4()))
            assert response.status < 500, response.body
            after = _stored(backend, table)
            if action == "upsert" and response.status == 200 and len(after) == len(before) + 1:
                # a key no row holds: the upsert inserted it; nothing else moved
                assert set(before) <= set(after), (action, sent)
            else:
                changed = set(before) ^ set(after)
                assert len(set(before) - set(after)) <= 1, (action, sent, changed)
                if not isinstance(sent, (str, int, float)) or sent is None:
                    assert not changed, (action, sent, response.body)
            # put the rows back as they were for the next key
            backend.sql("DELETE FROM %s" % table)
            assert push(application, [op("insert", table, **row) for row in rows]).status == 200
            assert _stored(backend, table) == before


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


CHECKPOINT_ERRORS = [
    ("garbage", "Invalid checkpoint"),
    ("cs1.abc.def", "Invalid checkpoint"),
    (5, "Invalid checkpoint"),
]


@pytest.mark.parametrize("since,error", CHECKPOINT_ERRORS)
def test_malformed_checkpoint_is_400(app, since, error):
    response = pull(app, tables=["sales"], since=since)
    assert response.status == 400 and response.json["error"] == error


def test_altered_checkpoint_is_400(app):
    checkpoint = pull(app, tables=["sales"], since=None).json["checkpoint"]
    prefix, payload, mac = checkpoint.split(".")
    fields = json.loads(cloudsync.base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields["s"] = 0
    forged = cloudsync.base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")
    response = pull(app, tables=["sales"], since="%s.%s.%s" % (prefix, forged, mac))
    assert response.status == 400 and "not issued by this server" in response.json["detail"]


def test_checkpoint_of_another_database_is_400(app, tmp_path):
    other_path = str(tmp_path / "other.db")
    conn = sqlite3.connect(other_path)
    conn.executescript(open(os.path.join(HERE, "schema-sqlite.sql")).read() + EXTRA_SQLITE)
    conn.close()
    other = cloudsync.App(cloudsync.load_config(None, environ={}, overrides={
        "DB_PATH": other_path, "ALLOWED_TABLES": ",".join(TABLES)}))
    other.start()
    foreign = pull(other, tables=["sales"], since=None).json["checkpoint"]
    assert pull(app, tables=["sales"], since=foreign).status == 400


def test_checkpoint_for_other_tables_is_400(app):
    checkpoint = pull(app, tables=["sales"], since=None).json["checkpoint"]
    response = pull(app, tables=["sales", "products"], since=checkpoint)
    assert response.status == 400 and "issued for tables sales" in response.json["detail"]


@pytest.mark.parametrize("path", ["/sync/pull", "/sync/push"])
def test_checkpoint_ahead_of_the_log_must_reset(app, path):
    push(app, [op("insert", id="x")])
    with app.db.connection() as conn:
        head = app.engine.changelog.head(conn)
    # what a device holds after the database was restored from an older backup
    ahead = app.engine.checkpoints.encode({"t": ["sales"], "s": head + 5})
    fields = {"tables": ["sales"], "since": ahead} if path == "/sync/pull" else \
        {"device_id": "till", "checkpoint": ahead, "operations": [op("insert", id="y")]}
    response = call(app, "POST", path, fields)
    assert response.status == 410 and response.json["reset"] is True


def test_checkpoint_serves_its_tables_in_any_order(app):
    push(app, [op("insert", id="s1"), op("insert", "customers", id="c1")])
    first = pull(app, tables=["sales", "customers"], since=None).json
    again = pull(app, tables=["customers", "sales"], since=first["checkpoint"])
    assert again.status == 200 and again.json["has_more"] is False
    assert pull(app, tables=["customers"], since=first["checkpoint"]).status == 400


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def test_config_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=5000\nALLOWED_TABLES=sales\n")
    config = cloudsync.load_config(str(env_file), environ={"PORT": "6000"})
    assert config.port == 6000 and config.allowed_tables == ("sales",)


CONFIG_ERRORS = [
    ({"PORT": "abc"}, "PORT='abc' is not valid"),
    ({"PORT": "70000"}, "PORT='70000' is not valid"),
    ({"MAX_BODY_BYTES": "0"}, "MAX_BODY_BYTES='0' is not valid"),
    ({"ALLOWED_TABLES": "sales,sales"}, "named twice"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"DB_HOST": "db.example"}, "DB_USER and DB_NAME must be set"),
    ({"DB_CONNECT_TIMEOUT_SECONDS": "inf"}, "DB_CONNECT_TIMEOUT_SECONDS='inf' is not valid"),
    ({"CHANGE_CAPTURE": "magic"}, "expected triggers or api"),
]


@pytest.mark.parametrize("environ,message", CONFIG_ERRORS)
def test_config_errors_are_one_clear_sentence(environ, message):
    with pytest.raises(cloudsync.ConfigError, match=message):
        cloudsync.load_config(None, environ=environ)


def test_config_rejects_unknown_setting_in_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=5000\nDB_PASWORD=typo\n")
    with pytest.raises(cloudsync.ConfigError, match="unknown setting DB_PASWORD; did you mean DB_PASS"):
        cloudsync.load_config(str(env_file), environ={})


def test_config_unreadable_dotenv_is_config_error(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"PORT=\xff\xfe\n")
    with pytest.raises(cloudsync.ConfigError, match="cannot read"):
        cloudsync.load_config(str(env_file), environ={})


def test_config_describe_masks_password():
    config = cloudsync.load_config(None, environ={"DB_HOST": "h", "DB_USER": "u", "DB_NAME": "n", "DB_PASS": "hunter2"})
    assert "hunter2" not in config.describe() and "DB_PASS=***" in config.describe()


def test_sample_env_and_readme_document_every_setting():
    sample = open(os.path.join(HERE, "sample.env")).read()
    readme = open(os.path.join(HERE, "README.md")).read()
    for name in cloudsync.SETTING_NAMES:
        assert "\n# " in sample and ("\n%s=" % name in sample or "\n# %s=" % name in sample), name
        assert "`%s`" % name in readme, name
    values, problems = cloudsync.parse_dotenv(sample, environ={})
    assert problems == [] and set(values) <= set(cloudsync.SETTING_NAMES)


@pytest.mark.parametrize("settings,message", [
    ({"ALLOWED_TABLES": "sales,cloudsync_meta"}, "cloudsync's own tables"),
    ({"TOKENS": "till sha256:abc"}, "TOKENS"),
    ({"ADMIN_TOKEN": "sha256:0123"}, "ADMIN_TOKEN"),
])
def test_unsafe_settings_stop_the_start(backend, settings, message):
    with pytest.raises(cloudsync.ConfigError, match=re.escape(message)):
        cloudsync.App(backend.config(**settings))


@pytest.mark.parametrize("value", ["field.example.com", "https://x.example.com/path", "ftp://x"])
def test_bad_cors_origins_fail_at_start_up(value):
    with pytest.raises(cloudsync.ConfigError, match="CORS_ORIGINS"):
        cloudsync.load_config(None, environ={"CORS_ORIGINS": value})


def test_bad_tokens_setting_does_not_echo_the_secret():
    with pytest.raises(cloudsync.ConfigError) as raised:
        cloudsync.load_config(None, environ={"TOKENS": "till supersecret-token-value; oops"})
    assert "supersecret-token-value" not in str(raised.value)


def _live_push(url, operations):
    request = urllib.request.Request(url + "/sync/push", json.dumps({"operations": operations}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_reloads_the_settings_that_can_and_names_those_that_need_a_restart(tmp_path, workers):
    settings = tmp_path / "cloudsync.env"
    settings.write_text("LOG_LEVEL=INFO\n")
    server = LiveServer(tmp_path, args=("--env-file", str(settings), "serve"), WORKERS=workers,
                        DB_POOL_SIZE="8")
    try:
        assert _live_push(server.url, [op("insert", "products", id="p1", name="tea")])[0] == 200
        settings.write_text("LOG_LEVEL=DEBUG\nREAD_ONLY_TABLES=products\nMAX_OPERATIONS=2\nTHREADS=4\n")
        server.process.send_signal(signal.SIGHUP)
        assert _eventually(lambda: _live_push(server.url, [op("insert", "products", id="p2", name="x")])[0] == 403)
        status, answer = _live_push(server.url, [op("insert", id="s%d" % n) for n in range(3)])
        assert status == 413 and answer["code"] == "too_many_operations"
        assert _eventually(lambda: "SIGHUP: settings reloaded: LOG_LEVEL, READ_ONLY_TABLES, MAX_OPERATIONS; "
                                   "changed but need a restart (systemctl restart cloudsync): THREADS"
                           in open(server.log).read())
        # a setting that no longer reads changes nothing
        settings.write_text("READ_ONLY_TABLES=products\nMAX_OPERATIONS=many\n")
        server.process.send_signal(signal.SIGHUP)
        assert _eventually(lambda: "settings not reloaded, the running ones stay: MAX_OPERATIONS='many'"
                           in open(server.log).read())
        assert _live_push(server.url, [op("insert", id="s%d" % n) for n in range(3)])[0] == 413
        # a worker started after the reload has the new settings
        if workers == "2":
            log_text = open(server.log).read()
            pid = int(re.findall(r"worker 1 started \(pid (\d+)\)", log_text)[-1])
            os.kill(pid, signal.SIGKILL)
            assert _eventually(lambda: len(re.findall(r"worker 1 started", open(server.log).read())) == 2, 20)
            assert all(_live_push(server.url, [op("insert", "products", id="p3", name="x")])[0] == 403
                       for _ in range(6))
    finally:
        server.stop()


def test_reloaded_table_rules_that_do_not_fit_the_tables_change_nothing(backend, caplog):
    application = started(backend)
    fresh = backend.config(READ_ONLY_COLUMNS="products.nothing_here", READ_ONLY_TABLES="products")
    application.config.reload_from = lambda: fresh
    with caplog.at_level(logging.INFO, logger="cloudsync"):
        application.reload_settings()
    assert "settings not reloaded, the running ones stay: READ_ONLY_COLUMNS names products.nothing_here" \
        in caplog.text
    assert push(application, [op("insert", "products", id="p1", name="tea")]).status == 200
    application.config.reload_from = lambda: backend.config(READ_ONLY_COLUMNS="products.price",
                                                            PULL_MAX_BYTES="5000", LOG_LEVEL="INFO")
    application.reload_settings()
    answer = push(application, [op("insert", "products", id="p2", name="tea", price="2.00")])
    assert answer.status == 403 and answer.json["code"] == "read_only_column"
    assert application.pulls.max_bytes == 5000
    status = call(application, "GET", "/sync/status").json
    assert status["tables"]["products"]["rules"]["read_only_columns"] == ["price"]
    # rules written for other allowed tables wait for the restart that serves those tables
    application.config.reload_from = lambda: backend.config(ALLOWED_TABLES="sales",
                                                            READ_ONLY_COLUMNS="", LOG_LEVEL="INFO")
    with caplog.at_level(logging.INFO, logger="cloudsync"):
        application.reload_settings()
    assert "need a restart (systemctl restart cloudsync): ALLOWED_TABLES, READ_ONLY_COLUMNS" in caplog.text
    answer = push(application, [op("insert", "products", id="p3", name="tea", price="2.00")])
    assert answer.status == 403 and answer.json["code"] == "read_only_column"
    application.db.close()


def test_db_host_lists_nodes_with_their_ports():
    config = cloudsync.load_config(None, environ={"DB_HOST": "db1, db2:3307,[::1]:3308", "DB_PORT": "3310",
                                                  "DB_USER": "u", "DB_NAME": "shop"})
    assert config.db_nodes() == [("db1", 3310), ("db2", 3307), ("::1", 3308)]
    for wrong in ("db1,,db2", "db1:0", "db1:port", "db1:70000"):
        with pytest.raises(cloudsync.ConfigError, match="DB_HOST"):
            cloudsync.load_config(None, environ={"DB_HOST": wrong, "DB_USER": "u", "DB_NAME": "shop"})


ROW_SCOPE_CONFIG_ERRORS = [
    ({"ROW_SCOPES": "ghost.store_id"}, "ROW_SCOPES names ghost, which is not in ALLOWED_TABLES"),
    ({"ROW_SCOPES": "orders"}, "expected table.column"),
    ({"ROW_SCOPES": "orders.store_id,orders.note"}, "a table is named twice"),
    ({"CHANGE_CAPTURE": "api"}, "ROW_SCOPES needs CHANGE_CAPTURE=triggers"),
    ({"AUTH": "off", "TOKENS": ""}, "ROW_SCOPES needs device tokens"),
    ({"TOKENS": "a b scope.store_id"}, "is not one of tables"),
    ({"TOKENS": "a b scope.store_id=7,*"}, "mixes \\* \\(every row\\) with values"),
    ({"TOKENS": "a b scope.store_id=7 scope.store_id=8"}, "given twice"),
]


@pytest.mark.parametrize("settings,message", ROW_SCOPE_CONFIG_ERRORS)
def test_row_scope_settings_that_cannot_work_stop_the_start(settings, message):
    values = dict(ALLOWED_TABLES=SCOPED_TABLES, ROW_SCOPES=ROW_SCOPES, TOKENS=SCOPED_TOKENS, TOKENS_FILE="")
    values.update(settings)
    with pytest.raises(cloudsync.ConfigError, match=message):
        cloudsync.load_config(env_file=None, environ={}, overrides=values)


@pytest.mark.parametrize("settings,error,message", [
    ({"READ_ONLY_COLUMNS": "shoppers.id"}, cloudsync.SchemaError, "a column of its primary key"),
    ({"READ_ONLY_COLUMNS": "shoppers.nope"}, cloudsync.SchemaError, "not a column of the table"),
    ({"READ_ONLY_COLUMNS": "ghost.x"}, cloudsync.ConfigError, "READ_ONLY_COLUMNS names ghost"),
    ({"READ_ONLY_COLUMNS": "shoppers"}, cloudsync.ConfigError, "expected table.column"),
    ({"INSERT_ONLY_TABLES": "ghost"}, cloudsync.ConfigError, "INSERT_ONLY_TABLES names ghost"),
])
def test_ledger_and_column_settings_that_cannot_work_stop_the_start(shop_backend, settings, error, message):
    with pytest.raises(error, match=message):
        started(shop_backend, **dict(SHOP_SETTINGS, **settings))


# ---------------------------------------------------------------------------
# SQL builders, compared as text (no database)
# ---------------------------------------------------------------------------


def _text_schema(quote, key=("store", "id")):
    """A table "line`s" with a composite key and a name that needs quoting, as a backend would describe it."""
    names = ["store", "id", "na`me \"x\""]
    columns = [cloudsync.Column(name, quote(name), "text") for name in names]
    return cloudsync.TableSchema("line`s", quote("line`s"), columns, list(key))


MYSQL_SCHEMA = _text_schema(cloudsync.quote_mysql)
SQLITE_SCHEMA = _text_schema(cloudsync.quote_sqlite)
SINGLE_KEY_SCHEMA = _text_schema(cloudsync.quote_sqlite, key=("id",))
SINGLE_KEY_SCHEMA.key_sql = "K"
SQLITE_SCHEMA.key_sql = "K"
DECIMAL_KEY_SCHEMA = cloudsync.TableSchema("t", "`t`", [cloudsync.Column(
    "amount", "`amount`", "decimal", "decimal(12,2)", scale=2, param="CAST(? AS DECIMAL(65, 2))")], ["amount"])


class _Store7:
    """A scope as a TableScope gives it: store 7's rows."""
    where, params, texts = '"store" IN (?)', [7], ("7",)


STORE_7 = _Store7()

SQL_BUILDER_CASES = [
    # (builder call, expected sql, expected params)
    (lambda: cloudsync.key_where(MYSQL_SCHEMA), "`store` = ? AND `id` = ?", None),
    (lambda: cloudsync.keys_where(SINGLE_KEY_SCHEMA, [("a",), ("b",)]), '"id" IN (?, ?)', ["a", "b"]),
    (lambda: cloudsync.keys_where(SQLITE_SCHEMA, [(1, "a"), (2, "b")]),
     '("store" = ? AND "id" = ?) OR ("store" = ? AND "id" = ?)', [1, "a", 2, "b"]),
    (lambda: cloudsync.insert_sql(MYSQL_SCHEMA, ["store", "na`me \"x\""]),
     "INSERT INTO `line``s` (`store`, `na``me \"x\"`) VALUES (?, ?)", None),
    (lambda: cloudsync.update_sql(SQLITE_SCHEMA, {'na`me "x"': "v"}, (1, "a"), cloudsync.EVERY_ROW),
     'UPDATE "line`s" SET "na`me ""x""" = ? WHERE "store" = ? AND "id" = ?', ("v", 1, "a")),
    (lambda: cloudsync.exists_sql(MYSQL_SCHEMA, (1, "a"), cloudsync.EVERY_ROW),
     "SELECT 1 FROM `line``s` WHERE `store` = ? AND `id` = ?", (1, "a")),
    (lambda: cloudsync.delete_sql(MYSQL_SCHEMA, (1, "a"), cloudsync.EVERY_ROW),
     "DELETE FROM `line``s` WHERE `store` = ? AND `id` = ?", (1, "a")),
    (lambda: cloudsync.first_rows_sql(SQLITE_SCHEMA, 10, cloudsync.EVERY_ROW),
     'SELECT "store", "id", "na`me ""x""" FROM "line`s" ORDER BY "store", "id" LIMIT ?', [10]),
    (lambda: cloudsync.page_sql(SQLITE_SCHEMA, None, 5, cloudsync.EVERY_ROW),
     'SELECT "store", "id", "na`me ""x""" FROM "line`s" WHERE "store" IS NOT NULL AND "id" IS NOT NULL'
     ' ORDER BY "store", "id" LIMIT ?', [5]),
    (lambda: cloudsync.page_sql(SQLITE_SCHEMA, (1, "a"), 5, cloudsync.EVERY_ROW),
     'SELECT "store", "id", "na`me ""x""" FROM "line`s" WHERE "store" IS NOT NULL AND "id" IS NOT NULL'
     ' AND (("store" > ?) OR ("store" = ? AND "id" > ?)) ORDER BY "store", "id" LIMIT ?', [1, 1, "a", 5]),
    # a device's scope goes into every statement that finds rows
    (lambda: cloudsync.update_sql(SQLITE_SCHEMA, {"id": "b"}, (1, "a"), STORE_7),
     'UPDATE "line`s" SET "id" = ? WHERE "store" = ? AND "id" = ? AND "store" IN (?)', ("b", 1, "a", 7)),
    (lambda: cloudsync.delete_sql(MYSQL_SCHEMA, (1, "a"), STORE_7),
     "DELETE FROM `line``s` WHERE `store` = ? AND `id` = ? AND \"store\" IN (?)", (1, "a", 7)),
    (lambda: cloudsync.select_keyed_sql(SINGLE_KEY_SCHEMA, [("a",), ("b",)], STORE_7),
     'SELECT K, "store", "id", "na`me ""x""" FROM "line`s" WHERE ("id" IN (?, ?)) AND "store" IN (?)',
     ["a", "b", 7]),
    (lambda: cloudsync.first_rows_sql(SQLITE_SCHEMA, 10, STORE_7),
     'SELECT "store", "id", "na`me ""x""" FROM "line`s" WHERE "store" IN (?) ORDER BY "store", "id" LIMIT ?',
     [7, 10]),
    # a MySQL decimal is compared as an exact decimal, never as the double text would be
    (lambda: cloudsync.key_where(DECIMAL_KEY_SCHEMA), "`amount` = CAST(? AS DECIMAL(65, 2))", None),
    (lambda: cloudsync.page_sql(DECIMAL_KEY_SCHEMA, ("1.50",), 5, cloudsync.EVERY_ROW),
     "SELECT `amount` FROM `t` WHERE `amount` IS NOT NULL AND ((`amount` > CAST(? AS DECIMAL(65, 2))))"
     " ORDER BY `amount` LIMIT ?", ["1.50", 5]),
]


@pytest.mark.parametrize("builder", [
    lambda scope: cloudsync.update_sql(SQLITE_SCHEMA, {"id": "b"}, (1, "a"), scope),
    lambda scope: cloudsync.delete_sql(SQLITE_SCHEMA, (1, "a"), scope),
    lambda scope: cloudsync.exists_sql(SQLITE_SCHEMA, (1, "a"), scope),
    lambda scope: cloudsync.first_rows_sql(SQLITE_SCHEMA, 10, scope),
    lambda scope: cloudsync.page_sql(SQLITE_SCHEMA, None, 10, scope),
    lambda scope: cloudsync.select_keyed_sql(SQLITE_SCHEMA, [(1, "a")], scope),
])
def test_a_statement_that_finds_rows_needs_a_scope_named(builder):
    # no default: forgetting the scope is an error, never every row
    with pytest.raises(AttributeError):
        builder(None)


@pytest.mark.parametrize("build,sql,params", SQL_BUILDER_CASES)
def test_sql_builder_text(build, sql, params):
    built = build()
    if params is None:
        assert built == sql
    else:
        assert built == (sql, params)


def test_sql_builders_bind_every_value():
    # no value reaches the text: a hostile key stays a parameter
    hostile = ("1; DROP TABLE x", "' OR '1'='1")
    every = cloudsync.EVERY_ROW
    for sql, params in (cloudsync.update_sql(MYSQL_SCHEMA, {"store": hostile[0]}, hostile, every),
                        cloudsync.delete_sql(MYSQL_SCHEMA, hostile, every),
                        cloudsync.exists_sql(MYSQL_SCHEMA, hostile, every)):
        assert "DROP" not in sql and "'" not in sql and sql.count("?") == len(params)


# ---------------------------------------------------------------------------
# Private APIs, each with its public fallback
# ---------------------------------------------------------------------------


def test_a_push_of_any_size_is_all_or_nothing(probe, backend):
    """A plain push of 4,000 inserts with 400-byte notes is several statements; its last one clashing undoes all."""
    assert push(probe, [op("insert", id="s-3999")]).status == 200
    operations = [op("insert", id="s-%d" % n, note="n" * 400) for n in range(4000)]
    response = push(probe, operations)
    assert response.status == 409 and response.json["op"] == 3999
    assert backend.sql("SELECT COUNT(*) FROM sales")[0][0] == 1


def test_a_small_plain_push_still_goes_in_one_statement(probe, backend):
    assert probe.engine.db.fits_one_statement([("x" * 100,)] * 50) if backend.kind == "mysql" else True
    assert push(probe, [op("insert", id="s-%d" % n) for n in range(50)]).status == 200
    assert backend.sql("SELECT COUNT(*) FROM sales")[0][0] == 50


def test_live_server_refuses_oversized_body(demo_server):
    request = urllib.request.Request(demo_server + "/sync/push", data=b"x" * 100001, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 413


def test_live_server_oversized_bodies_get_json_413(demo_server):
    import http.client
    host, port = demo_server.rsplit(":", 1)
    for headers, body in [({"Content-Length": "100001"}, b"x" * 100001),
                          ({"Transfer-Encoding": "chunked"}, b"".join(
                              b"%x\r\n%s\r\n" % (20000, b"y" * 20000) for _ in range(6)) + b"0\r\n\r\n")]:
        connection = http.client.HTTPConnection(host.replace("http://", ""), int(port), timeout=10)
        connection.putrequest("POST", "/sync/push")
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        try:
            connection.send(body)
        except OSError:
            pass                       # the server may close before reading everything
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"] == "Payload too large"
        connection.close()


def test_sigterm_lets_a_push_in_progress_finish(tmp_path):
    """SIGTERM while a push waits for the database: it is answered 200, new connections are refused."""
    server = LiveServer(tmp_path, DB_WAIT_SECONDS="30")
    process, port, url, db_path = server.process, server.port, server.url, server.db
    try:
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")                   # the push will wait for this write lock
        answer = []
        request = urllib.request.Request(url + "/sync/push", method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({"operations": [op("insert", id="late")]}).encode())
        sender = threading.Thread(target=lambda: answer.append(urllib.request.urlopen(request, timeout=60).status))
        sender.start()
        time.sleep(1.0)                                      # the push is now inside the server, waiting
        process.send_signal(signal.SIGTERM)
        for _ in range(100):                                 # the listening socket closes
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                time.sleep(0.05)
            except OSError:
                break
        else:
            pytest.fail("still accepting connections after SIGTERM")
        blocker.execute("COMMIT")
        sender.join(timeout=60)
        assert answer == [200]
        assert process.wait(timeout=60) == 0
        assert sqlite3.connect(db_path).execute("SELECT id FROM sales").fetchall() == [("late",)]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# The public paths under "Private APIs, each with its public fallback", forced.

WITHOUT_WAITRESS_INTERNALS = """
import sys
sys.path.insert(0, %r)
import cloudsync
cloudsync._graceful_stop_possible = lambda server: False
cloudsync._channel_class = lambda config, limits: None
cloudsync._loop_dispatcher = lambda threads, answers_in_loop, goes_first: None
sys.exit(cloudsync.main())
""" % HERE


def test_without_waitress_internals_the_server_serves_and_stops_on_sigterm(tmp_path):
    script = tmp_path / "public_waitress.py"
    script.write_text(WITHOUT_WAITRESS_INTERNALS)
    server = LiveServer(tmp_path, script=str(script), MAX_BODY_BYTES="1000")
    try:
        request = urllib.request.Request(server.url + "/sync/push", method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({"operations": [op("insert", id="s1")]}).encode())
        assert urllib.request.urlopen(request, timeout=10).status == 200
        too_big = urllib.request.Request(server.url + "/sync/push", method="POST", data=b"{" + b" " * 5000 + b"}",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(too_big, timeout=10)
        assert refused.value.code == 413           # waitress's own words, in its plain text
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        server_log = open(server.log, errors="replace").read()
        assert "graceful stop" in server_log and "stopped" in server_log and "Traceback" not in server_log
        assert sqlite3.connect(server.db).execute("SELECT id FROM sales").fetchall() == [("s1",)]
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_mysql_statements_take_the_fast_path_when_the_driver_has_it(app, backend):
    if backend.kind != "mysql":
        pytest.skip("MySQL only")
    assert isinstance(app.db.statements, cloudsync._DriverStatements)


def test_without_driver_internals_the_cursor_path_is_chosen(backend, monkeypatch, caplog):
    if backend.kind != "mysql":
        pytest.skip("MySQL only")
    monkeypatch.setattr(cloudsync._DriverStatements, "available", staticmethod(lambda conn: False))
    with caplog.at_level(logging.WARNING, logger="cloudsync"):
        application = started(backend)
    try:
        assert isinstance(application.db.statements, cloudsync._CursorStatements)
        assert "statements go through cursors" in caplog.text
        assert push(application, [op("insert", id="s1", total="12.50")]).status == 200
        assert pull(application, tables=["sales"]).json["data"]["sales"][0]["total"] == "12.50"
    finally:
        application.db.close()


@pytest.fixture
def cursor_path(probe, backend):
    """The probe app with its MySQL statements going through cursors (the public path)."""
    if backend.kind != "mysql":
        pytest.skip("MySQL only")
    probe.db.statements = cloudsync._CursorStatements()
    return probe


def test_cursor_path_keeps_a_push_of_any_size_all_or_nothing(cursor_path, backend, monkeypatch):
    runs = []
    real = cloudsync._CursorStatements._insert_run
    monkeypatch.setattr(cloudsync._CursorStatements, "_insert_run",
                        lambda self, *args: runs.append(len(args[-1])) or real(self, *args))
    assert push(cursor_path, [op("insert", id="s-3999")]).status == 200
    operations = [op("insert", id="s-%d" % n, note="n" * 400) for n in range(4000)]
    response = push(cursor_path, operations)
    assert response.status == 409 and response.json["op"] == 3999
    assert backend.sql("SELECT COUNT(*) FROM sales")[0][0] == 1
    assert len(runs) > 1                         # several statements, in one transaction
    runs.clear()
    assert push(cursor_path, [op("insert", id="t-%d" % n, note="n" * 400) for n in range(4000)]).status == 200
    assert backend.sql("SELECT COUNT(*) FROM sales")[0][0] == 4001 and sum(runs) == 4000


def test_cursor_path_binds_values_holding_percent_and_question_marks(cursor_path, backend):
    hostile = "50%s off? %(p0)s ?? %% '; --"
    assert push(cursor_path, [op("insert", id="p?%s", note=hostile),
                              op("upsert", id="q%(p1)s", note=hostile)]).status == 200
    rows = {row["id"]: row["note"] for row in pull(cursor_path, tables=["sales"]).json["data"]["sales"]}
    assert rows == {"p?%s": hostile, "q%(p1)s": hostile}
    assert push(cursor_path, [op("delete", id="p?%s")]).status == 200
    assert [row[0] for row in backend.sql("SELECT id FROM sales")] == ["q%(p1)s"]


def test_every_type_survives_the_cursor_path(request, tmp_path_factory):
    """The type matrix, every step, with MySQL statements through cursors."""
    application, backend, cases = _make_matrix("mysql", request, tmp_path_factory)
    application.db.statements = cloudsync._CursorStatements()
    try:
        for table, (role, values) in cases.items():
            _every_step(application, backend, "mysql", table, role, values)
    finally:
        application.db.close()
        backend.close()


@pytest.mark.parametrize("resizable", [True, False])
def test_the_server_adds_a_thread_for_each_waiting_pull_or_starts_with_them(backend, monkeypatch, resizable):
    config = backend.config(THREADS="2", LONGPOLL_MAX_WAITERS="3", PORT=str(_free_port()))
    application = cloudsync.App(config)
    if not resizable:                           # the public path: a pool sized for every waiting pull
        monkeypatch.setattr(cloudsync, "_resizable_pool", lambda: False)
    server = cloudsync._create_server(application, config)
    dispatcher = server.task_dispatcher

    def running():
        return len(dispatcher.threads) - dispatcher.stop_count
    try:
        spare = cloudsync.SPARE_THREADS if resizable else 0
        assert running() == (2 if resizable else 5)
        assert application.watcher.enter("till-1") and application.watcher.enter("till-2")
        assert 4 <= running() <= 4 + 2 * spare if resizable else running() == 5   # one each, a few spare
        grown = running()
        application.watcher.leave("till-1")
        assert running() == grown                   # kept for the till's next poll
        application.watcher.leave("till-2")
        for till in range(3):                       # more than the spare ones: the pool grows
            assert application.watcher.enter("other-%d" % till)
        assert running() >= 5
        for till in range(3):
            application.watcher.leave("other-%d" % till)
    finally:
        dispatcher.shutdown(timeout=5)
        server.close()
        application.db.close()


def test_a_body_framed_both_by_length_and_as_chunked_is_refused_and_the_connection_closed(tmp_path):
    server = LiveServer(tmp_path)
    try:
        body = b'{"tables": ["sales"]}'
        smuggled = b"GET /sync/status HTTP/1.1\r\nHost: x\r\n\r\n"
        chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        request = (b"POST /sync/pull HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunk)) + chunk + smuggled
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(request)
            received = b""
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break                            # the server closed the connection
                received += piece
        assert received.startswith(b"HTTP/1.1 400"), received[:200]
        assert received.count(b"HTTP/1.1") == 1      # the bytes after it were not read as a request
        assert b"Content-Length and Transfer-Encoding" in received
    finally:
        server.stop()


# /health is answered by the server's loop; one client address holds at most
# MAX_CONNECTIONS_PER_ADDRESS. The faults themselves (a frozen database, a
# flood, large rows) are under Reliability.

def test_health_answers_while_every_thread_waits_on_the_database(backend, tmp_path):
    backend.sql("INSERT INTO sales (id, total) VALUES ('s1', 1)")
    server = LiveServer(tmp_path, THREADS="1", DB_WAIT_SECONDS="6", PUSH_RETRIES="1", ALLOWED_TABLES="sales",
                        **backend.settings)
    holder = _hold_the_database(backend)
    answers = []
    try:
        pusher = threading.Thread(target=lambda: answers.append(_http(server.url, "POST", "/sync/push", {
            "operations": [op("update", id="s1", total="2.00")]})))
        pusher.start()
        time.sleep(1.5)                 # the push reaches the one thread, and waits there for 6 s
        health = _http(server.url, "GET", "/health")
        assert pusher.is_alive(), ("/health waited for the push's thread", answers)
        assert health[0] == 200 and health[1]["status"] == "Sync API running" and health[1]["database"] == "ok"
    finally:
        holder.rollback() if backend.kind == "mysql" else holder.execute("ROLLBACK")
        holder.close()
        pusher.join(timeout=60)
        server.stop()
    assert answers and answers[0][0] in (200, 503)


def _connect_from(address, port):
    """A TCP connection to the server from a loopback address of our choosing."""
    sock = socket.socket()
    sock.bind((address, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _ask(sock, path="/health"):
    """Send a GET on an open connection; the answer's first bytes."""
    sock.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())
    return sock.recv(65536)


def test_one_address_holds_at_most_its_connections_and_others_are_served(tmp_path):
    server = LiveServer(tmp_path, MAX_CONNECTIONS_PER_ADDRESS="3")
    held = []
    try:
        held = [_connect_from("127.0.0.2", server.port) for _ in range(3)]
        assert all(_ask(sock).startswith(b"HTTP/1.1 200") for sock in held)     # kept alive
        refused = _connect_from("127.0.0.2", server.port)
        answer = refused.recv(65536)
        refused.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in answer
        assert b'"error":"Too many connections"' in answer and b"MAX_CONNECTIONS_PER_ADDRESS" in answer
        assert _http(server.url, "GET", "/health")[0] == 200                   # another address
        held.pop().close()
        until(lambda: _ask_fresh("127.0.0.2", server.port).startswith(b"HTTP/1.1 200"), seconds=10)
    finally:
        for sock in held:
            sock.close()
        server.stop()


def _ask_fresh(address, port):
    sock = _connect_from(address, port)
    try:
        return _ask(sock)
    except OSError:
        return b""
    finally:
        sock.close()


def test_near_the_connection_limit_idle_connections_are_closed(tmp_path):
    server = LiveServer(tmp_path, MAX_CONNECTIONS="20", MAX_CONNECTIONS_PER_ADDRESS="0")
    idle = []
    try:
        idle = [_connect_from("127.0.0.2", server.port) for _ in range(16)]
        for sock in idle:
            assert _ask(sock).startswith(b"HTTP/1.1 200")

        def closed(sock):
            sock.settimeout(0.01)
            try:
                return sock.recv(1) == b""
            except socket.timeout:
                return False
            except OSError:
                return True
        until(lambda: all(closed(sock) for sock in idle), seconds=30)
        assert _http(server.url, "GET", "/health")[0] == 200
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_pushes_are_queued_ahead_of_pulls_and_health_is_left_to_the_loop():
    class Parsed:
        def __init__(self, command, path):
            self.command, self.path, self.error = command, path, None

    class Channel:
        def __init__(self, command, path):
            self.requests, self.server = [Parsed(command, path)], self

        def pull_trigger(self):
            pass
    dispatcher = cloudsync._loop_dispatcher(0, lambda command, path: path == "/health",
                                            lambda command, path: command == "POST" and path == "/sync/push")
    dispatcher.loop_answers = True
    tasks = [Channel("POST", "/sync/pull"), Channel("POST", "/sync/pull"), Channel("POST", "/sync/push"),
             Channel("GET", "/health"), Channel("POST", "/sync/push")]
    for task in tasks:
        dispatcher.add_task(task)
    assert list(dispatcher.queue) == [tasks[2], tasks[4], tasks[0], tasks[1]]      # pushes first, in order
    assert list(dispatcher.in_loop) == [tasks[3]]


@pytest.mark.parametrize("sql, parts", [
    ("INSERT INTO t (a, b) VALUES (?, ?)", ("INSERT INTO t (a, b)", "(?, ?)", "")),
    # a function in the row: the row ends where the statement's clauses begin, not at the first )
    ("INSERT INTO t (a, at) VALUES (?, NOW(6))", ("INSERT INTO t (a, at)", "(?, NOW(6))", "")),
    ("INSERT INTO t (a) VALUES (?) ON DUPLICATE KEY UPDATE a = VALUES(a)",
     ("INSERT INTO t (a)", "(?)", " ON DUPLICATE KEY UPDATE a = VALUES(a)")),
    ("INSERT INTO t (a) VALUES (?) ON CONFLICT (a) DO NOTHING", ("INSERT INTO t (a)", "(?)", " ON CONFLICT (a) DO NOTHING")),
])
def test_a_multi_row_insert_is_cut_into_head_row_and_tail(sql, parts):
    assert cloudsync._insert_parts(sql) == parts


# ---------------------------------------------------------------------------
# Database layer
# ---------------------------------------------------------------------------


def _tricky_texts():
    """Strings that stress JSON escaping: every control character, quotes, backslashes, wide Unicode."""
    generator = random.Random(7)
    alphabet = [chr(n) for n in range(0, 0x80)] + ["\u00e9", "\u2028", "\u2029", "\ufeff", "\u6771", "\U0001f9fe",
                                                    "\U0010fffd", "\u05e9", "\u0301"]
    texts = ["".join(chr(n) for n in range(32)), '"\\/\b\f\n\r\t', "", " ", "null", "\\u0000"]
    texts += ["".join(generator.choice(alphabet) for _ in range(generator.randint(1, 40))) for _ in range(150)]
    return texts


def test_rows_encoded_by_mysql_equal_rows_encoded_here(backend):
    if backend.kind != "mysql":
        pytest.skip("SQLite rows are always encoded in Python")
    backend.sql("CREATE TABLE kinds (id INT PRIMARY KEY, i BIGINT, u BIGINT UNSIGNED, d DECIMAL(20,6),"
                " t VARCHAR(100), tx TEXT, e ENUM('a','b'), c CHAR(5), dt DATE, dtt DATETIME, dt6 DATETIME(6),"
                " ts TIMESTAMP(3) NULL, b VARBINARY(200), bl BLOB) DEFAULT CHARSET utf8mb4")
    values = [
        (1, -9223372036854775808, 18446744073709551615, "-12345678901234.123456", "x", "y", "a", "ab",
         "2026-01-31", "2026-11-26 09:30:00", "2026-11-26 09:30:00.000001", "2026-11-26 09:30:00.500",
         bytes(range(256))[:200], bytes(range(256)) * 3),
        (2,) + (None,) * 13,
        (3, 0, 0, "0.000000", "", "", "b", "", "1000-01-01", "9999-12-31 23:59:59", "2026-11-26 09:30:00",
         "2026-11-26 09:30:00.000", b"", b"\x00"),
    ]
    values += [(10 + n, n, n, "%d.5" % n, text[:100], text, None, None, None, None, None, None,
                text.encode("utf-8")[:200], None) for n, text in enumerate(_tricky_texts())]
    for row in values:
        backend.sql("INSERT INTO kinds VALUES (%s)" % ", ".join("?" for _ in row), row)
    app = started(backend, ALLOWED_TABLES="kinds")
    try:
        schema = app.engine.schemas["kinds"]
        assert schema.json_row is not None
        with app.db.connection() as conn:
            by_server = json.loads(app.db.rows_as_json(conn, schema, 5000, cloudsync.EVERY_ROW)[0])
            here = json.loads(cloudsync.to_json_bytes(app.pulls._read_rows(conn, ["kinds"], 5000,
                                                                           app.engine.every_row())["kinds"]))
            assert len(here) == len(values)
            assert by_server == here
            assert json.loads(app.db.rows_as_json(conn, schema, 2, cloudsync.EVERY_ROW)[0]) == here[:2]
    finally:
        app.db.close()


def test_tables_mysql_cannot_encode_are_encoded_here(backend):
    if backend.kind != "mysql":
        pytest.skip("SQLite rows are always encoded in Python")
    backend.sql("CREATE TABLE readings (id INT PRIMARY KEY, level DOUBLE, at TIME)")
    backend.sql("INSERT INTO readings VALUES (1, 0.1, '-00:30:00'), (2, 1e300, '100:00:00')")
    app = started(backend, ALLOWED_TABLES="readings")
    try:
        assert app.engine.schemas["readings"].json_row is None
        assert pull(app, tables=["readings"]).json["data"]["readings"] == [
            {"id": 1, "level": 0.1, "at": "-00:30:00"}, {"id": 2, "level": 1e300, "at": "100:00:00"}]
    finally:
        app.db.close()


@pytest.fixture
def pure_python_driver(monkeypatch):
    """mysql-connector-python without its C extension, as where the extension cannot load."""
    monkeypatch.setattr(cloudsync.MySQLDatabase, "use_pure", True)


def test_pure_python_driver_pushes_and_pulls_the_same(backend, pure_python_driver):
    if backend.kind != "mysql":
        pytest.skip("the MySQL driver")
    app = started(backend)
    try:
        assert "pure Python" in app.db.driver() or app.db.pool is not None
        operations = [op("insert", id="s1", total=12.5, sold_at="2026-11-26 09:30:00", note="it's \"quoted\" \\"),
                      op("insert", id="s2", total="1234567890.99", note="Grüße 🧾"),
                      op("insert", "attachments", id=1, body="AAEC/w==", taken_on="2026-01-31")]
        assert push(app, operations, device_id="till", batch_id="b1").status == 200
        assert push(app, operations, device_id="till", batch_id="b1").json["replayed"] is True
        data = pull(app, tables=["sales", "attachments"]).json["data"]
        assert [(row["id"], row["total"], row["note"]) for row in data["sales"]] == [
            ("s1", "12.50", 'it\'s "quoted" \\'), ("s2", "1234567890.99", "Grüße 🧾")]
        assert data["sales"][0]["sold_at"] == "2026-11-26T09:30:00"
        assert data["attachments"] == [{"id": 1, "body": "AAEC/w==", "taken_on": "2026-01-31"}]
        device = Device(app, ["sales"]).sync()
        assert device.rows["sales"] == server_rows(app, "sales")
    finally:
        app.db.close()


def test_sqlite_write_lock_held_too_long_is_503_with_retry_after(backend, tmp_path):
    if backend.kind != "sqlite":
        pytest.skip("the SQLite write lock")
    application = started(backend, DB_WAIT_SECONDS="0.2", PUSH_RETRIES="1")
    holder = sqlite3.connect(backend.settings["DB_PATH"], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        response = push(application, [op("insert", id="s1")])
        assert response.status == 503 and response.headers["Retry-After"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert push(application, [op("insert", id="s1")]).status == 200
    application.db.close()


def test_a_table_lock_held_by_another_program_is_bounded(backend):
    if backend.kind != "mysql":
        pytest.skip("LOCK TABLES is MySQL's")
    application = started(backend, DB_WAIT_SECONDS="1", PUSH_RETRIES="1")
    holder = backend._raw_connect()
    holder.cursor().execute("LOCK TABLES sales WRITE")
    try:
        began = time.monotonic()
        response = push(application, [op("insert", id="s1")])
        assert response.status == 503 and response.headers["Retry-After"]
        assert time.monotonic() - began < 30
    finally:
        holder.cursor().execute("UNLOCK TABLES")
        holder.close()
    assert push(application, [op("insert", id="s1")]).status == 200
    application.db.close()


def test_mysql_driver_uses_c_extension(mysql_server):
    config = cloudsync.load_config(None, environ={}, overrides={"DB_HOST": "127.0.0.1", "DB_USER": "u", "DB_NAME": "n"})
    assert cloudsync.MySQLDatabase(config).driver().endswith("(C extension)")


def test_lost_connection_at_commit_is_503_not_500(app, backend, monkeypatch):
    if backend.kind != "mysql":
        pytest.skip("the C extension's own exception")
    from mysql.connector.connection_cext import MySQLInterfaceError, CMySQLConnection

    def commit(self):
        raise MySQLInterfaceError("Lost connection to MySQL server during query")
    monkeypatch.setattr(CMySQLConnection, "commit", commit)
    response = push(app, [op("insert", id="s1")], device_id="till", batch_id="b1")
    assert response.status == 503 and response.headers["Retry-After"]


@pytest.mark.parametrize("settings,words,code", [
    ({"DB_NAME": "cloudsync_no_such_db"}, ["Unknown database 'cloudsync_no_such_db'", "MySQL error 1049",
                                           "create the database"], 2),
    ({"DB_PASS": "wrong-password"}, ["Access denied for user", "MySQL error 1045", "check DB_USER and DB_PASS"], 2),
    ({"DB_PORT": "1"}, ["MySQL error 2003", "check DB_HOST and DB_PORT"], 1),       # down: try again later
])
def test_database_errors_give_the_servers_words_and_the_fix(backend, settings, words, code):
    if backend.kind != "mysql":
        pytest.skip("MySQL's own words")
    env = dict(backend.settings, ALLOWED_TABLES="sales", TOKENS_FILE="", **settings)
    exit_code, _, err = _cli(["--env-file", "", "migrate"], env)
    assert exit_code == code and "migrate: the database is unavailable: " in err, err
    for word in words:
        assert word in err, err
    assert "wrong-password" not in err


def test_a_python_without_the_mysql_driver_is_one_line_naming_the_fix(tmp_path):
    blocked = tmp_path / "blocked" / "mysql"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not installed here')\n")
    env = {"DB_HOST": "127.0.0.1", "DB_USER": "u", "DB_NAME": "shop", "ALLOWED_TABLES": "sales",
           "TOKENS_FILE": "", "PYTHONPATH": str(tmp_path / "blocked")}
    code, out, err = _cli(["--env-file", "", "migrate"], env)
    assert code == cloudsync.EXIT_CONFIGURATION and "Traceback" not in err, err
    assert "mysql-connector-python is not installed" in err and ".venv/bin/python" in err


# ---------------------------------------------------------------------------
# Change capture
# ---------------------------------------------------------------------------


CASCADE_TABLES = {
    "mysql": [
        "CREATE TABLE c_shops (id INT PRIMARY KEY, name VARCHAR(20)) ENGINE=InnoDB",
        "CREATE TABLE c_notes (id INT PRIMARY KEY, shop_id INT NOT NULL, note VARCHAR(20), FOREIGN KEY (shop_id)"
        " REFERENCES c_shops (id) ON DELETE CASCADE ON UPDATE CASCADE) ENGINE=InnoDB",
        # an intermediate table no device syncs, and lines keyed by their order
        "CREATE TABLE c_orders (id INT PRIMARY KEY, shop_id INT NOT NULL, FOREIGN KEY (shop_id) REFERENCES c_shops"
        " (id) ON DELETE CASCADE ON UPDATE CASCADE) ENGINE=InnoDB",
        "CREATE TABLE c_lines (order_id INT NOT NULL, n INT NOT NULL, qty INT, PRIMARY KEY (order_id, n),"
        " FOREIGN KEY (order_id) REFERENCES c_orders (id) ON DELETE CASCADE ON UPDATE CASCADE) ENGINE=InnoDB",
        "CREATE TABLE c_tags (id INT PRIMARY KEY, shop_id INT NULL, FOREIGN KEY (shop_id) REFERENCES c_shops (id)"
        " ON DELETE SET NULL ON UPDATE CASCADE) ENGINE=InnoDB",
        "CREATE TABLE c_staff (id INT PRIMARY KEY, boss INT NULL, FOREIGN KEY (boss) REFERENCES c_staff (id)"
        " ON DELETE CASCADE) ENGINE=InnoDB",
    ],
    "sqlite": [
        "CREATE TABLE c_shops (id INT PRIMARY KEY, name TEXT)",
        "CREATE TABLE c_notes (id INT PRIMARY KEY, shop_id INT NOT NULL REFERENCES c_shops (id) ON DELETE CASCADE"
        " ON UPDATE CASCADE, note TEXT)",
        "CREATE TABLE c_orders (id INT PRIMARY KEY, shop_id INT NOT NULL REFERENCES c_shops (id) ON DELETE CASCADE"
        " ON UPDATE CASCADE)",
        "CREATE TABLE c_lines (order_id INT NOT NULL REFERENCES c_orders (id) ON DELETE CASCADE ON UPDATE CASCADE,"
        " n INT NOT NULL, qty INT, PRIMARY KEY (order_id, n))",
        "CREATE TABLE c_tags (id INT PRIMARY KEY, shop_id INT NULL REFERENCES c_shops (id) ON DELETE SET NULL"
        " ON UPDATE CASCADE)",
        "CREATE TABLE c_staff (id INT PRIMARY KEY, boss INT NULL REFERENCES c_staff (id) ON DELETE CASCADE)",
    ],
}
CASCADE_SYNCED = ["c_shops", "c_notes", "c_lines", "c_tags", "c_staff"]


@pytest.fixture
def cascades(backend):
    for statement in CASCADE_TABLES[backend.kind]:
        backend.sql(statement)
    if backend.kind == "sqlite":
        backend.sql("PRAGMA foreign_keys = ON")         # the outside program's connection cascades too
    application = started(backend, ALLOWED_TABLES=",".join(CASCADE_SYNCED))
    yield application
    application.db.close()


def _fill_shops(backend):
    for statement in ["INSERT INTO c_shops VALUES (1, 'north'), (2, 'south')",
                      "INSERT INTO c_notes VALUES (10, 1, 'a'), (11, 1, 'b'), (12, 2, 'c')",
                      "INSERT INTO c_orders VALUES (100, 1), (101, 2)",
                      "INSERT INTO c_lines VALUES (100, 1, 5), (100, 2, 6), (101, 1, 7)",
                      "INSERT INTO c_tags VALUES (20, 1), (21, 2)",
                      "INSERT INTO c_staff VALUES (1, NULL), (2, 1), (3, 2)"]:
        backend.sql(statement)


@pytest.mark.parametrize("change", [
    "DELETE FROM c_shops WHERE id = 1",             # notes, orders and their lines go; tags lose their shop
    "UPDATE c_orders SET id = 200 WHERE id = 100",  # lines keyed by the order move with it
    "UPDATE c_shops SET id = 9 WHERE id = 2",       # tags follow, lines' orders follow (their keys stay)
    "DELETE FROM c_staff WHERE id = 2",             # one level of a table cascading into itself
])
def test_rows_a_foreign_key_cascade_changes_reach_every_device(cascades, backend, change):
    _fill_shops(backend)
    device = Device(cascades, CASCADE_SYNCED, limit=3).sync()
    backend.sql(change)
    device.sync()
    for table in CASCADE_SYNCED:
        assert device.rows[table] == server_rows(cascades, table), (table, change)


def test_cascade_triggers_follow_the_foreign_keys(cascades, backend):
    if backend.kind != "mysql":
        pytest.skip("SQLite fires triggers for cascades itself")
    names = {name for (name,) in backend.sql("SELECT TRIGGER_NAME FROM information_schema.TRIGGERS"
                                              " WHERE TRIGGER_SCHEMA = DATABASE() AND TRIGGER_NAME LIKE"
                                              " 'cloudsync\\\\_cascade\\\\_%'")}
    assert names == {cloudsync._cascade_trigger_name(table, event) for table, event in [
        ("c_shops", "del"), ("c_shops", "upd"), ("c_orders", "del"), ("c_orders", "upd"), ("c_staff", "del")]}
    # a table cascading into itself is followed one level: its seed pulls are never cached
    assert [schema.name for schema in cascades.engine.schemas.values() if schema.cascaded] == ["c_staff"]
    application = started(backend, ALLOWED_TABLES=",".join(CASCADE_SYNCED), CHANGE_CAPTURE="api")
    assert not backend.sql("SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA ="
                           " DATABASE() AND TRIGGER_NAME LIKE 'cloudsync\\\\_cascade\\\\_%'")
    application.db.close()


def test_change_log_records_api_and_outside_writes(app, backend):
    push(app, [op("insert", id="s1"), op("update", id="s1", note="x")], device_id="d1", batch_id="b1")
    backend.sql("UPDATE sales SET note = 'office' WHERE id = 's1'")
    backend.sql("DELETE FROM sales WHERE id = 's1'")
    push(app, [op("insert", "stock_moves", shop="A", sku="7", qty=1)], device_id="d2")
    assert log_entries(app) == [
        ("sales", '["s1"]', "I", "d1", "b1"),
        ("sales", '["s1"]', "U", "d1", "b1"),
        ("sales", '["s1"]', "U", None, None),
        ("sales", '["s1"]', "D", None, None),
        ("stock_moves", '["A", "7"]' if backend.kind == "mysql" else '["A","7"]', "I", "d2", None),
    ]
    assert [entry[0] for entry in log_entries(app, device_id="d2")] == ["stock_moves"]


def test_key_change_is_logged_as_delete_and_insert(app, backend):
    push(app, [op("insert", id="old")])
    backend.sql("UPDATE sales SET id = 'new' WHERE id = 'old'")
    assert [(key, kind) for _, key, kind, _, _ in log_entries(app)][1:] == [('["old"]', "D"), ('["new"]', "U")]


def test_migrate_is_idempotent(backend):
    for _ in range(3):
        application = started(backend)
    push(application, [op("insert", id="s1")])
    assert len(log_entries(application)) == 1


@pytest.mark.parametrize("backend", ["mysql"], indirect=True)
def test_start_without_trigger_privilege_says_so(backend):
    user = "cs_%s" % uuid.uuid4().hex[:8]
    backend.sql("CREATE USER '%s'@'127.0.0.1' IDENTIFIED BY 'pw'" % user)
    try:
        backend.sql("GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX ON %s.* TO '%s'@'127.0.0.1'"
                    % (backend.settings["DB_NAME"], user))
        with pytest.raises(cloudsync.ChangeCaptureError, match="may not create triggers.*CHANGE_CAPTURE=api"):
            cloudsync.App(backend.config(DB_USER=user, DB_PASS="pw")).start()
        application = started(backend, DB_USER=user, DB_PASS="pw", CHANGE_CAPTURE="api")
        assert push(application, [op("insert", id="s1")], device_id="d").status == 200
        assert len(log_entries(application)) == 1
        application.db.close()
    finally:
        backend.sql("DROP USER '%s'@'127.0.0.1'" % user)


def test_api_capture_records_only_own_writes(backend):
    application = started(backend, CHANGE_CAPTURE="api")
    push(application, [op("insert", id="s1"), op("update", id="s1", note="n"), op("delete", id="s1")], device_id="d")
    backend.sql("INSERT INTO sales (id) VALUES ('outside')")
    assert [(kind, device) for _, _, kind, device, _ in log_entries(application)] == [("I", "d"), ("U", "d"), ("D", "d")]


def test_switching_to_api_capture_removes_triggers(backend):
    cloudsync.App(backend.config()).start()
    application = started(backend, CHANGE_CAPTURE="api")
    push(application, [op("insert", id="s1")], device_id="d")
    assert len(log_entries(application)) == 1


def test_sequence_follows_commit_order(app, backend):
    """A transaction that started first but commits last is still seen after a later pull's checkpoint."""
    first = pull(app, tables=["sales"], since=None).json["checkpoint"]
    if backend.kind == "mysql":
        early, late = _mysql_connect(backend.settings["DB_NAME"]), _mysql_connect(backend.settings["DB_NAME"])
        early.autocommit = late.autocommit = False
        early.cursor().execute("INSERT INTO sales (id) VALUES ('early')")   # takes the lower AUTO_INCREMENT
        late.cursor().execute("INSERT INTO sales (id) VALUES ('late')")
        late.commit()
        seen = pull(app, tables=["sales"], since=first).json
        assert [row["id"] for row in seen["changes"]["sales"]["upserted"]] == ["late"]
        early.commit()
        early.close(), late.close()
    else:
        writer = sqlite3.connect(backend.settings["DB_PATH"], isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO sales (id) VALUES ('early')")
        seen = pull(app, tables=["sales"], since=first).json
        assert seen["changes"]["sales"]["upserted"] == []
        writer.execute("COMMIT")
        writer.close()
    after = pull(app, tables=["sales"], since=seen["checkpoint"]).json
    assert [row["id"] for row in after["changes"]["sales"]["upserted"]] == ["early"]


def test_server_numbers_pending_changes_in_the_background(app, backend):
    if backend.kind != "mysql":
        pytest.skip("SQLite numbers changes as they are written")
    push(app, [op("insert", id="a")])          # a push without checkpoint leaves its change pending
    assert backend.sql("SELECT COUNT(*) FROM cloudsync_pending")[0][0] == 1
    stop = threading.Event()
    wake = threading.Event()
    worker = threading.Thread(target=cloudsync._maintain, args=(app, app.config, stop, wake))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while backend.sql("SELECT COUNT(*) FROM cloudsync_pending")[0][0] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        wake.set()
        worker.join()
    assert [row[1:4] for row in backend.sql("SELECT seq, table_name, row_key, op FROM cloudsync_changes")] == \
        [("sales", '["a"]', "I")]


def test_sequencer_numbers_backlogs_larger_than_a_batch(app, backend):
    if backend.kind != "mysql":
        pytest.skip("SQLite numbers changes as they are written")
    count = cloudsync.SEQUENCE_BATCH_ROWS * 2 + 17
    backend.sql("INSERT INTO product_stock (product_id, store_id, qty) SELECT CONCAT('k', seq), 1, seq FROM seq_1_to_%d" % count)
    with app.db.connection() as conn:               # as the numberer does, a batch per transaction
        assert app.engine.changelog.sequence(conn) == count
    assert backend.sql("SELECT COUNT(*), MIN(seq), MAX(seq), COUNT(DISTINCT row_key) FROM cloudsync_changes")[0] \
        == (count, 1, count, count)
    assert backend.sql("SELECT COUNT(*) FROM cloudsync_pending")[0][0] == 0


def test_compaction_and_expired_checkpoint(app, backend):
    push(app, [op("insert", id="a")])
    old = Device(app, ["sales"]).sync().checkpoint
    push(app, [op("delete", id="a"), op("insert", id="b")])
    with app.db.connection() as conn:
        app.engine.changelog.sequence(conn)     # as the watcher does within WATCH_INTERVAL_SECONDS
    backend.sql("UPDATE cloudsync_changes SET changed_at = '2000-01-01 00:00:00'")
    with app.db.connection() as conn:
        removed, _, upto = app.engine.changelog.compact(conn, 30)
    assert removed == 3 and upto == 3
    response = pull(app, tables=["sales"], since=old)
    assert response.status == 410
    assert response.json == {"success": False, "error": "Checkpoint expired", "code": "expired", "reset": True,
                             "reset_tables": ["sales"], "checkpoint": response.json["checkpoint"],
                             "detail": response.json["detail"]}
    assert push(app, [op("insert", id="c")], checkpoint=old).status == 410
    fresh = Device(app, ["sales"]).sync()
    assert set(fresh.rows["sales"]) == {("b",)}
    push(app, [op("insert", id="d")])
    assert pull(app, tables=["sales"], since=fresh.checkpoint).status == 200


def test_conflict_seen_while_the_sequencer_numbers_it(app, backend):
    if backend.kind != "mysql":
        pytest.skip("only MySQL numbers changes after commit")
    push(app, [op("insert", id="x")])
    till = Device(app, ["sales"], device_id="till").sync()
    backend.sql("UPDATE sales SET note = 'price change' WHERE id = 'x'")   # committed, not yet numbered
    changelog, real_query, reads = app.engine.changelog, app.db.query, []

    def query(conn, sql, params=()):
        rows = real_query(conn, sql, params)
        if "SELECT row_key, op, columns" in sql and not reads:
            reads.append(sql)
            with app.db.connection() as other:    # the sequencer runs between the two reads
                changelog.sequence(other)
        return rows
    app.db.query = query
    try:
        schema = app.engine.schemas["sales"]
        with app.db.connection() as conn:
            since = app.engine.checkpoints.decode(till.checkpoint)["s"]
            touched = changelog.touched_by_others(conn, schema, {app.db.key_text(schema, ("x",))}, since, "till",
                                                  cloudsync.EVERY_ROW)
    finally:
        del app.db.query
    assert reads and touched == {'["x"]': {"note"}}


KEY_CASE_CASES = [
    # (old key, new key): equal under the column's collation, different to a device
    ("abc", "ABC"),
    ("a", "a "),
]


@pytest.mark.parametrize("old, new", KEY_CASE_CASES)
def test_key_change_equal_under_collation_deletes_old_key(backend, old, new):
    if backend.kind == "mysql":
        backend.sql("CREATE TABLE tags (name VARCHAR(20) PRIMARY KEY, note TEXT)"
                    " DEFAULT CHARSET utf8mb4 COLLATE utf8mb4_general_ci")
    else:
        backend.sql("CREATE TABLE tags (name TEXT COLLATE NOCASE PRIMARY KEY, note TEXT)")
    app = started(backend, ALLOWED_TABLES="tags")
    try:
        push(app, [op("insert", "tags", name=old, note="n")])
        device = Device(app, ["tags"]).sync()
        backend.sql("UPDATE tags SET name = ? WHERE name = ?", (new, old))
        device.sync()
        assert device.rows["tags"] == server_rows(app, "tags") and list(device.rows["tags"]) == [(new,)]
    finally:
        app.db.close()


def test_a_push_in_progress_and_the_numberer_are_never_deadlocked(app, backend):
    """The push holds its new pending row while the numberer holds last_seq.

    The numberer deletes the committed pending rows it numbered: a DELETE whose
    id list covers most of a small table is a full scan, which waits for the
    push's row. A push that then waited for last_seq (it numbered its own
    changes once) closed a cycle (reliability_cloudsync.sequencer_deadlock
    plays it in SQL); a push never numbers, so the numberer only waits for it.
    """
    if backend.kind != "mysql":
        pytest.skip("MySQL numbers changes after commit")
    for n in range(3):
        backend.sql("INSERT INTO sales (id) VALUES ('committed-%d')" % n)     # waiting to be numbered
    failures, numbering = [], threading.Event()

    def sequencer():
        try:
            with app.db.connection() as conn:
                backend.sequencer_thread = app.db.query(conn, "SELECT CONNECTION_ID()")[0][0]
                numbering.set()
                app.engine.changelog.sequence(conn)
        except cloudsync.Retryable as error:
            failures.append(error)
        finally:
            numbering.set()

    with app.db.connection() as conn:
        with app.db.transaction(conn):
            app.db.execute(conn, "INSERT INTO sales (id) VALUES ('pushed')")
            thread = threading.Thread(target=sequencer)
            thread.start()
            numbering.wait(10)
            deadline = time.monotonic() + 10
            # on to the push's numbering once the sequencer waits for a lock (or is done)
            while thread.is_alive() and time.monotonic() < deadline and not backend.sql(
                    "SELECT 1 FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"
                    " AND trx_mysql_thread_id = %d" % backend.sequencer_thread):
                time.sleep(0.2)     # InnoDB refreshes INNODB_TRX only when unread for 0.1 s
            # what a push with a checkpoint does last: read the log (conflicts, its basis)
            app.engine.changelog.read(conn, ["sales"], 0, 10, app.engine.every_row())
    thread.join()
    assert failures == []
    with app.db.connection() as conn:
        app.engine.changelog.sequence(conn)
    assert backend.sql("SELECT COUNT(*) FROM cloudsync_changes") == [(4,)]


# The shop's own trigger: a visit adds its fee to the patient's balance.
CLINIC_MYSQL = [
    "CREATE TABLE patients (id VARCHAR(10) PRIMARY KEY, balance DECIMAL(10,2) NOT NULL DEFAULT 0) ENGINE=InnoDB",
    "CREATE TABLE visits (id VARCHAR(10) PRIMARY KEY, patient VARCHAR(10), fee DECIMAL(10,2)) ENGINE=InnoDB",
    "CREATE TRIGGER visit_fee AFTER INSERT ON visits FOR EACH ROW"
    " UPDATE patients SET balance = balance + NEW.fee WHERE id = NEW.patient",
]
CLINIC_SQLITE = [
    "CREATE TABLE patients (id TEXT PRIMARY KEY, balance DECIMAL(10,2) NOT NULL DEFAULT 0)",
    "CREATE TABLE visits (id TEXT PRIMARY KEY, patient TEXT, fee DECIMAL(10,2))",
    "CREATE TRIGGER visit_fee AFTER INSERT ON visits BEGIN"
    " UPDATE patients SET balance = balance + NEW.fee WHERE id = NEW.patient; END",
]


def test_the_shops_own_trigger_is_another_writer_for_the_log(request, tmp_path):
    for kind in ("sqlite", "mysql"):
        (tmp_path / kind).mkdir()
        backend = _fresh_database(kind, CLINIC_SQLITE if kind == "sqlite" else CLINIC_MYSQL, tmp_path / kind,
                                  request) if kind == "sqlite" or REQUIRE_MYSQL or _mysql_reachable() else None
        if backend is None:
            continue
        application = started(backend, ALLOWED_TABLES="patients,visits")
        try:
            backend.sql("INSERT INTO patients (id, balance) VALUES ('p1', 0)")
            till, other = (Device(application, ["patients", "visits"], device_id=name).sync()
                           for name in ("till", "other"))
            response = till.push([op("insert", "visits", id="v1", patient="p1", fee="30.00")],
                                 checkpoint=till.checkpoint)
            assert response.status == 200
            till.checkpoint = response.json["checkpoint"]
            till.rows["visits"][("v1",)] = {"id": "v1", "patient": "p1", "fee": "30.00"}
            till.sync()                                     # it learns of the fee the trigger added
            assert till.rows["patients"][("p1",)]["balance"] == "30.00", kind
            # a push of the balance from a copy without it is a conflict, as for any other device
            stale = dict(till.rows["patients"][("p1",)], balance="5.00")
            response = push(application, [op("update", "patients", **stale)], device_id="till",
                            checkpoint=response.json["checkpoint"])
            assert response.status == 409, (kind, response.body)
            assert str(backend.sql("SELECT balance FROM patients")[0][0]).startswith("30"), kind
        finally:
            application.db.close()
            backend.close()


def _mysql_reachable():
    try:
        _mysql_connect().close()
        return True
    except Exception:
        return False


def test_a_replace_by_another_program_reaches_devices_as_a_delete(request, tmp_path):
    backend = _fresh_database("sqlite", ["CREATE TABLE codes (id TEXT PRIMARY KEY, code TEXT UNIQUE, note TEXT)",
                                         "CREATE TABLE tags (id TEXT PRIMARY KEY,"
                                         " tag TEXT UNIQUE ON CONFLICT REPLACE)"], tmp_path, request)
    application = started(backend, ALLOWED_TABLES="codes,tags")
    try:
        backend.sql("INSERT INTO codes VALUES ('a', 'X', 'first'), ('b', 'Y', 'second')")
        assert push(application, [op("insert", "tags", id="t1", tag="red")]).status == 200
        till = Device(application, ["codes", "tags"], device_id="till").sync()
        backend.sql("REPLACE INTO codes (id, code, note) VALUES ('c', 'X', 'third')")     # removes 'a'
        backend.sql("INSERT OR IGNORE INTO codes (id, code) VALUES ('d', 'Y')")           # removes nothing
        assert push(application, [op("insert", "tags", id="t2", tag="red")]).status == 200     # removes t1
        till.sync()
        assert sorted(till.rows["codes"]) == [("b",), ("c",)]
        assert sorted(till.rows["tags"]) == [("t2",)]
    finally:
        application.db.close()
        backend.close()


def test_a_wide_table_with_long_column_names_is_logged(backend):
    names = ["colonne_numéro_%03d_très_longue_désignation_comptable_régionale" % n for n in range(180)]
    columns = ", ".join("%s %s" % (cloudsync.quote_mysql(name) if backend.kind == "mysql"
                                   else cloudsync.quote_sqlite(name), "INT" if backend.kind == "mysql" else "INTEGER")
                        for name in names)
    backend.sql("CREATE TABLE wide (id INT PRIMARY KEY, %s)" % columns)
    application = started(backend, ALLOWED_TABLES="wide")
    try:
        backend.sql("INSERT INTO wide (id) VALUES (1)")
        quote = cloudsync.quote_mysql if backend.kind == "mysql" else cloudsync.quote_sqlite
        backend.sql("UPDATE wide SET %s WHERE id = 1" % ", ".join("%s = 1" % quote(name) for name in names))
        assert push(application, [op("update", "wide", id=1, **{names[0]: 2})]).status == 200
    finally:
        application.db.close()


def test_a_quiet_stores_checkpoint_moves_and_compaction_never_resets_it(scoped_backend, scoped):
    seed_orders(scoped_backend, (1, 7, "1.00", "a"))
    _, _, since = sync_to_end(scoped, "t7", ["orders"])
    for n in range(5):                              # only store 8 is busy
        seed_orders(scoped_backend, (100 + n, 8, "1.00", "b"))
    with scoped.db.connection() as conn:            # as the server's numberer does
        scoped.engine.changelog.sequence(conn)
    _, _, moved = sync_to_end(scoped, "t7", ["orders"], since=since)
    assert scoped.engine.checkpoints.decode(moved)["s"] > scoped.engine.checkpoints.decode(since)["s"]
    # everything is compacted: store 7 missed nothing, so its (old) checkpoint still serves
    scoped_backend.sql("UPDATE cloudsync_changes SET changed_at = '2000-01-01 00:00:00'")
    with scoped.db.connection() as conn:
        scoped.engine.changelog.compact(conn, 1)
    assert spull(scoped, "t7", tables=["orders"], since=since).status == 200


def test_a_pulls_log_read_is_one_index_range_per_table_and_scope_value(scoped):
    grant = scoped.engine.grant_for(next(token for token in scoped.auth.tokens if token.device_id == "both"))
    parts = scoped.engine.changelog._entries_sql(["orders", "catalogue"], {"orders": 5, "catalogue": 9}, 11, grant,
                                                 None)
    assert parts == [
        ("SELECT 'e', table_name, row_key, seq FROM cloudsync_changes WHERE table_name = ? AND scope = ? AND seq > ?"
         " ORDER BY seq LIMIT ?", ["orders", "7", 5, 11]),
        ("SELECT 'e', table_name, row_key, seq FROM cloudsync_changes WHERE table_name = ? AND scope = ? AND seq > ?"
         " ORDER BY seq LIMIT ?", ["orders", "8", 5, 11]),
        ("SELECT 'e', table_name, row_key, seq FROM cloudsync_changes WHERE table_name = ? AND seq > ?"
         " ORDER BY seq LIMIT ?", ["catalogue", 9, 11])]


def test_many_scope_values_read_the_log_as_one_range_per_table(scoped):
    token = cloudsync.DeviceToken("region", "r", scopes={"store_id": tuple(str(n) for n in range(40))})
    grant = scoped.engine.grant_for(token)
    parts = scoped.engine.changelog._entries_sql(["orders", "catalogue"], 3, 11, grant, None)
    assert len(parts) == 2
    assert parts[0][0] == ("SELECT 'e', table_name, row_key, seq FROM cloudsync_changes WHERE table_name = ?"
                           " AND scope IN (%s) AND seq > ? ORDER BY seq LIMIT ?" % ", ".join("?" * 40))


# ---------------------------------------------------------------------------
# Sync engine: the tables and their rows, the live schema
# ---------------------------------------------------------------------------


def test_status_refreshes_schema(app, backend):
    backend.sql("ALTER TABLE sales ADD COLUMN till VARCHAR(10)" if backend.kind == "mysql"
                else "ALTER TABLE sales ADD COLUMN till TEXT")
    assert push(app, [op("insert", id="s1", till="T1")]).json["error"] == "Unknown column"
    time.sleep(cloudsync.SCHEMA_REFRESH_SECONDS + 0.1)       # status re-reads at most this often
    assert call(app, "GET", "/sync/status").status == 200
    assert push(app, [op("insert", id="s1", till="T1")]).status == 200


@pytest.mark.parametrize("table,message", [("missing_table", "does not exist"), ("no_key", "no primary key"),
                                           ("float_pk", "cannot name a row exactly"),
                                           ("double_pk", "cannot name a row exactly")])
def test_start_refuses_bad_table(backend, table, message):
    if table in ("float_pk", "double_pk"):
        backend.sql("CREATE TABLE %s (k %s PRIMARY KEY, note TEXT)" % (table, table[:-3].upper()))
    application = cloudsync.App(backend.config(ALLOWED_TABLES="sales," + table))
    with pytest.raises(cloudsync.SchemaError, match=message):
        application.start()


KEYS = st.integers(0, 7)
PUSH_STEP = st.tuples(st.just("push"), st.integers(0, 2),
                      st.lists(st.tuples(st.sampled_from(["insert", "update", "delete", "upsert"]), KEYS,
                                         st.integers(0, 99)), min_size=1, max_size=4),
                      st.booleans(), st.sampled_from(["abort", "skip"]))
OUTSIDE_STEP = st.tuples(st.just("outside"), st.sampled_from(["insert", "update", "delete"]), KEYS, st.integers(0, 99))
PULL_STEP = st.tuples(st.just("pull"), st.integers(0, 2), st.integers(1, 4))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(PUSH_STEP, OUTSIDE_STEP, PULL_STEP), min_size=1, max_size=25))
def test_property_devices_following_the_loop_end_equal_to_server(app, backend, steps):
    prefix = uuid.uuid4().hex[:6]
    devices = [Device(app, ["product_stock"], limit=3, device_id="dev%d" % n) for n in range(3)]
    for step in steps:
        if step[0] == "push":
            _, n, operations, with_checkpoint, on_conflict = step
            device = devices[n]
            fields = {"on_conflict": on_conflict}
            if with_checkpoint and device.checkpoint is not None:
                fields["checkpoint"] = device.checkpoint
            response = device.push([op(action, "product_stock", product_id="%s-%d" % (prefix, key), store_id=1, qty=value)
                                    for action, key, value in operations], **fields)
            assert response.status in (200, 409), response.body
        elif step[0] == "outside":
            _, action, key, value = step
            row_id = "%s-%d" % (prefix, key)
            if action == "insert":
                ignore = "INSERT IGNORE" if backend.kind == "mysql" else "INSERT OR IGNORE"
                backend.sql(ignore + " INTO product_stock (product_id, store_id, qty) VALUES (?, 1, ?)", (row_id, value))
            elif action == "update":
                backend.sql("UPDATE product_stock SET qty = ? WHERE product_id = ?", (value, row_id))
            else:
                backend.sql("DELETE FROM product_stock WHERE product_id = ?", (row_id,))
        else:
            _, n, limit = step
            device = devices[n]
            response = pull(app, tables=device.tables, since=device.checkpoint, limit=limit).json
            for row in response["changes"]["product_stock"]["upserted"]:
                device.rows["product_stock"][device.key("product_stock", row)] = row
            for key in response["changes"]["product_stock"]["deleted"]:
                device.rows["product_stock"].pop(device.key("product_stock", key), None)
            device.checkpoint = response["checkpoint"]
    expected = server_rows(app, "product_stock")
    for device in devices:
        device.sync()
        assert device.rows["product_stock"] == expected


def test_the_server_sees_a_new_column_by_itself(app, backend):
    stop_watching = app.watch()
    try:
        backend.sql("ALTER TABLE sales ADD COLUMN payment VARCHAR(20)" if backend.kind == "mysql"
                    else "ALTER TABLE sales ADD COLUMN payment TEXT")
        until(lambda: "payment" in app.engine.schemas["sales"].column_names)
        assert push(app, [op("insert", id="s1", payment="cash")]).status == 200
    finally:
        stop_watching()


def test_a_column_added_with_a_default_is_announced_and_costs_no_pull(app, backend):
    assert push(app, [op("insert", id="s1")]).status == 200
    checkpoint = pull(app, tables=["sales"], since=None).json["checkpoint"]
    backend.sql("ALTER TABLE sales ADD COLUMN payment VARCHAR(20) DEFAULT 'cash'" if backend.kind == "mysql"
                else "ALTER TABLE sales ADD COLUMN payment TEXT DEFAULT 'cash'")
    app.engine.follow_schema()              # (the watcher does it within SCHEMA_LOOK_SECONDS)
    assert push(app, [op("insert", id="s2", payment="card")], device_id="till", checkpoint=checkpoint).status == 200
    response = pull(app, tables=["sales"], since=checkpoint)
    assert response.status == 200 and response.json["added_columns"] == {"sales": {"payment": "cash"}}
    assert [(row["id"], row["payment"]) for row in response.json["changes"]["sales"]["upserted"]] == [("s2", "card")]
    again = pull(app, tables=["sales"], since=response.json["checkpoint"])
    assert "added_columns" not in again.json                # told once


@pytest.mark.parametrize("alter", ["drop", "retype"])
def test_a_column_dropped_or_changed_makes_devices_pull_that_table_alone(app, backend, alter):
    assert push(app, [op("insert", id="s1", note="n"), op("insert", "products", id="p1", name="tea")]).status == 200
    checkpoint = pull(app, tables=["sales", "products"], since=None).json["checkpoint"]
    # (SQLite refuses to drop a column its triggers name: cloudsync.py alter does both in one step)
    app.engine.alter("sales", "ALTER TABLE sales DROP COLUMN note" if alter == "drop" else
                     "ALTER TABLE sales MODIFY note VARCHAR(7)" if backend.kind == "mysql" else
                     "ALTER TABLE sales RENAME COLUMN note TO memo")
    response = pull(app, tables=["sales", "products"], since=checkpoint)
    assert response.status == 410 and response.json["reset"] is True
    assert response.json["reset_tables"] == ["sales"]
    # the device empties sales and goes on: sales comes again from its start, products from where it was
    push(app, [op("insert", "products", id="p2", name="coffee")])
    upserted, since = {"sales": [], "products": []}, response.json["checkpoint"]
    while True:
        answer = pull(app, tables=["sales", "products"], since=since).json
        for table, change in answer["changes"].items():
            upserted[table] += [row["id"] for row in change["upserted"]]
        since = answer["checkpoint"]
        if not answer["has_more"]:
            break
    assert upserted == {"sales": ["s1"], "products": ["p2"]}


@pytest.mark.parametrize("scopes,message", [
    ("orders.shop", "has no column shop"),
    ("orders.total", "a scope column holds whole numbers or text"),
])
def test_a_scope_column_the_table_lacks_or_cannot_scope_by_is_a_schema_error(scoped_backend, scopes, message):
    with pytest.raises(cloudsync.SchemaError, match=message):
        cloudsync.App(scoped_config(scoped_backend, ROW_SCOPES=scopes)).start()


# Shops change their schema while the server runs: a column added, dropped or
# renamed, a dump reloaded, a table swapped for a copy (pt-online-schema-change,
# gh-ost), a TRUNCATE. The watcher follows each within SCHEMA_LOOK_SECONDS
# (SyncEngine.follow_schema); `cloudsync.py alter` closes the window entirely.
# A table whose history broke is pulled again on its own (410 reset_tables).

def _office_can_update(backend, table, column, value, key="s1"):
    """Whether the shop's own UPDATE of a row works (a trigger made for old columns fails it)."""
    try:
        backend.sql("UPDATE %s SET %s = ? WHERE id = ?" % (table, column), (value, key))
        return True
    except Exception:
        return False


def test_a_dropped_column_breaks_the_shops_writes_only_until_the_watcher_follows(backend):
    application = started(backend)
    stop_watching = application.watch()
    try:
        assert push(application, [op("insert", id="s1", note="n", total="1.00")]).status == 200
        if backend.kind == "sqlite":
            # SQLite refuses the DROP while cloudsync's trigger names the column: cloudsync.py alter
            with pytest.raises(sqlite3.OperationalError, match="cloudsync_sales_upd"):
                backend.sql("ALTER TABLE sales DROP COLUMN note")
            application.engine.alter("sales", "ALTER TABLE sales DROP COLUMN note")
        else:
            backend.sql("ALTER TABLE sales DROP COLUMN note")
        until(lambda: _office_can_update(backend, "sales", "total", "2.00"))
        assert push(application, [op("update", id="s1", total="3.00")]).status == 200
        assert backend.sql("SELECT CAST(total AS CHAR) FROM sales")[0][0] in ("3.00", "3")
    finally:
        stop_watching()
        application.db.close()


def test_every_trigger_dropped_by_hand_is_followed_at_the_look_at_triggers(backend):
    # nothing else about the table changes (as with a dump reload within the second the table was
    # made): only the look at the triggers, every TRIGGER_LOOK_SECONDS, can see it. The one table
    # allowed: no trigger of cloudsync's is left on any
    application = started(backend, ALLOWED_TABLES="sales")
    try:
        assert push(application, [op("insert", id="s1", total="1.00")]).status == 200
        till = Device(application, ["sales"], device_id="till").sync()
        application.engine.follow_schema()              # the watcher's first look after the start
        assert application.engine.follow_schema(triggers=True) is False
        names = backend.sql("SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
                            " AND EVENT_OBJECT_TABLE = 'sales'" if backend.kind == "mysql" else
                            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'sales'")
        assert names
        for (name,) in names:
            backend.sql("DROP TRIGGER %s" % name)
        backend.sql("INSERT INTO sales (id, total) VALUES ('unlogged', 2)")
        assert application.engine.follow_schema(triggers=True) is True
        backend.sql("INSERT INTO sales (id, total) VALUES ('logged', 3)")
        till.sync()
        assert till.resets == [["sales"]]
        assert set(key[0] for key in till.rows["sales"]) == {"s1", "unlogged", "logged"}
    finally:
        application.db.close()


@pytest.mark.parametrize("command", ["alter", "plain"])
def test_an_added_column_changed_before_the_watcher_noticed_is_still_a_conflict(backend, command):
    application = started(backend)
    try:
        assert push(application, [op("insert", id="s1", total="1.00")]).status == 200
        till = Device(application, ["sales"], device_id="till").sync()
        ddl = "ALTER TABLE sales ADD COLUMN memo VARCHAR(20)"
        if command == "alter":
            application.engine.alter("sales", ddl)
        else:
            backend.sql(ddl)
        # the office writes the new column at once: with a plain ALTER, before any look
        backend.sql("UPDATE sales SET memo = 'office' WHERE id = 's1'")
        application.engine.follow_schema()
        response = till.push([op("update", id="s1", memo="till")], checkpoint=till.checkpoint)
        assert response.status == 409, response.body
        assert backend.sql("SELECT memo FROM sales") == [("office",)]
    finally:
        application.db.close()


def test_a_renamed_column_is_followed_and_its_changes_count(backend):
    application = started(backend)
    try:
        assert push(application, [op("insert", id="s1", note="a")]).status == 200
        till = Device(application, ["sales"], device_id="till").sync()
        application.engine.alter("sales", "ALTER TABLE sales RENAME COLUMN note TO memo")
        backend.sql("UPDATE sales SET memo = 'office' WHERE id = 's1'")
        till.sync()                                 # a column renamed: sales is pulled again, alone
        assert till.resets == [["sales"]]
        assert till.rows["sales"][("s1",)]["memo"] == "office"
        response = till.push([op("update", id="s1", memo="till")], checkpoint=till.checkpoint)
        assert response.status == 200               # nothing changed since its new start
        backend.sql("UPDATE sales SET memo = 'office again' WHERE id = 's1'")
        response = till.push([op("update", id="s1", memo="till")], checkpoint=till.checkpoint)
        assert response.status == 409 and response.json["conflicts"][0]["columns"] == ["memo"]
    finally:
        application.db.close()


def _reload_like_a_dump(backend, table="sales"):
    """DROP, CREATE, INSERT, as mysqldump's output (without cloudsync's triggers) does."""
    rows = backend.sql("SELECT id, total, note FROM %s" % table)
    create = backend.sql("SHOW CREATE TABLE %s" % table)[0][1] if backend.kind == "mysql" else \
        backend.sql("SELECT sql FROM sqlite_master WHERE name = ?", (table,))[0][0]
    backend.sql("DROP TABLE %s" % table)
    backend.sql(create)
    for row in rows:
        backend.sql("INSERT INTO %s (id, total, note) VALUES (?, ?, ?)" % table, row)
    backend.sql("UPDATE %s SET note = 'reloaded' WHERE id = 's2'" % table)


def _swap_like_pt_osc(backend, table="sales"):
    """A copy with a new column, filled, then RENAME TABLE into place, as pt-osc and gh-ost do."""
    backend.sql("CREATE TABLE _%s_new AS SELECT * FROM %s" % (table, table) if backend.kind == "sqlite" else
                "CREATE TABLE _%s_new LIKE %s" % (table, table))
    if backend.kind == "mysql":
        backend.sql("INSERT INTO _%s_new SELECT * FROM %s" % (table, table))
    backend.sql("UPDATE _%s_new SET note = 'copied' WHERE id = 's2'" % table)
    if backend.kind == "mysql":
        backend.sql("RENAME TABLE %s TO _%s_old, _%s_new TO %s" % (table, table, table, table))
        backend.sql("DROP TABLE _%s_old" % table)
    else:
        backend.sql("ALTER TABLE %s RENAME TO _%s_old" % (table, table))
        backend.sql("ALTER TABLE _%s_new RENAME TO %s" % (table, table))
        backend.sql("DROP TABLE _%s_old" % table)


def _truncate(backend, table="sales"):
    backend.sql("TRUNCATE TABLE %s" % table if backend.kind == "mysql" else "DELETE FROM %s" % table)
    backend.sql("INSERT INTO %s (id, total) VALUES ('s9', 9)" % table)


@pytest.mark.parametrize("change", [_reload_like_a_dump, _swap_like_pt_osc, _truncate],
                         ids=["dump reload", "pt-osc swap", "truncate"])
def test_a_table_made_again_swapped_or_truncated_is_pulled_again_alone(backend, change):
    if backend.kind == "sqlite" and change is _swap_like_pt_osc:
        # a copy made with CREATE TABLE AS has no primary key on SQLite
        pytest.skip("the copy needs the key: covered by the dump reload on SQLite")
    application = started(backend)
    stop_watching = application.watch()
    try:
        assert push(application, [op("insert", id="s1", total="1.00"), op("insert", id="s2", total="2.00"),
                                   op("insert", "products", id="p1", name="tea")]).status == 200
        till = Device(application, ["sales", "products"], device_id="till").sync()
        seed = pull(application, tables=["sales"])
        epoch = application.engine.epochs.get("sales", 0)
        change(backend)
        seen = backend.kind == "mysql" or change is not _truncate   # SQLite logs a DELETE of every row
        if seen:
            until(lambda: application.engine.epochs.get("sales", 0) > epoch)
        push(application, [op("insert", "products", id="p2", name="coffee")])
        till.sync()
        assert getattr(till, "resets", [None])[-1] == (["sales"] if seen else None)   # products went on
        assert till.rows["sales"] == server_rows(application, "sales")
        assert till.rows["products"] == server_rows(application, "products")
        again = call(application, "POST", "/sync/pull", {"tables": ["sales"]},
                     headers={"If-None-Match": seed.headers["ETag"]})
        assert again.status == 200 and again.json["data"]["sales"] != seed.json["data"]["sales"]
        # and the table is captured again
        backend.sql("UPDATE sales SET note = 'after' WHERE id = (SELECT MIN(id) FROM (SELECT id FROM sales) t)"
                    if backend.kind == "mysql" else "UPDATE sales SET note = 'after' WHERE id = (SELECT MIN(id) FROM sales)")
        # (another program's change reaches polls within WATCH_INTERVAL_SECONDS: Long polls)
        until(lambda: till.sync().rows["sales"] == server_rows(application, "sales"))
        assert call(application, "GET", "/sync/status").status == 200
    finally:
        stop_watching()
        application.db.close()


# The schema changing under the server, as a property: random DDL (columns added, dropped and
# renamed, the table dropped and made again, swapped for a copy, truncated) between the office's
# writes and a device's pushes and pulls. Once the server has followed each change, the office's
# own writes never fail, and the device ends equal to the server.

SCHEMA_STEPS = ["office", "office", "push", "pull", "add", "drop", "rename", "reload", "swap", "truncate"]


def _columns_of(backend, table="sales"):
    if backend.kind == "mysql":
        return [row[0] for row in backend.sql("SELECT COLUMN_NAME FROM information_schema.COLUMNS"
                                              " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
                                              " ORDER BY ORDINAL_POSITION", (table,))]
    return [row[1] for row in backend.sql("SELECT * FROM pragma_table_info('%s')" % table)]


def _schema_step(application, backend, data, step, extra, counter):
    """One DDL step on sales, as the shop (or its tools) would run it; `extra` holds added columns."""
    text = "VARCHAR(20)" if backend.kind == "mysql" else "TEXT"
    if step == "add":
        name = "x%d" % counter
        default = data.draw(st.sampled_from([None, "'d'"]))
        ddl = "ALTER TABLE sales ADD COLUMN %s %s%s" % (name, text, "" if default is None else " DEFAULT " + default)
        extra.append(name)
    elif step in ("drop", "rename") and extra:
        name = data.draw(st.sampled_from(extra))
        extra.remove(name)
        if step == "drop":
            ddl = "ALTER TABLE sales DROP COLUMN %s" % name
        else:
            ddl = "ALTER TABLE sales RENAME COLUMN %s TO %s_r%d" % (name, name, counter)
            extra.append("%s_r%d" % (name, counter))
    elif step == "reload":
        _reload_like_a_dump(backend)
        return
    elif step == "swap" and backend.kind == "mysql":
        _swap_like_pt_osc(backend)
        return
    elif step == "truncate":
        _truncate(backend)
        return
    else:
        return
    through_cloudsync = data.draw(st.booleans())
    if backend.kind == "sqlite" and step != "add" or through_cloudsync:
        application.engine.alter("sales", ddl)      # (SQLite refuses to drop a column its triggers name)
    else:
        backend.sql(ddl)


def _reload_with_mariadb_dump(options):
    """A reshape of sales: the table dumped by mariadb-dump (with `options`), then the dump loaded back."""
    def reshape(connect, database, directory, during):
        dump = directory / "sales.sql"
        with open(str(dump), "wb") as out:
            subprocess.run(["mariadb-dump"] + connect + options + [database, "sales"], stdout=out, check=True,
                           timeout=60)
        during()
        with open(str(dump), "rb") as source:
            subprocess.run(["mariadb"] + connect + [database], stdin=source, check=True, timeout=60)
    reshape.tool = "mariadb-dump"
    return reshape


def _alter_with_pt_online_schema_change(connect, database, directory, during):
    """A reshape of sales: pt-online-schema-change adds a column (copy, its triggers, RENAME swap)."""
    during()
    host, port, user = connect[1], connect[3], connect[5]
    subprocess.run(["pt-online-schema-change", "--alter", "ADD COLUMN tip DECIMAL(12,2) NULL",
                    "--preserve-triggers", "--execute", "h=%s,P=%s,u=%s,D=%s,t=sales" % (host, port, user, database)],
                   check=True, timeout=120, capture_output=True)
_alter_with_pt_online_schema_change.tool = "pt-online-schema-change"


@pytest.mark.parametrize("reshape", [_reload_with_mariadb_dump(["--skip-triggers"]), _reload_with_mariadb_dump([]),
                                     _alter_with_pt_online_schema_change],
                         ids=["dump reload without triggers", "dump reload with triggers", "pt-osc swap"])
def test_a_table_reshaped_by_real_tools_while_tills_sync_leaves_them_equal_to_the_server(backend, tmp_path, reshape):
    if backend.kind != "mysql":
        pytest.skip("%s works on a MariaDB database" % reshape.tool)
    _require(shutil.which(reshape.tool), "%s is not installed" % reshape.tool)
    settings = backend.settings
    server = LiveServer(tmp_path, ALLOWED_TABLES="sales", **settings)
    tills = [cloudsync_client.Client(str(tmp_path / ("till%d.db" % number)), server.url, ["sales"],
                                     device_id="till%d" % number) for number in range(2)]
    connect = ["--host", settings["DB_HOST"], "--port", settings["DB_PORT"], "--user", settings["DB_USER"]]
    stop, refusals, sellers = threading.Event(), [], []

    def keep_selling(number, till):
        sale = 100
        while not stop.is_set():
            till.insert("sales", {"id": "t%d-%03d" % (number, sale), "total": "2.00"})
            sale += 1
            refusals.extend(till.sync().rejected)

    def start_selling():
        sellers.extend(threading.Thread(target=keep_selling, args=pair, daemon=True) for pair in enumerate(tills))
        for seller in sellers:
            seller.start()
    try:
        for number, till in enumerate(tills):
            for sale in range(10):
                till.insert("sales", {"id": "t%d-%02d" % (number, sale), "total": "1.00"})
            assert till.sync()
        reshape(connect, settings["DB_NAME"], tmp_path, start_selling)
        # the shop's own writes work on the reshaped table, and the tills pull them
        backend.sql("UPDATE sales SET note = 'after' WHERE id = 't0-00'")
        time.sleep(1)
        stop.set()
        for seller in sellers:
            seller.join(timeout=60)
        # A reload within the second the table was made keeps its creation time: the server then
        # follows it at its look at the triggers, within TRIGGER_LOOK_SECONDS.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                all(till.sync() and not till.pending() for till in tills)
                and any(row["note"] == "after" for row in tills[1].rows("sales"))
                and all(till.rows("sales") == server.rows("sales") for till in tills)):
            time.sleep(0.05)
        expected = server.rows("sales")
        assert {"t%d-%02d" % (number, n) for number in range(2) for n in range(10)} <= {row["id"] for row in expected}
        for till in tills:
            assert till.rows("sales") == expected, till.device_id
        assert refusals == []
        check = subprocess.run([sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", "", "check"],
                               env=server.env, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "Traceback" not in open(server.log, errors="replace").read()
    finally:
        stop.set()
        for till in tills:
            till.close()
        server.stop()


@pytest.mark.parametrize("kind", ["sqlite", "mysql"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_devices_follow_a_schema_that_changes_under_the_server(kind, request, tmp_path, data):
    # each example alters its tables, so each gets a database of its own
    backend = _example_database(kind, tempfile.mkdtemp(dir=str(tmp_path)), request)
    application = started(backend)
    try:
        till = Device(application, ["sales", "products"], device_id="till").sync()
        extra = []
        for counter in range(data.draw(st.integers(4, 10))):
            step = data.draw(st.sampled_from(SCHEMA_STEPS))
            if step == "office":
                key = "o%d" % data.draw(st.integers(0, 6))
                backend.sql("DELETE FROM sales WHERE id = ?", (key,))
                backend.sql("INSERT INTO sales (id, total, note) VALUES (?, 1, 'office')", (key,))
                backend.sql("UPDATE products SET name = 'office' WHERE id = 'p1'")
            elif step == "push":
                response = till.push([op("upsert", id="t%d" % data.draw(st.integers(0, 4)), total="2.00",
                                         note="till"), op("upsert", "products", id="p1", name="till")],
                                     checkpoint=till.checkpoint, on_conflict="skip", batch_id=str(uuid.uuid4()))
                assert response.status in (200, 409, 410), response.body
            elif step == "pull":
                till.sync()
            else:
                _schema_step(application, backend, data, step, extra, counter)
                application.engine.follow_schema()      # what the watcher does within SCHEMA_LOOK_SECONDS
                # the shop's own writes work again
                backend.sql("UPDATE sales SET total = total + 1")
                backend.sql("INSERT INTO sales (id, total) VALUES (?, 3)", ("w%d" % counter,))
                backend.sql("DELETE FROM sales WHERE id = ?", ("w%d" % counter,))
        till.sync()
        for table in ("sales", "products"):
            assert till.rows[table] == server_rows(application, table), table
    finally:
        application.db.close()
        backend.close()


# ---------------------------------------------------------------------------
# Long polls: one watcher per instance
# ---------------------------------------------------------------------------


class Waiter(threading.Thread):
    """A device's pull that waits for a change, in a thread of its own: .answer when it returned."""

    def __init__(self, application, since, wait=20, tables=("sales",)):
        super().__init__(daemon=True)
        self.application, self.since, self.wait, self.tables, self.answer = application, since, wait, tables, None
        self.start()

    def run(self):
        self.answer = pull(self.application, tables=list(self.tables), since=self.since, wait=self.wait)


def synced_checkpoint(application, tables=("sales",)):
    since = None
    while True:
        answer = pull(application, tables=list(tables), since=since)
        since = answer.json["checkpoint"]
        if not answer.json["has_more"]:
            return since


@pytest.mark.parametrize("writer", ["push", "sql", "other_instance"])
def test_a_waiting_pull_wakes_when_a_change_commits(backend, writer):
    application = started(backend)
    stop_watching = application.watch()
    other = started(backend) if writer == "other_instance" else None
    try:
        since = synced_checkpoint(application)
        waiter = Waiter(application, since)
        until(lambda: application.watcher.waiting == 1)
        if writer == "push":
            push(application, [op("insert", id="w1", total="1.00")])
        elif writer == "sql":
            backend.sql("INSERT INTO sales (id, total) VALUES ('w1', 1.00)")
        else:
            push(other, [op("insert", id="w1", total="1.00")])
        waiter.join(15)                         # it waits 20 s when nothing wakes it
        assert not waiter.is_alive() and waiter.answer.status == 200
        assert [row["id"] for row in waiter.answer.json["changes"]["sales"]["upserted"]] == ["w1"]
        assert waiter.answer.json["checkpoint"] != since and application.watcher.waiting == 0
    finally:
        stop_watching()
        application.db.close()
        if other is not None:
            other.db.close()


def test_a_waiting_pull_answers_at_once_when_changes_are_there_and_times_out_empty(app):
    since = synced_checkpoint(app)
    push(app, [op("insert", id="x1")])
    answer = pull(app, tables=["sales"], since=since, wait=20)
    assert answer.status == 200 and answer.json["changes"]["sales"]["upserted"][0]["id"] == "x1"
    since = answer.json["checkpoint"]
    push(app, [op("insert", id="other", table="products", name="tea")])     # another table wakes it, no more
    answer = pull(app, tables=["sales"], since=since, wait=1)
    # nothing for it: the checkpoint moves on to the head, past the other table's change
    assert answer.status == 200 and answer.json == {
        "success": True, "changes": {"sales": {"upserted": [], "deleted": []}},
        "checkpoint": answer.json["checkpoint"], "has_more": False, "limit": 1000}
    assert app.engine.checkpoints.decode(answer.json["checkpoint"])["s"] \
        >= app.engine.checkpoints.decode(since)["s"]


@pytest.mark.parametrize("wait,status,error", [
    (-1, 400, "Invalid wait"), ("5", 400, "Invalid wait"), (True, 400, "Invalid wait"), ([], 400, "Invalid wait"),
    (0, 200, None), (None, 200, None), (0.2, 200, None), (-10 ** 400, 400, "Invalid wait"),
])
def test_wait_is_a_number_of_seconds(app, wait, status, error):
    answer = pull(app, tables=["sales"], since=synced_checkpoint(app), wait=wait)
    assert (answer.status, answer.json.get("error")) == (status, error)


def test_wait_is_capped_and_needs_since(app):
    assert cloudsync.parse_wait(1000, 30) == 25 and cloudsync.parse_wait(1000, 10) == 9
    assert cloudsync.parse_wait(10 ** 400, 30) == 25
    assert cloudsync.parse_wait(0, 30) is None and cloudsync.parse_wait(2.5, 30) == 2.5
    answer = pull(app, tables=["sales"], wait=5)
    assert (answer.status, answer.json["error"]) == (400, "Invalid wait")


def test_pulls_past_the_waiter_cap_answer_at_once_with_a_retry_hint(backend):
    application = started(backend, LONGPOLL_MAX_WAITERS="1")
    try:
        since = synced_checkpoint(application)
        first = Waiter(application, since)
        until(lambda: application.watcher.waiting == 1)
        answer = pull(application, tables=["sales"], since=since, wait=20)
        assert answer.status == 200 and answer.json["retry_after"] == cloudsync.LONGPOLL_RETRY_AFTER_SECONDS
        assert answer.json["changes"]["sales"] == {"upserted": [], "deleted": []}
        push(application, [op("insert", id="y")])
        first.join(15)
        assert first.answer.json["changes"]["sales"]["upserted"][0]["id"] == "y"
        metrics = call(application, "GET", "/metrics").body.decode()
        assert "cloudsync_longpoll_turned_away_total 1" in metrics
    finally:
        application.db.close()


def test_an_idle_poll_is_answered_from_the_watcher_without_the_database(backend):
    application = started(backend)
    stop_watching = application.watch()
    try:
        since = synced_checkpoint(application)
        until(lambda: application.watcher.known_head() == application.engine.checkpoints.decode(since)["s"])
        real, used = application.db.connection, []

        def connection():
            if threading.current_thread().name != "cloudsync-watcher":
                used.append(threading.current_thread().name)
            return real()
        application.db.connection = connection
        answers = [pull(application, tables=["sales"], since=since) for _ in range(5)]
        assert all(answer.json["checkpoint"] == since for answer in answers) and used == []
        # a push through this instance: the next poll asks the database, and sees it
        del application.db.connection
        push(application, [op("insert", id="z")])
        application.db.connection = connection
        answer = pull(application, tables=["sales"], since=since)
        assert answer.json["changes"]["sales"]["upserted"][0]["id"] == "z" and used
    finally:
        stop_watching()
        application.db.close()


def _post_json(url, path, body, timeout=30):
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _park_live_pulls(server, count, wait):
    """`count` pulls waiting on a live server, each in a thread: (their checkpoint, threads, answers)."""
    status, answer = _post_json(server.url, "/sync/pull", {"tables": ["sales"], "since": None})
    since, answers = answer["checkpoint"], []
    waiters = [threading.Thread(target=lambda: answers.append(_post_json(
        server.url, "/sync/pull", {"tables": ["sales"], "since": since, "wait": wait})), daemon=True)
        for _ in range(count)]
    for waiter in waiters:
        waiter.start()

    def parked():
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            return "cloudsync_longpoll_waiting %d" % count in response.read().decode()
    until(parked)
    return since, waiters, answers


def test_pushes_and_status_are_served_while_every_waiting_slot_is_taken(tmp_path):
    server = LiveServer(tmp_path, THREADS="1", LONGPOLL_MAX_WAITERS="3")
    try:
        since, waiters, answers = _park_live_pulls(server, 3, 20)
        # three threads are parked; the one of THREADS still serves, at once
        with urllib.request.urlopen(server.url + "/sync/status", timeout=10) as response:
            assert response.status == 200
        assert all(waiter.is_alive() for waiter in waiters)
        status, answer = _post_json(server.url, "/sync/push", {"operations": [
            {"table": "sales", "action": "insert", "data": {"id": "busy", "total": "1.00"}}]}, timeout=10)
        assert status == 200
        for waiter in waiters:
            waiter.join(15)
        assert [answer["changes"]["sales"]["upserted"][0]["id"] for _, answer in answers] == ["busy"] * 3
    finally:
        server.stop()


def test_sigterm_wakes_every_waiting_pull_with_a_normal_answer(tmp_path):
    server = LiveServer(tmp_path, LONGPOLL_MAX_WAITERS="4")
    since, waiters, answers = _park_live_pulls(server, 2, 25)
    server.process.send_signal(signal.SIGTERM)
    for waiter in waiters:
        waiter.join(15)                         # they would wait 25 s
    assert [status for status, _ in answers] == [200, 200]
    assert all(answer["checkpoint"] == since and answer["has_more"] is False for _, answer in answers)
    assert server.process.wait(timeout=15) == 0


def test_one_device_cannot_take_every_long_poll_slot(backend):
    application = started(backend, TOKENS="a ta; b tb", LONGPOLL_MAX_WAITERS="10")
    watcher = application.watcher
    try:
        taken = sum(watcher.enter("a") for _ in range(10))
        assert taken == cloudsync.LONGPOLL_WAITERS_PER_DEVICE
        assert watcher.enter("b")                    # another device still waits
    finally:
        for _ in range(taken):
            watcher.leave("a")
        watcher.leave("b")
        application.db.close()


# A sale in store 7 wakes the waiting pulls of store 7's tills and of devices
# that see every store, not those of store 8; a change of a shared table (the
# catalogue) wakes every pull of it.

class ScopedWaiter(threading.Thread):
    """A scoped device's pull that waits for a change, in a thread of its own: .answer when it returned."""

    def __init__(self, application, token, tables, since, wait=20):
        super().__init__(daemon=True)
        self.application, self.token, self.tables, self.since, self.wait = application, token, tables, since, wait
        self.answer = None
        self.start()

    def run(self):
        self.answer = spull(self.application, self.token, tables=self.tables, since=self.since, wait=self.wait)


def _checkpoint_at_the_end(application, token, tables):
    return sync_to_end(application, token, tables)[2]


@pytest.mark.parametrize("writer", ["push", "sql"])
def test_a_change_wakes_only_the_waiting_pulls_of_its_store_and_a_shared_table_wakes_all(scoped, scoped_backend,
                                                                                       writer, monkeypatch):
    stop_watching = scoped.watch()
    watcher = scoped.watcher
    # which waiting pull each wake-up went to (a pull woken early by the push, before the watcher
    # numbered its change, parks again and is woken twice: counted per pull, not in all)
    wakes, park = collections.Counter(), watcher.park

    def counted_park(*args, **kwargs):
        woken = park(*args, **kwargs)
        wakes[threading.current_thread().name] += woken
        return woken
    monkeypatch.setattr(watcher, "park", counted_park)
    try:
        tables = ["orders", "catalogue"]
        waiters = {token: ScopedWaiter(scoped, token, tables, _checkpoint_at_the_end(scoped, token, tables))
                   for token in ("t7", "t8", "to")}
        for token, waiter in waiters.items():
            waiter.name = token
        until(lambda: watcher.waiting == 3)
        generation = watcher.generation
        if writer == "push":
            assert spush(scoped, "t7", [op("insert", "orders", id=1, store_id=7, total="5.00")]).status == 200
        else:
            scoped_backend.sql("INSERT INTO orders (id, store_id, total) VALUES (1, 7, 5)")
        for token in ("t7", "to"):                  # store 7's till, and the office that sees every store
            waiters[token].join(15)
            assert not waiters[token].is_alive() and waiters[token].answer.status == 200
            assert [row["id"] for row in waiters[token].answer.json["changes"]["orders"]["upserted"]] == [1]
        # the watcher has looked past the sale (and once more), and store 8's pull still waits, never woken
        until(lambda: watcher.generation > generation)
        looks = watcher.looked
        until(lambda: watcher.looked > looks)
        assert waiters["t8"].is_alive() and watcher.waiting == 1
        assert wakes["t8"] == 0 and wakes["t7"] >= 1 and wakes["to"] >= 1, wakes
        scoped_backend.sql("INSERT INTO catalogue (id, name) VALUES (1, 'tea')")      # every store's
        waiters["t8"].join(15)
        assert not waiters["t8"].is_alive() and waiters["t8"].answer.status == 200
        assert waiters["t8"].answer.json["changes"]["orders"]["upserted"] == []
        assert [row["id"] for row in waiters["t8"].answer.json["changes"]["catalogue"]["upserted"]] == [1]
    finally:
        stop_watching()


def test_a_poll_behind_the_head_only_by_other_stores_changes_is_answered_from_memory(scoped, scoped_backend,
                                                                                    monkeypatch):
    stop_watching = scoped.watch()
    watcher = scoped.watcher
    try:
        tables = ["orders", "catalogue"]
        c7, c8 = (_checkpoint_at_the_end(scoped, token, tables) for token in ("t7", "t8"))
        behind = scoped.engine.checkpoints.decode(c8)["s"]
        scoped_backend.sql("INSERT INTO orders (id, store_id, total) VALUES (1, 7, 5)")
        until(lambda: (watcher.known_head() or 0) > behind)
        head = watcher.known_head()

        def no_database(*args):
            raise AssertionError("the poll read the database")
        with monkeypatch.context() as patched:
            patched.setattr(scoped.pulls, "pull_changes", no_database)
            answer = spull(scoped, "t8", tables=tables, since=c8)
        assert answer.status == 200, answer.json
        assert answer.json["changes"] == {table: {"upserted": [], "deleted": []} for table in tables}
        assert scoped.engine.checkpoints.decode(answer.json["checkpoint"])["s"] == head
        # store 7's till still gets its order, and store 8's the next of its own
        assert [row["id"] for row in spull(scoped, "t7", tables=tables, since=c7).json["changes"]["orders"]
                ["upserted"]] == [1]
        scoped_backend.sql("INSERT INTO orders (id, store_id, total) VALUES (2, 8, 6)")
        until(lambda: (watcher.known_head() or 0) > head)
        assert [row["id"] for row in spull(scoped, "t8", tables=tables, since=answer.json["checkpoint"])
                .json["changes"]["orders"]["upserted"]] == [2]
    finally:
        stop_watching()


def _watching(scoped):
    """The scoped app's watcher, as if its thread had just looked (shared answers need one)."""
    watcher = scoped.watcher
    watcher.seen_at = time.monotonic() + 3600
    return watcher


@pytest.mark.parametrize("move, read_again", [({"orders": {"7"}}, True), ({"orders": {"8"}}, False),
                                              ({"catalogue": {None}}, True), (None, True)])
def test_a_woken_pull_shares_an_answer_only_while_nothing_it_watches_moved(scoped, move, read_again):
    # A till woken by a sale in its store after another till's read of the same checkpoint began must not
    # get that read's answer (it would park again past the sale, and sleep until its deadline).
    watcher = _watching(scoped)
    interest = {"orders": ("7",), "catalogue": None}
    reads = []
    assert watcher.shared("k", interest, lambda: reads.append(1) or {"changes": {}, "n": 1}) == {"changes": {}, "n": 1}
    with watcher._changed:
        watcher._moved(move, 10, 11)
    answer = watcher.shared("k", interest, lambda: reads.append(2) or {"changes": {}, "n": 2})
    assert answer["n"] == (2 if read_again else 1) and len(reads) == (2 if read_again else 1)


def test_a_checkpoint_past_every_head_seen_goes_to_the_database(scoped):
    # A log restored from a backup is behind the devices' checkpoints: the database expires them, so a poll
    # past the highest head this instance has seen is never answered from memory.
    tables = ["orders", "catalogue"]
    since = _checkpoint_at_the_end(scoped, "t7", tables)
    head = scoped.engine.checkpoints.decode(since)["s"]
    grant = scoped.engine.grant_for(next(token for token in scoped.auth.tokens if token.device_id == "till7"))
    assert scoped.pulls.unchanged(tables, since, grant, head - 1, highest=head)["changes"]["orders"] == \
        {"upserted": [], "deleted": []}
    assert scoped.pulls.unchanged(tables, since, grant, head - 1, highest=head - 1) is None


# ---------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------


def test_push_insert_update_delete(app, backend):
    response = push(app, [op("insert", id="s1", total="10.00", note="a"),
                          op("insert", id="s2", total="2.50"),
                          op("update", id="s1", note="b"),
                          op("delete", id="s2")], device_id="shop_01")
    assert response.status == 200 and response.json["success"] is True
    assert response.json["applied"] == 4
    assert [(row[0], row[3]) for row in backend.rows("sales")] == [("s1", "b")]


def test_push_alias_sync(app, backend):
    response = call(app, "POST", "/sync", {"device_id": "d", "operations": [op("insert", id="x")]})
    assert response.status == 200 and response.json["success"] is True
    assert len(backend.rows("sales")) == 1


def test_push_many_inserts_in_one_batch(app, backend):
    operations = [op("insert", id="s%04d" % n, total="%d.25" % n, note="bulk") for n in range(300)]
    assert push(app, operations).status == 200
    assert len(backend.rows("sales")) == 300


def test_push_composite_key(app, backend):
    assert push(app, [op("insert", "stock_moves", shop="A", sku="1", qty=5),
                      op("insert", "stock_moves", shop="B", sku="1", qty=7),
                      op("update", "stock_moves", shop="A", sku="1", qty=6),
                      op("delete", "stock_moves", shop="B", sku="1")]).status == 200
    assert backend.rows("stock_moves") == [("A", "1", 6)]


def test_push_empty_operations_succeeds(app):
    response = push(app, [])
    assert response.status == 200 and response.json["success"] is True


def test_update_of_missing_row_succeeds_and_is_listed(app, backend):
    response = push(app, [op("update", id="ghost", note="x")])
    assert response.status == 200 and response.json["success"] is True
    assert response.json["missing"] == [{"op": 0, "table": "sales", "key": "ghost"}]


def test_delete_of_missing_row_succeeds(app):
    assert push(app, [op("delete", id="ghost")]).status == 200


@pytest.mark.parametrize("failing", [
    op("insert", id="s1", total="2.00"),          # the key of the first operation, other values
    op("insert", id="s9", total="not a number"),  # a value the database refuses
])
def test_atomic_rollback_when_last_operation_fails(app, backend, failing):
    operations = [op("insert", id="s1", total="1.00"), op("insert", id="s2"), op("update", id="s1", note="x"), failing]
    response = push(app, operations)
    assert response.status in (400, 409)
    assert response.json["success"] is False
    assert "operation 3" in response.json["detail"]
    assert backend.rows("sales") == []


def test_duplicate_inside_one_multirow_insert_names_the_operation(app, backend):
    operations = [op("insert", id="a", note="1"), op("insert", id="b", note="2"), op("insert", id="a", note="3")]
    response = push(app, operations)
    assert response.status == 409 and response.json["op"] == 2
    assert backend.rows("sales") == []


def test_not_null_violation_is_400_naming_operation(app, backend):
    response = push(app, [op("insert", "products", id="p1", name="ok"), op("insert", "products", id="p2", name=None)])
    assert response.status == 400 and response.json["op"] == 1
    assert backend.rows("products") == []


PUSH_ERRORS = [
    # (body, status, error, fragment of detail)
    (b"{not json", 400, "Invalid JSON", "line 1"),
    (b"\xff\xfe{}", 400, "Invalid JSON", "UTF-8"),
    (b"[1, 2]", 400, "Invalid payload", "JSON object"),
    (b'"text"', 400, "Invalid payload", "JSON object"),
    (b"{}", 400, "Invalid payload", "operations must be a list"),
    (b'{"operations": {}}', 400, "Invalid payload", "operations must be a list"),
    (b'{"operations": [1]}', 400, "Invalid operation", "operation 0 must be an object"),
    (b'{"operations": [{"action": "insert", "data": {}}]}', 400, "Invalid operation", "no table"),
    (b'{"operations": [{"table": "sales", "data": {}}]}', 400, "Invalid operation", "no action"),
    (b'{"operations": [{"table": "sales", "action": "insert"}]}', 400, "Invalid operation", "no data"),
    (b'{"operations": [{"table": "sales", "action": "merge", "data": {"id": "1"}}]}', 400, "Invalid action", "operation 0"),
    (b'{"operations": [{"table": "sales", "action": "insert", "data": []}]}', 400, "Invalid operation", "data must be an object"),
    (b'{"operations": [{"table": "nope", "action": "insert", "data": {"id": "1"}}]}', 400, "Invalid table", "nope"),
    (b'{"operations": [{"table": ["sales"], "action": "insert", "data": {"id": "1"}}]}', 400, "Invalid table", "operation 0"),
    (b'{"operations": [{"table": "sales", "action": "insert", "data": {"id": "1", "colour": "red"}}]}',
     400, "Unknown column", "colour"),
    (b'{"operations": [{"table": "sales", "action": "update", "data": {"note": "x"}}]}', 400, "Missing key", "'id'"),
    (b'{"operations": [{"table": "sales", "action": "delete", "data": {"id": null}}]}', 400, "Missing key", "'id'"),
    (b'{"operations": [{"table": "stock_moves", "action": "insert", "data": {"shop": "A", "qty": 1}}]}',
     400, "Missing key", "'sku'"),
    (b'{"operations": [{"table": "sales", "action": "insert", "data": {"id": "1", "note": {"a": 1}}}]}',
     400, "Invalid value", "'note'"),
    (b'{"operations": [{"table": "sales", "action": "insert", "data": {"id": "1", "total": NaN}}]}',
     400, "Invalid JSON", "NaN"),
    (b'{"operations": [{"table": "attachments", "action": "insert", "data": {"id": 1, "body": "***"}}]}',
     400, "Invalid value", "base64"),
    (b"[" * 100000 + b"]" * 100000, 400, "Invalid JSON", "nested"),
    (b'{"operations": [{"table": "nope", "table": "sales", "action": "insert", "data": {"id": "1"}}]}',
     400, "Invalid JSON", '"table" appears twice'),
    (b'{"operations": [{"table": "sales", "action": "insert", "data": {"id": "1", "total": 1.7e1000}}]}',
     400, "Invalid value", "out of range"),
]


@pytest.mark.parametrize("raw,status,error,detail", PUSH_ERRORS)
def test_push_errors(app, backend, raw, status, error, detail):
    response = call(app, "POST", "/sync/push", raw=raw)
    assert response.status == status
    assert response.json["success"] is False
    assert response.json["error"] == error
    assert detail in response.json["detail"]
    assert backend.rows("sales") == []


def test_bad_operation_late_in_batch_applies_nothing(app, backend):
    response = push(app, [op("insert", id="s1"), op("insert", id="s2", colour="red")])
    assert response.status == 400 and "operation 1" in response.json["detail"]
    assert backend.rows("sales") == []


def test_database_failure_is_500_sync_failed(app, backend):
    # a trigger of the shop's writing to a table that does not exist: the database's own failure
    backend.sql("CREATE TRIGGER shop_audit AFTER INSERT ON product_stock FOR EACH ROW"
                + (" INSERT INTO audit_nowhere VALUES (NEW.product_id)" if backend.kind == "mysql"
                   else " BEGIN INSERT INTO audit_nowhere VALUES (NEW.product_id); END"))
    response = push(app, [op("insert", "sales", id="s1"), op("insert", "product_stock", product_id="p", store_id=1, qty=1)])
    assert response.status == 500
    assert response.json == {"success": False, "error": "Sync failed", "code": "push_failed",
                             "detail": "the database failed; nothing was applied"}
    assert backend.rows("sales") == []


def test_a_table_dropped_under_the_server_is_503_to_retry_and_a_schema_problem_in_status(app, backend):
    backend.sql("DROP TABLE product_stock")
    response = push(app, [op("insert", "sales", id="s1"), op("insert", "product_stock", product_id="p", store_id=1, qty=1)])
    assert response.status == 503 and response.json["error"] == "Sync failed", response.body
    assert dict(response.headers)["Retry-After"]
    assert backend.rows("sales") == []
    pulled = pull(app, tables=["product_stock"], since=None)
    assert pulled.status == 503 and pulled.json["error"] == "Pull sync failed", pulled.body
    status = call(app, "GET", "/sync/status")
    assert status.status == 500 and status.json["error"] == "Schema problem"
    assert "product_stock" in status.json["detail"]


@pytest.mark.parametrize("action", ["upsert", "insert", "update"])
def test_a_clash_on_another_unique_key_changes_nothing(probe, backend, action):
    assert push(probe, [op("insert", "uq", id=1, code="A", name="first"),
                        op("insert", "uq", id=2, code="B", name="second")]).status == 200
    data = {"id": 3 if action != "update" else 2, "code": "A", "name": "clash"}
    response = push(probe, [op(action, "uq", **data)])
    assert response.status == 409 and response.json["op"] == 0, response.body
    assert sorted(backend.sql("SELECT id, code, name FROM uq")) == [(1, "A", "first"), (2, "B", "second")]
    # the key's own row is still updated by an upsert
    assert push(probe, [op("upsert", "uq", id=1, code="A", name="renamed")]).status == 200
    assert push(probe, [op("upsert", "uq", id=4, code="D")]).status == 200
    assert sorted(backend.sql("SELECT id, name FROM uq")) == [(1, "renamed"), (2, "second"), (4, None)]


def test_a_shops_own_rule_refuses_with_its_message(probe, backend):
    response = push(probe, [op("insert", "guarded", id=1, qty=5), op("insert", "guarded", id=2, qty=-1)])
    assert response.status == 422, response.body
    assert response.json["error"] == "Rejected" and response.json["op"] == 1
    assert response.json["rejected"] == [{"op": 1, "table": "guarded", "key": 2,
                                          "code": "rejected", "message": "stock cannot go below 0"}]
    assert backend.sql("SELECT COUNT(*) FROM guarded")[0][0] == 0
    assert push(probe, [op("insert", "guarded", id=1, qty=5)]).status == 200
    response = push(probe, [op("update", "guarded", id=1, qty=-3)], batch_id="b1")
    assert response.status == 422 and "stock cannot go below 0" in response.json["detail"]
    assert backend.sql("SELECT qty FROM guarded")[0][0] == 5


def test_batch_ids_are_compared_byte_for_byte(app, backend):
    first = push(app, [op("insert", id="s1")], device_id="till", batch_id="batch")
    second = push(app, [op("insert", id="s2")], device_id="till", batch_id="batch ")
    assert first.status == 200 and second.status == 200 and not second.json.get("replayed")
    assert len(backend.rows("sales")) == 2
    devices = [push(app, [op("insert", id="s%d" % n)], device_id=device, batch_id="b")
               for n, device in ((3, "dev"), (4, "dev "))]
    assert [response.json.get("replayed") for response in devices] == [None, None]


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_a_replay_returns_exactly_the_first_outcome(app, backend, with_checkpoint):
    fields = {"device_id": "till", "batch_id": "b1"}
    if with_checkpoint:
        fields["checkpoint"] = pull(app, tables=["sales"], since=None).json["checkpoint"]
    operations = [op("insert", id="s1"), op("update", id="gone" if not with_checkpoint else "s1", note="x")]
    first = push(app, operations, **fields)
    assert first.status == 200 and bool(first.json["checkpoint"]) == with_checkpoint
    assert push(app, [op("insert", id="s2")], device_id="other").status == 200    # the log moves on
    replayed = push(app, operations, **fields).json
    assert replayed.pop("replayed") is True
    assert replayed == first.json


def test_batch_replay_changes_nothing(app, backend):
    operations = [op("insert", id="s1", total="1.00"), op("update", id="ghost", note="x")]
    first = push(app, operations, device_id="d1", batch_id="b-1")
    assert first.status == 200 and "replayed" not in first.json
    entries = log_entries(app)
    backend.sql("UPDATE sales SET total = 5 WHERE id = 's1'")
    again = push(app, operations, device_id="d1", batch_id="b-1")
    assert again.status == 200 and again.json["replayed"] is True
    assert again.json["applied"] == first.json["applied"] and again.json["missing"] == first.json["missing"]
    assert backend.rows("sales")[0][2] == 5
    assert len(log_entries(app)) == len(entries) + 1      # only the outside update


def test_same_batch_id_other_body_is_409(app):
    push(app, [op("insert", id="s1")], device_id="d1", batch_id="b-1")
    response = push(app, [op("insert", id="s2")], device_id="d1", batch_id="b-1")
    assert response.status == 409 and response.json["error"] == "Batch id reused"


def test_batch_ids_are_per_device(app, backend):
    assert push(app, [op("insert", id="s1")], device_id="d1", batch_id="b").status == 200
    response = push(app, [op("insert", id="s2")], device_id="d2", batch_id="b")
    assert response.status == 200 and "replayed" not in response.json
    assert len(backend.rows("sales")) == 2


def test_failed_batch_is_not_recorded(app, backend):
    bad = [op("insert", "products", id="p1", name=None)]
    assert push(app, bad, device_id="d1", batch_id="b").status == 400
    good = [op("insert", "products", id="p1", name="Tea")]
    response = push(app, good, device_id="d1", batch_id="b")
    assert response.status == 200 and "replayed" not in response.json


def test_concurrent_twins_apply_once(app, backend):
    import threading
    operations = [op("insert", id="s%03d" % n) for n in range(50)]
    results = []

    def send():
        results.append(push(app, operations, device_id="d1", batch_id="twin"))
    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status for r in results) == [200] * 4
    assert sum(1 for r in results if not r.json.get("replayed")) == 1
    assert len(backend.rows("sales")) == 50


def test_identical_insert_retry_is_noop(app, backend):
    assert push(app, [op("insert", id="s1", total=1.5, sold_at="2026-01-02T03:04:05")]).status == 200
    assert push(app, [op("insert", id="s1", total="1.50", sold_at="2026-01-02T03:04:05")]).status == 200
    # the same instant in the other ISO form: the same DATETIME on MySQL, other text on SQLite
    other_form = push(app, [op("insert", id="s1", total="1.50", sold_at="2026-01-02 03:04:05")])
    assert other_form.status == (200 if backend.kind == "mysql" else 409)
    assert push(app, [op("insert", id="s1", total="1.51")]).status == 409


@pytest.mark.parametrize("stored,retried", [
    ("Tea Time", " ea  ime"), ("abc", "ABC"), ("abc", "abc "), ("1.5", "1.50"), ("x", None)])
def test_insert_of_an_existing_key_with_other_values_is_409(app, backend, stored, retried):
    assert push(app, [op("insert", id="s1", note=stored)]).status == 200
    response = push(app, [op("insert", id="s1", note=retried)])
    assert response.status == 409 and response.json["op"] == 0
    assert backend.rows("sales")[0][3] == stored


def test_upsert_inserts_or_replaces(app, backend):
    assert push(app, [op("upsert", id="s1", note="a")]).status == 200
    assert push(app, [op("upsert", id="s1", note="b"), op("upsert", id="s2")]).status == 200
    assert [(row[0], row[3]) for row in backend.rows("sales")] == [("s1", "b"), ("s2", None)]


def test_conflict_with_another_device(app, backend):
    push(app, [op("insert", id="x", note="base"), op("insert", id="y")])
    till = Device(app, ["sales"], device_id="till").sync()
    push(app, [op("update", id="x", note="from office pc")], device_id="office")
    response = till.push([op("update", id="y", note="ok"), op("update", id="x", note="till")],
                         checkpoint=till.checkpoint)
    assert response.status == 409 and response.json["error"] == "Conflict"
    conflict, = response.json["conflicts"]
    assert conflict["op"] == 1 and conflict["table"] == "sales" and conflict["key"] == "x"
    assert conflict["server_row"]["note"] == "from office pc"
    assert {row[0]: row[3] for row in backend.rows("sales")} == {"x": "from office pc", "y": None}


def test_conflict_with_outside_writer_and_skip(app, backend):
    push(app, [op("insert", id="x"), op("insert", id="y")])
    till = Device(app, ["sales"], device_id="till").sync()
    backend.sql("UPDATE sales SET note = 'price change' WHERE id = 'x'")
    response = till.push([op("update", id="x", note="till"), op("update", id="y", note="till")],
                         checkpoint=till.checkpoint, on_conflict="skip")
    assert response.status == 200 and response.json["applied"] == 1
    assert [c["op"] for c in response.json["conflicts"]] == [0]
    assert {row[0]: row[3] for row in backend.rows("sales")} == {"x": "price change", "y": "till"}


def test_update_of_deleted_row_is_conflict_with_checkpoint(app):
    push(app, [op("insert", id="x")])
    till = Device(app, ["sales"], device_id="till").sync()
    push(app, [op("delete", id="x")], device_id="office")
    response = till.push([op("update", id="x", note="n")], checkpoint=till.checkpoint)
    assert response.status == 409
    assert response.json["conflicts"] == [{"op": 0, "table": "sales", "key": "x", "server_row": None,
                                           "columns": ["customer_id", "id", "note", "sold_at", "store_id", "total"]}]


def test_own_writes_never_conflict(app):
    push(app, [op("insert", id="x")])
    till = Device(app, ["sales"], device_id="till").sync()
    base = till.checkpoint
    assert till.push([op("update", id="x", note="1")], checkpoint=base).status == 200
    assert till.push([op("update", id="x", note="2")], checkpoint=base).status == 200


def full_sale(key, **values):
    """A sales row with every column, as a device that knows the whole row pushes it."""
    return dict(dict(id=key, customer_id=None, total="1.00", note=None, sold_at=None, store_id=None), **values)


def test_push_checkpoint_skips_own_changes_only(app):
    till = Device(app, ["sales"], device_id="till").sync()
    mine = till.push([op("insert", **full_sale("a"))], checkpoint=till.checkpoint).json["checkpoint"]
    assert mine != till.checkpoint
    assert pull(app, tables=["sales"], since=mine).json["changes"]["sales"]["upserted"] == []
    push(app, [op("insert", id="b")], device_id="office")
    after = till.push([op("insert", **full_sale("c"))], checkpoint=mine).json["checkpoint"]
    rows = pull(app, tables=["sales"], since=after).json["changes"]["sales"]["upserted"]
    assert "b" in [row["id"] for row in rows]


def test_push_without_checkpoint_returns_a_null_checkpoint(app):
    assert push(app, [op("insert", id="a")], device_id="till").json["checkpoint"] is None


def test_insert_then_update_in_one_push_is_not_a_conflict(app):
    till = Device(app, ["sales"], device_id="till").sync()
    response = till.push([op("insert", **full_sale("a", note="first")), op("update", id="a", note="second")],
                         checkpoint=till.checkpoint)
    assert response.status == 200, response.body
    assert "conflicts" not in response.json


# Each operation may carry the checkpoint its edit was based on: a device that pulled while
# the edit waited still has it judged against what its user saw (the office edit in between).
# (operation's own checkpoint, push checkpoint, what the office changed, the edit, status, conflict columns)
OWN_CHECKPOINT_CASES = [
    ("before", "after", "note", op("update", id="x", note="till"), 409, ["note"]),
    (None, "after", "note", op("update", id="x", note="till"), 200, None),    # the trap it closes
    ("after", "before", "note", op("update", id="x", note="till"), 200, None),
    ("before", None, "note", op("update", id="x", note="till"), 409, ["note"]),
    ("before", "after", "note", op("update", id="x", total="2.00"), 200, None),  # column level
    ("before", "after", "note", op("delete", id="x"), 409, ["note"]),
    ("before", "after", "total", op("increment", id="x", total=1), 200, None),   # never a conflict
]


@pytest.mark.parametrize("own, whole, changed, edit, status, columns", OWN_CHECKPOINT_CASES)
def test_an_operation_is_judged_against_its_own_checkpoint(app, backend, own, whole, changed, edit,
                                                           status, columns):
    push(app, [op("insert", **full_sale("x"))])
    till = Device(app, ["sales"], device_id="till").sync()
    seen = {"before": till.checkpoint}
    backend.sql("UPDATE sales SET %s = %s WHERE id = 'x'" % (changed, "'office'" if changed == "note"
                                                             else "5.00"))
    seen["after"] = till.sync().checkpoint          # pulled the office's edit while the till's waited
    edit = dict(edit, checkpoint=seen[own]) if own else edit
    response = till.push([edit], checkpoint=seen.get(whole), batch_id="b1")
    assert response.status == status, response.body
    if columns is None:
        assert "conflicts" not in response.json
    else:
        assert response.json["code"] == "conflict"
        conflict, = response.json["conflicts"]
        assert conflict["op"] == 0 and conflict["columns"] == columns
        assert {row[0]: row[3] for row in backend.rows("sales")} == {"x": "office"}


# Beyond the sales table: a composite text key, and an integer key with a date and a blob.
# (table, the row, the office's change, the till's edit of the same column)
OWN_CHECKPOINT_TABLES = [
    ("stock_moves", {"shop": "s1", "sku": "k1", "qty": 5},
     "UPDATE stock_moves SET qty = 9 WHERE shop = 's1' AND sku = 'k1'", {"shop": "s1", "sku": "k1", "qty": 4}),
    ("attachments", {"id": 7, "body": "AAE=", "taken_on": "2026-12-01"},
     "UPDATE attachments SET taken_on = '2026-12-24' WHERE id = 7", {"id": 7, "taken_on": "2026-12-02"}),
]


@pytest.mark.parametrize("table, row, office, edit", OWN_CHECKPOINT_TABLES)
def test_an_operation_is_judged_against_its_own_checkpoint_on_other_keys_and_types(app, backend, table, row,
                                                                                  office, edit):
    assert push(app, [op("insert", table, **row)]).status == 200
    till = Device(app, [table], device_id="till").sync()
    before = till.checkpoint
    backend.sql(office)
    after = till.sync().checkpoint                  # the till pulled the office's change meanwhile
    stale = till.push([dict(op("update", table, **edit), checkpoint=before)], checkpoint=after)
    assert stale.status == 409 and stale.json["conflicts"][0]["columns"] == [
        name for name in edit if name not in ("shop", "sku", "id")]
    assert till.push([dict(op("update", table, **edit), checkpoint=after)], checkpoint=after).status == 200
    changed = Device(app, [table], device_id="office").sync().rows[table]
    assert [{name: found[name] for name in edit} for found in changed.values()] == [edit]


def test_operations_with_and_without_their_own_checkpoint_are_each_judged(app, backend):
    push(app, [op("insert", **full_sale("x")), op("insert", **full_sale("y"))])
    till = Device(app, ["sales"], device_id="till").sync()
    before = till.checkpoint
    backend.sql("UPDATE sales SET note = 'office' WHERE id IN ('x', 'y')")
    after = till.sync().checkpoint
    response = till.push([dict(op("update", id="x", note="till"), checkpoint=before),
                          op("update", id="y", note="till")],
                         checkpoint=after, on_conflict="skip")
    assert response.status == 200 and response.json["applied"] == 1
    assert [conflict["op"] for conflict in response.json["conflicts"]] == [0]
    assert {row[0]: row[3] for row in backend.rows("sales")} == {"x": "office", "y": "till"}
    # the answer's checkpoint goes on from the push's own, the device's pull position
    assert app.engine.checkpoints.decode(response.json["checkpoint"])["s"] \
        == app.engine.checkpoints.decode(after)["s"]


@pytest.mark.parametrize("checkpoint", [5, ["cs1"], {"s": 1}, "cs1.forged.mac", ""])
def test_an_operation_checkpoint_that_is_not_one_is_400_naming_the_operation(app, checkpoint):
    till = Device(app, ["sales"], device_id="till").sync()
    response = till.push([op("insert", id="a"), dict(op("insert", id="b"), checkpoint=checkpoint)],
                         checkpoint=till.checkpoint)
    assert response.status == 400 and response.json["code"] == "invalid_checkpoint"
    assert response.json["op"] == 1
    assert Device(app, ["sales"], device_id="office").sync().rows["sales"] == {}


def test_skipped_operation_keeps_the_request_checkpoint(app, backend):
    push(app, [op("insert", **full_sale("x"))])
    till = Device(app, ["sales"], device_id="till").sync()
    backend.sql("UPDATE sales SET note = 'office' WHERE id = 'x'")
    response = till.push([op("insert", **full_sale("a")), op("update", id="x", note="till")],
                         checkpoint=till.checkpoint, on_conflict="skip")
    assert response.status == 200 and [c["op"] for c in response.json["conflicts"]] == [1]
    assert response.json["checkpoint"] == till.checkpoint


def _user_trigger(backend):
    """An outside trigger: every new sale also writes a product_stock row."""
    if backend.kind == "mysql":
        backend.sql("CREATE TRIGGER user_side AFTER INSERT ON sales FOR EACH ROW "
                    "INSERT INTO product_stock (product_id, store_id, qty) VALUES (NEW.id, 1, 1)")
    else:
        backend.sql("CREATE TRIGGER user_side AFTER INSERT ON sales BEGIN "
                    "INSERT INTO product_stock (product_id, store_id, qty) VALUES (NEW.id, 1, 1); END")


def _user_stamp(backend):
    """An outside trigger: every update of a sale also changes its customer_id."""
    if backend.kind == "mysql":
        backend.sql("CREATE TRIGGER user_stamp BEFORE UPDATE ON sales FOR EACH ROW SET NEW.customer_id = 'stamped'")
    else:
        backend.sql("CREATE TRIGGER user_stamp AFTER UPDATE OF note ON sales BEGIN "
                    "UPDATE sales SET customer_id = 'stamped' WHERE id = NEW.id; END")


ECHO_CASES = [
    # (name, setup, tables, operations, checkpoint advanced past the push?)
    ("full rows", None, ["sales"], [op("insert", **full_sale("a")), op("update", id="x", note="n")], True),
    ("a number sent for a decimal", None, ["sales"], [op("insert", **full_sale("a", total=1.5))], False),
    ("insert then update", None, ["sales"], [op("insert", **full_sale("a")), op("update", id="a", note="2")], True),
    ("delete", None, ["sales"], [op("delete", id="x")], True),
    ("upsert of a full row", None, ["sales"], [op("upsert", **full_sale("x", note="u"))], True),
    ("database default", None, ["sales"], [op("insert", id="a", note="n")], False),
    ("rounded decimal", None, ["sales"], [op("insert", **full_sale("a", total="1.239"))], None),
    ("generated key", None, ["attachments"], [op("insert", "attachments", body=None, taken_on=None)], False),
    # the trigger's row is another writer's change: the device pulls it, and its own sale it holds
    ("user trigger writes another table", _user_trigger, ["sales", "product_stock"],
     [op("insert", **full_sale("a"))], True),
    ("user trigger changes the row", _user_stamp, ["sales"], [op("update", id="x", note="n")], False),
]


@pytest.mark.parametrize("name, setup, tables, operations, advanced", ECHO_CASES, ids=[c[0] for c in ECHO_CASES])
def test_push_checkpoint_never_skips_what_the_device_lacks(backend, name, setup, tables, operations, advanced):
    app = started(backend)
    try:
        push(app, [op("insert", **full_sale("x"))], device_id="office")
        if setup:
            setup(backend)
        till = Device(app, tables, device_id="till").sync()
        response = till.push(operations, checkpoint=till.checkpoint)
        assert response.status == 200, response.body
        if advanced is not None:
            assert (response.json["checkpoint"] != till.checkpoint) == advanced
        for operation in operations:      # the device applies its own operations locally, as clients do
            table, data = operation["table"], operation["data"]
            if None in [data.get(name) for name in app.engine.schemas[table].primary_key]:
                continue                  # no key yet: the device learns it from the pull
            if operation["action"] == "delete":
                till.rows[table].pop(till.key(table, data), None)
            else:
                row = till.rows[table].get(till.key(table, data)) or {
                    name: None for name in app.engine.schemas[table].column_names}
                till.rows[table][till.key(table, data)] = dict(row, **data)
        till.checkpoint = response.json["checkpoint"]
        till.sync()
        for table in tables:
            assert till.rows[table] == server_rows(app, table)
    finally:
        app.db.close()


@pytest.mark.parametrize("bad", [{"table": "nope", "action": "insert", "data": {"id": "x"}},
                                 {"table": "sales", "action": "insert", "data": {"id": "x", "nope": 1}},
                                 {"table": "sales", "action": "explode", "data": {"id": "x"}},
                                 {"table": "sales", "action": "insert", "data": {"note": "no key"}},
                                 "not an object"])
def test_every_refused_operation_is_named_by_its_index(app, backend, bad):
    response = push(app, [op("insert", id="ok"), bad])
    assert response.status == 400 and response.json["op"] == 1
    assert backend.rows("sales") == []


def test_retry_of_an_applied_batch_is_replayed_after_its_checkpoint_expired(app, backend):
    till = Device(app, ["sales"], device_id="till").sync()
    body = dict(device_id="till", batch_id="b1", checkpoint=till.checkpoint)
    assert push(app, [op("insert", id="s1")], **body).status == 200
    with app.db.connection() as conn:
        app.engine.changelog.sequence(conn)
    backend.sql("UPDATE cloudsync_changes SET changed_at = '2000-01-01 00:00:00'")
    with app.db.connection() as conn:
        app.engine.changelog.compact(conn, 30)
    again = push(app, [op("insert", id="s1")], **body)
    assert again.status == 200 and again.json["replayed"] is True
    assert push(app, [op("insert", id="s2")], **dict(body, batch_id="b2")).status == 410


def test_without_checkpoint_update_of_missing_row_is_listed(app):
    response = push(app, [op("update", id="gone", note="x")], device_id="till")
    assert response.status == 200 and response.json["missing"][0]["key"] == "gone"


PUSH_FIELD_ERRORS = [
    ({"device_id": 5}, "Invalid payload"),
    ({"device_id": ""}, "Invalid payload"),
    ({"batch_id": "x" * 129}, "Invalid payload"),
    ({"checkpoint": 7}, "Invalid checkpoint"),
    ({"checkpoint": "nonsense"}, "Invalid checkpoint"),
    ({"on_conflict": "merge"}, "Invalid payload"),
    ({"device_id": "\ud800"}, "Invalid payload"),
    ({"batch_id": "b\udfff"}, "Invalid payload"),
]


def _raw_call(application, path, text, **kwargs):
    """A body with characters json.dumps would refuse to write as UTF-8 (lone surrogates), sent escaped."""
    return call(application, "POST", path, raw=text.encode("ascii"), **kwargs)


def test_lone_surrogate_in_an_ignored_field_of_a_batch_is_harmless(app, backend):
    response = _raw_call(app, "/sync/push", '{"device_id": "till", "batch_id": "b1", "operations": '
                         '[{"table": "sales", "action": "insert", "data": {"id": "s1"}, "x": "\\ud800"}]}')
    assert response.status == 200 and [row[0] for row in backend.rows("sales")] == ["s1"]


@pytest.mark.parametrize("fields,error", PUSH_FIELD_ERRORS)
def test_push_field_errors(app, backend, fields, error):
    response = push(app, [op("insert", id="s1")], **fields)
    assert response.status == 400 and response.json["error"] == error
    assert backend.rows("sales") == []


def test_insert_without_key_needs_generated_key(app, backend):
    response = push(app, [op("insert", "sales", note="no id")])
    assert response.status == 400 and response.json["error"] == "Missing key"
    assert push(app, [op("insert", "sales", id=None)]).status == 400
    assert push(app, [op("insert", "attachments", taken_on="2026-01-01")]).status == 200
    assert push(app, [{"table": "attachments", "action": "insert", "data": {}}]).status == 200
    assert len(backend.rows("attachments")) == 2


def test_value_too_large_is_413(backend):
    application = started(backend, MAX_VALUE_BYTES="100")
    response = push(application, [op("insert", id="s1", note="é" * 51)])
    assert response.status == 413 and response.json["error"] == "Value too large" and "'note'" in response.json["detail"]
    assert push(application, [op("insert", id="s1", note="é" * 50)]).status == 200


def test_retryable_error_is_retried_then_succeeds(app, backend, monkeypatch):
    real_push, failures = app.pushes._push, []

    def flaky(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise cloudsync.Retryable("deadlock")
        return real_push(*args, **kwargs)
    monkeypatch.setattr(app.pushes, "_push", flaky)
    assert push(app, [op("insert", id="s1")]).status == 200
    assert app.pushes.retries == 2 and len(backend.rows("sales")) == 1


@pytest.mark.parametrize("error, tries", [
    (cloudsync.Retryable, lambda config: config.push_retries),          # a lock waited for
    (cloudsync.Deadlocked, lambda config: cloudsync.DEADLOCK_RETRIES),   # undone at once (Galera)
])
def test_retryable_error_gives_503_after_bounded_retries(app, monkeypatch, error, tries):
    def always(*args, **kwargs):
        raise error("MySQL error 1213")
    monkeypatch.setattr(app.pushes, "_push", always)
    monkeypatch.setattr(cloudsync.time, "sleep", lambda seconds: None)
    response = push(app, [op("insert", id="s1")])
    assert response.status == 503 and response.headers["Retry-After"]
    assert app.pushes.retries == tries(app.config)


def test_concurrent_pushes_in_opposite_order_all_succeed(app, backend):
    import threading
    push(app, [op("insert", id="a"), op("insert", id="b")])
    statuses = []

    def worker(first, second):
        for n in range(25):
            statuses.append(push(app, [op("update", id=first, note=str(n)),
                                       op("update", id=second, note=str(n))]).status)
    threads = [threading.Thread(target=worker, args=pair) for pair in (("a", "b"), ("b", "a"))] * 1
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 50


def checkpoint_of(application, tables=("shoppers", "stock")):
    """A device's checkpoint after syncing `tables` to the end."""
    since = None
    while True:
        answer = pull(application, tables=list(tables), since=since, limit=1000)
        since = answer.json["checkpoint"]
        if not answer.json["has_more"]:
            return since


COLUMN_CONFLICTS = [
    # (what another device or program changed, the device's operation, conflict_level, status, columns)
    ("phone", op("update", "shoppers", id=1, points=11), "column", 200, None),
    ("phone", op("update", "shoppers", id=1, phone="555-0199"), "column", 409, ["phone"]),
    ("phone", op("update", "shoppers", id=1, phone="555-0199", points=11), "column", 409, ["phone"]),
    ("phone", op("update", "shoppers", id=1, points=11), "row", 409, ["phone"]),
    ("phone", op("upsert", "shoppers", id=1, name="Anne"), "column", 200, None),
    ("phone", op("upsert", "shoppers", id=1, phone="1"), "column", 409, ["phone"]),
    ("phone", op("delete", "shoppers", id=1), "column", 409, ["phone"]),
    ("phone,points", op("update", "shoppers", id=1, points=11, note="x"), "column", 409, ["points"]),
    ("nothing", op("update", "shoppers", id=1, phone="555-0199"), "column", 200, None),
    ("nothing", op("update", "shoppers", id=1, phone="555-0199"), "row", 409, []),
    ("deleted", op("update", "shoppers", id=1, points=11), "column", 409, None),
]


@pytest.mark.parametrize("writer", ["device", "sql"])
@pytest.mark.parametrize("changed,operation,level,status,columns", COLUMN_CONFLICTS)
def test_an_update_conflicts_only_on_the_columns_someone_else_changed(shop_backend, shop, writer, changed,
                                                                   operation, level, status, columns):
    since = checkpoint_of(shop)
    if changed == "deleted":
        statement = ("DELETE FROM shoppers WHERE id = 1", ())
        other = op("delete", "shoppers", id=1)
    else:
        values = {"phone": "555-0142", "points": 99}
        names = [] if changed == "nothing" else changed.split(",")
        # "nothing": the same values written again; an update entry that changes no column
        statement = ("UPDATE shoppers SET phone = phone" + "".join(", %s = ?" % name for name in names)
                     + " WHERE id = 1", tuple(values[name] for name in names))
        other = op("update", "shoppers", id=1, **{name: values[name] for name in names or ["phone"]})
        if changed == "nothing":
            other = op("update", "shoppers", id=1, phone="555-0100")
    if writer == "sql":
        shop_backend.sql(*statement)
    else:
        assert push(shop, [other], device_id="till-b").status == 200
    before = shop_backend.rows("shoppers")
    answer = push(shop, [operation], device_id="till-a", checkpoint=since, conflict_level=level)
    assert answer.status == status, answer.json
    if status == 409:
        conflict = answer.json["conflicts"][0]
        assert conflict["op"] == 0 and shop_backend.rows("shoppers") == before
        if columns is not None:
            assert conflict["columns"] == columns
        else:                                   # the row was deleted: every column is someone else's now
            assert conflict["columns"] == ["credit_limit", "id", "name", "note", "phone", "points"]
    else:
        assert answer.json["applied"] == 1 and "conflicts" not in answer.json


def test_a_case_only_change_of_a_column_is_a_change_on_mysql_too(shop_backend, shop):
    since = checkpoint_of(shop)
    shop_backend.sql("UPDATE shoppers SET name = 'ANN' WHERE id = 1")
    answer = push(shop, [op("update", "shoppers", id=1, name="Annie")], device_id="till-a", checkpoint=since)
    assert answer.status == 409 and answer.json["conflicts"][0]["columns"] == ["name"]


def test_increments_add_in_the_database_exactly_and_once(shop_backend, shop):
    key = {"product_id": "p1", "store_id": 7}
    answer = push(shop, [op("increment", "stock", qty="-2.5", sold=1, **key),
                         op("increment", "stock", qty="0.125", ratio=0.5, **key)], device_id="till", batch_id="b1")
    assert answer.status == 200 and answer.json["applied"] == 2
    again = push(shop, [op("increment", "stock", qty="-2.5", sold=1, **key),
                        op("increment", "stock", qty="0.125", ratio=0.5, **key)], device_id="till", batch_id="b1")
    assert again.status == 200 and again.json["replayed"] is True
    row = pull(shop, tables=["stock"]).json["data"]["stock"][0]
    assert (row["qty"], row["sold"], row["ratio"]) == ("2.625", 1, 0.5)
    # exact decimals, however many steps
    for step in range(10):
        assert push(shop, [op("increment", "stock", qty="0.1", **key)], device_id="till",
                    batch_id="c%d" % step).status == 200
    assert pull(shop, tables=["stock"]).json["data"]["stock"][0]["qty"] == "3.625"


INCREMENT_REFUSALS = [
    # (operation, batch_id, status, error)
    (op("increment", "stock", product_id="p1", store_id=7, qty=1), None, 400, "Batch id required"),
    (op("increment", "stock", product_id="p1", store_id=7, label=1), "b", 400, "Invalid value"),
    (op("increment", "stock", product_id="p1", store_id=7), "b", 400, "Invalid operation"),
    (op("increment", "stock", product_id="p1", store_id=7, qty=None), "b", 400, "Invalid value"),
    (op("increment", "stock", product_id="p1", store_id=7, qty="lots"), "b", 400, "Invalid value"),
    (op("increment", "stock", store_id=7, qty=1), "b", 400, "Missing key"),
    (op("increment", "ledger", id=1, amount=1), "b", 403, "Insert-only table"),
    (op("increment", "shoppers", id=1, credit_limit=1), "b", 403, "Read-only column"),
    (op("increment", "stock", product_id="p1", store_id=7, qty=-6), "b", 422, "Rejected"),
]


@pytest.mark.parametrize("operation,batch_id,status,error", INCREMENT_REFUSALS)
def test_increments_that_cannot_be_applied_are_refused_and_change_nothing(shop_backend, shop, operation, batch_id,
                                                                        status, error):
    before = shop_backend.rows("stock"), shop_backend.rows("shoppers")
    answer = push(shop, [op("increment", "stock", product_id="p1", store_id=7, sold=1), operation],
                  device_id="till", batch_id=batch_id)
    assert (answer.status, answer.json["error"]) == (status, error), answer.json
    assert (shop_backend.rows("stock"), shop_backend.rows("shoppers")) == before


def test_an_increment_of_a_missing_row_is_reported_missing_and_never_conflicts(shop_backend, shop):
    since = checkpoint_of(shop)
    shop_backend.sql("UPDATE stock SET qty = 9 WHERE product_id = 'p1'")      # someone else changed it
    answer = push(shop, [op("increment", "stock", product_id="p1", store_id=7, qty=-1),
                         op("increment", "stock", product_id="p9", store_id=7, qty=-1)],
                  device_id="till", batch_id="b", checkpoint=since)
    assert answer.status == 200 and "conflicts" not in answer.json
    assert answer.json["missing"] == [{"op": 1, "table": "stock", "key": {"product_id": "p9", "store_id": 7}}]
    assert answer.json["checkpoint"] == since           # the device must pull the sum
    assert pull(shop, tables=["stock"]).json["data"]["stock"][0]["qty"] == "8.000"


def test_concurrent_increments_from_many_tills_all_count(shop_backend, shop):
    errors = []

    def till(number):
        for step in range(15):
            answer = push(shop, [op("increment", "stock", product_id="p1", store_id=7, qty="1.001", sold=1)],
                          device_id="till-%d" % number, batch_id="b%d" % step)
            if answer.status != 200:
                errors.append(answer.json)
    threads = [threading.Thread(target=till, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    row = pull(shop, tables=["stock"]).json["data"]["stock"][0]
    assert (row["qty"], row["sold"]) == ("65.060", 60)


def test_a_rule_of_the_database_rejects_an_operation_with_its_message(shop_backend, shop):
    key = {"product_id": "p1", "store_id": 7}
    operations = [op("increment", "stock", sold=1, **key), op("increment", "stock", qty=-6, **key),
                  op("insert", "ledger", id=1, amount="1.00")]
    answer = push(shop, operations, device_id="till", batch_id="b1")
    assert answer.status == 422 and answer.json["rejected"] == [
        {"op": 1, "table": "stock", "key": key, "code": "rejected", "message": "stock cannot go below 0"}]
    assert shop_backend.rows("ledger") == [] and shop_backend.rows("stock")[0][3] == 0
    # on_reject skip: the others are applied, the rejection listed
    answer = push(shop, operations, device_id="till", batch_id="b2", on_reject="skip")
    assert answer.status == 200, answer.json
    # each with the row as the server holds it, which the device takes back
    assert answer.json["applied"] == 2 and answer.json["rejected"] == [
        {"op": 1, "table": "stock", "key": key, "code": "rejected", "message": "stock cannot go below 0",
         "server_row": dict(key, qty="5.000", sold=1, ratio=None, label=None)}]
    assert len(shop_backend.rows("ledger")) == 1 and shop_backend.rows("stock")[0][3] == 1
    # a retry is answered as the first time
    assert push(shop, operations, device_id="till", batch_id="b2", on_reject="skip").json["rejected"] \
        == answer.json["rejected"]


def test_on_reject_skip_sets_aside_one_row_of_a_many_row_insert(shop_backend, shop):
    rows = [op("insert", "ledger", id=n, amount="-1.00" if n == 3 else "%d.00" % n) for n in range(1, 6)]
    answer = push(shop, rows, on_reject="skip")
    assert answer.status == 200 and answer.json["applied"] == 4
    assert answer.json["rejected"] == [{"op": 2, "table": "ledger", "key": 3, "code": "rejected", "message": "a ledger amount is positive",
                                        "server_row": None}]
    assert [row[0] for row in shop_backend.rows("ledger")] == [1, 2, 4, 5]
    assert push(shop, [op("insert", "ledger", id=9, amount="1")], on_reject="maybe").status == 400


# the property: devices offline, each editing its own column of shared rows and incrementing shared stock
SHOP_DEVICES = ("a", "b", "c")
DEVICE_COLUMN = {"a": "name", "b": "phone", "c": "note"}
SHOP_STEP = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(SHOP_DEVICES), st.integers(1, 2), st.text("xyz", min_size=1, max_size=3)),
    st.tuples(st.just("increment"), st.sampled_from(SHOP_DEVICES), st.sampled_from(["p1", "p2"]),
              st.integers(-3, 3)),
    st.tuples(st.just("sync"), st.sampled_from(SHOP_DEVICES), st.booleans(), st.booleans()),
)


def pull_into(application, since, rows):
    """Pull shoppers and stock from `since` to the end into `rows` ({(table, key): row}); the checkpoint."""
    while True:
        answer = pull(application, tables=["shoppers", "stock"], since=since, limit=1000)
        assert answer.status == 200
        for table, change in answer.json["changes"].items():
            for row in change["upserted"]:
                rows[(table, row["id"] if table == "shoppers" else row["product_id"])] = row
            for key in change["deleted"]:
                rows.pop((table, key if table == "shoppers" else key["product_id"]), None)
        since = answer.json["checkpoint"]
        if not answer.json["has_more"]:
            return since


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(SHOP_STEP, min_size=5, max_size=30))
@example(steps=[("write", "a", 1, "x"), ("write", "b", 1, "y"), ("increment", "a", "p1", 2),
                ("increment", "b", "p1", -1), ("sync", "a", True, False), ("sync", "b", False, True)])
def test_property_every_increment_counts_once_and_no_column_update_is_lost(shop_backend, shop, steps):
    shop_backend.sql("DELETE FROM shoppers")
    shop_backend.sql("DELETE FROM stock")
    for shopper in (1, 2):
        shop_backend.sql("INSERT INTO shoppers (id, name, phone, note) VALUES (?, 'n', 'p', 't')", (shopper,))
    for product in ("p1", "p2"):
        shop_backend.sql("INSERT INTO stock (product_id, store_id, qty, sold) VALUES (?, 7, 100, 0)", (product,))
    devices = {}
    for name in SHOP_DEVICES:
        rows = {}
        devices[name] = {"rows": rows, "outbox": [], "batch": 0, "since": pull_into(shop, None, rows)}
    expected_qty, last_written, run = {"p1": 100, "p2": 100}, {}, uuid.uuid4().hex

    def sync(name, lose_answer, pull_after):
        device = devices[name]
        if device["outbox"]:
            device["batch"] += 1
            body = dict(device_id=name, batch_id="%s-%d-%s" % (name, device["batch"], run), checkpoint=device["since"])
            answer = push(shop, device["outbox"], **body)
            if lose_answer:                         # the answer never arrived: the device sends it again
                answer = push(shop, device["outbox"], **body)
            assert answer.status == 200, answer.json      # no two devices set the same column
            device["outbox"], device["since"] = [], answer.json["checkpoint"]
        if pull_after:                              # pulls only with an empty outbox, as the client does
            device["since"] = pull_into(shop, device["since"], device["rows"])

    for step in steps:
        kind, name = step[0], step[1]
        device = devices[name]
        if kind == "write":
            column = DEVICE_COLUMN[name]
            device["outbox"].append(op("update", "shoppers", id=step[2], **{column: step[3]}))
            device["rows"][("shoppers", step[2])][column] = step[3]
            last_written[(step[2], column)] = step[3]
        elif kind == "increment":
            device["outbox"].append(op("increment", "stock", product_id=step[2], store_id=7, qty=step[3]))
            row = device["rows"][("stock", step[2])]
            row["qty"] = "%.3f" % (float(row["qty"]) + step[3])
            expected_qty[step[2]] += step[3]
        else:
            sync(name, step[2], step[3])
    for _ in range(2):                          # the second round pulls what the others pushed last
        for name in SHOP_DEVICES:
            sync(name, False, True)
    server_rows = {}
    pull_into(shop, None, server_rows)
    assert {product: server_rows[("stock", product)]["qty"] for product in ("p1", "p2")} \
        == {product: "%.3f" % qty for product, qty in expected_qty.items()}
    for (shopper, column), value in last_written.items():
        assert server_rows[("shoppers", shopper)][column] == value, (shopper, column)
    for name in SHOP_DEVICES:
        assert devices[name]["rows"] == server_rows, name


def test_a_checkpoint_judges_only_the_tables_it_covers(app, backend):
    assert push(app, [op("insert", "products", id="p1", name="tea", price="1.00"),
                      op("insert", id="s1")]).status == 200
    till = Device(app, ["products"], device_id="till").sync()
    backend.sql("UPDATE sales SET note = 'office' WHERE id = 's1'")
    tickets = Device(app, ["sales"], device_id="till")         # another table set, another checkpoint
    response = till.push([op("update", id="s1", note="till")], checkpoint=till.checkpoint)
    assert response.status == 409 and response.json["conflicts"][0]["server_row"]["note"] == "office"
    assert tickets.sync().rows["sales"][("s1",)]["note"] == "office"


def test_key_zero_on_an_auto_increment_table_is_refused(backend):
    if backend.kind != "mysql":
        pytest.skip("MySQL: 0 in an AUTO_INCREMENT column makes the database choose a key")
    application = started(backend)
    try:
        for action in ("insert", "upsert"):
            response = push(application, [op(action, "attachments", id=0, body=None)], batch_id=action)
            assert response.status == 400 and "AUTO_INCREMENT" in response.json["detail"], response.body
        assert backend.sql("SELECT COUNT(*) FROM attachments") == [(0,)]
        assert push(application, [op("insert", "attachments", body=None)]).status == 200   # a key it chooses
    finally:
        application.db.close()


def test_an_insert_that_leaves_columns_out_is_no_retry_of_a_fuller_row(app, backend):
    assert push(app, [op("insert", id="R-100", total="5.00", note="voided")], device_id="till-1").status == 200
    response = push(app, [op("insert", id="R-100", total="5.00")], device_id="till-2")
    assert response.status == 409, response.body
    # a true retry (every column the same, sent or left at its default) is still a no-op
    assert push(app, [op("insert", id="R-200", total="5.00")], device_id="till-1").status == 200
    assert push(app, [op("insert", id="R-200", total="5.00")], device_id="till-1").status == 200
    assert push(app, [op("insert", id="R-200", total="5.00", note=None)], device_id="till-1").status == 200


def test_a_rejected_operation_says_what_the_server_holds(probe, backend):
    assert push(probe, [op("insert", "guarded", id=1, qty=2)]).status == 200
    till = Device(probe, ["guarded"], device_id="till").sync()
    response = push(probe, [op("increment", "guarded", id=1, qty=-5), op("insert", "guarded", id=2, qty=-1),
                            op("insert", "guarded", id=3, qty=4)],
                    device_id="till", batch_id="b1", on_reject="skip", checkpoint=till.checkpoint)
    assert response.status == 200, response.body
    rejected = {entry["op"]: entry for entry in response.json["rejected"]}
    assert rejected[0]["server_row"] == {"id": 1, "qty": 2} and rejected[1]["server_row"] is None
    # and a pull from the checkpoint it returned agrees
    till.checkpoint = response.json["checkpoint"]
    till.sync()
    assert till.rows["guarded"] == {("1",): {"id": 1, "qty": 2}, ("3",): {"id": 3, "qty": 4}}


# A request's retries stop within REQUEST_BUDGET_SECONDS.

def test_a_push_stops_retrying_within_the_request_budget(backend, monkeypatch):
    application = started(backend, DB_WAIT_SECONDS="1", PUSH_RETRIES="3")
    backend.sql("INSERT INTO sales (id, total) VALUES ('s1', 1)")
    holder = _hold_the_database(backend)
    try:
        monkeypatch.setattr(cloudsync, "REQUEST_BUDGET_SECONDS", 1.5)  # no room for a second wait
        response = push(application, [op("update", id="s1", total="2.00")])
        assert response.status == 503 and application.pushes.retries == 0
        monkeypatch.setattr(cloudsync, "REQUEST_BUDGET_SECONDS", 25)
        response = push(application, [op("update", id="s1", total="2.00")])
        assert response.status == 503 and application.pushes.retries == 3
    finally:
        holder.rollback() if backend.kind == "mysql" else holder.execute("ROLLBACK")
        holder.close()
        application.db.close()


def test_a_push_stuck_behind_a_lock_is_answered_before_the_clients_timeout(backend, tmp_path):
    # DB_WAIT_SECONDS=8 and 3 retries took 4 x 8 = 32 s, past the reference client's 30 s: the client
    # gave up on a push that might still commit. The retries now stop within REQUEST_BUDGET_SECONDS.
    backend.sql("INSERT INTO sales (id, total) VALUES ('s1', 1)")
    server = LiveServer(tmp_path, DB_WAIT_SECONDS="8", PUSH_RETRIES="3", ALLOWED_TABLES="sales", **backend.settings)
    holder = _hold_the_database(backend)
    try:
        began = time.monotonic()
        status, answer = _http(server.url, "POST", "/sync/push", {"operations": [op("update", id="s1", total="2.00")]},
                               timeout=60)
        took = time.monotonic() - began
        assert status == 503, answer
        assert took < 30, took                  # a bound with room to spare, not a timing: about 16 s
    finally:
        holder.rollback() if backend.kind == "mysql" else holder.execute("ROLLBACK")
        holder.close()
        server.stop()


# ---------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------


def test_pull_defaults_to_every_table(app, backend):
    push(app, [op("insert", "products", id="p1", name="Tea", price="2.50")])
    response = pull(app)
    assert response.status == 200 and response.json["success"] is True
    assert response.json["limit"] == 1000
    assert set(response.json["data"]) == set(TABLES)
    assert response.json["data"]["products"][0]["price"] == "2.50"


def test_pull_rows_in_primary_key_order_with_limit(app):
    push(app, [op("insert", id=name) for name in ("c", "a", "d", "b")])
    response = pull(app, tables=["sales"], limit=3)
    assert [row["id"] for row in response.json["data"]["sales"]] == ["a", "b", "c"]
    assert response.json["limit"] == 3


def test_unchanged_pull_is_cached_with_etag(app, backend):
    push(app, [op("insert", "products", id="p1", name="Tea", price="2.50")])
    first = pull(app, tables=["products"])
    assert "ETag" in first.headers, (first.status, first.headers, first.body[:300])
    etag = first.headers["ETag"]
    again = pull(app, tables=["products"])
    assert again.body == first.body and again.headers["ETag"] == etag
    not_modified = call(app, "POST", "/sync/pull", {"tables": ["products"]}, headers={"If-None-Match": etag})
    assert not_modified.status == 304 and not_modified.body == b""
    backend.sql("UPDATE products SET price = 3 WHERE id = 'p1'")          # an outside writer
    changed = call(app, "POST", "/sync/pull", {"tables": ["products"]}, headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.headers["ETag"] != etag
    assert changed.json["data"]["products"][0]["price"] == "3.00"
    push(app, [op("insert", "sales", id="s1")])                            # another table: still cached
    assert pull(app, tables=["products"]).headers["ETag"] == changed.headers["ETag"]


def test_cached_pull_sees_changes_numbered_and_compacted_since(app, backend):
    assert pull(app, tables=["products"]).json["data"]["products"] == []      # cached while nothing changes
    backend.sql("INSERT INTO products (id, name) VALUES ('p1', 'Tea')")
    with app.db.connection() as conn:
        app.engine.changelog.sequence(conn)
    backend.sql("UPDATE cloudsync_changes SET changed_at = '2000-01-01 00:00:00'")
    with app.db.connection() as conn:
        assert app.engine.changelog.compact(conn, 30)[0] == 1            # the log is empty again
    assert [row["id"] for row in pull(app, tables=["products"]).json["data"]["products"]] == ["p1"]


def test_seed_cache_sees_a_commit_of_an_earlier_pending_id(app, backend):
    if backend.kind != "mysql":
        pytest.skip("MySQL numbers changes after commit")
    first, second = _mysql_connect(backend.settings["DB_NAME"]), _mysql_connect(backend.settings["DB_NAME"])
    try:
        early, late = first.cursor(), second.cursor()
        early.execute("START TRANSACTION")
        early.execute("INSERT INTO products (id, name) VALUES ('p1', 'first')")    # takes the lower pending id
        late.execute("INSERT INTO products (id, name) VALUES ('p2', 'second')")    # higher id, committed first
        assert [row["id"] for row in pull(app, tables=["products"]).json["data"]["products"]] == ["p2"]
        early.execute("COMMIT")
        assert [row["id"] for row in pull(app, tables=["products"]).json["data"]["products"]] == ["p1", "p2"]
    finally:
        first.close()
        second.close()


def test_seed_and_sync_pulls_write_decimals_alike(backend):
    backend.sql("CREATE TABLE rates (id INT PRIMARY KEY, r DECIMAL(20,10))")
    backend.sql("INSERT INTO rates VALUES (1, 0), (2, 0.0000001), (3, 12.5)")
    app = started(backend, ALLOWED_TABLES="rates")
    seed = pull(app, tables=["rates"]).json["data"]["rates"]
    sync = pull(app, tables=["rates"], since=None).json["changes"]["rates"]["upserted"]
    assert seed == sync
    assert [row["r"] for row in seed] == ["0.0000000000", "0.0000001000", "12.5000000000"]


def test_api_capture_does_not_cache_pulls(backend):
    application = started(backend, CHANGE_CAPTURE="api")
    assert "ETag" not in pull(application, tables=["products"]).headers
    backend.sql("INSERT INTO products (id, name) VALUES ('p9', 'Outside')")
    assert pull(application, tables=["products"]).json["data"]["products"][0]["id"] == "p9"


def test_pull_limit_is_capped(app):
    assert pull(app, tables=["sales"], limit=999999).json["limit"] == 5000


def test_pull_sees_outside_writes(app, backend):
    backend.sql("INSERT INTO customers (id, name) VALUES ('c1', 'Ann')")
    rows = pull(app, tables=["customers"]).json["data"]["customers"]
    assert [row["name"] for row in rows] == ["Ann"]


PULL_ERRORS = [
    ({"tables": ["nope"]}, 400, "Invalid table"),
    ({"tables": ["sales", 3]}, 400, "Invalid table"),
    ({"tables": "sales"}, 400, "Invalid payload"),
    ({"tables": []}, 400, "No tables configured"),
    ({"limit": "ten"}, 400, "Invalid limit"),
    ({"limit": "1e3"}, 400, "Invalid limit"),
    ({"limit": 0}, 400, "Invalid limit"),
    ({"limit": -5}, 400, "Invalid limit"),
    ({"limit": 2.5}, 400, "Invalid limit"),
    ({"limit": True}, 400, "Invalid limit"),
]


@pytest.mark.parametrize("body,status,error", PULL_ERRORS)
def test_pull_errors(app, body, status, error):
    response = pull(app, **body)
    assert response.status == status
    assert response.json["success"] is False and response.json["error"] == error
    assert response.json["detail"]


def test_pull_without_configured_tables(backend):
    application = started(backend, ALLOWED_TABLES="")
    response = pull(application)
    assert response.status == 400 and response.json["error"] == "No tables configured"


def test_a_pull_of_a_table_dropped_under_the_server_is_503(app, backend):
    backend.sql("DROP TABLE customers")
    response = pull(app, tables=["customers"])
    assert response.status == 503 and response.json["error"] == "Pull sync failed"
    assert push(app, [op("insert", "sales", id="s1")]).status == 200    # the other tables serve on


def test_seed_cache_never_serves_rows_a_cascade_deleted(probe, backend):
    assert push(probe, [op("insert", "shops", id=1, name="north"),
                        op("insert", "shop_notes", id=10, shop_id=1, note="a"),
                        op("insert", "shop_notes", id=11, shop_id=1, note="b")]).status == 200
    first = pull(probe, tables=["shop_notes"])
    assert len(first.json["data"]["shop_notes"]) == 2
    if backend.kind == "sqlite":
        backend.sql("PRAGMA foreign_keys = ON")             # SQLite cascades only where a connection asks
    backend.sql("DELETE FROM shops WHERE id = 1")          # another program; the notes go by cascade
    assert backend.sql("SELECT COUNT(*) FROM shop_notes")[0][0] == 0
    again = pull(probe, tables=["shop_notes"])
    assert again.json["data"]["shop_notes"] == []
    if "ETag" in first.headers:
        revalidated = call(probe, "POST", "/sync/pull", {"tables": ["shop_notes"]},
                           headers={"If-None-Match": first.headers["ETag"]})
        assert revalidated.status == 200 and revalidated.json["data"]["shop_notes"] == []


def test_seed_cache_never_serves_rows_a_truncate_removed(app, backend):
    assert push(app, [op("insert", "product_stock", product_id="p%d" % n, store_id=1, qty=n) for n in range(3)]).status == 200
    first = pull(app, tables=["product_stock"])
    assert len(first.json["data"]["product_stock"]) == 3 and first.headers["ETag"]
    backend.sql("TRUNCATE TABLE product_stock" if backend.kind == "mysql" else "DELETE FROM product_stock")
    again = call(app, "POST", "/sync/pull", {"tables": ["product_stock"]},
                 headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 200 and again.json["data"]["product_stock"] == []


def test_seed_cache_memory_is_bounded_in_bytes(probe, backend, monkeypatch):
    monkeypatch.setattr(cloudsync, "PULL_CACHE_BYTES", 4 << 20)
    for n in range(6):
        assert push(probe, [op("insert", "docs", id=n, body="x" * 1000000)]).status == 200
    for limit in range(1, 7):
        assert pull(probe, tables=["docs"], limit=limit).status == 200
    cached = probe.pulls._cache.values()
    assert sum(len(entry.body) + len(entry.gzipped or b"") for entry in cached) <= 4 << 20
    # 6 rows of 1 MB are more than a page's PULL_MAX_BYTES (4 MiB): the seed answer holds 4 and says so
    answer = pull(probe, tables=["docs"], limit=6).json
    assert len(answer["data"]["docs"]) == 4 and answer["has_more"] is True


def test_text_another_program_stored_in_a_sqlite_blob_key_pages_and_syncs(backend):
    if backend.kind != "sqlite":
        pytest.skip("SQLite keeps any type in any column")
    backend.sql("CREATE TABLE files (id BLOB PRIMARY KEY, v REAL, amount DECIMAL(10,2))")
    backend.sql("INSERT INTO files VALUES (X'01', 1, 1), ('abc', 9e999, 'n/a'), (X'02', 2, 2), ('616263', 3, 3)")
    application = started(backend, ALLOWED_TABLES="files")
    rows, _, checkpoint = _sync_all(application, "files")
    assert sorted(json.dumps(row["id"]) for row in rows) == sorted(json.dumps(key) for key in
                                                                  ["AQ==", "abc", "Ag==", "616263"])
    backend.sql("DELETE FROM files")
    _, deleted, _ = _sync_all(application, "files", checkpoint)
    assert sorted(map(json.dumps, deleted)) == sorted(json.dumps(key) for key in ["AQ==", "abc", "Ag==", "616263"])
    application.db.close()


def test_initial_sync_pages_through_large_table(app):
    push(app, [op("insert", id="s%04d" % n, total="%d.00" % n) for n in range(250)])
    push(app, [op("insert", "stock_moves", shop="S%d" % (n % 3), sku="K%03d" % n, qty=n) for n in range(70)])
    device = Device(app, ["sales", "stock_moves"], limit=40).sync()
    assert device.pages >= 8
    assert device.rows["sales"] == server_rows(app, "sales")
    assert device.rows["stock_moves"] == server_rows(app, "stock_moves")


def test_initial_sync_while_another_writer_writes(app, backend):
    import threading
    push(app, [op("insert", id="s%04d" % n, note="v0") for n in range(300)])
    stop = threading.Event()

    def writer():
        other = started(backend)
        n = 0
        while not stop.is_set() and n < 400:
            n += 1
            push(other, [op("update", id="s%04d" % (n * 7 % 300), note="v%d" % n),
                         op("insert", id="new%04d" % n), op("delete", id="s%04d" % (n * 13 % 300))])
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        device = Device(app, ["sales"], limit=25).sync()
    finally:
        stop.set()
        thread.join()
    device.sync()
    assert device.rows["sales"] == server_rows(app, "sales")


def test_deletes_and_outside_writes_propagate(app, backend):
    push(app, [op("insert", id="a"), op("insert", id="b"), op("insert", id="c")])
    device = Device(app, ["sales"]).sync()
    push(app, [op("delete", id="a")])
    backend.sql("DELETE FROM sales WHERE id = 'b'")
    backend.sql("UPDATE sales SET note = 'office' WHERE id = 'c'")
    response = pull(app, tables=["sales"], since=device.checkpoint).json
    assert sorted(response["changes"]["sales"]["deleted"]) == ["a", "b"]
    assert [row["note"] for row in response["changes"]["sales"]["upserted"]] == ["office"]


def test_composite_key_deleted_as_object(app):
    push(app, [op("insert", "stock_moves", shop="A", sku="1", qty=1)])
    device = Device(app, ["stock_moves"]).sync()
    push(app, [op("delete", "stock_moves", shop="A", sku="1")])
    response = pull(app, tables=["stock_moves"], since=device.checkpoint).json
    assert response["changes"]["stock_moves"]["deleted"] == [{"shop": "A", "sku": "1"}]


def test_row_changed_many_times_is_sent_once_in_current_state(app):
    device = Device(app, ["sales"]).sync()
    for n in range(5):
        push(app, [op("upsert", id="x", note="v%d" % n)])
    response = pull(app, tables=["sales"], since=device.checkpoint).json
    assert [row["note"] for row in response["changes"]["sales"]["upserted"]] == ["v4"]


def test_unchanged_pull_returns_nothing(app):
    push(app, [op("insert", id="a")])
    device = Device(app, ["sales"]).sync()
    response = pull(app, tables=["sales"], since=device.checkpoint).json
    assert response["changes"] == {"sales": {"upserted": [], "deleted": []}}
    assert response["has_more"] is False
    assert response["checkpoint"] == device.checkpoint


def test_log_paging_has_more(app):
    device = Device(app, ["sales"]).sync()
    push(app, [op("insert", id="r%02d" % n) for n in range(12)])
    response = pull(app, tables=["sales"], since=device.checkpoint, limit=5).json
    assert len(response["changes"]["sales"]["upserted"]) == 5 and response["has_more"] is True
    device.limit = 5
    device.sync()
    assert device.rows["sales"] == server_rows(app, "sales")


def test_sqlite_rows_with_null_in_key_are_not_synced(backend):
    if backend.kind != "sqlite":
        pytest.skip("only SQLite lets a primary key column hold NULL")
    app = started(backend)
    try:
        for shop, sku in ((None, "K1"), ("S1", "K1"), (None, "K2"), ("S1", "K2"), ("S2", None), ("S2", "K1")):
            backend.sql("INSERT INTO stock_moves (shop, sku, qty) VALUES (?, ?, 1)", (shop, sku))
        device = Device(app, ["stock_moves"], limit=1).sync()
        assert sorted(device.rows["stock_moves"]) == [("S1", "K1"), ("S1", "K2"), ("S2", "K1")]
        backend.sql("UPDATE stock_moves SET qty = 2 WHERE shop IS NULL")
        body = pull(app, tables=["stock_moves"], since=device.checkpoint).json
        assert body["changes"]["stock_moves"] == {"upserted": [], "deleted": []}
    finally:
        app.db.close()


def test_limit_with_a_huge_negative_exponent_is_never_expanded(app, monkeypatch):
    expanded, real_int = [], int

    class IsInt(type):
        def __instancecheck__(cls, value):
            return isinstance(value, real_int)

    class SpyInt(metaclass=IsInt):
        """int() for the module under test, noting huge decimals it is asked to write out."""

        def __new__(cls, value=0, *args):
            if isinstance(value, cloudsync.decimal.Decimal) and value.adjusted() > 100:
                expanded.append(value)          # a million digits: 20 s of CPU
                return 0
            return real_int(value, *args)
    monkeypatch.setattr(cloudsync, "int", SpyInt, raising=False)
    response = call(app, "POST", "/sync/pull", raw=b'{"limit": -1e1000000}')
    assert response.status == 400 and response.json["error"] == "Invalid limit"
    assert expanded == []


def test_huge_limit_exponent_is_capped_quickly(app):
    started = time.monotonic()
    response = call(app, "POST", "/sync/pull", raw=b'{"tables": ["sales"], "limit": 1E+1000000}')
    assert response.status == 200 and response.json["limit"] == 5000
    assert time.monotonic() - started < 5


def test_limit_as_digit_string_is_accepted(app):
    assert pull(app, tables=["sales"], limit="500").json["limit"] == 500


def test_pull_limit_capped_by_setting(backend):
    application = started(backend, MAX_PULL_ROWS="10")
    assert pull(application, tables=["sales"], limit=50).json["limit"] == 10


def test_pulls_never_fail_beside_pushes_that_deadlock(backend):
    application = started(backend)
    failures = []
    push(application, [op("insert", id="a"), op("insert", id="b")])
    checkpoint = pull(application, tables=["sales"], since=None).json["checkpoint"]

    def pusher(first, second, with_checkpoint):
        for n in range(20):
            fields = {"checkpoint": checkpoint, "on_conflict": "skip"} if with_checkpoint else {}
            status = push(application, [op("update", id=first, note=str(n)), op("update", id=second, note=str(n))],
                          **fields).status
            if status >= 500:
                failures.append(("push", status))

    def puller():
        since = checkpoint
        for _ in range(30):
            response = pull(application, tables=["sales"], since=since)
            if response.status >= 500:
                failures.append(("pull", response.status))
            else:
                since = response.json["checkpoint"]
    threads = [threading.Thread(target=pusher, args=args) for args in
               (("a", "b", True), ("b", "a", False), ("a", "b", False), ("b", "a", True))]
    threads += [threading.Thread(target=puller) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
    finally:
        application.db.close()


# A pull's page stops at PULL_MAX_BYTES.

BIG_NOTE_CHARS = 30000              # a sales note of this size: three fit in a page of 100,000 bytes


def _big_sales(backend, count, first=0):
    """`count` sales with notes of BIG_NOTE_CHARS characters, written by another program."""
    for number in range(first, first + count):
        backend.sql("INSERT INTO sales (id, total, note) VALUES (?, 1, ?)",
                    ("big-%02d" % number, chr(ord("a") + number % 26) * BIG_NOTE_CHARS))


def _pages(application, body):
    """Every page of a sync-mode pull loop from `body`: [(answer, its rows of sales)]."""
    pages = []
    while True:
        answer = pull(application, **body).json
        assert answer["success"], answer
        pages.append((answer, answer["changes"]["sales"]["upserted"]))
        body = dict(body, since=answer["checkpoint"])
        if not answer["has_more"]:
            return pages


@pytest.mark.parametrize("mode", ["first sync", "changes"])
def test_a_pull_page_stops_at_its_bytes_and_the_loop_gets_every_row_once(backend, mode):
    application = started(backend, PULL_MAX_BYTES="100000")
    try:
        since = None
        if mode == "changes":
            since = pull(application, tables=["sales"], since=None).json["checkpoint"]
        _big_sales(backend, 10)
        pages = _pages(application, {"tables": ["sales"], "since": since, "limit": 1000})
        got = [row["id"] for _, rows in pages for row in rows]
        assert sorted(got) == ["big-%02d" % number for number in range(10)]      # each once
        assert len(pages) >= 4
        for _, rows in pages:
            assert len(rows) == 1 or sum(len(row["note"]) for row in rows) <= 100000
        assert all(row["note"] == chr(ord("a") + int(row["id"][4:]) % 26) * BIG_NOTE_CHARS
                   for _, rows in pages for row in rows)
    finally:
        application.db.close()


def test_a_first_sync_gets_every_row_when_rows_commit_between_measuring_and_reading(backend, monkeypatch):
    # Rows another program commits after the scan measured a page and before it reads it sort
    # before the measured ones: the scan goes on past them, and loses none of the earlier rows.
    application = started(backend)
    try:
        for number in range(5):
            backend.sql("INSERT INTO sales (id, total) VALUES (?, 1)", ("m-%d" % number,))
        measuring = application.engine.schemas["sales"].size_sql
        query, arrived = application.db.query, []

        def query_then_commit(conn, sql, params=()):
            rows = query(conn, sql, params)
            if measuring in sql and not arrived:
                arrived.extend("a-%d" % number for number in range(3))
                for key in arrived:
                    backend.sql("INSERT INTO sales (id, total) VALUES (?, 1)", (key,))
            return rows
        monkeypatch.setattr(application.db, "query", query_then_commit)
        pages = _pages(application, {"tables": ["sales"], "since": None, "limit": 1000})
        got = [row["id"] for _, rows in pages for row in rows]
        assert arrived, "the scan measured no page: the test did not test"
        assert sorted(set(got)) == sorted(["m-%d" % number for number in range(5)] + arrived)
    finally:
        application.db.close()


@pytest.mark.parametrize("limit", [1, 2, 3, 50])
def test_a_row_changed_many_times_comes_once_a_page_and_the_loop_ends_with_every_row_as_it_is(backend, limit):
    application = started(backend)
    try:
        since = pull(application, tables=["sales"], since=None).json["checkpoint"]
        for number in range(4):
            backend.sql("INSERT INTO sales (id, total) VALUES (?, 1)", ("r%d" % number,))
            for times in range(3):
                backend.sql("UPDATE sales SET total = ? WHERE id = 'r0'", (10 * number + times,))
        backend.sql("DELETE FROM sales WHERE id = 'r2'")
        held = {}
        for answer, rows in _pages(application, {"tables": ["sales"], "since": since, "limit": limit}):
            assert len({row["id"] for row in rows}) == len(rows)               # once a page
            held.update({row["id"]: row["total"] for row in rows})
            for key in answer["changes"]["sales"]["deleted"]:
                held.pop(key, None)
        assert held == {"r0": "32.00", "r1": "1.00", "r3": "1.00"}
    finally:
        application.db.close()


def test_a_row_larger_than_the_pull_budget_goes_alone(backend):
    application = started(backend, PULL_MAX_BYTES="1000")
    try:
        _big_sales(backend, 3)
        backend.sql("INSERT INTO sales (id, total) VALUES ('small', 2)")
        pages = _pages(application, {"tables": ["sales"], "since": None, "limit": 1000})
        assert [[row["id"] for row in rows] for _, rows in pages if rows] == [
            ["big-00"], ["big-01"], ["big-02"], ["small"]]
    finally:
        application.db.close()


def test_a_seed_pull_is_cut_at_its_bytes_and_says_so(backend):
    application = started(backend, PULL_MAX_BYTES="100000")
    try:
        _big_sales(backend, 10)
        answer = pull(application, tables=["sales", "products"]).json
        rows = answer["data"]["sales"]
        assert answer["has_more"] is True and 1 <= len(rows) <= 3
        assert [row["id"] for row in rows] == ["big-%02d" % number for number in range(len(rows))]
        small = started(backend)                        # the default budget: no cut, no has_more
        try:
            answer = pull(small, tables=["sales"]).json
            assert len(answer["data"]["sales"]) == 10 and "has_more" not in answer
        finally:
            small.db.close()
    finally:
        application.db.close()


def test_byte_pages_of_an_invented_table_with_a_composite_key_and_binary_rows_give_every_value_once(backend):
    big = "MEDIUMBLOB" if backend.kind == "mysql" else "BLOB"
    backend.sql("CREATE TABLE parts (region VARCHAR(10) NOT NULL, day DATE NOT NULL, photo %s, amount DECIMAL(10,2),"
                " PRIMARY KEY (region, day))" % big)
    photos = {("r%d" % (n % 3), "2026-12-%02d" % (n + 1)): bytes([n]) * 20000 + os.urandom(16) for n in range(12)}
    for (region, day), photo in photos.items():
        backend.sql("INSERT INTO parts (region, day, photo, amount) VALUES (?, ?, ?, ?)", (region, day, photo, "1.50"))
    application = started(backend, ALLOWED_TABLES="parts", PULL_MAX_BYTES="50000")
    try:
        def loop(since):
            pages = []
            while True:
                answer = pull(application, tables=["parts"], since=since, limit=1000).json
                pages.append(answer["changes"]["parts"]["upserted"])
                since = answer["checkpoint"]
                if not answer["has_more"]:
                    return pages, since
        pages, since = loop(None)
        got = [((row["region"], row["day"]), base64.b64decode(row["photo"]), row["amount"]) for page in pages for row in page]
        assert len(pages) >= 4 and all(len(page) <= 2 for page in pages)
        assert sorted(got) == sorted((key, photo, "1.50") for key, photo in photos.items())      # each once, exact
        changed = sorted(photos)[::2]
        for region, day in changed:
            photos[(region, day)] = b"\xff" * 30000
            backend.sql("UPDATE parts SET photo = ? WHERE region = ? AND day = ?", (photos[(region, day)], region, day))
        pages, _ = loop(since)
        got = [((row["region"], row["day"]), base64.b64decode(row["photo"])) for page in pages for row in page]
        assert sorted(got) == sorted((key, photos[key]) for key in changed) and len(pages) >= 3
    finally:
        application.db.close()


# ---------------------------------------------------------------------------
# Operations: metrics, device fleet
# ---------------------------------------------------------------------------


def test_metrics_count_requests_operations_and_rows(app):
    push(app, [op("insert", id="s1"), op("insert", id="s2")], device_id="till")
    pull(app, tables=["sales"])
    pull(app, tables=["sales"], since=None)
    response = call(app, "GET", "/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = response.body.decode()
    for line in ('cloudsync_requests_total{method="POST",route="/sync/push",status="200"} 1',
                 'cloudsync_operations_pushed_total{action="insert",table="sales"} 2',
                 'cloudsync_rows_pulled_total{table="sales"} 4',
                 'cloudsync_request_duration_seconds_count{route="/sync/pull",status="200"} 2',
                 'cloudsync_request_duration_seconds_bucket{le="+Inf",route="/sync/push",status="200"} 1',
                 "cloudsync_conflicts_total 0",
                 "# TYPE cloudsync_request_duration_seconds histogram"):
        assert line in text, line
    assert re.search(r"^cloudsync_change_log_head \d+$", text, re.M)
    assert re.search(r'^cloudsync_driver_info\{driver="[^"]+"\} 1$', text, re.M)


def test_metrics_count_conflicts_replays_and_auth_failures(backend):
    application = started(backend, TOKENS="till %s" % TILL_TOKEN)
    bearer = {"Authorization": "Bearer " + TILL_TOKEN}
    body = {"batch_id": "b1", "operations": [op("insert", id="x")]}
    for _ in range(2):
        assert call(application, "POST", "/sync/push", body, headers=bearer).status == 200
    assert call(application, "POST", "/sync/push", body).status == 401
    text = call(application, "GET", "/metrics", headers=bearer).body.decode()
    assert "cloudsync_replays_total 1" in text and "cloudsync_auth_failures_total 1" in text


METRICS_ACCESS = [
    # (settings, header token, status)
    ({}, None, 200),                                               # loopback demo: open like /sync*
    ({"TOKENS": "till " + TILL_TOKEN}, None, 401),
    ({"TOKENS": "till " + TILL_TOKEN}, TILL_TOKEN, 200),           # protected like the sync endpoints
    ({"METRICS_TOKEN": "scrape"}, None, 401),
    ({"METRICS_TOKEN": "scrape"}, "scrape", 200),
    ({"METRICS_TOKEN": "scrape", "ADMIN_TOKEN": ADMIN}, ADMIN, 200),
    ({"METRICS_TOKEN": "sha256:" + hashlib.sha256(b"scrape").hexdigest()}, "scrape", 200),
    ({"METRICS_TOKEN": "scrape", "TOKENS": "till " + TILL_TOKEN}, TILL_TOKEN, 401),
]


@pytest.mark.parametrize("settings,token,status", METRICS_ACCESS)
def test_metrics_access(backend, settings, token, status):
    application = started(backend, **settings)
    headers = {"Authorization": "Bearer " + token} if token else {}
    response = call(application, "GET", "/metrics", headers=headers)
    assert response.status == status
    if status == 401:
        assert response.json["success"] is False and "WWW-Authenticate" in response.headers


def test_device_fleet_counts_pushes_pulls_errors_and_lag(backend):
    application = started(backend, ADMIN_TOKEN=ADMIN)
    push(application, [op("insert", id="s1")], device_id="till")
    push(application, [op("insert", id="s1")], device_id="till")           # a retry: a no-op, still a push
    push(application, [op("update", id="s1", nope=1)], device_id="till")   # 400: counts as an error
    assert pull(application, tables=["sales"], since=None, device_id="till").status == 200
    push(application, [op("insert", id="s2")], device_id="office")
    response = call(application, "GET", "/sync/devices", headers={"Authorization": "Bearer " + ADMIN})
    assert response.status == 200
    devices = {device["device_id"]: device for device in response.json["devices"]}
    till, office = devices["till"], devices["office"]
    assert (till["pushes"], till["pulls"], till["errors"]) == (2, 1, 1)      # the refused push is an error only
    assert till["lag"] == 1 and office["lag"] is None                     # office pushed after till pulled
    assert till["last_seen"].endswith("Z") and till["silent"] is False


@pytest.mark.parametrize("settings,token", [({}, ADMIN), ({"ADMIN_TOKEN": ADMIN}, None),
                                            ({"ADMIN_TOKEN": ADMIN}, "wrong"),
                                            ({"ADMIN_TOKEN": ADMIN, "TOKENS": "till " + TILL_TOKEN}, TILL_TOKEN)])
def test_device_fleet_needs_the_admin_token(backend, settings, token):
    application = started(backend, **settings)
    headers = {"Authorization": "Bearer " + token} if token else {}
    assert call(application, "GET", "/sync/devices", headers=headers).status == 401


def test_device_fleet_survives_a_failed_flush(app, backend):
    app.fleet.seen("till", "push")
    real_executemany = app.db.executemany

    def failing(conn, sql, rows):
        if "cloudsync_devices" in sql:
            raise cloudsync.DatabaseUnavailable("down")
        return real_executemany(conn, sql, rows)
    app.db.executemany = failing
    with app.db.connection() as conn, pytest.raises(cloudsync.DatabaseUnavailable):
        app.fleet.flush(conn)
    del app.db.executemany
    app.fleet.seen("till", "pull", checkpoint_seq=0)
    with app.db.connection() as conn:
        till, = app.fleet.devices(conn, 0)
    assert (till["pushes"], till["pulls"]) == (1, 1)


def test_metrics_method_label_is_bounded(app):
    """A client choosing the method must not create a new time series per request (unbounded memory)."""
    for number in range(50):
        _call_unvalidated(app, "X%d" % number, "/sync/push")
    text = call(app, "GET", "/metrics").body.decode()
    methods = set(re.findall(r'cloudsync_requests_total\{method="([^"]*)"', text))
    assert len(methods) <= 10, sorted(methods)[:12]


def test_failed_push_is_not_the_last_push(backend):
    """'which devices have not synced today': a device whose every push fails has not synced."""
    application = started(backend, ADMIN_TOKEN=ADMIN)
    push(application, [op("update", id="s1", nope=1)], device_id="broken")     # 400
    devices = call(application, "GET", "/sync/devices", headers={"Authorization": "Bearer " + ADMIN}).json["devices"]
    broken, = devices
    assert broken["errors"] == 1 and broken["last_push"] is None


def test_lag_counts_only_the_changes_of_the_devices_tables(backend):
    application = started(backend)
    assert pull(application, tables=["sales"], since=None, device_id="till").status == 200
    assert push(application, [op("insert", "product_stock", product_id="p1", store_id=1, qty=1),
                              op("insert", "sales", id="s1")]).status == 200
    with application.db.connection() as conn:
        application.engine.changelog.sequence(conn)
        [device] = application.fleet.devices(conn, application.engine.changelog.head(conn))
    assert device["device_id"] == "till" and device["lag"] == 1
    application.db.close()


# ---------------------------------------------------------------------------
# HTTP application
# ---------------------------------------------------------------------------


def test_health_needs_no_database(tmp_path):
    config = cloudsync.load_config(None, environ={}, overrides={"DB_PATH": str(tmp_path / "none" / "x.db")})
    response = call(cloudsync.App(config), "GET", "/health")
    # the database is not even reachable: /health says the process runs, and does not ask it
    assert response.status == 200 and response.json == {"status": "Sync API running", "database": "ok",
                                                         "database_down_seconds": None}


ROUTING_CASES = [
    ("GET", "/nowhere", 404, None),
    ("POST", "/health", 405, "GET, HEAD, OPTIONS"),
    ("GET", "/sync/push", 405, "OPTIONS, POST"),
    ("DELETE", "/sync", 405, "OPTIONS, POST"),
    ("GET", "/sync/pull", 405, "OPTIONS, POST"),
    ("POST", "/sync/status", 405, "GET, HEAD, OPTIONS"),
    ("POST", "/metrics", 405, "GET, HEAD, OPTIONS"),
]


@pytest.mark.parametrize("method,path,status,allow", ROUTING_CASES)
def test_routing_errors_are_json(app, method, path, status, allow):
    response = call(app, method, path)
    assert response.status == status
    assert response.json["success"] is False and response.json["error"]
    assert response.headers.get("Allow") == allow


@pytest.mark.parametrize("path", ["/health", "/sync/status"])
def test_head_answers_like_get_without_body(app, path):
    get, head = call(app, "GET", path), call(app, "HEAD", path)
    assert head.status == get.status == 200
    assert head.body == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]


def test_trailing_slash_matches_like_express(app):
    assert call(app, "GET", "/health/").status == 200


def test_unhandled_error_is_generic_500_and_logged(app, monkeypatch, caplog):
    def explode(request):
        raise RuntimeError("secret internals")
    monkeypatch.setitem(app.routes, "/health", {"GET": explode})
    response = call(app, "GET", "/health")
    assert response.status == 500
    assert response.json == {"success": False, "error": "Internal server error", "code": "internal",
                             "detail": "an unexpected error; the server log has the details"}
    assert b"secret" not in response.body and "secret internals" in caplog.text


@pytest.mark.parametrize("tail,status", [(b"", 200), (b"garbage", 400), ("second member", 200)])
def test_gzip_bodies_are_read_whole_or_refused(app, backend, tail, status):
    body = json.dumps({"operations": [op("insert", id="s1")]}).encode()
    if tail == "second member":         # a body may be several gzip members in a row
        raw = gzip.compress(body[:20]) + gzip.compress(body[20:])
    else:
        raw = gzip.compress(body) + tail
    response = call(app, "POST", "/sync/push", raw=raw, headers={"Content-Encoding": "gzip"})
    assert response.status == status, response.body
    assert len(backend.rows("sales")) == (1 if status == 200 else 0)


def test_status_ok(app, backend):
    response = call(app, "GET", "/sync/status")
    assert response.status == 200
    body = response.json
    assert body["success"] is True and body["status"] == "ok"
    assert body["allowed_tables"] == list(TABLES)
    assert body["backend"] == backend.kind
    assert body["tables"]["stock_moves"]["primary_key"] == ["shop", "sku"]


def test_status_database_unavailable(backend, tmp_path):
    application = started(backend)
    if backend.kind == "mysql":
        application.db.config.db_port = _free_port()
    else:
        application.db.config.db_path = str(tmp_path / "missing-dir" / "x.db")
    application.db.close()
    response = call(application, "GET", "/sync/status")
    assert response.status == 503
    assert response.json == {"success": False, "status": "error", "error": "Database unavailable",
                             "code": "database_unavailable", "detail": "the database did not answer; retry later"}
    assert response.headers["Retry-After"]


class ExplodingInput:
    """A wsgi.input that fails the test if anything reads it."""

    def read(self, size=-1):
        raise AssertionError("the body was read")


def test_oversized_body_is_413_without_reading(app):
    limit = app.config.max_body_bytes
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update({"REQUEST_METHOD": "POST", "PATH_INFO": "/sync/push", "wsgi.input": ExplodingInput(),
                    "CONTENT_LENGTH": str(limit + 1)})
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"] = status
    body = b"".join(app(environ, start_response))
    assert captured["status"].startswith("413")
    assert json.loads(body)["error"] == "Payload too large"


def test_body_at_limit_is_accepted(backend):
    application = started(backend, MAX_BODY_BYTES="200")
    body = json.dumps({"operations": [op("insert", id="x")]}).encode()
    body += b" " * (200 - len(body))
    assert call(application, "POST", "/sync/push", raw=body).status == 200
    assert call(application, "POST", "/sync/push", raw=body + b" ").status == 413


@pytest.mark.parametrize("accept", ["gzip;q=.", "gzip;q=1.2.3", "gzip; q=", "gzip;q=abc", "*;q=.5.5"])
def test_malformed_accept_encoding_never_fails_a_push(app, backend, accept):
    operations = [op("insert", id="s%04d" % n, note="x" * 20) for n in range(60)]    # a body worth gzipping
    response = call(app, "POST", "/sync/pull", {"tables": ["sales"]}, headers={"Accept-Encoding": accept})
    assert response.status == 200
    response = call(app, "POST", "/sync/push", {"operations": operations}, headers={"Accept-Encoding": accept})
    assert response.status == 200


def test_paths_ignore_case_like_express(app):
    assert call(app, "GET", "/SYNC/Status").status == 200


def test_too_many_operations_is_413(backend):
    application = started(backend, MAX_OPERATIONS="3")
    response = push(application, [op("insert", id=str(n)) for n in range(4)])
    assert response.status == 413 and "split the batch" in response.json["detail"]
    assert backend.rows("sales") == []
    assert push(application, [op("insert", id=str(n)) for n in range(3)]).status == 200


def test_nesting_deeper_than_limit_is_400(backend):
    application = started(backend, MAX_JSON_DEPTH="4")
    response = call(application, "POST", "/sync/push", raw=b'{"operations": [{"data": {"x": [[1]]}}]}')
    assert response.status == 400 and response.json["error"] == "Too deeply nested"


@pytest.mark.parametrize("path", ["/sync/push", "/sync/pull"])
@pytest.mark.parametrize("raw", [b"null", b"5", b'"text"', b"true", b"[]", b"[[[]]]"])
def test_body_that_is_not_an_object_is_400(app, path, raw):
    response = call(app, "POST", path, raw=raw)
    assert response.status == 400 and response.json["success"] is False


def test_gzip_request_body(app, backend):
    import gzip
    raw = gzip.compress(json.dumps({"operations": [op("insert", id="s%d" % n) for n in range(20)]}).encode())
    response = call(app, "POST", "/sync/push", raw=raw, headers={"Content-Encoding": "gzip"})
    assert response.status == 200 and len(backend.rows("sales")) == 20


@pytest.mark.parametrize("raw,encoding,status,error", [
    (b"not gzip at all", "gzip", 400, "Invalid request"),
    (None, "gzip", 413, "Payload too large"),           # a zip bomb
    (b"{}", "br", 415, "Unsupported content encoding"),
])
def test_gzip_request_errors(backend, raw, encoding, status, error):
    import gzip
    application = started(backend, MAX_BODY_BYTES="100000")
    if raw is None:
        raw = gzip.compress(b'{"operations": [], "pad": "' + b" " * 50_000_000 + b'"}')
        assert len(raw) < 100000
    response = call(application, "POST", "/sync/push", raw=raw, headers={"Content-Encoding": encoding})
    assert response.status == status and response.json["error"] == error


def test_gzip_response_when_accepted_and_large(app):
    import gzip
    push(app, [op("insert", id="s%03d" % n, note="x" * 50) for n in range(50)])
    zipped = call(app, "POST", "/sync/pull", {"tables": ["sales"]}, headers={"Accept-Encoding": "gzip, deflate"})
    assert zipped.headers["Content-Encoding"] == "gzip" and zipped.headers["Vary"] == "Accept-Encoding"
    assert len(json.loads(gzip.decompress(zipped.body))["data"]["sales"]) == 50
    plain = call(app, "POST", "/sync/pull", {"tables": ["sales"]}, headers={"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in plain.headers and len(plain.json["data"]["sales"]) == 50
    small = call(app, "GET", "/health", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in small.headers


OPERATION = st.fixed_dictionaries({
    "table": st.sampled_from(list(TABLES) + ["nope", "sales; DROP TABLE products", "", "`sales`"]),
    "action": st.sampled_from(["insert", "update", "delete", "upsert", "merge", ""]),
    "data": st.dictionaries(st.sampled_from(["id", "note", "total", "qty", "x", "id`", "shop", "sku"]),
                            JSON_VALUES, max_size=4)})
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries({"operations": st.lists(OPERATION, max_size=4)},
                          optional={"device_id": JSON_VALUES, "batch_id": JSON_VALUES, "checkpoint": JSON_VALUES,
                                    "on_conflict": JSON_VALUES, "tables": JSON_VALUES, "limit": JSON_VALUES,
                                    "since": JSON_VALUES}).map(lambda value: json.dumps(value).encode()),
    st.binary(min_size=1, max_size=50).map(lambda junk: b'{"operations": [' + junk + b"]}"),
)
HEADERS = st.dictionaries(
    st.sampled_from(["Content-Encoding", "Accept-Encoding", "Authorization", "Content-Type", "X-Junk"]),
    st.sampled_from(["gzip", "identity", "br", "", "Bearer x", "application/json", "text/plain", "gzip;q=0", "\x7f"]),
    max_size=3)


def _snapshot(backend):
    return [backend.rows(table) for table in TABLES] + [backend.sql("SELECT COUNT(*) FROM cloudsync_changes")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]),
       path=st.sampled_from(["/health", "/sync", "/sync/push", "/sync/pull", "/sync/status", "/SYNC/PULL/",
                             "/", "/sync/../etc/passwd", "/%00", "/sync/push/extra"]) | st.text(max_size=30).map(
           lambda text: "/" + text),
       body=BODIES, headers=HEADERS)
def test_fuzz_never_5xx_and_rejections_change_nothing(app, backend, method, path, body, headers):
    before = _snapshot(backend)
    response = call(app, method, path, raw=body, headers=headers)
    assert response.status < 500, response.body
    raw = response.body
    if response.headers.get("Content-Encoding") == "gzip":
        import gzip
        raw = gzip.decompress(raw)
    if response.status >= 400:
        assert method == "HEAD" or json.loads(raw)["success"] is False and json.loads(raw)["error"]
    elif method not in ("HEAD", "OPTIONS") and response.headers["Content-Type"].startswith("application/json"):
        json.loads(raw)
    if response.status >= 400:
        assert _snapshot(backend) == before


CORS_CASES = [
    # (CORS_ORIGINS, Origin sent, Access-Control-Allow-Origin expected)
    ("https://field.example.com", "https://field.example.com", "https://field.example.com"),
    ("https://field.example.com", "https://evil.example.com", None),
    ("https://a.example.com,https://field.example.com", "https://field.example.com", "https://field.example.com"),
    ("*", "https://anyone.example.com", "*"),
    ("", "https://field.example.com", None),
]


@pytest.mark.parametrize("origins,origin,allowed", CORS_CASES)
def test_cors_preflight_and_responses(backend, origins, origin, allowed):
    application = started(backend, CORS_ORIGINS=origins)
    preflight = call(application, "OPTIONS", "/sync/push", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status == 204 and preflight.body == b"" and "POST" in preflight.headers["Allow"]
    assert preflight.headers.get("Access-Control-Allow-Origin") == allowed
    if allowed:
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    response = call(application, "POST", "/sync/pull", {"tables": ["sales"]}, headers={"Origin": origin})
    assert response.status == 200 and response.headers.get("Access-Control-Allow-Origin") == allowed


def test_preflight_needs_no_token(backend):
    application = started(backend, TOKENS="till " + TILL_TOKEN, CORS_ORIGINS="https://field.example.com")
    response = call(application, "OPTIONS", "/sync/pull", headers={"Origin": "https://field.example.com"})
    assert response.status == 204 and response.headers["Access-Control-Allow-Origin"] == "https://field.example.com"


def test_status_takes_one_round_trip(app):
    call(app, "GET", "/sync/status")
    app.engine.schema_loaded_at = time.monotonic() + 3600      # the schema re-read is not due
    real, queries = app.db.query, []

    def query(conn, sql, params=()):
        queries.append(sql)
        return real(conn, sql, params)
    app.db.query = query
    try:
        answer = call(app, "GET", "/sync/status")
    finally:
        del app.db.query
    assert answer.status == 200 and len(queries) == 1, queries
    assert answer.json["server_version"].startswith(("MySQL ", "SQLite "))


# Every field of a push and a pull, and the JSON types a careless client sends there.
CARELESS_VALUES = [[], ["insert"], {}, {"a": 1}, True, None, 10 ** 30, -1, 1.5, "", "x" * 300]
PUSH_FIELD_PATHS = ["device_id", "batch_id", "checkpoint", "on_conflict", "conflict_level", "on_reject",
                    "operations", "operations.0", "operations.0.table", "operations.0.action", "operations.0.data",
                    "operations.0.data.id", "operations.0.data.total", "operations.0.data.note"]
PULL_FIELD_PATHS = ["device_id", "tables", "tables.0", "since", "limit", "wait"]


def _with_value(body, path, value):
    body = json.loads(json.dumps(body))
    target, *rest = path.split(".")
    holder = body
    for part in path.split(".")[:-1]:
        holder = holder[int(part)] if isinstance(holder, list) else holder[part]
    last = path.split(".")[-1]
    if isinstance(holder, list):
        holder[int(last)] = value
    else:
        holder[last] = value
    return body


@pytest.mark.parametrize("route,path", [("/sync/push", path) for path in PUSH_FIELD_PATHS]
                         + [("/sync/pull", path) for path in PULL_FIELD_PATHS])
def test_every_json_type_in_every_field_is_answered_4xx_or_done_never_5xx(app, backend, route, path):
    base = {"device_id": "till", "batch_id": None, "operations": [op("insert", id="s1", total="1.00", note="n")]} \
        if route == "/sync/push" else {"device_id": "till", "tables": ["sales"], "since": None, "limit": 10}
    for value in CARELESS_VALUES:
        body = _with_value(base, path, value)
        before = backend.rows("sales")
        response = call(app, "POST", route, body)
        assert response.status < 500, (path, value, response.body)
        if response.status >= 400:
            assert response.json["success"] is False and response.json["error"]
            assert backend.rows("sales") == before, (path, value)
        backend.sql("DELETE FROM sales")


def test_the_demo_serves_the_web_till_and_nothing_else_from_disk(demo_server, tmp_path):
    for path, name, kind in [("/demo/", "demo/index.html", "text/html"), ("/Demo", "demo/index.html", "text/html"),
                             ("/demo/till.js", "demo/till.js", "text/javascript"),
                             ("/demo/cloudsync_client.mjs", "cloudsync_client.mjs", "text/javascript")]:
        with urllib.request.urlopen(demo_server + path, timeout=10) as response:
            assert response.headers["Content-Type"] == kind + "; charset=utf-8"
            assert response.headers["Cache-Control"] == "no-store"
            assert response.read() == open(os.path.join(HERE, name), "rb").read()
    for path in ["/demo/seed.sql", "/demo/../cloudsync.py", "/demo/%2e%2e/cloudsync.py", "/demo/cloudsync.py",
                 "/demo//etc/passwd", "/cloudsync_client.mjs", "/demo/index.html%00.js"]:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(demo_server + path, timeout=10)
        assert refused.value.code == 404, path
    served = cloudsync.App(cloudsync.load_config(env_file=None, environ={}, overrides={
        "DB_HOST": "", "DB_PATH": str(tmp_path / "serve.db"), "ALLOWED_TABLES": "", "TOKENS_FILE": ""}))
    assert call(served, "GET", "/demo/").status == 404          # `serve` has no web till
    served.db.close()


def _calls_while(run):
    """Every call from one definition of cloudsync.py to another while `run()` runs in this thread:
    {(caller code, callee code)}, and what run() returned."""
    module = cloudsync.__file__
    calls = set()

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == module and frame.f_back is not None \
                and frame.f_back.f_code.co_filename == module:
            calls.add((frame.f_back.f_code, frame.f_code))
    sys.settrace(tracer)
    try:
        result = run()
    finally:
        sys.settrace(None)
    return calls, result


def _section_starts():
    """The first line of each banner section of cloudsync.py, in order."""
    lines = open(cloudsync.__file__).read().splitlines()
    return [number + 2 for number in range(len(lines) - 2)
            if lines[number].startswith("# ----") and lines[number + 2].startswith("# ----")]


def _class_of(code):
    """The class of cloudsync.py a code object is a method of (or nested in), or None."""
    head = code.co_qualname.split(".")[0]
    return head if isinstance(getattr(cloudsync, head, None), type) else None


@pytest.mark.parametrize("path", ["push", "pull"])
def test_a_push_and_a_pull_read_forward(backend, path):
    """The module's reading order (its docstring): on the path of a push and of a sync pull, every
    definition calls only what is below it in its section, a method of its own class, or what an
    earlier section defined; never a later section."""
    application = started(backend)
    try:
        checkpoint = pull(application, tables=["sales"], since=None).json["checkpoint"]
        assert push(application, [op("insert", id="s1", total="1.50")], device_id="till", batch_id="b1",
                    checkpoint=checkpoint).status == 200
        if path == "push":
            calls, response = _calls_while(lambda: push(application, [op("insert", id="s2", total="2.50")],
                                                         device_id="till", batch_id="b2", checkpoint=checkpoint))
        else:
            calls, response = _calls_while(lambda: pull(application, tables=["sales"], since=checkpoint))
        assert response.status == 200, response.body
    finally:
        application.db.close()
    starts = _section_starts()

    def section(code):
        return bisect.bisect_right(starts, code.co_firstlineno)
    against = sorted("%s (line %d) calls %s (line %d)" % (caller.co_qualname, caller.co_firstlineno,
                                                          callee.co_qualname, callee.co_firstlineno)
                     for caller, callee in calls
                     if "<" not in callee.co_name
                     and (section(callee) > section(caller)
                          or section(callee) == section(caller)
                          and callee.co_firstlineno < caller.co_firstlineno
                          and (_class_of(callee) is None or _class_of(callee) != _class_of(caller))))
    assert len(calls) > 50 and not against, against


# ---------------------------------------------------------------------------
# Command line, and workers
# ---------------------------------------------------------------------------


def _readme_curl_commands():
    """The curl commands of README's "Try it" section."""
    text = open(os.path.join(HERE, "README.md")).read()
    text = text[text.index("## Try it"):text.index("## Run the tests")]
    commands, current = [], None
    for line in text.splitlines() + [""]:
        if current is not None and line.startswith("  "):
            current = current.rstrip("\\ ") + " " + line.strip()
            continue
        if current is not None:
            commands.append(current)
        current = line if line.startswith("curl ") else None
    return commands


def test_readme_curl_examples_work_against_demo(demo_server):
    commands = _readme_curl_commands()
    assert len(commands) >= 3
    for command in commands:
        command = command.replace("http://127.0.0.1:4000", demo_server)
        output = subprocess.run(command + " -s -w '\\n%{http_code}'", shell=True, capture_output=True, text=True)
        body, code = output.stdout.rsplit("\n", 1)
        assert code == "200", (command, body)
        assert json.loads(body).get("success", True) is True, (command, body)


def test_server_refuses_to_start_on_bad_table(tmp_path):
    env = dict(os.environ, DB_PATH=str(tmp_path / "x.db"), ALLOWED_TABLES="nowhere", PORT=str(_free_port()))
    result = subprocess.run([sys.executable, os.path.join(HERE, "cloudsync.py")], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "cannot start: table 'nowhere' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_compact_command(backend, tmp_path, capsys):
    application = started(backend)
    push(application, [op("insert", id="a")], device_id="till-9")
    env = {name: value for name, value in backend.settings.items()}
    env["ALLOWED_TABLES"] = ",".join(TABLES)
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        assert cloudsync.main(["--env-file", "", "log", "--device", "till-9"]) == 0
        out = capsys.readouterr().out
        assert "till-9" in out and '["a"]' in out and "insert" in out
        assert cloudsync.main(["--env-file", "", "compact"]) == 0
        assert "removed 0 change-log entries" in capsys.readouterr().out
        assert cloudsync.main(["--env-file", "", "migrate"]) == 0
        assert "change capture (triggers) on 7 table(s), unchanged" in capsys.readouterr().out
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_silent_client_is_disconnected(tmp_path):
    server = LiveServer(tmp_path, READ_TIMEOUT_SECONDS="2")
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /sync/push HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            sock.settimeout(15)
            started = time.monotonic()
            assert sock.recv(100) == b""              # closed by the server, nothing applied
            assert time.monotonic() - started < 10
    finally:
        server.stop()


def test_server_reports_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, os.path.join(HERE, "cloudsync.py"), "demo"], cwd=str(tmp_path),
                                env=dict(os.environ, PORT=str(port)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1                   # try again later: systemd restarts it
    assert "cannot listen on 127.0.0.1:%d" % port in result.stderr and "Traceback" not in result.stderr
    assert "ss -ltnp 'sport = :%d'" % port in result.stderr              # how to find who holds it


def test_devices_command_prints_the_fleet(backend, capsys):
    application = started(backend)
    push(application, [op("insert", id="s1")], device_id="till")
    with application.db.connection() as conn:
        application.fleet.flush(conn)
    backend.sql("UPDATE cloudsync_devices SET last_seen = '2000-01-01 00:00:00' WHERE device_id = 'till'")
    assert cloudsync._devices_command(application.config, argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "! till" in out and "1 device(s); 1 silent" in out


def test_devices_and_token_list_mark_a_removed_device(backend, tmp_path, capsys):
    tokens = str(tmp_path / "cloudsync.tokens")
    kept, lost = cloudsync.add_token(tokens, "till-01"), cloudsync.add_token(tokens, "till-02")
    application = started(backend, TOKENS_FILE=tokens, ADMIN_TOKEN=ADMIN)
    for token in (kept, lost):
        assert push(application, [op("insert", id=token[:8])]).status == 401     # no token: refused
        assert call(application, "POST", "/sync/push", {"operations": [op("insert", id=token[:8])]},
                    headers=bearer(token)).status == 200
    cloudsync.remove_token(tokens, "till-02")
    application.auth.reload(force=True)
    with application.db.connection() as conn:
        application.fleet.flush(conn)
    assert cloudsync._devices_command(application.config, argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert re.search(r"^x till-02 ", out, re.M) and re.search(r"^  till-01 ", out, re.M)
    assert "2 device(s); 0 silent for more than a day (!); 1 removed" in out
    devices = {device["device_id"]: device for device in call(
        application, "GET", "/sync/devices", headers=bearer(ADMIN)).json["devices"]}
    assert devices["till-02"]["removed"] is True and devices["till-02"]["removed_at"].endswith("Z")
    assert devices["till-01"]["removed"] is False and devices["till-01"]["removed_at"] is None
    # a new token for the device takes the mark away
    cloudsync.add_token(tokens, "till-02")
    assert "till-02" not in cloudsync.removed_devices(tokens)
    assert [token.device_id for token in cloudsync.read_tokens_file(tokens)] == ["till-01", "till-02"]


@pytest.mark.parametrize("command", [[], ["serve"], ["demo"], ["migrate"], ["compact"], ["log"], ["check"],
                                     ["devices"], ["token"], ["token", "add"], ["token", "list"]])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, os.path.join(HERE, "cloudsync.py")] + command + ["--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: cloudsync")


def test_migrate_and_compact_show_progress(tmp_path):
    db_path = str(tmp_path / "shop.db")
    conn = sqlite3.connect(db_path)
    conn.executescript(open(os.path.join(HERE, "schema-sqlite.sql")).read())
    conn.close()
    env = dict(os.environ, DB_HOST="", DB_PATH=db_path, ALLOWED_TABLES="sales,products", TOKENS_FILE="")
    command = [sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", ""]
    migrate = subprocess.run(command + ["migrate"], env=env, capture_output=True, text=True, timeout=60)
    assert migrate.returncode == 0
    assert "installed triggers on sales" in migrate.stdout and "installed triggers on products" in migrate.stdout
    compact = subprocess.run(command + ["compact"], env=env, capture_output=True, text=True, timeout=60)
    assert compact.returncode == 0 and "removed 0 change-log entries" in compact.stdout


def test_systemd_unit_verifies(tmp_path):
    """cloudsync.service with its paths pointed at this checkout passes systemd-analyze verify."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    text = open(os.path.join(HERE, "cloudsync.service")).read()
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure", "User=cloudsync",
                "KillSignal=SIGTERM", "ExecStart=/opt/cloudsync/.venv/bin/python /opt/cloudsync/cloudsync.py serve"):
        assert key in text, key
    unit = (text.replace("/opt/cloudsync/.venv/bin/python", os.path.realpath(sys.executable))
            .replace("/opt/cloudsync", HERE).replace("User=cloudsync", "User=root").replace("Group=cloudsync",
                                                                                          "Group=root"))
    path = tmp_path / "cloudsync.service"
    path.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_check_does_not_create_the_sqlite_file(tmp_path, capsys):
    """check is documented read-only; a mistyped DB_PATH must be reported, not created."""
    path = tmp_path / "typo.db"
    config = cloudsync.load_config(None, environ={}, overrides={"DB_HOST": "", "DB_PATH": str(path),
                                                                "ALLOWED_TABLES": "sales", "TOKENS_FILE": ""})
    assert cloudsync._check(config) >= 1
    assert not path.exists()


def _limited_mysql_user(backend, name):
    """A user with row privileges on the test database, and ALL PRIVILEGES on another database only."""
    database = backend.settings["DB_NAME"]
    for statement in ("DROP USER IF EXISTS '%s'@'%%'" % name,
                      "CREATE USER '%s'@'%%' IDENTIFIED BY 'pw-limited'" % name,
                      "GRANT SELECT, INSERT, UPDATE, DELETE ON `%s`.* TO '%s'@'%%'" % (database, name),
                      "GRANT ALL PRIVILEGES ON `%s_other`.* TO '%s'@'%%'" % (database, name)):
        backend.sql(statement)
    return {"DB_USER": name, "DB_PASS": "pw-limited"}


def test_check_sees_trigger_privilege_of_another_database_as_missing(backend, capsys):
    if backend.kind != "mysql":
        pytest.skip("MySQL privileges")
    started(backend)
    user = _limited_mysql_user(backend, "cs_limited_check")
    try:
        cloudsync._check(backend.config(**user))
        out = capsys.readouterr().out
        assert "lacks CREATE, INDEX, ALTER, TRIGGER on %s" % backend.settings["DB_NAME"] in out and "fix: GRANT" in out
    finally:
        backend.sql("DROP USER IF EXISTS 'cs_limited_check'@'%'")


def test_migrate_without_create_privilege_is_a_clean_error(backend):
    """main() catches ConfigError/SchemaError/ChangeCaptureError/DatabaseUnavailable; a raw driver error
    becomes a traceback."""
    if backend.kind != "mysql":
        pytest.skip("MySQL privileges")
    user = _limited_mysql_user(backend, "cs_limited_migrate")
    try:
        application = cloudsync.App(backend.config(**user))
        with pytest.raises((cloudsync.SchemaError, cloudsync.ChangeCaptureError, cloudsync.DatabaseUnavailable)):
            application.start()
        application.db.close()
    finally:
        backend.sql("DROP USER IF EXISTS 'cs_limited_migrate'@'%'")


def test_check_finds_nothing_wrong_after_migrate(backend, capsys):
    started(backend)
    assert cloudsync._check(backend.config()) == 0
    assert "0 problem(s)" in capsys.readouterr().out


CHECK_PROBLEMS = [
    # (break the setup, expected words in the output)
    (lambda backend: backend.sql("DROP TRIGGER cloudsync_sales_upd"), "lacks change-capture triggers (upd)"),
    (lambda backend: backend.sql("DROP TABLE item_sales"), "'item_sales' does not exist"),
    (lambda backend: None, "the database refused the connection"),
]


@pytest.mark.parametrize("breaks,words", CHECK_PROBLEMS)
def test_check_reports_problems_and_fixes(backend, capsys, breaks, words):
    started(backend)
    breaks(backend)
    config = backend.config() if words != "the database refused the connection" else backend.config(
        DB_HOST="127.0.0.1", DB_PORT="1", DB_USER="x", DB_NAME="x", DB_CONNECT_TIMEOUT_SECONDS="1")
    assert cloudsync._check(config) >= 1
    out = capsys.readouterr().out
    assert words in out and "fix:" in out


def test_check_command_exit_code(tmp_path):
    env = dict(os.environ, DB_HOST="", DB_PATH=str(tmp_path / "missing.db"), ALLOWED_TABLES="sales")
    result = subprocess.run([sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", "", "check"],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "PROBLEM" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("arguments,env,words", [
    (["--env-file", "missing.env", "serve"], {}, ["cannot start: the settings file missing.env does not exist"]),
    (["--env-file", "", "serve"], {"PORT": "abc"}, ["cannot start: PORT='abc' is not valid: expected a port number"]),
    (["--env-file", "", "check"], {"THREADS": "many"}, ["check: THREADS='many' is not valid"]),
    (["--env-file", "", "token", "list"], {"TOKENS": "till sha256:12"}, ["token: TOKENS=(hidden) is not valid"]),
    (["--env-file", "", "migrate"], {"ALLOWED_TABLES": "cloudsync_meta"}, ["migrate: ALLOWED_TABLES="]),
    (["--env-file", "", "check"], {"PULL_MAX_BYTES": "0"}, ["PULL_MAX_BYTES='0' is not valid: expected a whole number of at least 1"]),
    (["--env-file", "", "check"], {"MAX_CONNECTIONS_PER_ADDRESS": "-1"},
     ["MAX_CONNECTIONS_PER_ADDRESS='-1' is not valid: expected a whole number of at least 0"]),
])
def test_bad_settings_are_one_sentence_naming_the_command(tmp_path, arguments, env, words):
    code, out, err = _cli(arguments, dict({"DB_PATH": str(tmp_path / "x.db")}, **env), cwd=str(tmp_path))
    assert code == 2 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert len([line for line in err.splitlines() if "ERROR" in line]) == 1


def test_start_up_errors_are_json_lines_with_log_format_json(tmp_path):
    code, _, err = _cli(["--env-file", "", "serve"], {"LOG_FORMAT": "json", "PORT": "abc"}, cwd=str(tmp_path))
    assert code == 2
    entry = json.loads(err.strip().splitlines()[-1])
    assert entry["level"] == "ERROR" and "PORT='abc' is not valid" in entry["message"]


def test_log_shows_the_newest_entries_and_stops_quietly_in_a_pipe(backend, tmp_path):
    application = started(backend)
    for n in range(30):
        assert push(application, [op("insert", id="s%02d" % n)], device_id="till").status == 200
    env = dict(backend.settings, ALLOWED_TABLES=",".join(TABLES), TOKENS_FILE="")
    code, out, _ = _cli(["--env-file", "", "log", "--tail", "5"], env)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 6 and '["s29"]' in lines[-1] and '["s25"]' in lines[1]
    code, out, _ = _cli(["--env-file", "", "log", "--since", "0", "--limit", "2"], env)
    assert '["s00"]' in out.splitlines()[1]
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", "", "log",
                                "--tail", "1000"], env=dict(os.environ, **env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()                      # `log | head -1`
    _, err = process.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err
    application.db.close()


def test_migrate_removes_the_triggers_of_tables_no_longer_allowed_and_check_sees_them(backend, tmp_path):
    started(backend).db.close()
    env = dict(backend.settings, ALLOWED_TABLES="sales,products", TOKENS_FILE="")
    code, out, _ = _cli(["--env-file", "", "check"], env)
    assert code == 1 and "customers is no longer in ALLOWED_TABLES" in out and "migrate" in out
    code, out, _ = _cli(["--env-file", "", "migrate"], env)
    assert code == 0 and "removed the change-capture triggers of customers" in out
    names = {name for (name,) in backend.sql(
        "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()"
        if backend.kind == "mysql" else "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert not any("customers" in name for name in names) and cloudsync._trigger_name("sales", "ins") in names
    code, out, _ = _cli(["--env-file", "", "check"], env)
    assert code == 0 and "0 problem(s)" in out, out


def test_a_scope_column_the_table_lacks_is_one_line_naming_the_setting_everywhere(backend, tmp_path):
    tokens = str(tmp_path / "cloudsync.tokens")
    cloudsync.add_token(tokens, "till-07", scopes={"region": ["north"]})
    env = dict(backend.settings, ALLOWED_TABLES="sales,products", ROW_SCOPES="sales.region",
               TOKENS_FILE=tokens)
    for command in ("migrate", "serve"):
        code, out, err = _cli(["--env-file", "", command], dict(env, PORT=str(_free_port())))
        lines = [line for line in err.splitlines() if "ERROR" in line]
        assert code == cloudsync.EXIT_CONFIGURATION and len(lines) == 1, err
        assert lines[0].endswith("ROW_SCOPES names sales.region, but table sales has no column region; "
                                 "change ROW_SCOPES, or the table"), lines
    code, out, _ = _cli(["--env-file", "", "check"], env)
    assert code == 1 and "change ROW_SCOPES, or the table" in out
    assert "after fixing the problems above, run: " in out        # migrate would refuse it first


def test_check_of_a_database_never_migrated_reports_one_problem(backend):
    env = dict(backend.settings, ALLOWED_TABLES=",".join(TABLES), TOKENS_FILE="")
    code, out, _ = _cli(["--env-file", "", "check"], env)
    assert code == 1 and "1 problem(s)" in out and re.search(r"run: \S*python\S* \S*cloudsync.py migrate", out), out


def test_devices_tell_refusals_from_failures_and_fit_100_columns(backend, monkeypatch):
    application = started(backend)
    assert push(application, [op("insert", id="s1")], device_id="till-with-a-long-name-01").status == 200
    assert push(application, [op("insert", id="s1", total="x")], device_id="till-with-a-long-name-01").status == 400

    def broken(*args, **kwargs):
        raise RuntimeError("the database failed")
    monkeypatch.setattr(application.pushes, "push", broken)
    assert push(application, [op("insert", id="s2")], device_id="till-with-a-long-name-01").status == 500
    monkeypatch.undo()
    with application.db.connection() as conn:
        application.fleet.flush(conn)
    env = dict(backend.settings, ALLOWED_TABLES=",".join(TABLES), TOKENS_FILE="")
    code, out, _ = _cli(["--env-file", "", "devices"], env)
    assert code == 0 and all(len(line) <= 100 for line in out.splitlines()), out
    code, out, _ = _cli(["--env-file", "", "devices", "--json"], env)
    device = json.loads(out)[0]
    assert (device["pushes"], device["rejected"], device["failed"], device["errors"]) == (1, 1, 1, 2)
    application.db.close()


def test_demo_is_self_contained(tmp_path):
    """An operator's tokens file and .env beside it change nothing for the demo."""
    cloudsync.add_token(str(tmp_path / "cloudsync.tokens"), "till-01")
    (tmp_path / ".env").write_text("DB_HOST=db.example.com\nDB_USER=u\nDB_NAME=shop\nALLOWED_TABLES=nothing\n")
    port = _free_port()
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "cloudsync.py"), "demo"], cwd=str(tmp_path),
                               env=dict(os.environ, PORT=str(port)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        url = "http://127.0.0.1:%d" % port
        assert _eventually(lambda: _status_with(url, "no token needed") == 200, 20)
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_compact_older_than_zero_warns_and_old_checkpoints_reset(backend):
    application = started(backend)
    assert push(application, [op("insert", id="s1")]).status == 200
    checkpoint = pull(application, tables=["sales"], since=None).json["checkpoint"]
    assert push(application, [op("insert", id="s2")]).status == 200
    env = dict(backend.settings, ALLOWED_TABLES=",".join(TABLES), TOKENS_FILE="")
    code, out, err = _cli(["--env-file", "", "compact", "--older-than", "0"], env)
    assert code == 0 and "warning: devices that have not pulled since now will get 410" in err
    assert out.strip().splitlines() == ["removed 2 change-log entries and 0 batch ids older than 0 day(s); "
                                        "checkpoints before seq 2 now get 410"]
    response = pull(application, tables=["sales"], since=checkpoint)
    assert response.status == 410 and response.json["reset"] is True
    application.db.close()


def test_a_taken_port_is_found_before_anything_changes(tmp_path):
    db = str(tmp_path / "shop.db")
    cloudsync._create_demo_database(db)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"DB_PATH": db, "ALLOWED_TABLES": "sales", "TOKENS_FILE": "", "PORT": str(taken.getsockname()[1])}
        code, _, err = _cli(["--env-file", "", "serve"], env)
    assert code == 1 and "cannot listen" in err
    with sqlite3.connect(db) as conn:                 # no trigger, no table of cloudsync's
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'cloudsync%'").fetchall()


def test_start_up_says_one_line_about_triggers_unless_something_changed(backend):
    env = dict(backend.settings, ALLOWED_TABLES=",".join(TABLES), TOKENS_FILE="")
    code, first, _ = _cli(["--env-file", "", "migrate"], env)
    assert code == 0 and "installed triggers on sales" in first
    code, again, _ = _cli(["--env-file", "", "migrate"], env)
    assert code == 0 and again.strip().splitlines() == ["change capture (triggers) on 7 table(s), unchanged"]


def test_token_commands_write_list_and_check_scopes(tmp_path, scoped_backend):
    tokens_file = str(tmp_path / "tokens")
    env = dict(TOKENS_FILE=tokens_file, ALLOWED_TABLES=SCOPED_TABLES, ROW_SCOPES=ROW_SCOPES,
               **scoped_backend.settings)
    code, out, err = _cli(["--env-file", "", "token", "add", "till-07", "--scope", "store_id=7,8",
                           "--scope", "region=north"], env)
    assert code == 0, err
    assert re.search(r"^till-07 sha256:[0-9a-f]{64} scope.region=north scope.store_id=7,8 created=",
                     open(tokens_file).read(), re.M)
    token = cloudsync.read_tokens_file(tokens_file)[0]
    assert token.scopes == {"store_id": ("7", "8"), "region": ("north",)}
    code, out, _ = _cli(["--env-file", "", "token", "list"], env)
    assert code == 0 and re.search(r"till-07 .* region=north store_id=7,8", out)
    for bad in ("store_id", "store_id=7,,8", "store_id=7,*", "store id=7", "store_id=" + "9" * 201):
        code, _, err = _cli(["--env-file", "", "token", "rotate", "till-07", "--scope", bad], env)
        assert code == cloudsync.EXIT_CONFIGURATION and "--scope" in err, (bad, err)
    code, _, err = _cli(["--env-file", "", "token", "rotate", "till-07", "--scope", "store_id=*"], env)
    assert code == 0 and cloudsync.read_tokens_file(tokens_file)[0].scopes == {"store_id": ("*",)}


def test_devices_and_check_show_scopes(scoped_backend, capsys):
    application = cloudsync.App(scoped_config(scoped_backend, ADMIN_TOKEN="admin"))
    application.start()
    try:
        assert spull(application, "t7", tables=["orders"], since=None).status == 200
        devices = call(application, "GET", "/sync/devices", headers=as_device("admin"))
        assert devices.status == 200
        scopes = {device["device_id"]: device["scope"] for device in devices.json["devices"]}
        assert scopes == {"till7": "region=north store_id=7 tech=ann"}
    finally:
        application.db.close()
    # the index missing, and three tokens of the fixture left without a value for a scoped column
    assert cloudsync._check(scoped_config(scoped_backend)) == 4
    out = capsys.readouterr().out
    assert "table notes is scoped by store_id, but no index starts with store_id" in out
    assert "device both has no scope value for region, tech: it cannot sync visits, jobs" in out
    assert "device bare has no scope value for region, store_id, tech" in out
    assert "ok       table orders is scoped by store_id, and an index starts with it" in out


def test_check_reports_triggers_made_for_other_columns(backend, capsys):
    application = started(backend)
    application.db.close()
    if backend.kind == "mysql":
        backend.sql("ALTER TABLE sales ADD COLUMN memo VARCHAR(20)")
    else:
        backend.sql("ALTER TABLE sales ADD COLUMN memo TEXT")
    assert cloudsync._check(backend.config()) >= 1
    out = capsys.readouterr().out
    assert "sales" in out and "made for other columns" in out


# WORKERS=2: a master and two workers on one listening socket. Which worker
# holds a connection is read from /proc (the worker whose descriptors hold the
# server's end of it), so a test puts a long poll in one worker and a push in
# the other on purpose.

@pytest.mark.parametrize("settings, workers, share", [
    ({"WORKERS": "2", "DB_POOL_SIZE": "8"}, 2, (4, 500, 50)),
    ({"WORKERS": "3", "DB_POOL_SIZE": "10", "MAX_CONNECTIONS": "100", "LONGPOLL_MAX_WAITERS": "10"}, 3, (3, 34, 4)),
    ({"WORKERS": "1"}, 1, (8, 1000, 100)),
    ({"WORKERS": "auto"}, 1, (8, 1000, 100)),              # SQLite writes one transaction at a time
    ({"WORKERS": "auto", "DB_HOST": "db", "DB_USER": "u", "DB_NAME": "n"},
     max(1, min(os.cpu_count() or 1, 4, 8 // 3)), None),
])
def test_workers_divide_the_totals_they_share(settings, workers, share):
    config = cloudsync.load_config(None, environ=settings)
    assert config.worker_count == workers
    if share is not None:
        mine = config.worker_share()
        assert (mine.db_pool_size, mine.max_connections, mine.longpoll_max_waiters) == share
        assert mine.threads == config.threads                 # THREADS is each worker's


@pytest.mark.parametrize("settings, message", [
    ({"WORKERS": "3", "DB_POOL_SIZE": "8"}, "WORKERS=3 needs DB_POOL_SIZE of at least 9"),
    ({"WORKERS": "0"}, "WORKERS='0' is not valid: expected auto or a number of processes from 1 to 64"),
    ({"WORKERS": "two"}, "expected auto or a number"),
])
def test_a_worker_count_the_pool_cannot_serve_is_refused_in_one_sentence(settings, message):
    with pytest.raises(cloudsync.ConfigError) as error:
        cloudsync.load_config(None, environ=settings)
    assert message in str(error.value)


def _workers_of(server, count=2):
    """The pids of a LiveServer's workers, once `count` of them run."""
    pid = server.process.pid

    def children():
        with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
            return [int(child) for child in handle.read().split()]
    until(lambda: len(children()) == count)
    return children()


def _holder(workers, client_port):
    """The worker holding the server's end of the connection from `client_port`, or None."""
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as handle:
            for line in handle.read().splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == client_port:
                    inodes.add("socket:[%s]" % fields[9])
    for pid in workers:
        for descriptor in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, descriptor)) in inodes:
                    return pid
            except OSError:
                pass
    return None


def _connection_in(server, workers, other_than=None):
    """(an open connection, the worker holding it), in a worker other than `other_than`."""
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.connect()
        port, held = conn.sock.getsockname()[1], []
        until(lambda: held.append(_holder(workers, port)) or held[-1] is not None)
        if held[-1] != other_than:
            return conn, held[-1]
        conn.close()
    raise AssertionError("every connection went to worker %d" % other_than)


def _two_workers(backend, tmp_path):
    """(a WORKERS=2 LiveServer on the backend's database syncing sales, [(connection, worker)] with one
    connection open in each worker)."""
    server = LiveServer(tmp_path, WORKERS="2", ALLOWED_TABLES="sales", **backend.settings)
    workers = _workers_of(server)
    first = _connection_in(server, workers)
    return server, [first, _connection_in(server, workers, other_than=first[1])]


def _on(conn, method, path, body=None):
    """(status, answer: JSON, or the text of /metrics) of one request on an open connection."""
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    return response.status, data.decode() if path == "/metrics" else json.loads(data)


def _metric(text, sample):
    """A sample's value in /metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _metric_of(server, sample):
    """A sample's value in /metrics, asked on a new connection (any worker answers)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        return _metric(response.read().decode(), sample)


def _long_poll(conn, tables, since, wait=20):
    """A thread making a long poll on `conn`; its `.answer` once it is answered."""
    def run():
        thread.answer = _on(conn, "POST", "/sync/pull", {"tables": tables, "since": since, "wait": wait})
    thread = threading.Thread(target=run, daemon=True)
    thread.answer = None
    thread.start()
    return thread


def test_a_push_in_one_worker_wakes_a_long_poll_in_the_other(backend, tmp_path):
    server, [(polling, _), (pushing, _)] = _two_workers(backend, tmp_path)
    try:
        status, answer = _on(polling, "POST", "/sync/pull", {"tables": ["sales"], "since": None})
        assert status == 200, answer
        told = _metric_of(server, "cloudsync_worker_wakeups_total")
        waiting = _long_poll(polling, ["sales"], answer["checkpoint"])
        until(lambda: _metric_of(server, "cloudsync_longpoll_waiting") == 1)
        assert _on(pushing, "POST", "/sync/push", {"operations": [op("insert", id="w1", total="1.00")]})[0] == 200
        waiting.join(25)
        status, answer = waiting.answer
        assert status == 200 and [row["id"] for row in answer["changes"]["sales"]["upserted"]] == ["w1"]
        # the pushing worker told the other over the line, not only through the database
        until(lambda: _metric_of(server, "cloudsync_worker_wakeups_total") > told)
    finally:
        server.stop()


def test_metrics_count_every_worker_whichever_answers(backend, tmp_path):
    server, conns = _two_workers(backend, tmp_path)
    try:
        for number in range(5):
            conn, _ = conns[number % 2]
            assert _on(conn, "POST", "/sync/push", {"operations": [op("insert", id="m%d" % number)]})[0] == 200
        sample = 'cloudsync_operations_pushed_total{action="insert",table="sales"}'
        for conn, _ in conns:                       # asked of each worker in turn
            until(lambda: _metric(_on(conn, "GET", "/metrics")[1], sample) == 5)
            text = _on(conn, "GET", "/metrics")[1]
            assert _metric(text, "cloudsync_workers") == 2
            assert _metric(text, 'cloudsync_requests_total{method="POST",route="/sync/push",status="200"}') == 5
    finally:
        server.stop()


def test_a_killed_worker_is_started_again_and_keeps_its_counts(backend, tmp_path):
    server, [(conn, victim), _] = _two_workers(backend, tmp_path)
    sample = 'cloudsync_operations_pushed_total{action="insert",table="sales"}'
    try:
        for number in range(3):
            assert _on(conn, "POST", "/sync/push", {"operations": [op("insert", id="k%d" % number)]})[0] == 200
        until(lambda: _metric_of(server, sample) == 3)
        conn.close()
        os.kill(victim, signal.SIGKILL)
        until(lambda: victim not in _workers_of(server) and len(_workers_of(server)) == 2)
        assert _http(server.url, "GET", "/health")[0] == 200
        assert _http(server.url, "POST", "/sync/push", {"operations": [op("insert", id="k3")]})[0] == 200
        until(lambda: _metric_of(server, sample) == 4)          # the dead worker's 3 are still counted
        assert "worker %d" % 0 in open(server.log).read() and "was killed by signal 9" in open(server.log).read()
    finally:
        server.stop()


def test_sigterm_drains_every_worker(backend, tmp_path):
    server, conns = _two_workers(backend, tmp_path)
    workers = [worker for _, worker in conns]
    polls = []
    for conn, _ in conns:
        status, answer = _on(conn, "POST", "/sync/pull", {"tables": ["sales"], "since": None})
        polls.append(_long_poll(conn, ["sales"], answer["checkpoint"]))
    until(lambda: _metric_of(server, "cloudsync_longpoll_waiting") == 2)
    server.process.send_signal(signal.SIGTERM)
    for poll in polls:                              # each worker answered its waiting pull normally
        poll.join(15)
        assert not poll.is_alive() and poll.answer[0] == 200
        assert poll.answer[1]["changes"]["sales"] == {"upserted": [], "deleted": []}
    assert server.process.wait(timeout=30) == 0
    until(lambda: not any(os.path.exists("/proc/%d" % pid) for pid in workers))


def test_a_metrics_slot_keeps_the_last_whole_publish_when_a_worker_dies_writing(backend):
    application = started(backend)
    try:
        share = cloudsync._WorkerShare(1)
        share.slot = 0
        application.metrics.count("cloudsync_replays_total", 3)
        share.publish(application)
        # a worker killed half way through its next publish: the half not in use holds half a JSON
        version = struct.unpack_from("<Q", share._memory, 0)[0]
        half = 8 + (version + 1) % 2 * share._half
        struct.pack_into("<Q", share._memory, half, 1000)
        share._memory[half + 8:half + 20] = b'{"counters":'
        (snapshot,) = share.published()
        assert ["cloudsync_replays_total", [], 3] in snapshot["counters"]
        application.metrics.count("cloudsync_replays_total", 1)        # its successor publishes whole
        share.publish(application)
        assert ["cloudsync_replays_total", [], 4] in share.published()[0]["counters"]
    finally:
        application.db.close()


def test_token_add_prints_only_the_token_and_refuses_a_scoped_device_without_scope(tmp_path, scoped_backend):
    tokens_file = str(tmp_path / "tokens")
    env = dict(TOKENS_FILE=tokens_file, ALLOWED_TABLES=SCOPED_TABLES, ROW_SCOPES=ROW_SCOPES,
               **scoped_backend.settings)
    code, out, err = _cli(["--env-file", "", "token", "add", "till-09"], env)
    assert code == cloudsync.EXIT_CONFIGURATION and "--scope store_id=7" in err and not os.path.exists(tokens_file)
    code, out, err = _cli(["--env-file", "", "token", "add", "till-09", "--scope", "store_id=9"], env)
    assert code == 0 and re.fullmatch(r"[A-Za-z0-9_-]{40,}\n", out), out          # TOKEN=$(... token add ...)
    assert "shown once" in err and "may not sync visits, jobs" in err
    assert cloudsync.read_tokens_file(tokens_file)[0].matches(hashlib.sha256(out.strip().encode()).digest())
    # a device limited to tables nobody scopes needs no --scope
    code, out, err = _cli(["--env-file", "", "token", "add", "kiosk", "--tables", "catalogue"], env)
    assert code == 0, err


def test_a_device_that_pushed_through_one_worker_pulls_its_change_through_the_other(backend, tmp_path):
    # A push marks its tables in every worker before it is answered: a poll through the other worker right
    # after is never answered from memory (one server, whichever worker answers).
    server, [(pushing, _), (pulling, _)] = _two_workers(backend, tmp_path)
    try:
        status, answer = _on(pulling, "POST", "/sync/pull", {"tables": ["sales"], "since": None})
        since = answer["checkpoint"]
        for number in range(20):
            assert _on(pushing, "POST", "/sync/push", {"operations": [op("insert", id="x%d" % number)]})[0] == 200
            status, answer = _on(pulling, "POST", "/sync/pull", {"tables": ["sales"], "since": since})
            assert [row["id"] for row in answer["changes"]["sales"]["upserted"]] == ["x%d" % number], answer
            since = answer["checkpoint"]
    finally:
        server.stop()


def test_serve_with_a_missing_table_names_the_fix_check_gives(tmp_path):
    db = tmp_path / "shop.db"
    cloudsync._create_demo_database(str(db))
    env = {"DB_PATH": str(db), "ALLOWED_TABLES": "sales,no_such_table", "TOKENS_FILE": "", "PORT": str(_free_port())}
    code, _, err = _cli(["--env-file", "", "serve"], env)
    assert code == cloudsync.EXIT_CONFIGURATION and "no_such_table" in err and cloudsync.TABLE_FIX in err
    code, out, _ = _cli(["--env-file", "", "check"], env)
    assert cloudsync.TABLE_FIX in out


def test_check_names_tokens_that_cannot_use_a_scoped_table(tmp_path, scoped_backend):
    tokens_file = str(tmp_path / "tokens")
    env = dict(TOKENS_FILE=tokens_file, ALLOWED_TABLES=SCOPED_TABLES, ROW_SCOPES=ROW_SCOPES, **scoped_backend.settings)
    cloudsync.add_token(tokens_file, "till-07", None, {"store_id": ("7",), "region": ("north",), "tech": ("ann",)})
    cloudsync.add_token(tokens_file, "till-08", None, {"store_id": ("8",)})
    cloudsync.add_token(tokens_file, "kiosk", ["catalogue"], None)
    code, out, _ = _cli(["--env-file", "", "check"], env)
    assert "device till-08 has no scope value for region, tech: it cannot sync visits, jobs" in out
    assert "token rotate till-08 --scope region=VALUE" in out
    assert "device till-07 has no" not in out and "device kiosk has no" not in out


# ---------------------------------------------------------------------------
# Data: cloudsync's own tables, metric help, the API description
# ---------------------------------------------------------------------------


def test_openapi_describes_every_route_and_method(app):
    response = call(app, "GET", "/openapi.json")
    assert response.status == 200
    document = response.json
    assert document["openapi"].startswith("3.1") and document["info"]["version"] == cloudsync.__version__
    for path, methods in app.routes.items():
        described = document["paths"].get(path)
        assert described is not None, path
        expected = {method.lower() for method in methods} | {"options"} | ({"head"} if "GET" in methods else set())
        assert set(described) - {"parameters", "summary", "description"} == expected, path
    assert set(document["paths"]) == set(app.routes)


def test_openapi_error_responses_are_described_with_the_error_schema(app):
    document = call(app, "GET", "/openapi.json").json
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation.get("responses", {}).items():
                if status.startswith(("4", "5")) and "content" in answer:
                    assert "application/json" in answer["content"], (path, method, status)


def test_openapi_error_answers_come_from_the_refusal_catalogue(app):
    """Every refusal is described, on the routes that answer it, with its status and `error` from REFUSALS."""
    document = call(app, "GET", "/openapi.json").json
    described = set()
    for (path, method), refusals in cloudsync.ROUTE_REFUSALS.items():
        assert method.upper() in app.routes[path], (path, method)
        for entry in refusals:
            reason = entry[0] if isinstance(entry, tuple) else entry
            status, error, _ = cloudsync.REFUSALS[reason]
            for operation in ("get", "head") if method == "get" else (method,):
                answer = document["paths"][path][operation]["responses"][str(status)]
                assert "`%s`" % error in answer["description"], (path, operation, reason)
            described.add(reason)
    components = document["components"]["responses"]
    assert "`Not found`" in components["NotFound"]["description"]
    assert set(cloudsync.REFUSALS) - described == {"not_found", "method_not_allowed"}
    assert document["paths"]["/sync"]["post"]["responses"] == document["paths"]["/sync/push"]["post"]["responses"]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    """The live server against its own description: random valid and invalid requests, no 5xx, no mismatch."""
    schemathesis = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(schemathesis):
        pytest.skip("schemathesis is installed by requirements-test.txt")
    server = LiveServer(tmp_path, ADMIN_TOKEN=ADMIN)
    url = server.url
    try:
        result = subprocess.run(
            [schemathesis, "run", url + "/openapi.json", "--url", url, "--checks", "all",
             # schema-valid pushes may still name tables and columns this server does not have: 400 is right
             "--exclude-checks", "positive_data_acceptance", "--max-examples", "25", "--seed", "21",
             "--generation-database", "none", "--no-color", "-H", "Authorization: Bearer " + ADMIN],
            capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
        assert result.returncode == 0, result.stdout[-6000:]
    finally:
        server.stop()
    server_log = open(server.log, errors="replace").read()
    assert "Traceback" not in server_log, server_log[-4000:]


# ---------------------------------------------------------------------------
# The reference client (cloudsync_client.py) against a live server
# ---------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """`cloudsync.py demo` on a fresh SQLite file, no tokens."""
    started = LiveServer(tmp_path)
    yield started
    started.stop()


@pytest.fixture
def device(tmp_path, server):
    """A factory of clients, each with its own local SQLite file; closed after the test."""
    made = []

    def make(name, **options):
        options.setdefault("tables", DEMO_TABLES)
        client = cloudsync_client.Client(str(tmp_path / (name + ".db")), options.pop("url", server.url),
                                         device_id=name, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def assert_equal_to_server(server, *clients):
    for table in DEMO_TABLES:
        expected = server.rows(table)
        for client in clients:
            assert client.rows(table) == expected, (client.device_id, table)


def record_posts(client):
    """Wrap the client's HTTP calls; return the list of (path, body, status, answer) it made."""
    calls, post = [], client._post

    def recording(path, body):
        status, answer = post(path, body)
        calls.append((path, body, status, answer))
        return status, answer

    client._post = recording
    return calls


def test_two_devices_edit_offline_and_converge_server_wins(server, device):
    till_a = device("till-a", batch_size=2, pull_limit=2)      # small: several batches and pages
    till_b = device("till-b", batch_size=2, pull_limit=2)
    for n in range(1, 5):
        till_a.insert("sales", {"id": "s%d" % n, "total": "%d.00" % n, "note": "new"})
    till_a.insert("products", {"id": "p1", "name": "Coffee", "price": "2.50"})
    assert till_a.sync() and till_b.sync()
    assert till_b.rows("sales") == till_a.rows("sales")
    # offline: both edit s1 (a conflict), and each makes independent changes
    till_a.update("sales", "s1", {"note": "from a"})
    till_b.update("sales", "s1", {"note": "from b", "total": "9.00"})
    till_a.insert("sales", {"id": "s5", "total": "5.00"})
    till_a.update("sales", "s3", {"total": "3.30"})
    till_b.delete("sales", "s2")
    till_b.insert("customers", {"id": "c1", "name": "Ann"})
    till_b.upsert("products", {"id": "p1", "name": "Espresso"})
    till_b.update("sales", "s4", {"note": "b again"})
    assert till_a.sync()
    result = till_b.sync()
    assert not result                               # a conflict nobody resolved needs the user's attention
    assert [c["key"] for c in result.conflicts] == ["s1"] and till_b.last_report["dropped"] == []
    assert [(letter["error"], letter["data"]["id"]) for letter in till_b.dead_letters()] == [("Conflict", "s1")]
    assert till_a.sync() and till_b.sync() and till_a.sync()     # once more: nothing left to move
    assert till_a.pending() == till_b.pending() == 0
    assert_equal_to_server(server, till_a, till_b)
    sales = {row["id"]: row for row in till_a.rows("sales")}
    assert sales["s1"]["note"] == "from a" and sales["s1"]["total"] == "1.00"      # server (first writer) won
    assert set(sales) == {"s1", "s3", "s4", "s5"}
    assert sales["s3"]["total"] == "3.30" and sales["s4"]["note"] == "b again"
    assert till_a.rows("products")[0]["name"] == "Espresso" and till_a.rows("customers")[0]["name"] == "Ann"


def test_conflict_on_deleted_row_deletes_it_locally(server, device):
    till_a, till_b = device("till-a"), device("till-b")
    till_a.insert("sales", {"id": "s1", "total": "1.00"})
    assert till_a.sync() and till_b.sync()
    till_a.delete("sales", "s1")
    till_b.update("sales", "s1", {"note": "kept?"})
    till_b.insert("sales", {"id": "s2", "total": "2.00"})
    assert till_a.sync()
    post = till_b._post
    till_b._post = lambda path, body: (None, None) if path == "/sync/pull" else post(path, body)   # pull fails
    assert not till_b.sync()
    assert till_b.last_report["conflicts"][0]["server_row"] is None
    assert [row["id"] for row in till_b.rows("sales")] == ["s2"]        # taken from the conflict, not a pull
    till_b._post = post
    assert till_b.sync()
    assert till_a.sync()
    assert_equal_to_server(server, till_a, till_b)


def test_crash_after_send_retries_same_batch_id_and_applies_once(server, device):
    till = device("till-a")
    assert till.sync()
    till.insert("sales", {"id": "s1", "total": "1.00"})
    calls, post = [], till._post

    def crash_after_push(path, body):
        answer = post(path, body)
        calls.append((path, body, answer))
        if path == "/sync/push":
            raise KeyboardInterrupt("power cut after sending")     # the answer is never stored
        return answer

    till._post = crash_after_push
    with pytest.raises(KeyboardInterrupt):
        till.sync()
    assert calls[0][2][0] == 200 and till.pending() == 1
    till.close()
    restarted = device("till-a")                                   # same file, as after a reboot
    retried = record_posts(restarted)
    assert restarted.sync()
    push = retried[0]
    assert push[0] == "/sync/push" and push[1]["batch_id"] == calls[0][1]["batch_id"]
    assert push[3]["replayed"] is True
    assert server.changes_of("sales", "s1") == 1
    assert restarted.pending() == 0
    assert_equal_to_server(server, restarted)


def test_unreachable_server_keeps_batch_id_for_next_sync(server, device, tmp_path):
    till = device("till-a", url="http://127.0.0.1:%d" % _free_port())
    till.insert("sales", {"id": "s1", "total": "1.00"})
    calls = record_posts(till)
    first, second = till.sync(), till.sync()
    assert not first and first.offline and not second
    assert till.pending() == 1
    assert calls[0][1]["batch_id"] == calls[1][1]["batch_id"]
    till.url = server.url
    assert till.sync()
    assert calls[2][1]["batch_id"] == calls[0][1]["batch_id"] and calls[2][2] == 200
    assert_equal_to_server(server, till)


def test_batches_hold_at_most_batch_size_operations(server, device):
    till = device("till-a", batch_size=3)
    for n in range(7):
        till.insert("sales", {"id": "s%d" % n, "total": "1.00"})
    calls = record_posts(till)
    assert till.sync()
    pushes = [body for path, body, _, _ in calls if path == "/sync/push"]
    assert [len(body["operations"]) for body in pushes] == [3, 3, 1]
    assert len({body["batch_id"] for body in pushes}) == 3
    assert_equal_to_server(server, till)


def test_refused_operation_is_kept_as_a_dead_letter_and_device_converges(server, device, caplog):
    tables = dict(DEMO_TABLES, products=(DEMO_TABLES["products"][0] + ["colour"], ["id"]))   # app newer than server
    till = device("till-a", tables=tables)
    assert till.sync()                          # holds a checkpoint: only a reset re-pulls the refused rows
    till.insert("sales", {"id": "s1", "total": "1.00"})
    till.insert("products", {"id": "p1", "name": "Tea", "colour": "green"})      # 400 Unknown column, no `op`
    till.insert("products", {"id": "p2", "name": None})                         # 400 Sync failed (NOT NULL), `op`
    till.insert("sales", {"id": "s2", "total": "2.00"})
    result = till.sync()
    assert not result                               # refused operations need the user's attention
    assert [op["error"] for op in till.last_report["dropped"]] == ["Unknown column", "Sync failed"]
    assert [(letter["error"], letter["data"]["id"]) for letter in till.dead_letters()] == [
        ("Unknown column", "p1"), ("Sync failed", "p2")]
    assert "kept as a dead letter" in caplog.text
    assert till.pending() == 0
    assert [row["id"] for row in till.rows("products")] == []        # re-pulled: the refused rows are gone
    assert [row["id"] for row in till.rows("sales")] == ["s1", "s2"]
    assert_equal_to_server(server, till)


def test_expired_checkpoint_wipes_and_pulls_everything(server, device):
    till_a, till_b = device("till-a"), device("till-b")
    till_a.insert("sales", {"id": "s1", "total": "1.00"})
    till_a.insert("sales", {"id": "s2", "total": "2.00"})
    assert till_a.sync() and till_b.sync()
    till_b.delete("sales", "s1")
    till_b.insert("sales", {"id": "s3", "total": "3.00"})
    assert till_b.sync()
    # the log ages past CHANGELOG_RETENTION_DAYS and is compacted: till_a's checkpoint is now too old
    with sqlite3.connect(server.db) as conn:
        conn.execute("UPDATE cloudsync_changes SET changed_at = '2000-01-01 00:00:00'")
    subprocess.run([sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", "", "compact"], check=True,
                   cwd=server.cwd, env=dict(server.env, DB_PATH=server.db, ALLOWED_TABLES="sales,products,customers"),
                   capture_output=True)
    till_a.insert("sales", {"id": "s4", "total": "4.00"})
    calls = record_posts(till_a)
    assert till_a.sync()
    assert [(path, status) for path, _, status, _ in calls][:2] == [("/sync/push", 410), ("/sync/push", 200)]
    assert [row["id"] for row in till_a.rows("sales")] == ["s2", "s3", "s4"]     # s1's delete was compacted away
    assert_equal_to_server(server, till_a)


def test_pull_never_overwrites_a_local_change_made_during_sync(server, device):
    till_a, till_b = device("till-a"), device("till-b")
    till_a.insert("sales", {"id": "s1", "total": "1.00"})
    assert till_a.sync() and till_b.sync()
    till_b.update("sales", "s1", {"note": "from b"})
    assert till_b.sync()
    post = till_a._post

    def write_before_pull(path, body):
        if path == "/sync/pull":
            till_a._post = post
            till_a.update("sales", "s1", {"note": "from a"})     # the app writes while the pull is in flight
        return post(path, body)

    till_a._post = write_before_pull
    # b's note is pulled, and a's write made again on top: the local row shows it, and it waits
    assert till_a.sync().up_to_date
    assert till_a.rows("sales")[0]["note"] == "from a" and till_a.pending() == 1
    result = till_a.sync()
    assert [c["key"] for c in result.conflicts] == ["s1"]     # b set the note first: server wins
    assert [letter["data"]["note"] for letter in till_a.dead_letters()] == ["from a"]
    assert_equal_to_server(server, till_a, till_b)


def test_failed_local_write_queues_nothing(device):
    till = device("till-a")
    till.insert("sales", {"id": "s1", "total": "1.00"})
    with pytest.raises(sqlite3.IntegrityError):
        till.insert("sales", {"id": "s1", "total": "2.00"})
    with pytest.raises(LookupError):
        till.update("sales", "nope", {"note": "x"})
    assert till.pending() == 1


def test_pushes_carry_the_pulled_checkpoint(server, device):
    till = device("till-a")
    assert till.sync()
    till.insert("sales", {"id": "s1", "total": "1.00"})
    calls = record_posts(till)
    checkpoint = till.checkpoint
    assert till.sync()
    assert calls[0][1]["checkpoint"] == checkpoint and calls[0][1]["device_id"] == "till-a"


class InProcessClient(cloudsync_client.Client):
    """The reference client talking to an App in this process (no socket); `lose_next` drops the
    next answer after the server has acted on it (the device never hears back)."""

    def __init__(self, path, application, **options):
        self.application, self.lose_next = application, False
        super().__init__(path, "http://in-process", **options)

    def _request(self, path, data, timeout=None):
        answer = call(self.application, "POST" if data is not None else "GET", path, raw=data or b"")
        if self.lose_next:
            self.lose_next, self._unreachable = False, "the answer was lost"
            return None, None
        return answer.status, json.loads(answer.body)


def test_a_pull_from_the_start_keeps_the_devices_edits_that_wait(app, backend, tmp_path):
    """A device pulled again from its first row (a reset) while its own new row and edits wait in
    the outbox: they stay on the device, and reach the server."""
    backend.sql("INSERT INTO sales (id, total, note) VALUES ('x', 1, 'server')")
    till = InProcessClient(str(tmp_path / "till.db"), app, tables=["sales"], device_id="till")
    assert till.sync()
    till.insert("sales", {"id": "mine", "total": "2.00"})
    till.update("sales", "x", {"note": "till"})
    with till._transaction():
        till._wipe("sales")                 # what a reset (whole, or reset_tables) does first
    assert {row["id"] for row in till.rows("sales")} == {"mine"}
    with till._transaction():
        till._set_state("reset", "1")
    till._pull(cloudsync_client.SyncResult())
    assert {row["id"]: row["note"] for row in till.rows("sales")} == {"x": "till", "mine": None}
    assert till.sync() and till.pending() == 0
    assert {row[0]: row[3] for row in backend.rows("sales")} == {"x": "till", "mine": None}
    till.close()


# Devices that pull whenever they like while their edits wait (as run_forever's long poll does),
# against an office writing the same column: every device edit names what it was based on, so
# an overwrite of a value the device never saw shows on the server as a value based on another.
EDITING_STEP = st.one_of(
    st.tuples(st.just("edit"), st.sampled_from("ab"), st.sampled_from(["x", "y"])),
    st.tuples(st.just("office"), st.sampled_from(["x", "y"])),
    st.tuples(st.just("pull"), st.sampled_from("ab")),
    st.tuples(st.just("push"), st.sampled_from("ab"), st.booleans()),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(EDITING_STEP, min_size=4, max_size=25))
@example(steps=[("edit", "a", "x"), ("office", "x"), ("pull", "a"), ("push", "a", False)])
@example(steps=[("edit", "a", "x"), ("office", "x"), ("pull", "a"), ("edit", "a", "x"),
                ("push", "a", True), ("office", "x"), ("pull", "b"), ("edit", "b", "x"),
                ("pull", "b"), ("push", "b", False)])
def test_property_devices_that_pull_while_editing_never_overwrite_an_office_edit_silently(
        app, backend, tmp_path, steps):
    backend.sql("DELETE FROM sales")
    backend.sql("INSERT INTO sales (id, total, note) VALUES ('x', 1, 'start-x'), ('y', 1, 'start-y')")
    run = uuid.uuid4().hex[:8]
    # the hook takes the server's row (device a) or leaves a dead letter (device b): never "mine"
    devices = {name: InProcessClient(str(tmp_path / ("%s-%s.db" % (name, run))), app, tables=["sales"],
                                     device_id=name, on_conflict=(lambda op, row: "server")
                                     if name == "a" else None)
               for name in "ab"}
    for device in devices.values():
        assert device.sync()
    counter = itertools.count()

    def server_notes():
        return {row[0]: row[3] for row in backend.rows("sales")}

    def based_on(value):
        return value.split("<-", 1)[1] if "<-" in value else None

    def push(name, lose):
        before = server_notes()
        device = devices[name]
        sent = {}
        for _, operation in device._batch(device.batch_size)[2]:
            sent.setdefault(operation["data"]["id"], set()).add(operation["data"]["note"])
        device.lose_next = lose
        device._push(cloudsync_client.SyncResult())
        if lose:                        # the device sends the same batch again, as its next sync does
            device._push(cloudsync_client.SyncResult())
        for key, value in server_notes().items():
            if value != before[key] and not value.startswith("office"):
                # walk back through this push's own values to what the first of them replaced
                while based_on(value) in sent.get(key, ()):
                    value = based_on(value)
                assert based_on(value) == before[key], (key, value, before[key])

    for step in steps:
        if step[0] == "edit":
            device = devices[step[1]]
            shown = device.get("sales", step[2])["note"]        # what its user saw
            device.update("sales", step[2], {"note": "%s%d<-%s" % (step[1], next(counter), shown)})
        elif step[0] == "office":
            backend.sql("UPDATE sales SET note = ? WHERE id = ?", ("office%d" % next(counter), step[1]))
        elif step[0] == "pull":
            devices[step[1]]._pull(cloudsync_client.SyncResult())
        else:
            push(step[1], step[2])
    for _ in range(2):
        for name in "ab":
            push(name, False)
            devices[name].sync()
    server = server_notes()
    for device in devices.values():
        assert device.pending() == 0
        assert {row["id"]: row["note"] for row in device.rows("sales")} == server
        device.close()


def test_a_refused_operation_can_be_fixed_and_resent(server, device):
    till = device("till-a")
    till.insert("sales", {"id": "s1", "total": "not-a-number"})
    result = till.sync()
    assert not result and [entry["error"] for entry in result.rejected] == ["Invalid value"]
    [letter] = till.dead_letters()
    assert letter["action"] == "insert" and letter["status"] == 400 and "'total'" in letter["detail"]
    till.resend(letter["id"], dict(letter["data"], total="12.50"))
    assert till.sync() and till.dead_letters() == []
    assert till.get("sales", "s1")["total"] == "12.50"
    till.insert("sales", {"id": "s2", "total": "bad"})
    assert not till.sync()
    till.discard(till.dead_letters()[0]["id"])
    assert till.dead_letters() == [] and till.get("sales", "s2") is None
    assert_equal_to_server(server, till)


@pytest.mark.parametrize("choice,note", [("server", "from a"), ("mine", "from b"), ("merged", "from a + from b")])
def test_on_conflict_decides_and_on_change_tells_the_app(server, device, choice, note):
    seen, changes = [], []

    def decide(local_op, server_row):
        seen.append((local_op["data"]["note"], server_row["note"]))
        if choice == "merged":
            return dict(server_row, note=server_row["note"] + " + " + local_op["data"]["note"])
        return choice
    till_a = device("till-a")
    till_b = device("till-b", on_conflict=decide, on_change=lambda table, upserted, deleted: changes.append(
        (table, [row["id"] for row in upserted], deleted)))
    till_a.insert("sales", {"id": "s1", "total": "1.00"})
    assert till_a.sync() and till_b.sync()
    assert changes == [("sales", ["s1"], [])]
    till_a.update("sales", "s1", {"note": "from a"})
    till_b.update("sales", "s1", {"note": "from b"})
    assert till_a.sync()
    result = till_b.sync()
    assert result and [c["key"] for c in result.conflicts] == ["s1"]     # resolved: nothing needs attention
    assert seen == [("from b", "from a")] and till_b.dead_letters() == []
    assert till_a.sync() and till_b.sync()
    assert till_a.get("sales", "s1")["note"] == till_b.get("sales", "s1")["note"] == note
    assert_equal_to_server(server, till_a, till_b)


def test_sync_runs_in_a_background_thread_while_the_app_writes(server, device):
    till = device("till-a", batch_size=7)
    errors, done = [], threading.Event()

    def background():
        try:
            while not done.is_set():
                till.sync()
        except Exception as error:              # e.g. "SQLite objects created in a thread..."
            errors.append(error)
    thread = threading.Thread(target=background)
    thread.start()
    try:
        for n in range(60):
            till.insert("sales", {"id": "s%02d" % n, "total": "%d.00" % n})
            till.rows("sales")
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert till.sync() and till.pending() == 0
    assert len(till.rows("sales")) == 60
    assert_equal_to_server(server, till)


def test_a_client_built_from_the_servers_schema_learns_a_new_column(server, tmp_path):
    till = cloudsync_client.Client(str(tmp_path / "till.db"), server.url, ["sales", "products"], "till-a")
    assert till.tables["sales"][0] == ["id", "customer_id", "total", "note", "sold_at", "store_id"]
    till.insert("sales", {"id": "s1", "total": 3.5})
    assert till.get("sales", "s1")["total"] == "3.50"        # one form before and after a sync
    assert till.sync() and till.get("sales", "s1")["total"] == "3.50"
    with sqlite3.connect(server.db) as conn:                  # the office adds a column, and fills it in
        conn.execute("ALTER TABLE sales ADD COLUMN payment TEXT")
        conn.execute("UPDATE sales SET payment = 'cash'")
        conn.execute("INSERT INTO sales (id, total, payment) VALUES ('s2', 2, 'card')")
    time.sleep(cloudsync.SCHEMA_REFRESH_SECONDS + 0.1)       # status re-reads the columns at most this often
    urllib.request.urlopen(server.url + "/sync/status").read()    # the server sees it at once (else within 10 s)
    assert till.sync()
    assert [(row["id"], row["payment"]) for row in till.rows("sales")] == [("s1", "cash"), ("s2", "card")]
    till.update("sales", "s2", {"payment": "voucher"})
    assert till.sync() and server.rows("sales")[1]["payment"] == "voucher"
    till.close()
    with cloudsync_client.Client(str(tmp_path / "till.db"), "http://127.0.0.1:%d" % _free_port(), ["sales"],
                                 "till-a") as offline:       # the schema is kept: a restart works offline
        assert "payment" in offline.tables["sales"][0] and offline.get("sales", "s2")["payment"] == "voucher"


def test_client_errors_say_what_is_wrong(server, device, caplog):
    till = device("till-a")
    with pytest.raises(ValueError, match="no column 'colour'"):
        till.insert("sales", {"id": "s1", "colour": "red"})
    with pytest.raises(ValueError, match="does not sync table 'nope'"):
        till.rows("nope")
    assert till.pending() == 0
    till.url = "http://127.0.0.1:%d" % _free_port()
    till.insert("sales", {"id": "s1", "total": "1.00"})
    result = till.sync()
    assert result.offline and "could not be reached" in result.reason
    assert "1 operation(s) kept for the next sync" in caplog.text and "None None" not in caplog.text


def test_bearer_token_is_sent_and_a_bad_one_stops_the_sync(tmp_path):
    server = LiveServer(tmp_path, TOKENS="till-a secret-a")
    try:
        good = cloudsync_client.Client(str(tmp_path / "a.db"), server.url, DEMO_TABLES, "till-a", token="secret-a")
        good.insert("sales", {"id": "s1", "total": "1.00"})
        assert good.sync() and good.pending() == 0
        bad = cloudsync_client.Client(str(tmp_path / "b.db"), server.url, DEMO_TABLES, "till-a", token="wrong")
        bad.insert("sales", {"id": "s2", "total": "2.00"})
        with pytest.raises(cloudsync_client.SyncError, match="401"):
            bad.sync()
        assert bad.pending() == 1                  # nothing dropped for an auth failure
        good.close(), bad.close()
    finally:
        server.stop()


def test_composite_keys_sync_both_ways(tmp_path):
    db = tmp_path / "server.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE stock_moves (shop TEXT, sku TEXT, qty INTEGER NOT NULL, PRIMARY KEY (shop, sku))")
    server = LiveServer(tmp_path, args=("--env-file", "", "serve"), DB_PATH=str(db), ALLOWED_TABLES="stock_moves")
    tables = {"stock_moves": (["shop", "sku", "qty"], ["shop", "sku"])}
    try:
        a = cloudsync_client.Client(str(tmp_path / "a.db"), server.url, tables, "till-a")
        b = cloudsync_client.Client(str(tmp_path / "b.db"), server.url, tables, "till-b")
        a.insert("stock_moves", {"shop": "S1", "sku": "K1", "qty": 1})
        a.insert("stock_moves", {"shop": "S1", "sku": "K2", "qty": 2})
        assert a.sync() and b.sync()
        b.delete("stock_moves", {"shop": "S1", "sku": "K1"})
        b.update("stock_moves", {"shop": "S1", "sku": "K2"}, {"qty": 5})
        assert b.sync() and a.sync()
        assert a.rows("stock_moves") == b.rows("stock_moves") == [{"shop": "S1", "sku": "K2", "qty": 5}]
        a.close(), b.close()
    finally:
        server.stop()


def test_the_reference_client_works_with_scopes_unchanged(tmp_path):
    db = tmp_path / "server.db"
    with sqlite3.connect(db) as conn:
        for statement in SCOPED_SQLITE:
            conn.execute(statement)
        conn.executemany("INSERT INTO orders (id, store_id, note) VALUES (?, ?, ?)",
                         [(1, 7, "mine"), (2, 8, "theirs"), (3, 7, "mine too")])
    server = LiveServer(tmp_path, DB_PATH=str(db), ALLOWED_TABLES="orders,catalogue", ROW_SCOPES="orders.store_id",
                        TOKENS="till7 t7 scope.store_id=7; till8 t8 scope.store_id=8")
    tables = {"orders": (["id", "store_id", "total", "note"], ["id"])}
    try:
        till7 = cloudsync_client.Client(str(tmp_path / "7.db"), server.url, tables, "till7", token="t7")
        till8 = cloudsync_client.Client(str(tmp_path / "8.db"), server.url, tables, "till8", token="t8")
        assert till7.sync() and till8.sync()
        assert [row["id"] for row in till7.rows("orders")] == [1, 3]
        assert [row["id"] for row in till8.rows("orders")] == [2]
        till7.insert("orders", {"id": 4, "store_id": 7, "note": "new"})
        till7.update("orders", 1, {"note": "edited"})
        assert till7.sync() and till7.pending() == 0
        # the office moves order 3 to store 8: it leaves till 7 and reaches till 8
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE orders SET store_id = 8 WHERE id = 3")
        # (another program's change reaches polls within WATCH_INTERVAL_SECONDS: Long polls)
        until(lambda: till7.sync() and till8.sync()
              and [(row["id"], row["note"]) for row in till7.rows("orders")] == [(1, "edited"), (4, "new")]
              and [row["id"] for row in till8.rows("orders")] == [2, 3])
        # a write outside the scope is refused, and the client keeps it rather than dropping it silently
        till8.insert("orders", {"id": 5, "store_id": 7, "note": "not ours"})
        try:
            till8.sync()
        except cloudsync_client.SyncError as error:
            assert "Out of scope" in str(error)
        assert till8.pending() + len(till8.dead_letters()) == 1
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM orders WHERE id = 5").fetchone()[0] == 0
        till7.close(), till8.close()
    finally:
        server.stop()


def test_the_reference_client_sends_increments_and_shows_its_pending_ones(tmp_path):
    db = tmp_path / "server.db"
    with sqlite3.connect(db) as conn:
        for statement in SHOP_SQLITE:
            conn.execute(statement)
        conn.execute("INSERT INTO stock (product_id, store_id, qty, sold) VALUES ('p1', 7, 5.000, 0)")
        conn.execute("INSERT INTO shoppers (id, name, phone) VALUES (1, 'Ann', '555-0100')")
    server = LiveServer(tmp_path, DB_PATH=str(db), **SHOP_SETTINGS)
    key = {"product_id": "p1", "store_id": 7}
    try:
        a = cloudsync_client.Client(str(tmp_path / "a.db"), server.url, ["stock", "shoppers", "ledger"], "till-a")
        b = cloudsync_client.Client(str(tmp_path / "b.db"), server.url, ["stock", "shoppers", "ledger"], "till-b")
        assert a.sync() and b.sync()
        a.increment("stock", key, {"qty": "-2", "sold": 2})          # both sell offline
        b.increment("stock", key, {"qty": -1.5, "sold": 1})
        assert (a.get("stock", key)["qty"], a.get("stock", key)["sold"]) == ("3.000", 2)
        b.update("shoppers", 1, {"phone": "555-0199"})                 # and edit different columns
        a.update("shoppers", 1, {"name": "Anne"})
        assert a.sync() and b.sync() and a.sync()
        for device in (a, b):
            assert (device.get("stock", key)["qty"], device.get("stock", key)["sold"]) == ("1.500", 3)
            assert (device.get("shoppers", 1)["name"], device.get("shoppers", 1)["phone"]) == ("Anne", "555-0199")
        # a conflict on the row keeps the pending increment: the server's row plus ours
        a.increment("stock", key, {"qty": 1})
        a.update("stock", key, {"label": "mine"})
        b.update("stock", key, {"label": "theirs"})
        assert b.sync()
        result = a.sync()
        assert not result and result.conflicts                       # the label conflict, kept as a dead letter
        assert a.get("stock", key)["qty"] == "2.500" and a.get("stock", key)["label"] == "theirs"
        assert [letter["action"] for letter in a.dead_letters()] == ["update"]
        # refused operations are kept, never dropped: a ledger is only inserted into
        a.insert("ledger", {"id": 1, "amount": "2.00"})
        assert a.sync()
        a.delete("ledger", 1)
        assert not a.sync() and [letter["error"] for letter in a.dead_letters()][-1] == "Insert-only table"
        a.close(), b.close()
    finally:
        server.stop()


def test_the_reference_client_stays_in_sync_with_run_forever(server, device):
    office, till = device("office"), device("till")
    assert office.sync() and till.sync()
    loop = threading.Thread(target=till.run_forever, kwargs={"wait": 2}, daemon=True)
    loop.start()
    try:
        office.insert("sales", {"id": "from-office", "total": "2.00"})
        assert office.sync()
        until(lambda: till.get("sales", "from-office") is not None)          # a long poll woke it
        till.insert("sales", {"id": "from-till", "total": "3.00"})          # pushed without a sync() call
        until(lambda: any(row["id"] == "from-till" for row in server.rows("sales")))
        until(lambda: till.pending() == 0)
    finally:
        till.stop()
        loop.join(15)
    assert not loop.is_alive()
    assert_equal_to_server(server, office.sync() and office, till)


def test_the_reference_clients_stop_ends_a_long_poll_within_a_second(server, device):
    till = device("till")
    assert till.sync()
    loop = threading.Thread(target=till.run_forever, kwargs={"wait": 20}, daemon=True)
    loop.start()
    try:
        until(lambda: till._polling is not None and till._polling.sock is not None)   # the server holds it
        time.sleep(0.2)
    finally:
        till.stop()
    loop.join(5)                    # a bound, far below the 20 s the server would have waited
    assert not loop.is_alive()


def test_the_reference_client_backs_off_while_the_server_is_away(tmp_path):
    client = cloudsync_client.Client(str(tmp_path / "c.db"), "http://127.0.0.1:%d" % _free_port(),
                                     {"sales": (["id", "total"], ["id"])}, "till")
    attempts = []
    real = client._post

    def counting(path, body, timeout=None):
        attempts.append(time.monotonic())
        return real(path, body, timeout)
    client._post = counting
    stop = threading.Event()
    loop = threading.Thread(target=client.run_forever, kwargs={"wait": 1, "stop": stop, "max_backoff": 0.4},
                            daemon=True)
    loop.start()
    until(lambda: len(attempts) >= 4)
    stop.set()
    loop.join(10)
    assert not loop.is_alive()
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
    assert all(gap > 0.1 for gap in gaps[:3]), gaps          # it waited between attempts, not a busy loop
    client.close()


def stock(product, store=1):
    """product_stock's key: a product at a store."""
    return {"product_id": product, "store_id": store}


def test_the_reference_client_keeps_missing_and_rejected_operations_and_takes_the_servers_row(tmp_path):
    db = tmp_path / "server.db"
    cloudsync._create_demo_database(str(db))
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER stock_not_negative BEFORE UPDATE ON product_stock WHEN NEW.qty < 0"
                     " BEGIN SELECT RAISE(ABORT, 'stock cannot go below 0'); END")
        conn.execute("INSERT INTO product_stock (product_id, store_id, qty) VALUES ('p1', 1, 2), ('p2', 1, 5), ('p3', 1, 1)")
        conn.execute("INSERT INTO sales (id, total) VALUES ('s1', 1)")
    server = LiveServer(tmp_path, DB_PATH=str(db), ALLOWED_TABLES="sales,product_stock")
    tables = {"product_stock": (["product_id", "store_id", "qty"], ["product_id", "store_id"]), "sales": (["id", "customer_id", "total", "note",
                                                                         "sold_at"], ["id"])}
    till = cloudsync_client.Client(str(tmp_path / "till.db"), server.url, tables, "till")
    try:
        assert till.sync()
        with sqlite3.connect(db) as conn:           # the office deletes a product the till still holds
            conn.execute("DELETE FROM product_stock WHERE product_id = 'p3'")
        till.increment("product_stock", stock("p3"), {"qty": 1})     # an increment never conflicts: missing
        till.increment("product_stock", stock("p1"), {"qty": -5})    # refused by the shop's rule
        till.increment("product_stock", stock("p2"), {"qty": -1})
        result = till.sync()
        assert not result                           # the user should know
        letters = sorted((letter["data"]["product_id"], letter["error"]) for letter in till.dead_letters())
        assert letters == [("p1", "Rejected"), ("p3", "Missing")]
        assert till.get("product_stock", stock("p1"))["qty"] == 2        # the server's row, taken back
        assert till.get("product_stock", stock("p2"))["qty"] == 4
        until(lambda: till.sync() is not None and till.get("product_stock", stock("p3")) is None)
        assert till.pending() == 0
    finally:
        till.close()
        server.stop()


# ---------------------------------------------------------------------------
# The JavaScript client and the web till: Node's test runner, headless Chromium
# ---------------------------------------------------------------------------
# cloudsync_client.mjs is tested by js/*.test.mjs, run with `node --test` against a live server
# started here on each backend, and the web till of `cloudsync.py demo` in Chromium driven by
# playwright-core (package.json). .ci/run installs Node, Chromium and playwright-core; without
# them these tests skip saying what is missing, and fail instead when CI is set.

CHROMIUM = os.environ.get("CLOUDSYNC_CHROMIUM", "/usr/bin/chromium")


def _node():
    """The path of Node.js 18 or newer."""
    node = shutil.which("node")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout if node else ""
    found = re.match(r"v(\d+)\.", version)
    _require(found and int(found.group(1)) >= 18, "Node.js 18 or newer is not installed (%s)"
             % (version.strip() or "no node on PATH"))
    return node


def _node_test(node, name, env):
    """Run js/<name>.test.mjs with Node's test runner; its report is the failure's message."""
    done = subprocess.run([node, "--test", os.path.join(HERE, "js", name + ".test.mjs")], cwd=HERE, env=dict(
        env, CLOUDSYNC_PYTHON=sys.executable, CLOUDSYNC_DIR=HERE), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                                           if not line.lstrip().startswith(("duration_ms", "...", "---")))


@pytest.mark.parametrize("name", ["client", "reset", "random"])
def test_the_javascript_client(backend, tmp_path, name):
    """js/client.test.mjs: the Python client's scenarios; js/reset.test.mjs: a compacted log and a
    column added on the server; js/random.test.mjs: a seeded random loop of tills and the office."""
    node = _node()
    server = LiveServer(tmp_path, args=("--env-file", "", "serve"), **dict(
        backend.settings, ALLOWED_TABLES=",".join(cloudsync.EXAMPLE_TABLES), TOKENS_FILE="", LOG_LEVEL="WARNING"))
    try:
        _node_test(node, name, dict(server.env, CLOUDSYNC_URL=server.url))
    finally:
        server.stop()


def test_the_web_till_sells_offline_and_syncs_in_a_browser(tmp_path):
    """js/web-till.test.mjs against `cloudsync.py demo`; the till's screenshot is kept as
    artifacts/web-till.png (docs/web-till.png is a copy)."""
    node = _node()
    _require(os.path.exists(CHROMIUM), "Chromium is not installed at %s (apt-get install chromium)" % CHROMIUM)
    _require(os.path.isdir(os.path.join(HERE, "node_modules", "playwright-core")),
             "playwright-core is not installed (npm ci)")
    server = LiveServer(tmp_path, args=("demo",))
    artifacts = os.path.join(HERE, "artifacts")
    os.makedirs(artifacts, exist_ok=True)
    try:
        _node_test(node, "web-till", dict(server.env, CLOUDSYNC_URL=server.url, CLOUDSYNC_CHROMIUM=CHROMIUM,
                                          DB_PATH=str(tmp_path / "cloudsync-demo.db"),
                                          CLOUDSYNC_SCREENSHOT=os.path.join(artifacts, "web-till.png")))
    finally:
        server.stop()
    assert open(os.path.join(artifacts, "web-till.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# Reliability: faults and load against live servers (a private MariaDB)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_mariadb(tmp_path_factory):
    """A MariaDB of the tests' own, which they may stop, kill and restart."""
    if not reliability_cloudsync.mariadb_available():
        if REQUIRE_MYSQL:
            pytest.fail("mariadbd is not installed and CLOUDSYNC_REQUIRE_MYSQL=1")
        pytest.skip("mariadbd and mariadb-install-db are needed for the fault tests")
    root = str(tmp_path_factory.mktemp("mariadb"))
    db = reliability_cloudsync.PrivateMariaDB(root)
    db.start()
    yield db
    db.close()


def test_database_restart_while_devices_sync(private_mariadb, tmp_path):
    figures = reliability_cloudsync.scenario_restart(private_mariadb, str(tmp_path), devices=6)
    assert figures["device failures"] == 0
    assert figures["lost writes"] == 0 and figures["doubled writes"] == 0
    assert figures["acknowledged writes"] > 0
    assert figures["recovered without restart"] is True
    assert figures["slowest answer during outage (s)"] < 5


def test_sigkill_in_the_middle_of_a_push(private_mariadb, tmp_path):
    figures = reliability_cloudsync.scenario_crash(private_mariadb, str(tmp_path), operations=5000)
    assert figures["batch all-or-nothing"] is True and figures["rows right after the crash"] == 0
    assert figures["rows after retry"] == 5000 and figures["retry applied once"] is True
    assert figures["doubled writes"] == 0


def test_fifty_devices_through_two_instances(private_mariadb, tmp_path):
    figures = reliability_cloudsync.scenario_load(private_mariadb, str(tmp_path), devices=50, rounds=4)
    assert figures["device failures"] == 0 and figures["devices equal to server"] == 50
    assert figures["lost writes"] == 0 and figures["doubled writes"] == 0
    assert figures["change log gaps"] == 0
    assert figures["replays"] > 0


def test_bad_inputs_over_http(private_mariadb, tmp_path):
    figures = reliability_cloudsync.scenario_bad_inputs(private_mariadb, str(tmp_path), count=200)
    assert figures["5xx answers"] == 0 and figures["database changed"] is False


# The faults of issue 21, in the small forms reliability_cloudsync.QUICK gives. Each scenario
# runs once (fault_figures). One test per fault asserts that no acknowledged write is lost or
# doubled; the others, the bounds the server keeps during it: a 503 within the database wait,
# /health within a second, another address served during a flood, memory under its ceiling and
# back near its baseline after large pulls.

MEMORY_CEILING_MIB = 300                   # issue 21's aim for resident memory with default settings


@pytest.fixture(scope="module")
def fault_figures(private_mariadb, tmp_path_factory):
    """The figures of a fault scenario's quick form, by name; each scenario runs once per module."""
    done = {}

    def run(name):
        if name not in done:
            _, scenario = reliability_cloudsync.FAULTS[name]
            done[name] = scenario(private_mariadb, str(tmp_path_factory.mktemp(name)),
                                  **reliability_cloudsync.QUICK[name])
        return done[name]
    return run


def _no_write_lost_or_doubled(figures):
    assert figures["device failures"] == 0, figures
    assert figures["acknowledged writes"] > 0, figures
    assert figures["lost writes"] == 0 and figures["doubled writes"] == 0, figures
    assert figures.get("other 5xx answers", 0) == 0, figures


def test_frozen_database_loses_and_doubles_no_write(fault_figures):
    figures = fault_figures("frozen-db")
    _no_write_lost_or_doubled(figures)
    assert figures["recovered without restart"] is True


def test_frozen_database_gets_503_within_the_database_wait(fault_figures):
    figures = fault_figures("frozen-db")
    # the database stays frozen 10 s; DB_WAIT_SECONDS is 2, and 5 s more is a generous margin
    assert figures["slowest answer during the fault (s)"] <= figures["database wait (s)"] + 5, figures


def test_health_answers_within_a_second_while_the_database_is_frozen(fault_figures):
    figures = fault_figures("frozen-db")
    assert figures["/health failed"] == 0 and figures["/health p95 (s)"] <= 1, figures


def test_killed_database_loses_and_doubles_no_write(fault_figures):
    figures = fault_figures("killed-db")
    _no_write_lost_or_doubled(figures)
    assert figures["recovered without restart"] is True
    # a dead database answers at once (reset, refused): so does the server, with 503
    assert figures["slowest answer during the fault (s)"] < 5, figures
    assert figures["/health failed"] == 0 and figures["/health p95 (s)"] <= 1, figures


def test_killed_cloudsync_loses_and_doubles_no_write(fault_figures):
    figures = fault_figures("killed-cloudsync")
    _no_write_lost_or_doubled(figures)
    assert figures["/health failed"] == 0, figures


def test_connection_flood_loses_and_doubles_no_write(fault_figures):
    figures = fault_figures("flood")
    _no_write_lost_or_doubled(figures)
    assert figures["pushes during the fault"] > 0, figures


def test_another_address_is_answered_within_a_second_during_a_connection_flood(fault_figures):
    figures = fault_figures("flood")
    assert figures["/health failed"] == 0 and figures["/health p95 (s)"] <= 1, figures
    assert figures["pushes within 1 s"] >= 0.9 * figures["pushes during the fault"], figures


def test_large_row_pulls_give_every_device_every_row_once(fault_figures):
    figures = fault_figures("large-rows")
    _no_write_lost_or_doubled(figures)
    assert figures["killed at the memory cap"] is False, figures
    assert figures["pull failures"] == 0 and figures["pullers that got every row once"] == 3, figures
    assert figures["/health failed"] == 0, figures


def test_large_row_pulls_stay_under_the_memory_ceiling(fault_figures):
    figures = fault_figures("large-rows")
    assert figures["peak RSS (MiB)"] < MEMORY_CEILING_MIB, figures


def test_sixteen_maximum_pushes_and_large_pulls_at_once_stay_under_the_memory_ceiling(fault_figures):
    figures = fault_figures("memory")
    _no_write_lost_or_doubled(figures)
    assert figures["killed at the memory cap"] is False and figures["pull failures"] == 0, figures
    assert figures["pullers that got every row once"] == 16, figures
    assert figures["peak RSS (MiB)"] < MEMORY_CEILING_MIB, figures
    # 2 s after, within 100 MiB of the server's memory before the first push
    assert figures["settled RSS (MiB)"] < figures["baseline RSS (MiB)"] + 100, figures
    assert figures["/health failed"] == 0, figures


def test_memory_returns_near_its_baseline_after_large_pulls(fault_figures):
    figures = fault_figures("large-rows")
    # 2 s after the pulls, within 100 MiB of the server's memory before the first push
    assert figures["settled RSS (MiB)"] < figures["baseline RSS (MiB)"] + 100, figures


# ---------------------------------------------------------------------------
# Benchmarks: smoke runs so that the scripts cannot rot (figures are not checked)
# ---------------------------------------------------------------------------


def test_benchmark_smoke_run(mysql_server):
    out = _bench("--smoke", "--load", "python")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [cell.strip() for cell in rows[0]][:4] == ["scenario", "cloudsync", "original", "ratio"]
    scenarios = {cells[0].strip(): cells[1].strip() for cells in rows[2:]}
    for name in ("push, 1 insert per batch (req/s)", "push, 50 inserts per batch (rows/s)",
                 "pull of 1,000 unchanged rows (req/s)", "pull of 1,000 changing rows (req/s)",
                 "resident memory, 64 connections mixed (MiB)"):
        assert float(scenarios[name]) > 0, (name, out)


def _bench(*arguments):
    """bench_cloudsync.py run with `arguments` against the test MySQL server: its output (exit 0)."""
    env = dict(os.environ, CLOUDSYNC_BENCH_DB_HOST=MYSQL["host"], CLOUDSYNC_BENCH_DB_PORT=str(MYSQL["port"]),
               CLOUDSYNC_BENCH_DB_USER=MYSQL["user"], CLOUDSYNC_BENCH_DB_PASS=MYSQL["password"])
    result = subprocess.run([sys.executable, os.path.join(HERE, "bench_cloudsync.py")] + list(arguments),
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_scope_benchmark_smoke_run(mysql_server):
    out = _bench("--scopes", "--smoke")
    assert re.search(r"\| scoped pull, 10 own \+ 1,000 other stores' changes \(median ms\) \| [0-9.]+ \|", out), out


def test_fleet_benchmark_smoke_run(mysql_server):
    out = _bench("--fleet", "--smoke")
    assert re.search(r"\| 5 devices long-polling, 5 sales/s: propagation p95 \(ms; p50 \d+, p99 \d+\) \| [0-9.]+ \|",
                     out), out
    assert re.search(r"errors \(failed requests, and sales some device never got\) \| 0\.0 \|", out), out


def test_chain_benchmark_smoke_run(mysql_server):
    out = _bench("--chain", "--smoke")
    assert re.search(r"\| chain: 4 stores x 2 tills long-polling, 5 sales/s: propagation to the store p95 "
                     r"\(ms; p50 \d+, p99 \d+\) \| [0-9.]+ \|", out), out
    assert re.search(r"errors \(failed requests, and sales or changes some device never got\) \| 0\.0 \|", out), out


def test_against_benchmark_smoke_run(mysql_server):
    out = _bench("--against", os.path.join(HERE, "cloudsync.py"), "--smoke", "--load", "python")
    assert re.search(r"\| status \(req/s\), this / \S+ \(medians of 1; median of the rounds. ratios [0-9.]+x\) \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|", out), out


def test_paths_benchmark_smoke_run(mysql_server):
    out = _bench("--paths", "--smoke")
    for scenario in ("push, 1 insert per batch: statements through cmd_query", "push, 50 inserts per batch: a "
                     "one-statement push in autocommit", "seed pull of 1,000 rows: a seed page's JSON built by MySQL"):
        assert re.search(r"\| %s[^|]* \| [0-9.]+ \| [0-9.]+ \| [0-9.]+x \|" % re.escape(scenario), out), out


# ---------------------------------------------------------------------------
# Galera: a cluster of three MariaDB nodes
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def galera_cluster():
    """A 3-node MariaDB Galera cluster on loopback, shared by the module's tests (about 10 s to start)."""
    missing = reliability_cloudsync.galera_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail("a Galera cluster needs %s, and CI is set" % missing)
        pytest.skip("a Galera cluster needs %s (apt-get install galera-4 rsync)" % missing)
    cluster = reliability_cloudsync.GaleraCluster()
    yield cluster
    cluster.close()


def test_a_galera_cluster_replicates_and_cloudsync_migrates_and_checks_against_its_nodes(galera_cluster):
    database = galera_cluster.create_database("galera_%d" % random.randrange(10 ** 6))
    first, third = galera_cluster.nodes[0], galera_cluster.nodes[2]
    first.sql("INSERT INTO sales (id, total) VALUES ('written-on-1', 2.50)", database)
    # a read waits until this node has applied every commit the cluster made before it
    assert third.sql("SET STATEMENT wsrep_sync_wait = 1 FOR SELECT CAST(total AS CHAR) FROM sales"
                     " WHERE id = 'written-on-1'", database) == [("2.50",)]
    env = {"DB_HOST": "127.0.0.1", "DB_USER": "root", "DB_PASS": "", "DB_NAME": database,
           "ALLOWED_TABLES": "sales,products", "TOKENS_FILE": ""}
    code, out, err = _cli(["--env-file", "", "migrate"], dict(env, DB_PORT=str(first.port)))
    assert code == 0, out + err
    # the triggers migrate installed through node 1 are there on node 3
    code, out, err = _cli(["--env-file", "", "check"], dict(env, DB_PORT=str(third.port)))
    assert code == 0 and "PROBLEM" not in out, out + err

def test_one_instance_per_galera_node_with_devices_moving_between_them_keeps_every_write(galera_cluster,
                                                                                         tmp_path):
    """Multi-writer: each node has its instance, each device picks one at random per request."""
    database = galera_cluster.create_database("instances_%d" % random.randrange(10 ** 6))
    figures = reliability_cloudsync.scenario_instances(galera_cluster.nodes, database, str(tmp_path), 8, 10)
    assert [name for name in figures if name.startswith(("push 5", "pull 5"))] == [], figures
    assert figures["device failures"] == 0 and figures["devices equal to the database"] == 8, figures
    assert (figures["lost writes"], figures["doubled writes"], figures["change log gaps"]) == (0, 0, 0)


def test_a_galera_node_behind_makes_pulls_and_pushes_wait_and_never_resets_them(galera_cluster, tmp_path):
    """Node 3 stops applying for 4 s; a checkpoint numbered through node 1 is used on node 3."""
    figures = reliability_cloudsync.scenario_lagging_node(galera_cluster, str(tmp_path))
    assert figures["pull through node 3 while behind"].startswith("200 in"), figures
    assert figures["push through node 3 while behind"].startswith("200 in"), figures
    assert figures["pull through node 3 once caught up"] == "200"


def test_serve_on_a_read_only_galera_node_is_one_line_naming_the_fix_and_exit_2(galera_cluster, tmp_path):
    figures = reliability_cloudsync.scenario_read_only_node(galera_cluster, str(tmp_path))
    assert figures["migrate through node 1 (exit code)"] == 0
    assert figures["serve on read-only node 3 (exit code)"] == cloudsync.EXIT_CONFIGURATION, figures
    assert not figures["traceback"] and "read-only" in figures["its last words"]
    assert "point DB_HOST at a writable server" in figures["its last words"]


def test_db_host_listing_two_nodes_moves_to_the_second_when_the_first_is_killed(galera_cluster, tmp_path):
    """Devices push and pull through one instance while its node dies: 503s, then node 2; node 1
    is started again at the end."""
    figures = reliability_cloudsync.scenario_failover(galera_cluster, str(tmp_path))
    assert set(figures["answers"]) <= {"200", "503"}, figures["answers"]
    assert figures["checkpoint from before the kill"] == "200"
    assert figures["device failures"] == 0 and figures["devices equal to the database"] == figures["devices"]
    assert (figures["lost writes"], figures["doubled writes"], figures["change log gaps"]) == (0, 0, 0)
    assert figures["acknowledged"] > 0
