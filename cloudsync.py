#!/usr/bin/env python3
"""cloudsync: a small, auditable sync server for offline-first devices.

Devices (tills, scanners, field apps) push batches of row operations and pull
rows back, over HTTP/JSON, against one MySQL/MariaDB or SQLite database.

What this service guarantees:
- Only tables named in ALLOWED_TABLES, and only columns that exist in them
  (read from the database schema), ever reach SQL; every value is bound.
- A push is applied in one database transaction: all of it or none of it.
- Requests of the original Node.js service keep working unchanged: same
  paths, same request fields, same response fields (fields are only added).
- An error is always a JSON body with ``success: false``, an ``error`` and,
  where it helps, a ``detail``; never SQL, a traceback or a password.

The module reads top to bottom in sections: constants, errors, .env parser,
configuration, identifiers and values, database layer, sync engine, HTTP
application, command line.
"""

import argparse
import base64
import binascii
import datetime
import decimal
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager

__all__ = [
    "App", "Config", "ConfigError", "HTTPError", "SchemaError", "DatabaseUnavailable",
    "parse_dotenv", "load_config", "open_database", "make_app", "main",
]

__version__ = "0.1.0"

log = logging.getLogger("cloudsync")

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULT_PULL_LIMIT_ROWS = 1000      # the seed's default page size
MAX_PULL_LIMIT_ROWS = 5000          # the seed's cap on `limit`
READ_CHUNK_BYTES = 64 * 1024        # request bodies are read in pieces this size
EXAMPLE_TABLES = ("sales", "products", "customers", "item_sales", "product_stock")
HERE = os.path.dirname(os.path.abspath(__file__))

HTTP_REASONS = {
    200: "OK", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
    410: "Gone", 413: "Payload Too Large", 415: "Unsupported Media Type",
    500: "Internal Server Error", 503: "Service Unavailable",
}

# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class HTTPError(Exception):
    """An error that is also the JSON response sent for it."""

    def __init__(self, code, error, detail=None, headers=(), **fields):
        super().__init__(error)
        self.status = code
        self.headers = list(headers)
        self.body = {"success": False, "error": error}
        if detail is not None:
            self.body["detail"] = detail
        self.body.update(fields)


class ConfigError(Exception):
    """A configuration problem, told at start-up in one sentence."""


class SchemaError(Exception):
    """An allowed table that cannot be synced (missing, no primary key...)."""


class DatabaseUnavailable(Exception):
    """The database cannot be reached (refused, timed out, restarting)."""


class DataRejected(Exception):
    """The database refused the pushed values (duplicate key, NOT NULL...)."""

    def __init__(self, message, duplicate=False):
        super().__init__(message)
        self.duplicate = duplicate


# ---------------------------------------------------------------------------
# .env parser
# ---------------------------------------------------------------------------

_DOTENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_DOTENV_EXPAND = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DOUBLE_QUOTE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$", "'": "'"}


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
                problems.append((number, "unterminated %s quote" % ("double" if quote == '"' else "single")))
                continue
            trailing = rest.strip()
            if trailing and not trailing.startswith("#"):
                problems.append((number, "unexpected text after the closing quote"))
                continue
            value = "".join(chars)
            if quote == '"':
                value = _expand(value, values, environ)
        else:
            comment = re.search(r"\s#", rest)
            value = (rest[:comment.start()] if comment else rest).strip()
            if value.startswith("#"):
                value = ""
            value = _expand(value, values, environ)
        values[key] = value
    return values, problems


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _as_bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _as_port(text):
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError("expected a port number from 1 to 65535")
    return port


def _as_positive_int(text):
    number = int(text)
    if number < 1:
        raise ValueError("expected a whole number of at least 1")
    return number


def _as_positive_float(text):
    number = float(text)
    if not number > 0:
        raise ValueError("expected a number greater than 0")
    return number


def _as_table_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise ValueError("a table is named twice")
    return tuple(names)


def _as_log_level(text):
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return level


# (name, caster, default, one-line description): the single source for
# parsing, sample.env and README. Seed names (DB_HOST, DB_USER, DB_PASS,
# DB_NAME, ALLOWED_TABLES, PORT) keep their meaning.
SETTINGS = (
    ("HOST", str, "127.0.0.1", "address to listen on; 0.0.0.0 for every interface"),
    ("PORT", _as_port, "4000", "TCP port to listen on"),
    ("DB_HOST", str, "", "MySQL/MariaDB host; leave empty to use the embedded SQLite database"),
    ("DB_PORT", _as_port, "3306", "MySQL/MariaDB port"),
    ("DB_USER", str, "", "MySQL/MariaDB user"),
    ("DB_PASS", str, "", "MySQL/MariaDB password"),
    ("DB_NAME", str, "", "MySQL/MariaDB database (schema) name"),
    ("DB_PATH", str, "cloudsync.db", "SQLite database file, used when DB_HOST is empty"),
    ("ALLOWED_TABLES", _as_table_list, "", "comma-separated tables devices may sync"),
    ("MAX_BODY_BYTES", _as_positive_int, "10485760", "largest request body accepted, in bytes"),
    ("THREADS", _as_positive_int, "8", "request worker threads"),
    ("DB_POOL_SIZE", _as_positive_int, "8", "most database connections held open at once"),
    ("DB_CONNECT_TIMEOUT_SECONDS", _as_positive_float, "5", "give up connecting to the database after this long"),
    ("DB_WAIT_SECONDS", _as_positive_float, "10", "longest wait for a free database connection or a lock"),
    ("LOG_LEVEL", _as_log_level, "INFO", "DEBUG, INFO, WARNING or ERROR"),
)
SETTING_NAMES = tuple(name for name, _, _, _ in SETTINGS)
SECRET_SETTINGS = ("DB_PASS",)


class Config:
    """Validated settings; attribute names are the setting names in lower case."""

    def __init__(self, values):
        for name, _, _, _ in SETTINGS:
            setattr(self, name.lower(), values[name])

    @property
    def backend(self):
        """'mysql' when DB_HOST is set, else 'sqlite'."""
        return "mysql" if self.db_host else "sqlite"

    def describe(self):
        """Effective settings as text, secrets masked."""
        parts = []
        for name in SETTING_NAMES:
            value = getattr(self, name.lower())
            if name in SECRET_SETTINGS and value:
                value = "***"
            elif isinstance(value, tuple):
                value = ",".join(value)
            parts.append("%s=%s" % (name, value))
        return " ".join(parts)


def load_config(env_file=".env", environ=None, overrides=None):
    """Build a Config from defaults, the .env file and the environment (which wins)."""
    environ = os.environ if environ is None else environ
    file_values = {}
    if env_file and os.path.exists(env_file):
        with open(env_file, encoding="utf-8", newline="") as handle:
            file_values, problems = parse_dotenv(handle.read(), environ)
        for number, message in problems:
            log.warning("%s line %d skipped: %s", env_file, number, message)
        unknown = sorted(set(file_values) - set(SETTING_NAMES))
        if unknown:
            raise ConfigError("%s sets unknown setting %s; the settings are listed in sample.env."
                              % (env_file, ", ".join(unknown)))
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
            raise ConfigError("%s=%r is not valid: %s." % (name, raw, error)) from None
    config = Config(values)
    if config.backend == "mysql":
        missing = [name for name in ("DB_USER", "DB_NAME") if not values[name]]
        if missing:
            raise ConfigError("DB_HOST is set, so %s must be set too." % " and ".join(missing))
    return config


# ---------------------------------------------------------------------------
# Identifiers and values
# ---------------------------------------------------------------------------
# Identifiers reach SQL only through Column/TableSchema objects built from the
# database's own catalogue, quoted by doubling the quote character.


def quote_mysql(name):
    """Quote a MySQL identifier: `name` with backticks doubled."""
    return "`" + name.replace("`", "``") + "`"


def quote_sqlite(name):
    """Quote a SQLite identifier: "name" with double quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


class Column:
    """One column of an allowed table, as the database describes it."""

    __slots__ = ("name", "quoted", "kind", "scale")

    def __init__(self, name, quoted, kind, scale=None):
        self.name = name
        self.quoted = quoted
        self.kind = kind        # 'decimal', 'binary', 'date', 'datetime', 'time' or 'other'
        self.scale = scale      # digits after the point, for decimal columns


class TableSchema:
    """An allowed table: its quoted name, columns in order, and primary key."""

    def __init__(self, name, quoted, columns, primary_key):
        self.name = name
        self.quoted = quoted
        self.columns = {column.name: column for column in columns}
        self.column_names = [column.name for column in columns]
        self.primary_key = list(primary_key)
        self.select_list = ", ".join(column.quoted for column in columns)
        self.key_order = ", ".join(self.columns[name].quoted for name in primary_key)

    def describe(self):
        """The table as the status endpoint shows it."""
        return {"primary_key": self.primary_key, "columns": self.column_names}


def _json_default(value):
    """Encode the database's non-JSON types: exact decimals, ISO dates, base64 bytes."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):        # MySQL TIME columns
        seconds = int(value.total_seconds())
        sign = "-" if seconds < 0 else ""
        seconds = abs(seconds)
        return "%s%02d:%02d:%02d" % (sign, seconds // 3600, seconds // 60 % 60, seconds % 60)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set):                        # MySQL SET columns
        return ",".join(sorted(value))
    raise TypeError("cannot encode %s as JSON" % type(value).__name__)


def to_json_bytes(payload):
    """Encode a response payload as compact UTF-8 JSON."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                      default=_json_default).encode("utf-8")


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def parse_json(body):
    """Decode a request body; numbers with a fraction become exact Decimals."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HTTPError(400, "Invalid JSON", "the body is not valid UTF-8 (byte %d)" % error.start) from None
    if not text.strip():
        return {}
    try:
        return json.loads(text, parse_float=decimal.Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise HTTPError(400, "Invalid JSON", "%s at line %d column %d" % (error.msg, error.lineno, error.colno)) from None
    except (ValueError, RecursionError) as error:
        raise HTTPError(400, "Invalid JSON", str(error) if isinstance(error, ValueError)
                        else "the body is nested too deeply") from None


def bind_value(column, value, where):
    """Turn a pushed JSON value into a value to bind for `column`, or raise 400."""
    if value is None or isinstance(value, (str, int, decimal.Decimal)):
        if isinstance(value, bool):
            return int(value)
        if column.kind == "binary" and isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPError(400, "Invalid value", "%s: column %r holds binary data, "
                                "send it as base64" % (where, column.name)) from None
        return value
    raise HTTPError(400, "Invalid value", "%s: column %r must be a string, number, "
                    "boolean or null, not %s" % (where, column.name, _json_type(value)))


def _json_type(value):
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


# ---------------------------------------------------------------------------
# Database layer
# ---------------------------------------------------------------------------
# Two backends with one small interface: connection(), transaction(conn),
# execute/executemany/query helpers, introspect(table) and ping(). SQL text is
# written once with `?` placeholders; the MySQL backend rewrites them to `%s`.


class _Pool:
    """A bounded set of reusable connections; a broken one is dropped, not reused."""

    def __init__(self, connect, size, wait_seconds):
        self._connect = connect
        self._idle = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._wait_seconds = wait_seconds
        self.in_use = 0

    @contextmanager
    def connection(self):
        """Lend a connection for the duration of a with-block."""
        if not self._slots.acquire(timeout=self._wait_seconds):
            raise DatabaseUnavailable("no free database connection within %.0f s" % self._wait_seconds)
        conn = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
                self.in_use += 1
            if conn is None:
                conn = self._connect()
            yield conn
        except BaseException:
            if conn is not None:
                self._discard(conn)
                conn = None
            raise
        finally:
            with self._lock:
                self.in_use -= 1
                if conn is not None:
                    self._idle.append(conn)
            self._slots.release()

    def _discard(self, conn):
        try:
            conn.close()
        except Exception:       # a dead connection may fail to close; it is gone either way
            pass

    def close(self):
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)


class Database:
    """What both backends share: the pool, transactions and SQL helpers."""

    name = "?"
    placeholder = "?"

    def __init__(self, config):
        self.config = config
        self.pool = _Pool(self._connect, config.db_pool_size, config.db_wait_seconds)

    def connection(self):
        """A pooled connection, as a context manager."""
        return self.pool.connection()

    def sql(self, text):
        """Return SQL text with this backend's placeholder style."""
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

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


class SQLiteDatabase(Database):
    """SQLite through the standard library: one writer at a time, WAL journal."""

    name = "sqlite"
    placeholder = "?"
    quote = staticmethod(quote_sqlite)

    def __init__(self, config):
        super().__init__(config)
        sqlite3.register_adapter(decimal.Decimal, str)   # exact decimals go in as text

    def _connect(self):
        try:
            conn = sqlite3.connect(self.config.db_path, timeout=self.config.db_wait_seconds,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise DatabaseUnavailable("cannot open %s: %s" % (self.config.db_path, error)) from None
        conn.execute("PRAGMA journal_mode=WAL")     # readers never block the writer
        conn.execute("PRAGMA synchronous=FULL")     # an acknowledged push survives a power cut
        conn.execute("PRAGMA foreign_keys=ON")      # as InnoDB enforces them on MySQL
        return conn

    def _begin(self, conn):
        conn.execute("BEGIN IMMEDIATE")              # take the write lock now, not at the first write

    def _commit(self, conn):
        conn.execute("COMMIT")

    def _rollback(self, conn):
        conn.execute("ROLLBACK")

    @contextmanager
    def _errors(self):
        try:
            yield
        except sqlite3.IntegrityError as error:
            raise DataRejected(_sqlite_message(error), duplicate="UNIQUE" in str(error)) from None
        except sqlite3.OperationalError as error:
            text = str(error)
            if "locked" in text or "busy" in text or "unable to open" in text or "disk I/O" in text:
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
        return "SQLite " + sqlite3.sqlite_version

    def driver(self):
        """The driver in use, as status and the start-up log show it."""
        return "sqlite3 (Python %s)" % sys.version.split()[0]

    def introspect(self, conn, table):
        """Read one table's columns and primary key from the catalogue."""
        rows = self.query(conn, "SELECT name, type, pk FROM pragma_table_info(?)", (table,))
        if not rows:
            raise SchemaError("table %r does not exist in %s" % (table, self.config.db_path))
        columns, keyed = [], []
        for name, declared, key_position in rows:
            kind, scale = _sqlite_kind(declared)
            columns.append(Column(name, quote_sqlite(name), kind, scale))
            if key_position:
                keyed.append((key_position, name))
        if not keyed:
            raise SchemaError("table %r has no primary key; cloudsync needs one to find rows" % table)
        schema = TableSchema(table, quote_sqlite(table), columns, [name for _, name in sorted(keyed)])
        schema.decoders = [(position, _SQLITE_DECODERS[column.kind], column.scale)
                           for position, column in enumerate(columns) if column.kind in _SQLITE_DECODERS]
        return schema

    def decode_rows(self, schema, rows):
        """SQLite stores decimals as floats and dates as text: present them as MySQL would."""
        if not schema.decoders:
            return rows
        decoded = []
        for row in rows:
            row = list(row)
            for position, decoder, scale in schema.decoders:
                if row[position] is not None:
                    row[position] = decoder(row[position], scale)
            decoded.append(row)
        return decoded


def _sqlite_decimal(value, scale):
    """A SQLite number in a DECIMAL(p,s) column, as the exact decimal MySQL would show."""
    if isinstance(value, (int, float)):
        exact = decimal.Decimal(repr(value)) if isinstance(value, float) else decimal.Decimal(value)
        return exact.quantize(decimal.Decimal(1).scaleb(-scale)) if scale else exact
    return value


def _sqlite_datetime(value, scale):
    """'2024-05-01 10:00:00' stored as text, shown as ISO 8601 '2024-05-01T10:00:00'."""
    if isinstance(value, str) and len(value) > 10 and value[10] == " ":
        return value[:10] + "T" + value[11:]
    return value


_SQLITE_DECODERS = {"decimal": _sqlite_decimal, "datetime": _sqlite_datetime}


def _sqlite_message(error):
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


def _sqlite_kind(declared):
    """Map a declared SQLite column type to a value kind and decimal scale."""
    upper = (declared or "").upper()
    match = re.match(r"\s*(DECIMAL|NUMERIC)\s*(?:\(\s*\d+\s*(?:,\s*(\d+)\s*)?\))?", upper)
    if match:
        return "decimal", int(match.group(2) or 0)
    if "BLOB" in upper or "BINARY" in upper:
        return "binary", None
    if upper.startswith("DATETIME") or upper.startswith("TIMESTAMP"):
        return "datetime", None
    if upper.startswith("DATE"):
        return "date", None
    if upper.startswith("TIME"):
        return "time", None
    return "other", None


class MySQLDatabase(Database):
    """MySQL/MariaDB through mysql-connector-python (C extension when it loads)."""

    name = "mysql"
    placeholder = "%s"
    quote = staticmethod(quote_mysql)

    def __init__(self, config):
        super().__init__(config)
        import mysql.connector
        from mysql.connector import errorcode
        self._driver = mysql.connector
        self._codes = errorcode

    def _connect(self):
        connector = self._driver
        try:
            conn = connector.connect(
                host=self.config.db_host, port=self.config.db_port, user=self.config.db_user,
                password=self.config.db_pass, database=self.config.db_name,
                charset="utf8mb4", collation="utf8mb4_unicode_ci", autocommit=True,
                use_pure=False, connection_timeout=int(self.config.db_connect_timeout_seconds) or 1,
                # rowcount of UPDATE counts matched rows, not only changed ones
                client_flags=[connector.constants.ClientFlag.FOUND_ROWS],
            )
            cursor = conn.cursor()
            # each statement sees what is committed now: the change log relies on it
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            cursor.execute("SET SESSION innodb_lock_wait_timeout = %d" % max(1, int(self.config.db_wait_seconds)))
            cursor.close()
            return conn
        except connector.Error as error:
            raise DatabaseUnavailable(self._safe_message(error)) from None

    def _safe_message(self, error):
        return "MySQL error %s" % (getattr(error, "errno", None) or "?")

    def _begin(self, conn):
        with self._errors():
            conn.cmd_query("START TRANSACTION")

    def _commit(self, conn):
        with self._errors():
            conn.commit()

    def _rollback(self, conn):
        conn.rollback()

    # errno values that mean "the server is not there" or "try again"
    _UNAVAILABLE = {2002, 2003, 2005, 2006, 2013, 2055, 1040, 1053, 1205, 1213, 4031}
    _DUPLICATE = {1062, 1586}
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
        3819: "a CHECK constraint refused the value",
        4025: "a CHECK constraint refused the value",
    }

    @contextmanager
    def _errors(self):
        connector = self._driver
        try:
            yield
        except connector.Error as error:
            errno = getattr(error, "errno", None)
            if errno in self._DUPLICATE:
                raise DataRejected("a row with this primary key or unique value already exists",
                                   duplicate=True) from None
            if errno in self._REJECTED:
                found = re.search(r"column '([^']*)'", getattr(error, "msg", "") or "")
                column = repr(found.group(1)) if found else "?"
                raise DataRejected(self._REJECTED[errno] % {"column": column}) from None
            if errno in self._UNAVAILABLE or isinstance(error, (connector.InterfaceError, connector.OperationalError)):
                raise DatabaseUnavailable(self._safe_message(error)) from None
            raise

    def execute(self, conn, sql, params=()):
        """Run one statement; return the number of rows it matched."""
        with self._errors():
            cursor = conn.cursor()
            try:
                cursor.execute(sql, params)
                return cursor.rowcount
            finally:
                cursor.close()

    def executemany(self, conn, sql, rows):
        """Run an INSERT for many rows as one multi-row statement."""
        with self._errors():
            cursor = conn.cursor()
            try:
                cursor.executemany(sql, rows)
            finally:
                cursor.close()

    def query(self, conn, sql, params=()):
        """Run a SELECT; return its rows as tuples."""
        with self._errors():
            cursor = conn.cursor()
            try:
                cursor.execute(sql, params)
                return cursor.fetchall()
            finally:
                cursor.close()

    def ping(self, conn):
        """A real round trip to the database."""
        self.query(conn, "SELECT 1")

    def server_version(self, conn):
        """The database engine's version string."""
        return "MySQL " + self.query(conn, "SELECT VERSION()")[0][0]

    def driver(self):
        """The driver and whether its C extension is active."""
        from mysql.connector import version
        implementation = "C extension" if self._driver.HAVE_CEXT else "pure Python (slow)"
        return "mysql-connector-python %s (%s)" % (".".join(map(str, version.VERSION[:3])), implementation)

    _KINDS = {
        "decimal": "decimal", "binary": "binary", "varbinary": "binary", "tinyblob": "binary",
        "blob": "binary", "mediumblob": "binary", "longblob": "binary", "date": "date",
        "datetime": "datetime", "timestamp": "datetime", "time": "time",
    }

    def introspect(self, conn, table):
        """Read one table's columns and primary key from information_schema."""
        rows = self.query(conn, self.sql(
            "SELECT COLUMN_NAME, DATA_TYPE, NUMERIC_SCALE, COLUMN_KEY FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION"), (table,))
        if not rows:
            raise SchemaError("table %r does not exist in database %r" % (table, self.config.db_name))
        keys = self.query(conn, self.sql(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = DATABASE()"
            " AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION"), (table,))
        if not keys:
            raise SchemaError("table %r has no primary key; cloudsync needs one to find rows" % table)
        columns = []
        for name, data_type, scale, _ in rows:
            name, data_type = _text(name), _text(data_type).lower()
            if "%" in name or "%" in table:
                # the driver substitutes %s inside SQL text; such names cannot be bound safely
                raise SchemaError("table %r or its column %r contains '%%', which cloudsync cannot quote safely"
                                  % (table, name))
            columns.append(Column(name, quote_mysql(name), self._KINDS.get(data_type, "other"),
                                  scale if data_type == "decimal" else None))
        return TableSchema(table, quote_mysql(table), columns, [_text(key) for (key,) in keys])

    def decode_rows(self, schema, rows):
        """MySQL rows are already typed by the driver."""
        return rows


def _text(value):
    """information_schema values may come back as bytes on some servers."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def open_database(config):
    """The database backend the configuration names."""
    return MySQLDatabase(config) if config.backend == "mysql" else SQLiteDatabase(config)


# ---------------------------------------------------------------------------
# Sync engine
# ---------------------------------------------------------------------------
# The engine knows the allowed tables and turns validated requests into SQL.
# Validation happens in full before the first statement runs, so a bad
# operation anywhere in a batch leaves the database untouched.

ACTIONS = ("insert", "update", "delete")


class Operation:
    """One validated push operation: bound values and its primary key."""

    __slots__ = ("index", "table", "action", "values", "key")

    def __init__(self, index, table, action, values, key):
        self.index = index
        self.table = table      # a TableSchema
        self.action = action
        self.values = values    # {column name: bound value}, in the order the client sent
        self.key = key          # tuple of primary-key values


class SyncEngine:
    """Schema-checked push and pull over one Database."""

    def __init__(self, database, allowed_tables):
        self.db = database
        self.allowed_tables = tuple(allowed_tables)
        self.schemas = {}
        self._schema_lock = threading.Lock()

    # -- schema -------------------------------------------------------------

    def load_schema(self):
        """Introspect every allowed table; raise SchemaError naming the first bad one."""
        with self.db.connection() as conn:
            schemas = {table: self.db.introspect(conn, table) for table in self.allowed_tables}
        with self._schema_lock:
            self.schemas = schemas
        return schemas

    def _schema_for(self, table, where):
        if not isinstance(table, str) or table not in self.allowed_tables:
            raise HTTPError(400, "Invalid table", "%s: table %s is not in ALLOWED_TABLES"
                            % (where, json.dumps(table, default=str)[:100]))
        return self.schemas[table]

    # -- push ---------------------------------------------------------------

    def validate_operations(self, operations):
        """Check every operation against the schema; return Operations or raise 400."""
        if not isinstance(operations, list):
            raise HTTPError(400, "Invalid payload", "operations must be a list")
        validated = []
        for index, operation in enumerate(operations):
            where = "operation %d" % index
            if not isinstance(operation, dict):
                raise HTTPError(400, "Invalid operation", "%s must be an object" % where)
            missing = [field for field in ("table", "action", "data") if field not in operation]
            if missing:
                raise HTTPError(400, "Invalid operation", "%s has no %s" % (where, " or ".join(missing)))
            schema = self._schema_for(operation["table"], where)
            action = operation["action"]
            if action not in ACTIONS:
                raise HTTPError(400, "Invalid action", "%s: action must be one of %s"
                                % (where, ", ".join(ACTIONS)))
            data = operation["data"]
            if not isinstance(data, dict):
                raise HTTPError(400, "Invalid operation", "%s: data must be an object" % where)
            values = {}
            for name, value in data.items():
                column = schema.columns.get(name)
                if column is None:
                    raise HTTPError(400, "Unknown column", "%s: table %r has no column %s"
                                    % (where, schema.name, json.dumps(name)[:100]))
                values[name] = bind_value(column, value, where)
            absent = [name for name in schema.primary_key if values.get(name) is None]
            # an insert may leave out a one-column key for the database to generate
            generated = action == "insert" and len(schema.primary_key) == 1
            if absent and not generated:
                raise HTTPError(400, "Missing key", "%s: data must include primary key column %s"
                                % (where, ", ".join(repr(name) for name in absent)))
            key = tuple(values.get(name) for name in schema.primary_key)
            validated.append(Operation(index, schema, action, values, key))
        return validated

    def push(self, operations):
        """Apply validated operations in one transaction; return the push summary."""
        try:
            return self._push(operations, batched=True)
        except _GroupRejected:
            # A multi-row insert failed; which row is unknown, and on SQLite the
            # rows before it stay written. Roll back, then redo one by one.
            return self._push(operations, batched=False)

    def _push(self, operations, batched):
        missing = []
        with self.db.connection() as conn:
            with self.db.transaction(conn):
                for group in _group_inserts(operations, batched):
                    if isinstance(group, list):
                        self._insert_many(conn, group)
                    elif group.action == "update":
                        if not self._update(conn, group):
                            missing.append(group)
                    else:
                        self._delete(conn, group)
        return {"applied": len(operations), "missing": missing}

    def _key_condition(self, schema):
        return " AND ".join("%s = ?" % schema.columns[name].quoted for name in schema.primary_key)

    def _insert_many(self, conn, group):
        schema, names = group[0].table, list(group[0].values)
        sql = self.db.sql("INSERT INTO %s (%s) VALUES (%s)" % (
            schema.quoted, ", ".join(schema.columns[name].quoted for name in names),
            ", ".join("?" for _ in names)))
        try:
            if len(group) == 1:
                self.db.execute(conn, sql, tuple(group[0].values.values()))
            else:
                self.db.executemany(conn, sql, [tuple(op.values.values()) for op in group])
        except DataRejected as error:
            if len(group) == 1:
                raise PushRejected(group[0], error) from None
            raise _GroupRejected() from None

    def _update(self, conn, op):
        schema = op.table
        changes = [name for name in op.values if name not in schema.primary_key]
        try:
            if not changes:
                return bool(self.db.query(conn, self.db.sql("SELECT 1 FROM %s WHERE %s" % (
                    schema.quoted, self._key_condition(schema))), op.key))
            sql = self.db.sql("UPDATE %s SET %s WHERE %s" % (
                schema.quoted, ", ".join("%s = ?" % schema.columns[name].quoted for name in changes),
                self._key_condition(schema)))
            return self.db.execute(conn, sql, tuple(op.values[name] for name in changes) + op.key) > 0
        except DataRejected as error:
            raise PushRejected(op, error) from None

    def _delete(self, conn, op):
        schema = op.table
        try:
            return self.db.execute(conn, self.db.sql("DELETE FROM %s WHERE %s" % (
                schema.quoted, self._key_condition(schema))), op.key) > 0
        except DataRejected as error:
            raise PushRejected(op, error) from None

    # -- pull (seed mode) -----------------------------------------------------

    def check_tables(self, tables):
        """Validate a pull's `tables` field; return the table names to read."""
        if tables is None:
            tables = list(self.allowed_tables)
        if not isinstance(tables, list):
            raise HTTPError(400, "Invalid payload", "tables must be a list of table names")
        if not tables:
            raise HTTPError(400, "No tables configured", "no table was named and ALLOWED_TABLES is empty"
                            if not self.allowed_tables else "tables is an empty list")
        for position, table in enumerate(tables):
            self._schema_for(table, "tables[%d]" % position)
        return list(dict.fromkeys(tables))

    def pull_rows(self, tables, limit):
        """The first `limit` rows of each table in primary-key order (the seed's pull)."""
        data = {}
        with self.db.connection() as conn:
            for table in tables:
                schema = self.schemas[table]
                rows = self.db.query(conn, self.db.sql("SELECT %s FROM %s ORDER BY %s LIMIT ?" % (
                    schema.select_list, schema.quoted, schema.key_order)), (limit,))
                names = schema.column_names
                data[table] = [dict(zip(names, row)) for row in self.db.decode_rows(schema, rows)]
        return data


class _GroupRejected(Exception):
    """A multi-row insert was refused; the push is redone row by row to name the operation."""


class PushRejected(Exception):
    """The database refused one operation of a push."""

    def __init__(self, op, error):
        super().__init__(str(error))
        self.op = op
        self.error = error


def _group_inserts(operations, batched=True):
    """Yield runs of inserts into one table with the same columns as lists, others alone."""
    run = []
    for op in operations:
        if batched and op.action == "insert" and run and op.table is run[0].table and list(op.values) == list(run[0].values):
            run.append(op)
            continue
        if run:
            yield run
            run = []
        if op.action == "insert":
            run = [op]
        else:
            yield op
    if run:
        yield run


def parse_limit(value):
    """The seed's `limit`: default 1000, capped at 5000; must be a positive whole number."""
    if value is None:
        return DEFAULT_PULL_LIMIT_ROWS
    if isinstance(value, bool) or not isinstance(value, (int, decimal.Decimal)) \
            or value != int(value) or value < 1:
        raise HTTPError(400, "Invalid limit", "limit must be a whole number of at least 1")
    return min(int(value), MAX_PULL_LIMIT_ROWS)


# ---------------------------------------------------------------------------
# HTTP application
# ---------------------------------------------------------------------------


class Request:
    """The parts of a WSGI environ the handlers use, with a bounded body reader."""

    def __init__(self, environ, max_body_bytes):
        self.environ = environ
        self.method = environ["REQUEST_METHOD"]
        self.path = environ.get("PATH_INFO") or "/"
        self.max_body_bytes = max_body_bytes

    def body(self):
        """Read the request body; 413 before reading when it is declared too large."""
        environ = self.environ
        declared = environ.get("CONTENT_LENGTH") or ""
        stream = environ["wsgi.input"]
        if declared:
            try:
                length = int(declared)
            except ValueError:
                raise HTTPError(400, "Invalid request", "Content-Length is not a number") from None
            if length > self.max_body_bytes:
                raise HTTPError(413, "Payload too large", "the body is %d bytes; the limit is %d bytes, "
                                "split the batch into smaller pushes" % (length, self.max_body_bytes))
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
                    raise HTTPError(413, "Payload too large", "the body is over the limit of %d bytes, "
                                    "split the batch into smaller pushes" % self.max_body_bytes)
                chunks.append(chunk)
        return b""

    def json_object(self):
        """The body as a JSON object; {} when empty (as the seed's express.json gave)."""
        payload = parse_json(self.body())
        if not isinstance(payload, dict):
            raise HTTPError(400, "Invalid payload", "the body must be a JSON object, not %s" % _json_type(payload))
        return payload


def _read_exactly(stream, length):
    chunks, remaining = [], length
    while remaining > 0:
        chunk = stream.read(min(remaining, READ_CHUNK_BYTES))
        if not chunk:
            raise HTTPError(400, "Invalid request", "the body ended before Content-Length bytes arrived")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class App:
    """The WSGI application: a path router, the handlers, and the one place errors become responses."""

    def __init__(self, config, database=None, engine=None):
        self.config = config
        self.db = database or open_database(config)
        self.engine = engine or SyncEngine(self.db, config.allowed_tables)
        self.routes = {
            "/health": {"GET": self.health},
            "/sync": {"POST": self.push},
            "/sync/push": {"POST": self.push},
            "/sync/pull": {"POST": self.pull},
            "/sync/status": {"GET": self.status},
        }

    def start(self):
        """Check the database and every allowed table; raise SchemaError or DatabaseUnavailable."""
        return self.engine.load_schema()

    # -- WSGI ----------------------------------------------------------------

    def __call__(self, environ, start_response):
        request = Request(environ, self.config.max_body_bytes)
        try:
            status, payload, headers = self._dispatch(request)
        except HTTPError as error:
            status, payload, headers = error.status, error.body, error.headers
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            status, payload, headers = 500, {"success": False, "error": "Internal server error"}, []
        body = to_json_bytes(payload)
        headers = [("Content-Type", "application/json; charset=utf-8"),
                   ("Content-Length", str(len(body)))] + headers
        start_response("%d %s" % (status, HTTP_REASONS.get(status, "Unknown")), headers)
        return [] if request.method == "HEAD" else [body]

    def _dispatch(self, request):
        path = request.path
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]                  # Express matched /sync/push/ too
        methods = self.routes.get(path)
        if methods is None:
            raise HTTPError(404, "Not found", "no endpoint at %s" % path[:200])
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
            raise HTTPError(405, "Method not allowed", "%s takes %s" % (path, ", ".join(allowed)),
                            headers=[("Allow", ", ".join(allowed))])
        result = handler(request)
        return result if len(result) == 3 else result + ([],)

    # -- handlers --------------------------------------------------------------

    def health(self, request):
        """Liveness: answers without touching the database."""
        return 200, {"status": "Sync API running"}

    def push(self, request):
        """Apply a batch of operations in one transaction."""
        payload = request.json_object()
        operations = self.engine.validate_operations(payload.get("operations"))
        try:
            result = self.engine.push(operations)
        except PushRejected as rejected:
            op = rejected.op
            status = 409 if rejected.error.duplicate else 400
            raise HTTPError(status, "Sync failed", "operation %d (%s on %s): %s"
                            % (op.index, op.action, op.table.name, rejected.error), op=op.index) from None
        except DatabaseUnavailable:
            raise _unavailable("Sync failed") from None
        except Exception:
            log.exception("push failed")
            raise HTTPError(500, "Sync failed", "the database failed; nothing was applied") from None
        response = {"success": True, "applied": result["applied"]}
        if result["missing"]:
            response["missing"] = [{"op": op.index, "table": op.table.name, "key": _key_json(op)}
                                   for op in result["missing"]]
        return 200, response

    def pull(self, request):
        """Return rows of the requested tables (seed mode)."""
        payload = request.json_object()
        tables = self.engine.check_tables(payload.get("tables"))
        limit = parse_limit(payload.get("limit"))
        try:
            data = self.engine.pull_rows(tables, limit)
        except DatabaseUnavailable:
            raise _unavailable("Pull sync failed") from None
        except Exception:
            log.exception("pull failed")
            raise HTTPError(500, "Pull sync failed", "the database failed while reading") from None
        return 200, {"success": True, "data": data, "limit": limit}

    def status(self, request):
        """A real database round trip, and the tables as the schema now describes them."""
        try:
            with self.db.connection() as conn:
                self.db.ping(conn)
                version = self.db.server_version(conn)
            schemas = self.engine.load_schema()
        except DatabaseUnavailable as error:
            log.warning("status: database unavailable: %s", error)
            raise HTTPError(503, "Database unavailable", headers=[("Retry-After", "5")], status="error") from None
        except SchemaError as error:
            raise HTTPError(500, "Schema problem", str(error), status="error") from None
        return 200, {
            "success": True, "status": "ok", "allowed_tables": list(self.engine.allowed_tables),
            "backend": self.db.name, "server_version": version, "driver": self.db.driver(),
            "version": __version__,
            "tables": {name: schema.describe() for name, schema in schemas.items()},
        }


def _unavailable(error):
    return HTTPError(503, error, "the database is unavailable; retry later", headers=[("Retry-After", "5")])


def _key_json(op):
    """A row key as the protocol shows it: the value, or an object for a composite key."""
    names = op.table.primary_key
    if len(names) == 1:
        return op.key[0]
    return dict(zip(names, op.key))


def make_app(config):
    """An App for `config`, with its schema loaded (raises on a bad table)."""
    app = App(config)
    app.start()
    return app


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _serve(app, config):
    import waitress
    log.info("cloudsync %s listening on http://%s:%d", __version__, config.host, config.port)
    waitress.serve(app, host=config.host, port=config.port, threads=config.threads,
                   # waitress refuses an oversized declared body before reading it
                   max_request_body_size=config.max_body_bytes, ident="cloudsync",
                   clear_untrusted_proxy_headers=True)


def _create_demo_database(path):
    with open(os.path.join(HERE, "schema-sqlite.sql"), encoding="utf-8") as handle:
        script = handle.read()
    conn = sqlite3.connect(path)
    try:
        conn.executescript(script)
    finally:
        conn.close()


def main(argv=None):
    """Command-line entry point: serve (the default) or demo."""
    parser = argparse.ArgumentParser(prog="cloudsync", description="Sync server for offline-first devices.")
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env in the working directory)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve the sync API (the default)")
    demo = commands.add_parser("demo", help="serve the example tables from a local SQLite file")
    demo.add_argument("--db", default="cloudsync-demo.db", help="SQLite file (created with the example tables)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    overrides = None
    if args.command == "demo":
        overrides = {"DB_HOST": "", "DB_PATH": args.db, "ALLOWED_TABLES": ",".join(EXAMPLE_TABLES)}
    try:
        config = load_config(args.env_file, overrides=overrides)
        logging.getLogger().setLevel(config.log_level)
        if args.command == "demo":
            _create_demo_database(config.db_path)
        app = App(config)
        log.info("configuration: %s", config.describe())
        log.info("backend: %s, driver: %s", app.db.name, app.db.driver())
        schemas = app.start()
    except (ConfigError, SchemaError) as error:
        log.error("cannot start: %s", error)
        return 2
    except DatabaseUnavailable as error:
        log.error("cannot start: the database is unavailable (%s)", error)
        return 2
    if not schemas:
        log.warning("ALLOWED_TABLES is empty: every push and pull will be refused")
    for name, schema in schemas.items():
        log.info("table %s: primary key (%s)", name, ", ".join(schema.primary_key))
    if "pure Python" in app.db.driver():
        log.warning("mysql-connector-python's C extension did not load: rows decode several times slower")
    _serve(app, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
