#!/usr/bin/env python3
"""Fault and load scenarios for cloudsync, against a private MariaDB it starts itself.

    python3 reliability_cloudsync.py [--devices 50] [--rounds 8] [--quick] [--only NAMES]

Starts a throwaway MariaDB (its own data directory and port, so it can be
stopped, killed and restarted without touching any other database) and
cloudsync server processes on loopback ports, then runs:

- restart: devices push batches (with batch ids) and pull while MariaDB is
  stopped and started again; requests during the outage must get a quick 503
  with Retry-After, the server must recover by itself, and every batch must end
  in the database exactly once;
- crash: the server is killed with SIGKILL in the middle of a large push; the
  batch must be fully there or fully absent, and apply exactly once on retry;
- load: many devices push (with batch ids, retrying at random through the other
  instance) and pull through TWO server instances; every device must end equal
  to the server, with no acknowledged write missing or doubled and no gap in
  the change log;
- bad inputs: random malformed requests over HTTP; none may get a 5xx or
  change the database;

and the faults of issue 21, each while devices push (with batch ids) and pull,
and 127.0.0.1 asks /health every 0.25 s:

- frozen-db: the server reaches MariaDB through a TCP proxy that stops
  forwarding for 40 s (a database stopped with SIGSTOP, a dead network);
- killed-db: the proxy resets every connection, then MariaDB is killed with
  SIGKILL and started again 5 s later;
- killed-cloudsync: the server is killed with SIGKILL three times under load
  and started again at once;
- flood: 2,000 idle keep-alive and 200 slowloris connections from 127.0.0.2
  for 30 s;
- large-rows: a device pushes 1,008 rows of 1 MiB text (9 a push), then three
  devices pull them at once with limit 5000.

Each fault reports acknowledged, lost and doubled writes, the /health latency
during the fault, the 503s, other 5xx and timeouts legitimate clients saw, and
the server's peak and settled resident memory.

It prints the figures docs/performance.md's reliability section quotes. The test suite runs
the same scenarios with smaller numbers (--quick runs those).

    python3 reliability_cloudsync.py --galera [--devices 50] [--rounds 8]

measures issue 25 instead: starts a 3-node MariaDB Galera cluster on loopback
(GaleraCluster), then reports what Galera does with locks, commits of one row
through two nodes, reads after a commit elsewhere and auto-increments; devices
pushing (batch ids, checkpoints) and pulling through one cloudsync instance
per node, then three instances on one node; a checkpoint used on a node that
is behind; serve on a read-only node; and, on a plain private MariaDB, the
same devices through three instances and the sequencer deadlock.
"""

import argparse
import collections
import errno
import gzip
import http.client
import json
import math
import os
import pwd
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
MARIADBD = "/usr/sbin/mariadbd"
TABLES = "sales,products,customers,item_sales,product_stock"


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mariadb_available():
    """Whether this machine can start a private MariaDB."""
    return os.path.exists(MARIADBD) and shutil.which("mariadb-install-db") is not None


class PrivateMariaDB:
    """A throwaway MariaDB server that may be stopped, killed and restarted."""

    def __init__(self, root):
        self.root = root
        self.data = os.path.join(root, "data")
        self.port = free_port()
        self.process = None
        subprocess.run(["mariadb-install-db", "--no-defaults", "--datadir=" + self.data, "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True)

    def start(self):
        """Start the server and wait until it answers."""
        self.process = subprocess.Popen(
            [MARIADBD, "--no-defaults", "--datadir=" + self.data, "--socket=" + os.path.join(self.root, "sock"),
             "--port=%d" % self.port, "--bind-address=127.0.0.1", "--user=root",
             "--pid-file=" + os.path.join(self.root, "pid"), "--log-error=" + os.path.join(self.root, "err.log"),
             # its own: a server starting removes every #sql* file in its tmpdir, and in a shared
             # /tmp those are the temporary tables of the other servers' running queries
             "--tmpdir=" + self.root,
             "--innodb-buffer-pool-size=64M", "--max-connections=400"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.connect().close()
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("private MariaDB did not start; see %s" % os.path.join(self.root, "err.log"))

    def stop(self, kill=False):
        """Stop the server (SIGTERM, a clean shutdown) or kill it (SIGKILL, a crash)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=60)
            self.process = None

    def connect(self, database=None):
        import mysql.connector
        return mysql.connector.connect(host="127.0.0.1", port=self.port, user="root", password="",
                                       database=database, autocommit=True, connection_timeout=3)

    def sql(self, statement, database=None):
        """Run one statement; return its rows."""
        conn = self.connect(database)
        try:
            cursor = conn.cursor()
            cursor.execute(statement)
            rows = cursor.fetchall() if cursor.with_rows else []
            cursor.close()
            return rows
        finally:
            conn.close()

    def create_database(self, name):
        """A fresh database with the example tables."""
        self.sql("CREATE DATABASE %s CHARACTER SET utf8mb4" % name)
        script = open(os.path.join(HERE, "schema-mysql.sql")).read()
        for statement in script.split(";"):
            if "CREATE" in statement:
                self.sql(statement, name)
        return name

    def close(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------
# A Galera cluster on loopback
# ---------------------------------------------------------------------------

GALERA_LIBRARY = "/usr/lib/galera/libgalera_smm.so"


def galera_missing():
    """What this machine lacks to run a Galera cluster, in words ("" when nothing)."""
    missing = [name for name, there in (
        (MARIADBD, os.path.exists(MARIADBD)),
        ("mariadb-install-db", shutil.which("mariadb-install-db")),
        (GALERA_LIBRARY + " (apt-get install galera-4)", os.path.exists(GALERA_LIBRARY)),
        ("rsync", shutil.which("rsync")),
        ("wsrep_sst_rsync", shutil.which("wsrep_sst_rsync")),
        # the state-transfer script finds its rsync daemon's socket with one of these
        ("ss (iproute2)", shutil.which("ss") or shutil.which("lsof"))) if not there]
    return ", ".join(missing)


def galera_available():
    """Whether this machine can run a GaleraCluster."""
    return not galera_missing()


def _log_tail(path, lines=25):
    """The last lines of a log file, for an exception's message."""
    try:
        with open(path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])
    except OSError:
        return "(no log at %s)" % path


class GaleraNode(PrivateMariaDB):
    """One node of a GaleraCluster: its own directory, datadir, ports, socket and process."""

    def __init__(self, root, number, cluster_name, owner):
        # PrivateMariaDB.__init__ would install a datadir: only the first node gets one, the
        # others receive theirs from a donor (state transfer)
        self.root = root
        self.number = number
        self.data = os.path.join(root, "data")
        self.log_path = os.path.join(root, "err.log")
        self.port, self.galera_port, self.ist_port, self.sst_port = (free_port() for _ in range(4))
        self.cluster_name = cluster_name
        self.owner = owner
        self.process = None
        self.state = None                   # (wsrep_local_state_comment, wsrep_cluster_size) last seen
        os.makedirs(self.data)
        self._give_to_owner()

    def _give_to_owner(self):
        """Hand the node's files to the user it runs as (nobody, when started by root)."""
        if self.owner is not None:
            for folder, dirs, files in os.walk(self.root):
                for name in [folder] + [os.path.join(folder, entry) for entry in dirs + files]:
                    os.lchown(name, self.owner.pw_uid, self.owner.pw_gid)

    def install(self):
        """Create the system tables: the first node's datadir, from which the others are copied."""
        subprocess.run(["mariadb-install-db", "--no-defaults", "--datadir=" + self.data,
                        "--user=" + self.user, "--auth-root-authentication-method=normal",
                        "--skip-test-db", "--innodb-log-file-size=16M"],
                       check=True, capture_output=True)

    @property
    def user(self):
        """The operating-system user mariadbd runs as."""
        return self.owner.pw_name if self.owner is not None else "root"

    def start(self, addresses=(), bootstrap=False):
        """Start mariadbd; `addresses` are every node's replication address (host:port)."""
        self._give_to_owner()
        provider_options = ";".join([
            "gmcast.listen_addr=tcp://127.0.0.1:%d" % self.galera_port,
            "ist.recv_addr=127.0.0.1:%d" % self.ist_port,
            "gcache.size=32M",
            # a killed node is noticed within seconds, not the default 5-15 s
            "evs.suspect_timeout=PT3S", "evs.inactive_timeout=PT5S",
            "evs.inactive_check_period=PT0.5S", "evs.keepalive_period=PT0.5S",
            # a node that finds no cluster to join gives up after 10 s, not 30 s
            "pc.wait_prim_timeout=PT10S"])
        command = [
            MARIADBD, "--no-defaults", "--datadir=" + self.data, "--user=" + self.user,
            "--socket=" + os.path.join(self.root, "sock"), "--pid-file=" + os.path.join(self.root, "pid"),
            "--log-error=" + self.log_path, "--port=%d" % self.port, "--bind-address=127.0.0.1",
            # its own: a server starting removes every #sql* file in its tmpdir, and in a shared
            # /tmp those are the temporary tables of the other servers' running queries
            "--tmpdir=" + self.data,
            "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M", "--max-connections=400",
            # every node has the data; a commit is safe once certified, not when this disk has it
            "--innodb-flush-log-at-trx-commit=2",
            # what Galera needs: row events, and auto-increments that take no table lock
            "--binlog-format=ROW", "--innodb-autoinc-lock-mode=2", "--default-storage-engine=InnoDB",
            # Galera counts as binary logging: without this, only SUPER may create triggers
            "--log-bin-trust-function-creators=1",
            "--wsrep-on=ON", "--wsrep-provider=" + GALERA_LIBRARY,
            "--wsrep-cluster-name=" + self.cluster_name,
            "--wsrep-cluster-address=gcomm://" + ",".join(addresses),
            "--wsrep-node-name=node%d" % self.number,
            "--wsrep-node-address=127.0.0.1:%d" % self.galera_port,
            "--wsrep-node-incoming-address=127.0.0.1:%d" % self.port,
            "--wsrep-sst-method=rsync", "--wsrep-sst-receive-address=127.0.0.1:%d" % self.sst_port,
            "--wsrep-provider-options=" + provider_options,
            # replicated writes are applied in parallel, as on a production cluster
            "--wsrep-slave-threads=2"]
        if bootstrap:
            command.append("--wsrep-new-cluster")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def status(self):
        """The node's wsrep_* status variables, or None while it does not answer."""
        try:
            return dict(self.sql("SHOW GLOBAL STATUS LIKE 'wsrep%'"))
        except Exception:
            return None

    def synced(self, size):
        """Whether the node is Synced in a cluster of `size` nodes; raise if its process ended."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("Galera node %d exited; %s:\n%s"
                               % (self.number, self.log_path, _log_tail(self.log_path)))
        status = self.status() or {}
        self.state = status.get("wsrep_local_state_comment"), status.get("wsrep_cluster_size")
        return self.state == ("Synced", str(size)) and status.get("wsrep_ready") == "ON"

    def close(self):
        """Kill the node: its files go with the cluster's directory."""
        self.stop(kill=True)


class GaleraCluster:
    """A throwaway MariaDB Galera cluster of N nodes on loopback, each with its own datadir and ports.

    The first node is bootstrapped (--wsrep-new-cluster) from a fresh datadir;
    the others join with empty datadirs and receive a copy by rsync (state
    snapshot transfer). Every node accepts writes.

    The rsync daemon of a joining node, started by root, writes as nobody: so
    the nodes run as nobody (when started by root), and their files live under
    a directory of /tmp that nobody may enter, not under pytest's private one.
    """

    def __init__(self, size=3, start_seconds=90):
        owner = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        self.root = tempfile.mkdtemp(prefix="cloudsync-galera-", dir="/tmp" if owner else None)
        os.chmod(self.root, 0o755)
        name = "cloudsync-%06d" % random.randrange(10 ** 6)    # at most 32 characters
        self.start_seconds = start_seconds
        self.nodes = [GaleraNode(os.path.join(self.root, "node%d" % n), n + 1, name, owner)
                      for n in range(size)]
        self._paused = {}
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self):
        """Every node's replication address."""
        return ["127.0.0.1:%d" % node.galera_port for node in self.nodes]

    def start(self):
        """Bootstrap the first node, then join the others one by one; each must be Synced.

        One at a time: two nodes joining together take as long, and a failure
        then names the node that failed.
        """
        began = time.monotonic()
        first = self.nodes[0]
        first.install()
        first.start(self.addresses, bootstrap=True)
        self.wait_synced([first], 1, began + self.start_seconds)
        for size, node in enumerate(self.nodes[1:], 2):
            node.start(self.addresses)
            self.wait_synced([node], size, began + self.start_seconds)
        self.started_in = time.monotonic() - began

    @staticmethod
    def wait_synced(nodes, size, deadline):
        """Wait until these nodes are Synced in a cluster of `size`; else raise with the laggards' logs."""
        waiting = list(nodes)
        while waiting and time.monotonic() < deadline:
            waiting = [node for node in waiting if not node.synced(size)]
            if waiting:
                time.sleep(0.1)
        if waiting:
            raise RuntimeError("Galera nodes not Synced in a cluster of %d:\n%s" % (size, "\n".join(
                "node %d (state, cluster size: %s); %s:\n%s"
                % (node.number, node.state, node.log_path, _log_tail(node.log_path)) for node in waiting)))

    def create_database(self, name):
        """A database with the example tables, created through the first node; visible on all."""
        self.nodes[0].create_database(name)
        tables = self.nodes[0].sql("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '%s'"
                                   % name)[0][0]
        deadline = time.monotonic() + 30
        for node in self.nodes:
            while node.sql("SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '%s'"
                           % name)[0][0] != tables:
                if time.monotonic() > deadline:
                    raise RuntimeError("database %s did not reach node %d" % (name, node.number))
                time.sleep(0.05)
        return name

    def add_user(self, database, user="cloudsync", password="cloudsync"):
        """A user with every privilege on one database and none beyond; returns (user, password).

        read_only binds such a user. It does not bind root, which holds
        READ_ONLY ADMIN: root may still write on a read-only node.
        """
        self.nodes[0].sql("CREATE USER IF NOT EXISTS '%s'@'%%' IDENTIFIED BY '%s'" % (user, password))
        self.nodes[0].sql("GRANT ALL ON `%s`.* TO '%s'@'%%'" % (database, user))
        return user, password

    def kill(self, i):
        """SIGKILL nodes[i]: a crash; the others go on without it once they notice (about 3 s)."""
        self.nodes[i].stop(kill=True)

    def restart(self, i):
        """Start nodes[i] again and wait until it has rejoined and is Synced.

        After a kill its position is unknown, so it rejoins by a state transfer
        (rsync copies only the files that differ), not from the donor's cache.
        """
        node = self.nodes[i]
        node.stop()
        node.start(self.addresses)
        self.wait_synced([node], len(self.nodes), time.monotonic() + self.start_seconds)

    def pause(self, i):
        """Make nodes[i] fall behind: it stops applying the others' writes until resume(i).

        wsrep_desync first, so that the cluster's flow control does not
        stop every node to wait for it. Reads on the node answer (with old
        data); writes through it wait for the read lock.
        """
        conn = self.nodes[i].connect()
        cursor = conn.cursor()
        cursor.execute("SET GLOBAL wsrep_desync = ON")
        cursor.execute("FLUSH TABLES WITH READ LOCK")
        cursor.close()
        self._paused[i] = conn

    def resume(self, i):
        """Let a paused node apply what it missed, and wait until it is Synced again."""
        conn = self._paused.pop(i)
        cursor = conn.cursor()
        cursor.execute("UNLOCK TABLES")
        cursor.execute("SET GLOBAL wsrep_desync = OFF")
        cursor.close()
        conn.close()
        self.wait_synced([self.nodes[i]], len(self.nodes), time.monotonic() + self.start_seconds)

    def set_read_only(self, i, on):
        """Turn read_only on or off on nodes[i] (it binds the users of add_user, not root)."""
        self.nodes[i].sql("SET GLOBAL read_only = %s" % ("ON" if on else "OFF"))

    def close(self):
        """Stop every node and remove every file."""
        for conn in self._paused.values():
            conn.close()
        self._paused.clear()
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.root, ignore_errors=True)


class Server:
    """A cloudsync process serving one database on its own loopback port."""

    def __init__(self, db, database, log_path, **settings):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.env = dict(os.environ, HOST="127.0.0.1", PORT=str(self.port), DB_HOST="127.0.0.1",
                        DB_PORT=str(db.port), DB_USER="root", DB_PASS="", DB_NAME=database,
                        ALLOWED_TABLES=TABLES, TOKENS_FILE="", LOG_LEVEL="WARNING", DB_CONNECT_TIMEOUT_SECONDS="2",
                        # one process: the figures (memory, connections) are of the process measured
                        WORKERS="1")
        self.env.update({name: str(value) for name, value in settings.items()})
        self.log_path = log_path
        self.process = None

    def start(self):
        """Start the server and wait for /health."""
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", "",
                                         "serve"], env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if request(self.url, "GET", "/health", timeout=1)[0] == 200:
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("cloudsync did not start; see %s" % self.log_path)

    def stop(self, kill=False):
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=30)
            self.process = None


def request(url, method, path, body=None, timeout=30, headers=None):
    """(status, headers, JSON payload); status 0 when the connection failed, with the error as payload."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    sent = urllib.request.Request(url + path, data=data, method=method, headers=dict(headers or {}))
    if data is not None and "Content-Type" not in sent.headers:
        sent.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(sent, timeout=timeout) as response:
            raw = response.read()
            return response.status, dict(response.headers), json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw
        return error.code, dict(error.headers), payload
    # http.client's IncompleteRead: the server was killed in the middle of its answer
    except (OSError, ValueError, http.client.HTTPException) as error:
        return 0, {}, error


class Figures(dict):
    """Counters shared by threads, and the timing of every legitimate client's request."""

    def __init__(self, **start):
        super().__init__(start)
        self._lock = threading.Lock()
        self.calls = []                    # (began, seconds, status, path), see exchange()

    def add(self, name, amount=1):
        with self._lock:
            self[name] = self.get(name, 0) + amount

    def maximum(self, name, value):
        """Keep the larger of figures[name] and value."""
        with self._lock:
            self[name] = max(self.get(name, value), value)

    def slowest(self, start, end, path=None):
        """The longest request (s) that was in progress at some moment between start and end."""
        return round(max([seconds for began, seconds, _, called in list(self.calls)
                          if began <= end and began + seconds >= start and path in (None, called)]
                         or [0.0]), 3)


def timed_out(payload):
    """Whether request()'s payload of a status-0 answer is a timeout (not a refused connection)."""
    return isinstance(payload, TimeoutError) or isinstance(getattr(payload, "reason", None), TimeoutError)


def exchange(figures, url, method, path, body=None, timeout=30):
    """A legitimate client's request, counted in figures; returns what request() returns.

    Counted: requests, 503 answers, other 5xx answers, timeouts (no answer within `timeout`;
    30 s is the reference client's) and connection failures. figures.calls keeps every
    request's timing, for a scenario to look at what clients saw during its fault.
    """
    began = time.monotonic()
    status, headers, payload = request(url, method, path, body, timeout=timeout)
    figures.calls.append((began, time.monotonic() - began, status, path))
    figures.add("requests")
    if status == 503:
        figures.add("503 answers")
    elif status >= 500:
        figures.add("other 5xx answers")
    elif status == 0:
        figures.add("timeouts" if timed_out(payload) else "connection failures")
    return status, headers, payload


def start_devices(target, count, figures):
    """Start `count` device threads; a device that fails counts in figures["device failures"] and logs why."""
    def guarded(number):
        try:
            target(number)
        except Exception as error:          # a failed device must fail the scenario, not vanish
            figures.add("device failures")
            print("device %d failed: %r" % (number, error), file=sys.stderr)
    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    return threads


def push_until_acknowledged(urls, figures, body, attempts=600, timeout=30):
    """Send a push (with its batch id) until it gets a 200; return the answer."""
    for attempt in range(attempts):
        status, _, payload = exchange(figures, random.choice(urls), "POST", "/sync/push", body, timeout)
        if status == 200:
            return payload
        figures.add("push errors")
        if status not in (0, 503):
            raise AssertionError("push got %s: %s" % (status, payload))
        time.sleep(min(0.05 * (attempt + 1), 0.5))
    raise AssertionError("push was never acknowledged")


def pull_until_done(urls, figures, tables, checkpoint, rows, attempts=600):
    """The client loop; applies changes to rows {table: {key: row}}; returns the new checkpoint."""
    for attempt in range(attempts):
        status, _, payload = exchange(figures, random.choice(urls), "POST", "/sync/pull",
                                      {"tables": tables, "since": checkpoint, "limit": 200})
        figures.add("pull requests")
        if status != 200:
            figures.add("pull %s" % (status or "unanswered"))
        if status == 410:
            checkpoint, rows = None, rows.clear() or rows
            continue
        if status != 200:
            figures.add("pull errors")
            time.sleep(min(0.05 * (attempt + 1), 0.5))
            continue
        for table, change in payload["changes"].items():
            for row in change["upserted"]:
                rows.setdefault(table, {})[row_key(row)] = row
            for key in change["deleted"]:
                rows.setdefault(table, {}).pop(row_key(key), None)
        checkpoint = payload["checkpoint"]
        if not payload["has_more"]:
            return checkpoint
    raise AssertionError("pull loop did not finish")


def sync_devices(urls, figures, count, stop, prefix, rows_per_batch=5, pause=0.0, timeout=30):
    """Devices that push batches of new sales rows (with batch ids) and run the pull loop until `stop`.

    Returns (threads, acknowledged, started): the ids of every row whose push was acknowledged,
    and an event set once some device has done a whole round. A device stops after 1,000
    batches; `pause` (s) between rounds paces it like a till rather than a benchmark.
    """
    acknowledged, started = [], threading.Event()

    def device(number):
        checkpoint, rows, batch = None, {}, 0
        while not stop.is_set() and batch < 1000:
            ids = ["%s%d-%d-%d" % (prefix, number, batch, n) for n in range(rows_per_batch)]
            body = {"device_id": "%sdev%d" % (prefix, number), "batch_id": "b%d" % batch,
                    "operations": [{"table": "sales", "action": "insert", "data": {"id": i, "total": "1.00"}}
                                   for i in ids]}
            push_until_acknowledged(urls, figures, body, timeout=timeout)
            acknowledged.extend(ids)
            checkpoint = pull_until_done(urls, figures, ["sales"], checkpoint, rows)
            started.set()
            batch += 1
            stop.wait(pause)

    return start_devices(device, count, figures), acknowledged, started


def row_key(row):
    """A row's (or a deleted key's) key in the example tables: its id, or product and store."""
    if not isinstance(row, dict):
        return row
    return row["id"] if "id" in row else "%s@%s" % (row["product_id"], row["store_id"])


def server_rows(db, database, table):
    """{id: row} of a table, read directly from the database, as JSON-comparable values."""
    conn = db.connect(database)
    try:
        cursor = conn.cursor(dictionary=True)
        cursor.execute("SELECT * FROM %s" % table)
        rows = cursor.fetchall()
        cursor.close()
    finally:
        conn.close()
    return {row_key(row): json.loads(json.dumps(row, default=_plain)) for row in rows}


def _plain(value):
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _comparable(rows):
    return {key: json.loads(json.dumps(row, default=_plain)) for key, row in rows.items()}


def change_log_gaps(db, database):
    """Missing sequence numbers between the compaction mark and the newest change."""
    count, low, high = db.sql("SELECT COUNT(*), MIN(seq), MAX(seq) FROM cloudsync_changes", database)[0]
    return 0 if not count else (high - low + 1) - count


def doubled_inserts(db, database, prefix, table="sales"):
    """Rows whose insert was recorded more than once (an acknowledged write applied twice)."""
    return db.sql("SELECT COUNT(*) FROM (SELECT row_key FROM cloudsync_changes WHERE table_name = '%s' AND op = 'I'"
                  " AND row_key LIKE '[\"%s%%' GROUP BY row_key HAVING COUNT(*) > 1) AS twice"
                  % (table, prefix), database)[0][0]


# ---------------------------------------------------------------------------
# Fault tools: a database proxy, a connection flood, memory and /health probes
# ---------------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP proxy in front of a database: it can freeze, resume and reset its connections.

    cloudsync connects to `port` (its DB_PORT). Frozen, the proxy forwards nothing in either
    direction and connects no new client onward, yet keeps every connection open: to its
    clients the database looks stopped with SIGSTOP, and no system service is touched. One
    thread serves every connection (selectors), so a freeze or a reset falls between two
    forwarded chunks, never inside one.
    """

    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.frozen = False
        self._peers = {}                   # socket -> the socket at the other end of its connection
        self._waiting = []                 # clients accepted while frozen, not yet connected onward
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def freeze(self):
        """Stop forwarding in both directions; connections stay open (a frozen database)."""
        with self._lock:
            self.frozen = True
            for sock in self._peers:
                self._selector.unregister(sock)

    def resume(self):
        """Forward again, and connect the clients that arrived while frozen."""
        with self._lock:
            self.frozen = False
            for sock in self._peers:
                self._selector.register(sock, selectors.EVENT_READ)
            waiting, self._waiting = self._waiting, []
            for client in waiting:
                self._connect_onward(client)

    def kill_connections(self):
        """Reset every connection (RST to both ends), as when the database is killed."""
        with self._lock:
            for sock in list(self._peers) + self._waiting:
                self._drop(sock, reset=True)
            self._waiting = []

    @property
    def connections(self):
        """Connections open through the proxy, waiting ones included."""
        with self._lock:
            return len(self._peers) // 2 + len(self._waiting)

    def close(self):
        """Reset every connection and stop listening."""
        self._closed.set()
        self._thread.join()
        self.kill_connections()
        self._selector.close()
        self.listener.close()

    def _serve(self):
        while not self._closed.is_set():
            events = self._selector.select(timeout=0.1)
            with self._lock:
                for key, _ in events:
                    if key.fileobj is self.listener:
                        self._accept()
                    # an earlier event of this turn may have closed it, a freeze unregistered it
                    elif key.fileobj in self._peers and not self.frozen:
                        self._forward(key.fileobj)

    def _accept(self):
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.frozen:
            self._waiting.append(client)
        else:
            self._connect_onward(client)

    def _connect_onward(self, client):
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            # the database is down: its client sees the connection reset
            self._drop(client, reset=True)
            return
        for sock, peer in ((client, upstream), (upstream, client)):
            # sockets are only read when readable; the timeout bounds a send to a full buffer
            sock.settimeout(10)
            self._peers[sock] = peer
            self._selector.register(sock, selectors.EVENT_READ)

    def _forward(self, sock):
        peer = self._peers[sock]
        try:
            data = sock.recv(1 << 16)
            if data:
                peer.sendall(data)
                return
        except OSError:
            pass
        # one end closed or failed: close the other too, as the database or its client would
        self._drop(sock)
        self._drop(peer)

    def _drop(self, sock, reset=False):
        """Close a socket; with reset, abortively (RST instead of FIN)."""
        if self._peers.pop(sock, None) is not None and not self.frozen:
            self._selector.unregister(sock)
        try:
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass


class ConnectionFlood:
    """Connections from one address that hold cloudsync's connection slots: idle and slowloris.

    Idle connections send nothing, like a device's keep-alive connection between two requests;
    slowloris ones send the start of a request, then one more header byte every `interval`
    seconds, so the server never finds them silent. Every `interval` seconds the connections
    the server closed are opened again, as an attacker would. Sockets are bound to `source`, a
    second loopback address, so the server can tell them from legitimate clients on 127.0.0.1.
    """

    SLOW_START = b"GET /health HTTP/1.1\r\nHost: cloudsync\r\nX-Slow: "

    def __init__(self, port, idle=2000, slowloris=0, source="127.0.0.2", interval=3.0, host="127.0.0.1"):
        self.address, self.source, self.interval = (host, port), source, interval
        self.wanted = {"idle": idle, "slowloris": slowloris}
        self.sockets = {}                  # socket -> its kind
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tend, daemon=True)

    def open(self):
        """Open every connection (without waiting for the server to accept them); keep them open."""
        for kind, count in self.wanted.items():
            for _ in range(count):
                self._open(kind)
        self._thread.start()
        return self

    def close(self):
        """Close every connection."""
        self._stop.set()
        self._thread.join()
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    def _open(self, kind):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((self.source, 0))
        sock.connect_ex(self.address)      # in progress; it completes when the server's kernel answers
        self.sockets[sock] = kind
        if kind == "slowloris":
            self._send(sock, self.SLOW_START)

    def _send(self, sock, data):
        try:
            sock.send(data)
        except OSError:                    # not connected yet, or a full buffer: the next turn sends
            pass

    def _tend(self):
        while not self._stop.wait(self.interval):
            for sock, kind in list(self.sockets.items()):
                if self._closed_by_server(sock):
                    del self.sockets[sock]
                    sock.close()
                    self._open(kind)
                    self.reopened += 1
                elif kind == "slowloris":
                    self._send(sock, b"a")

    @staticmethod
    def _closed_by_server(sock):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return True                    # refused or reset
        try:
            return sock.recv(65536) == b""
        except (BlockingIOError, InterruptedError):
            return False                   # open, nothing to read
        except OSError as error:
            return error.errno != errno.ENOTCONN     # ENOTCONN: still connecting


def rss_mib(pid, field="VmRSS"):
    """A memory figure of a process from /proc/PID/status, in MiB (VmRSS: resident now, VmHWM:
    its peak); None once the process is gone."""
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


class MemoryWatch:
    """The resident memory of a process, sampled by a thread: its peak, and a cap.

    Above `cap_mib` the process is killed (SIGKILL) and `capped` says so: a server whose memory
    grows without bound must not take a shared machine down with it.
    """

    def __init__(self, pid, cap_mib=None, interval=0.05):
        self.pid, self.cap_mib, self.interval = pid, cap_mib, interval
        self.capped = False
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def now(self):
        """Resident memory now (MiB), 0 once the process is gone."""
        return round(rss_mib(self.pid) or 0.0, 1)

    def peak(self):
        """The highest resident memory (MiB) so far: the kernel's high-water mark, or the
        highest sample once the process is gone."""
        self._peak = max(self._peak, rss_mib(self.pid, "VmHWM") or 0.0)
        return round(self._peak, 1)

    def settled(self, seconds):
        """Resident memory (MiB) `seconds` after now: what stays once a storm is over."""
        time.sleep(seconds)
        return self.now()

    def stop(self):
        """Stop sampling; the figures stay readable."""
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(self.interval):
            resident = rss_mib(self.pid)
            if resident is None:
                return
            self.peak()
            if self.cap_mib and resident > self.cap_mib:
                self.capped = True
                os.kill(self.pid, signal.SIGKILL)
                return


def percentile(values, fraction):
    """The nearest-rank percentile of a list of numbers (0.0 for none)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


class HealthProbe:
    """GET /health from 127.0.0.1 every `interval` seconds while a fault lasts.

    Each question has its own thread and connection, so a stuck answer does not delay the
    next question: the figures are what a load balancer's health checks would see.
    """

    def __init__(self, url, interval=0.25, timeout=10.0):
        self.url, self.interval, self.timeout = url, interval, timeout
        self.answers = []                  # (seconds, status)
        self._askers = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ask_repeatedly, daemon=True)

    def start(self):
        """Start asking."""
        self._thread.start()
        return self

    def stop(self):
        """Ask no more, and wait for the answers (or timeouts) of the questions asked."""
        self._stop.set()
        self._thread.join()
        for asker in self._askers:
            asker.join()
        return self

    def figures(self):
        """p50, p95 and max latency (s), questions asked, answered (200) within 1 s, and failed."""
        waits = [seconds for seconds, _ in self.answers]
        return {"/health p50 (s)": round(percentile(waits, 0.50), 3),
                "/health p95 (s)": round(percentile(waits, 0.95), 3),
                "/health max (s)": round(max(waits or [0.0]), 3),
                "/health asked": len(waits),
                "/health within 1 s": sum(1 for seconds, status in self.answers if status == 200 and seconds <= 1),
                "/health failed": sum(1 for _, status in self.answers if status != 200)}

    def _ask_repeatedly(self):
        while True:
            asker = threading.Thread(target=self._ask, daemon=True)
            asker.start()
            self._askers.append(asker)
            if self._stop.wait(self.interval):
                return

    def _ask(self):
        began = time.monotonic()
        status = request(self.url, "GET", "/health", timeout=self.timeout)[0]
        self.answers.append((time.monotonic() - began, status))


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


def scenario_restart(db, workdir, devices=8, rows_per_batch=5, outage_seconds=2.0):
    """Stop and restart MariaDB while devices push and pull through one server."""
    database = db.create_database("restart_%d" % random.randrange(10 ** 6))
    server = Server(db, database, os.path.join(workdir, "restart.log")).start()
    figures = Figures(**{"faults injected": 1, "requests": 0, "device failures": 0})
    stop = threading.Event()
    threads, acknowledged, started = sync_devices([server.url], figures, devices, stop, "r", rows_per_batch)
    started.wait(30)
    time.sleep(0.5)
    db.stop()
    # during the outage: a quick 503 with Retry-After, no hanging
    slowest, ended = 0.0, time.monotonic() + outage_seconds
    while time.monotonic() < ended:
        began = time.monotonic()
        status, headers, payload = request(server.url, "POST", "/sync/pull", {"tables": ["sales"]}, timeout=15)
        slowest = max(slowest, time.monotonic() - began)
        figures.add("requests")
        assert status == 503 and headers.get("Retry-After"), (status, payload)
        time.sleep(0.1)
    figures["slowest answer during outage (s)"] = round(slowest, 3)
    db.start()
    time.sleep(1.5)                        # let the devices finish their retries against the new server
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    present = set(server_rows(db, database, "sales"))
    figures["acknowledged writes"] = len(acknowledged)
    figures["lost writes"] = len(set(acknowledged) - present)
    figures["doubled writes"] = doubled_inserts(db, database, "r")
    status, _, payload = request(server.url, "GET", "/sync/status")
    figures["recovered without restart"] = status == 200
    server.stop()
    return figures


def scenario_crash(db, workdir, operations=8000):
    """Kill the server with SIGKILL in the middle of a large push; the batch is all there or not at all."""
    database = db.create_database("crash_%d" % random.randrange(10 ** 6))
    server = Server(db, database, os.path.join(workdir, "crash.log")).start()
    body = {"device_id": "till", "batch_id": "closing",
            "operations": [{"table": "sales", "action": "insert", "data": {"id": "c%06d" % n, "total": "2.50"}}
                           for n in range(operations)]}
    # Another connection holds the push's last key uncommitted, so the push stops on that row's lock
    # with every row before it written: the server is killed while its transaction is open.
    blocker = db.connect(database)
    blocker.autocommit = False
    blocker.cursor().execute("INSERT INTO sales (id) VALUES ('c%06d')" % (operations - 1))
    answer = []
    sender = threading.Thread(target=lambda: answer.append(request(server.url, "POST", "/sync/push", body,
                                                                   timeout=120)))
    sender.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if db.sql("SELECT COUNT(*) FROM information_schema.INNODB_LOCK_WAITS")[0][0] > 0:
            break
        time.sleep(0.1)                    # polling much faster than this starves the push on 2 cores
    else:
        raise AssertionError("the push never reached the locked row")
    server.stop(kill=True)
    sender.join()
    blocker.rollback()
    blocker.close()
    time.sleep(0.5)
    after_crash = db.sql("SELECT COUNT(*) FROM sales", database)[0][0]
    server.start()
    figures = Figures(**{"faults injected": 1, "requests": 2})
    retried = push_until_acknowledged([server.url], figures, body)
    figures["rows right after the crash"] = after_crash
    figures["batch all-or-nothing"] = after_crash in (0, operations)
    figures["rows after retry"] = db.sql("SELECT COUNT(*) FROM sales", database)[0][0]
    figures["retry applied once"] = bool(retried.get("replayed")) == (after_crash == operations)
    figures["lost writes"] = operations - figures["rows after retry"]
    figures["doubled writes"] = doubled_inserts(db, database, "c")
    server.stop()
    return figures


def scenario_load(db, workdir, devices=50, rounds=8, seed=7):
    """Many devices pushing with batch ids and retries, and pulling, through two server instances."""
    database = db.create_database("load_%d" % random.randrange(10 ** 6))
    servers = [Server(db, database, os.path.join(workdir, "load-%d.log" % n), THREADS=8, DB_POOL_SIZE=8).start()
               for n in range(2)]
    urls = [server.url for server in servers]
    figures = Figures(**{"requests": 0, "devices": devices, "server instances": 2, "replays": 0,
                         "device failures": 0})
    expected = {}                          # id -> note, for the rows devices own (sales)
    lock = threading.Lock()
    finals = {}

    def device(number):
        rng = random.Random(seed * 1000 + number)
        own, checkpoint, rows = {}, None, {}
        for round_ in range(rounds):
            operations = []
            for n in range(2):
                row_id = "L%d-%d-%d" % (number, round_, n)
                own[row_id] = "new"
                operations.append({"table": "sales", "action": "insert", "data": {"id": row_id, "note": "new"}})
            if own and rng.random() < 0.7:
                row_id = rng.choice(sorted(own))
                own[row_id] = "edited %d" % round_
                operations.append({"table": "sales", "action": "update", "data": {"id": row_id, "note": own[row_id]}})
            if len(own) > 3 and rng.random() < 0.3:
                row_id = rng.choice(sorted(own))
                del own[row_id]
                operations.append({"table": "sales", "action": "delete", "data": {"id": row_id}})
            operations.append({"table": "product_stock", "action": "upsert",
                               "data": {"product_id": "shared-%d" % rng.randrange(5), "store_id": 1,
                                        "qty": rng.randrange(100)}})
            body = {"device_id": "load%d" % number, "batch_id": "round-%d" % round_, "operations": operations}
            push_until_acknowledged(urls, figures, body)
            figures.add("pushes acknowledged")
            if rng.random() < 0.25:        # the answer was "lost": the device sends the same batch again
                again = push_until_acknowledged(urls, figures, body)
                assert again.get("replayed") is True, again
                figures.add("replays")
            checkpoint = pull_until_done(urls, figures, ["sales", "product_stock"], checkpoint, rows)
        with lock:
            expected.update(own)
        finals[number] = (checkpoint, rows)

    began = time.monotonic()
    threads = start_devices(device, devices, figures)
    for thread in threads:
        thread.join(timeout=600)
    figures["seconds"] = round(time.monotonic() - began, 1)
    truth = {table: server_rows(db, database, table) for table in ("sales", "product_stock")}
    past_staleness()
    equal = 0
    for number, (checkpoint, rows) in finals.items():
        pull_until_done(urls, figures, ["sales", "product_stock"], checkpoint, rows)
        if all(_comparable(rows.get(table, {})) == truth[table] for table in truth):
            equal += 1
    figures["devices equal to server"] = equal
    own_rows = {key: row["note"] for key, row in truth["sales"].items() if key.startswith("L")}
    figures["lost writes"] = sum(1 for key, note in expected.items() if own_rows.get(key) != note)
    figures["doubled writes"] = doubled_inserts(db, database, "L") + len(set(own_rows) - set(expected))
    figures["change log gaps"] = change_log_gaps(db, database)
    for server in servers:
        server.stop()
    return figures


def past_staleness():
    """Wait until every instance's watcher has looked after the last write: a poll answered from
    its memory may lag the database by up to WATCH_INTERVAL_SECONDS (docs/protocol.md, Idle polls)."""
    from cloudsync import WATCH_INTERVAL_SECONDS
    time.sleep(2 * WATCH_INTERVAL_SECONDS)


def push_with_checkpoint(urls, figures, body, rows):
    """Send a push with the device's checkpoint and batch id until it is answered 200.

    Counts every other answer by status. A 410 (checkpoint expired) makes the
    device start over: the batch goes out again without a checkpoint, and the
    device's copy is dropped. When the answer moves the checkpoint, the server
    proved the device holds exactly what it pushed: the operations are applied
    to its copy, as a device applies them before it pushes. Returns the
    device's checkpoint.
    """
    for attempt in range(600):
        status, _, payload = request(random.choice(urls), "POST", "/sync/push", body)
        figures.add("requests")
        figures.add("push requests")
        if status == 200:
            if body.get("checkpoint") is None or payload["checkpoint"] == body["checkpoint"]:
                return body.get("checkpoint")
            figures.add("push checkpoints moved")
            for operation in body["operations"]:
                table, data = rows.setdefault(operation["table"], {}), operation["data"]
                if operation["action"] == "delete":
                    table.pop(row_key(data), None)
                else:
                    table[row_key(data)] = dict(table.get(row_key(data), {}), **data)
            return payload["checkpoint"]
        figures.add("push %s" % (status or "unanswered"))
        if status == 410:
            body = {name: value for name, value in body.items() if name != "checkpoint"}
            rows.clear()
        elif status not in (0, 500, 502, 503):
            raise AssertionError("push got %s: %s" % (status, payload))
        time.sleep(min(0.05 * (attempt + 1), 0.5))
    raise AssertionError("push was never acknowledged")


CONFLICT_COUNTERS = {"Innodb_deadlocks": "InnoDB deadlocks",
                     # a commit refused because a write from another node certified first
                     "wsrep_local_cert_failures": "Galera certification failures",
                     # a transaction of this node rolled back to let another node's write apply
                     "wsrep_local_bf_aborts": "Galera brute-force aborts"}


def conflict_counters(dbs):
    """Deadlocks and Galera conflicts so far, summed over the distinct servers of `dbs`."""
    totals = dict.fromkeys(CONFLICT_COUNTERS.values(), 0)
    for db in {db.port: db for db in dbs}.values():
        for name, value in db.sql("SHOW GLOBAL STATUS WHERE Variable_name IN (%s)"
                                  % ", ".join("'%s'" % name for name in CONFLICT_COUNTERS)):
            totals[CONFLICT_COUNTERS[name]] += int(value)
    return totals


def scenario_instances(dbs, database, workdir, devices=15, rounds=8, seed=5):
    """One cloudsync instance per entry of `dbs` (a Galera node each, or one server repeated).

    Devices push batches (batch ids, their checkpoint, conflicts skipped) and
    pull, each request through an instance chosen at random. Figures: requests
    and non-200 answers by kind and status, then lost and doubled writes,
    devices equal to the database, and gaps in the change log.
    """
    servers = []
    for number, db in enumerate(dbs):    # one at a time: each runs migrate as it starts
        servers.append(Server(db, database, os.path.join(workdir, "%s-%d.log" % (database, number)),
                              THREADS=8, DB_POOL_SIZE=8).start())
    urls = [server.url for server in servers]
    figures = Figures(**{"devices": devices, "instances": len(servers), "push requests": 0,
                         "pull requests": 0, "device failures": 0})
    expected, finals, lock = {}, {}, threading.Lock()
    counted = conflict_counters(dbs)

    def device(number):
        rng = random.Random(seed * 1000 + number)
        own, checkpoint, rows = {}, None, {}
        for round_ in range(rounds):
            operations = []
            for n in range(2):
                row_id = "G%d-%d-%d" % (number, round_, n)
                own[row_id] = "new"
                # every column, as a pull sends it: the device then holds exactly what the server does
                operations.append({"table": "sales", "action": "insert", "data": {
                    "id": row_id, "customer_id": None, "total": "1.00", "note": "new", "sold_at": None,
                    "store_id": None}})
            if rng.random() < 0.7:
                row_id = rng.choice(sorted(own))
                own[row_id] = "edited %d" % round_
                operations.append({"table": "sales", "action": "update", "data": {"id": row_id, "note": own[row_id]}})
            if len(own) > 3 and rng.random() < 0.3:
                row_id = rng.choice(sorted(own))
                del own[row_id]
                operations.append({"table": "sales", "action": "delete", "data": {"id": row_id}})
            if rng.random() < 0.5:
                operations.append({"table": "product_stock", "action": "upsert",
                                   "data": {"product_id": "shared-%d" % rng.randrange(5), "store_id": 1,
                                            "qty": rng.randrange(100)}})
            body = {"device_id": "dev%d" % number, "batch_id": "round-%d" % round_, "on_conflict": "skip",
                    "checkpoint": checkpoint, "operations": operations}
            checkpoint = push_with_checkpoint(urls, figures, body, rows)
            checkpoint = pull_until_done(urls, figures, ["sales", "product_stock"], checkpoint, rows)
        with lock:
            expected.update(own)
        finals[number] = (checkpoint, rows)

    began = time.monotonic()
    for thread in start_devices(device, devices, figures):
        thread.join(timeout=900)
    figures["seconds"] = round(time.monotonic() - began, 1)
    for name, value in conflict_counters(dbs).items():
        figures[name] = value - counted[name]
    for db in dbs:
        # a causal read: the node has applied every commit the cluster made (no-op without Galera)
        db.sql("SET STATEMENT wsrep_sync_wait = 1 FOR SELECT 1")
    db = dbs[0]
    truth = {table: server_rows(db, database, table) for table in ("sales", "product_stock")}
    past_staleness()
    equal = 0
    for number, (checkpoint, rows) in finals.items():
        pull_until_done(urls, figures, ["sales", "product_stock"], checkpoint, rows)
        if all(_comparable(rows.get(table, {})) == truth[table] for table in truth):
            equal += 1
    figures["devices equal to the database"] = equal
    own_rows = {key: row["note"] for key, row in truth["sales"].items() if key.startswith("G")}
    figures["lost writes"] = sum(1 for key, note in expected.items() if own_rows.get(key) != note)
    figures["doubled writes"] = doubled_inserts(db, database, "G") + len(set(own_rows) - set(expected))
    figures["change log gaps"] = change_log_gaps(db, database)
    figures["change log entries"] = db.sql("SELECT COUNT(*) FROM cloudsync_changes", database)[0][0]
    for server in servers:
        server.stop()
    return figures


def _run(conn, statement):
    """Run one statement on a connection; its rows.

    Through cmd_query, as cloudsync sends statements: a cursor would ping
    first, and the ping would take the error that a Galera brute-force abort
    leaves for the session's next command.
    """
    result = conn.cmd_query(statement)
    return [tuple(row) for row in conn.get_rows()[0]] if "columns" in result else []


def _outcome(conn, statement):
    """The statement's rows, or "error <number>"."""
    try:
        return _run(conn, statement)
    except Exception as error:                # the figure is which error
        return "error %s" % getattr(error, "errno", error)


def _timed(call):
    """(what call() returned, seconds it took)."""
    began = time.monotonic()
    result = call()
    return result, round(time.monotonic() - began, 2)


def _answer(status, payload):
    """An HTTP answer in a few words: the status, and the error and reset flag of a refusal."""
    if status == 200 or not isinstance(payload, dict):
        return str(status)
    return "%s %s%s" % (status, payload.get("error"), ", reset" if payload.get("reset") else "")


def scenario_lagging_node(cluster, workdir, lag_seconds=4.0):
    """A checkpoint issued through node 1 is used on node 3 while node 3 is paused behind.

    Node 3 stops applying (GaleraCluster.pause) and resumes after
    lag_seconds. Figures: what a pull and a push through node 3 answer with
    that checkpoint while it is behind, and how long they took; then a pull
    after it caught up.
    """
    database = cluster.create_database("lag_%d" % random.randrange(10 ** 6))
    first = Server(cluster.nodes[0], database, os.path.join(workdir, "lag-1.log")).start()
    behind = Server(cluster.nodes[2], database, os.path.join(workdir, "lag-3.log")).start()
    figures = Figures()

    def push(url, name, checkpoint):
        body = {"device_id": "lagging", "batch_id": name, "checkpoint": checkpoint, "operations": [
            {"table": "sales", "action": "insert", "data": {"id": name, "total": "1.00"}}]}
        return request(url, "POST", "/sync/push", body)

    def pull(url, checkpoint):
        return request(url, "POST", "/sync/pull", {"tables": ["sales"], "since": checkpoint})

    checkpoint = pull_until_done([first.url], Figures(), ["sales"], None, {})
    push(first.url, "before", checkpoint)
    cluster.pause(2)
    resumer = threading.Timer(lag_seconds, cluster.resume, (2,))
    resumer.start()
    try:
        push(first.url, "while-behind", checkpoint)
        status, _, payload = pull(first.url, checkpoint)
        ahead = payload["checkpoint"]      # numbered past what node 3 has applied
        figures["checkpoint from node 1"] = status
        (status, _, payload), took = _timed(lambda: pull(behind.url, ahead))
        figures["pull through node 3 while behind"] = "%s in %s s" % (_answer(status, payload), took)
        (status, _, payload), took = _timed(lambda: push(behind.url, "through-3", ahead))
        figures["push through node 3 while behind"] = "%s in %s s" % (_answer(status, payload), took)
    finally:
        resumer.join()
    status, _, payload = pull(behind.url, ahead)
    figures["pull through node 3 once caught up"] = _answer(status, payload)
    first.stop()
    behind.stop()
    return figures


def scenario_failover(cluster, workdir, devices=4, before_seconds=1.0, after_seconds=4.0):
    """One instance with DB_HOST listing nodes 1 and 2; devices push and pull; node 1 is killed.

    Figures: what the devices were answered, acknowledged writes lost or
    doubled, whether a checkpoint issued before the kill goes on after it (no
    reset), and the devices equal to the database. Node 1 is started again at
    the end (the cluster is whole for whoever uses it next).
    """
    database = cluster.create_database("failover_%d" % random.randrange(10 ** 6))
    first, second = cluster.nodes[0], cluster.nodes[1]
    server = Server(first, database, os.path.join(workdir, "failover.log"),
                    DB_HOST="127.0.0.1:%d,127.0.0.1:%d" % (first.port, second.port)).start()
    figures = Figures(devices=devices, **{"device failures": 0})
    old = pull_until_done([server.url], Figures(), ["sales"], None, {})
    stop_at = [None]
    acknowledged, finals, lock = {}, {}, threading.Lock()

    def device(number):
        checkpoint, rows, round_ = None, {}, 0
        while stop_at[0] is None or time.monotonic() < stop_at[0]:
            name = "F%d-%d" % (number, round_)
            body = {"device_id": "failover%d" % number, "batch_id": name, "operations": [
                {"table": "sales", "action": "insert", "data": {"id": name, "total": "1.00"}}]}
            push_until_acknowledged([server.url], figures, body)
            with lock:
                acknowledged[name] = True
            checkpoint = pull_until_done([server.url], figures, ["sales"], checkpoint, rows)
            round_ += 1
        finals[number] = (checkpoint, rows)

    threads = start_devices(device, devices, figures)
    time.sleep(before_seconds)
    cluster.kill(0)
    killed = time.monotonic()
    stop_at[0] = killed + after_seconds
    for thread in threads:
        thread.join(timeout=120)
    figures["answers"] = dict(collections.Counter(str(status) for _, _, status, _ in figures.calls))
    status, _, payload = request(server.url, "POST", "/sync/pull", {"tables": ["sales"], "since": old})
    figures["checkpoint from before the kill"] = _answer(status, payload)
    truth = server_rows(second, database, "sales")
    past_staleness()
    equal = 0
    for number, (checkpoint, rows) in finals.items():
        pull_until_done([server.url], figures, ["sales"], checkpoint, rows)
        equal += _comparable(rows.get("sales", {})) == truth
    figures["devices equal to the database"] = equal
    figures["acknowledged"] = len(acknowledged)
    figures["lost writes"] = sum(1 for name in acknowledged if name not in truth)
    figures["doubled writes"] = doubled_inserts(second, database, "F")
    figures["change log gaps"] = change_log_gaps(second, database)
    server.stop()
    cluster.restart(0)
    return figures


def scenario_read_only_node(cluster, workdir):
    """cloudsync serve against a read_only node, as a user read_only binds: how it ends."""
    database = cluster.create_database("readonly_%d" % random.randrange(10 ** 6))
    user, password = cluster.add_user(database)
    env = dict(os.environ, DB_HOST="127.0.0.1", DB_USER=user, DB_PASS=password, DB_NAME=database,
               ALLOWED_TABLES=TABLES, TOKENS_FILE="", HOST="127.0.0.1", PORT=str(free_port()))
    command = [sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", ""]
    figures = Figures()
    migrated = subprocess.run(command + ["migrate"], env=dict(env, DB_PORT=str(cluster.nodes[0].port)),
                              capture_output=True, text=True, timeout=60)
    figures["migrate through node 1 (exit code)"] = migrated.returncode
    cluster.set_read_only(2, True)
    try:
        served = subprocess.run(command + ["serve"], env=dict(env, DB_PORT=str(cluster.nodes[2].port)),
                                capture_output=True, text=True, timeout=60)
    finally:
        cluster.set_read_only(2, False)
    figures["serve on read-only node 3 (exit code)"] = served.returncode
    lines = served.stderr.strip().splitlines()
    figures["its last words"] = lines[-1] if lines else ""
    figures["traceback"] = "Traceback" in served.stderr
    return figures


def sequencer_deadlock(db, wait_seconds=10):
    """Issue 25, item 2: a push that numbers its changes and the sequencer of a pull, deadlocked.

    Two connections play the statements of ChangeLog.sequence_in_transaction in cloudsync
    cc4c503 (a push numbering its changes just before its commit; from 43801a0 on, only the
    watcher numbers) on a database migrated by cloudsync:

    1. three committed changes wait to be numbered (cloudsync_pending 1-3);
    2. push: START TRANSACTION; INSERT INTO sales: its trigger adds pending row 4, uncommitted;
    3. sequencer: START TRANSACTION; SELECT ... last_seq FOR UPDATE; SELECT id FROM cloudsync_pending
       (sees 1-3); INSERT INTO cloudsync_changes ... SELECT ... WHERE id IN (1, 2, 3);
       DELETE FROM cloudsync_pending WHERE id IN (1, 2, 3): the list covers most of a small
       table, so the plan is a full scan, and the scan waits for row 4's lock;
    4. push: SELECT ... last_seq FOR UPDATE (sequence_in_transaction, called just before its
       commit): it waits for the sequencer, which waits for it.

    Returns the figures, and InnoDB's report of the latest deadlock.
    """
    database = db.create_database("deadlock_%d" % random.randrange(10 ** 6))
    connections = []
    figures = Figures()

    def delete():
        done = _outcome(sequencer, "DELETE FROM cloudsync_pending WHERE id IN (%s)" % ids)
        figures["sequencer's DELETE"] = "done" if done == [] else done

    try:
        env = dict(os.environ, DB_HOST="127.0.0.1", DB_PORT=str(db.port), DB_USER="root", DB_PASS="",
                   DB_NAME=database, ALLOWED_TABLES="sales", TOKENS_FILE="")
        subprocess.run([sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", "", "migrate"],
                       env=env, check=True, capture_output=True, timeout=60)
        connections.extend([db.connect(database), db.connect(database)])
        push, sequencer = connections
        for conn in connections:
            _run(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")   # as cloudsync's
            _run(conn, "SET SESSION innodb_lock_wait_timeout = %d" % wait_seconds)
        for n in range(3):
            db.sql("INSERT INTO sales (id) VALUES ('committed-%d')" % n, database)
        _run(push, "START TRANSACTION")
        _run(push, "INSERT INTO sales (id) VALUES ('pushed')")
        _run(sequencer, "START TRANSACTION")
        _run(sequencer, "SELECT value FROM cloudsync_meta WHERE name = 'last_seq' FOR UPDATE")
        ids = ", ".join(str(row[0]) for row in _run(sequencer, "SELECT id FROM cloudsync_pending ORDER BY id"))
        _run(sequencer, "INSERT INTO cloudsync_changes (seq, table_name, row_key, op, device_id, batch_id,"
                        " changed_at, scope, columns) SELECT ROW_NUMBER() OVER (ORDER BY id), table_name,"
                        " row_key, op, device_id, batch_id, changed_at, scope, columns FROM cloudsync_pending"
                        " WHERE id IN (%s)" % ids)
        figures["DELETE's plan"] = db.sql("EXPLAIN DELETE FROM cloudsync_pending WHERE id IN (%s)" % ids,
                                          database)[0][3]
        deleting = threading.Thread(target=delete)
        deleting.start()
        deadline, waiting = time.monotonic() + wait_seconds, []
        while not waiting and deleting.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)                 # InnoDB refreshes INNODB_TRX only when unread for 0.1 s
            waiting = db.sql("SELECT 1 FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"
                             " AND trx_mysql_thread_id = %d" % sequencer.connection_id)
        figures["sequencer's DELETE waits for the push's pending row"] = bool(waiting)
        granted = _outcome(push, "SELECT value FROM cloudsync_meta WHERE name = 'last_seq' FOR UPDATE")
        figures["push's last_seq FOR UPDATE"] = "granted" if isinstance(granted, list) else granted
        deleting.join()
        status = db.sql("SHOW ENGINE INNODB STATUS")[0][2]
        start = status.find("LATEST DETECTED DEADLOCK")
        report = status[start:status.find("\nTRANSACTIONS\n", start)] if start >= 0 else ""
        figures["InnoDB reports the deadlock"] = database in report
        return figures, report
    finally:
        for conn in connections:
            conn.close()
        db.sql("DROP DATABASE %s" % database)


def galera_behaviour(cluster, reads=2000):
    """What Galera does with what a sequencer relies on, measured on this cluster.

    GET_LOCK, SELECT ... FOR UPDATE and commits of one row through two
    nodes, reads right after a commit on another node with and without
    wsrep_sync_wait, causal reads on a lagging node, and auto-increment
    offsets (before and after a node leaves).
    """
    database = cluster.create_database("behaviour_%d" % random.randrange(10 ** 6))
    one, two = (node.connect(database) for node in cluster.nodes[:2])
    figures = Figures()

    _run(one, "CREATE TABLE meta (name VARCHAR(20) PRIMARY KEY, value BIGINT NOT NULL)")
    _run(one, "INSERT INTO meta VALUES ('last_seq', 0)")
    _run(two, "SET STATEMENT wsrep_sync_wait = 1 FOR SELECT 1")    # node 2 has applied both
    # GET_LOCK
    _run(one, "SELECT GET_LOCK('cloudsync', 0)")
    figures["GET_LOCK held on node 1: node 2 gets the same lock"] = \
        _run(two, "SELECT GET_LOCK('cloudsync', 0)")[0][0] == 1
    _run(one, "SELECT RELEASE_LOCK('cloudsync')")
    _run(two, "SELECT RELEASE_LOCK('cloudsync')")
    # SELECT ... FOR UPDATE of one row, on two nodes
    for conn in (one, two):
        _run(conn, "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        _run(conn, "START TRANSACTION")
    _run(one, "SELECT value FROM meta WHERE name = 'last_seq' FOR UPDATE")
    _, took = _timed(lambda: _run(two, "SELECT value FROM meta WHERE name = 'last_seq' FOR UPDATE"))
    figures["FOR UPDATE on node 2 while node 1 holds the row: waited (s)"] = took
    for conn in (one, two):
        _run(conn, "UPDATE meta SET value = value + 1 WHERE name = 'last_seq'")
    figures["both update it: node 1 commits"] = _outcome(one, "COMMIT") == []
    figures["both update it: node 2's commit"] = _outcome(two, "COMMIT")
    _outcome(two, "ROLLBACK")
    # a transaction holding the row on node 2 when node 1 commits a write to it
    _run(two, "START TRANSACTION")
    _run(two, "SELECT value FROM meta WHERE name = 'last_seq' FOR UPDATE")
    _run(one, "UPDATE meta SET value = value + 1 WHERE name = 'last_seq'")
    time.sleep(0.5)                           # node 2 applies it, aborting the transaction in its way
    figures["node 2 holding the row FOR UPDATE, after node 1 commits to it: its next statement"] = \
        _outcome(two, "SELECT 1")
    _outcome(two, "ROLLBACK")
    # reads right after a commit elsewhere
    _run(one, "CREATE TABLE seen (id INT PRIMARY KEY)")
    _run(two, "SET STATEMENT wsrep_sync_wait = 1 FOR SELECT 1")
    for wait in (0, 1):
        _run(two, "SET SESSION wsrep_sync_wait = %d" % wait)
        missed, spent = 0, 0.0
        for n in range(reads):
            _run(one, "INSERT INTO seen VALUES (%d)" % (wait * reads + n))
            began = time.perf_counter()
            missed += not _run(two, "SELECT 1 FROM seen WHERE id = %d" % (wait * reads + n))
            spent += time.perf_counter() - began
        figures["wsrep_sync_wait=%d: reads on node 2 missing the commit just made on node 1" % wait] = \
            "%d of %d (%.2f ms a read)" % (missed, reads, 1000 * spent / reads)
    # a causal read on a node that is behind
    third = cluster.nodes[2].connect(database)
    _run(third, "SET SESSION wsrep_sync_wait = 1")
    cluster.pause(2)
    _run(one, "INSERT INTO seen VALUES (-1)")
    resumer = threading.Timer(2.0, cluster.resume, (2,))
    resumer.start()
    rows, took = _timed(lambda: _outcome(third, "SELECT COUNT(*) FROM seen WHERE id = -1"))
    figures["wsrep_sync_wait=1 read on node 3, paused 2 s behind"] = "%s after %s s" % (rows, took)
    resumer.join()
    _run(third, "SET GLOBAL wsrep_provider_options = 'repl.causal_read_timeout=PT1S'")
    cluster.pause(2)
    _run(one, "INSERT INTO seen VALUES (-2)")
    rows, took = _timed(lambda: _outcome(third, "SELECT COUNT(*) FROM seen WHERE id = -2"))
    cluster.resume(2)
    _run(third, "SET GLOBAL wsrep_provider_options = 'repl.causal_read_timeout=PT30S'")
    figures["the same with repl.causal_read_timeout=PT1S, paused longer"] = "%s after %s s" % (rows, took)
    # auto-increment offsets
    figures["auto_increment (increment, offset) per node"] = [
        tuple(node.sql("SELECT @@auto_increment_increment, @@auto_increment_offset")[0]) for node in cluster.nodes]
    _run(one, "CREATE TABLE numbered (id BIGINT AUTO_INCREMENT PRIMARY KEY, node INT)")
    for node in cluster.nodes:
        node.sql("SET STATEMENT wsrep_sync_wait = 1 FOR SELECT 1")
    for round_ in range(2):
        for number, node in enumerate(cluster.nodes, 1):
            node.sql("INSERT INTO numbered (node) VALUES (%d), (%d)" % (number, number), database)
    figures["ids given by node 1, 2, 3 (two rows each, twice, in turn)"] = [
        [row[0] for row in _run(one, "SELECT id FROM numbered WHERE node = %d ORDER BY id" % number)]
        for number in (1, 2, 3)]
    cluster.kill(2)
    deadline = time.monotonic() + 30
    while cluster.nodes[0].status()["wsrep_cluster_size"] != "2" and time.monotonic() < deadline:
        time.sleep(0.1)
    figures["with node 3 gone: (increment, offset) on nodes 1, 2"] = [
        tuple(node.sql("SELECT @@auto_increment_increment, @@auto_increment_offset")[0])
        for node in cluster.nodes[:2]]
    cluster.restart(2)
    for conn in (one, two, third):
        conn.close()
    return figures


BAD_BODIES = [
    b"", b"{", b"[]", b"null", b'"x"', b"\xff\xfe\x00", b'{"operations": 5}', b'{"operations": [null]}',
    b'{"operations": [{"table": "sales; DROP TABLE sales", "action": "insert", "data": {"id": "1"}}]}',
    b'{"operations": [{"table": "sales", "action": "insert", "data": {"id`": "1"}}]}',
    b'{"operations": [{"table": "sales", "action": "insert", "data": {"id": "1", "total": 1e400}}]}',
    b'{"operations": [{"table": "sales", "action": "drop", "data": {"id": "1"}}]}',
    b'{"tables": "sales", "limit": -1}', b'{"since": "cs1.forged.mac", "tables": ["sales"]}',
    b'{"limit": 1E+999999}', b"[" * 5000 + b"]" * 5000,
]


def scenario_bad_inputs(db, workdir, count=400, seed=11):
    """Random malformed requests over HTTP: never a 5xx, and the database unchanged."""
    database = db.create_database("bad_%d" % random.randrange(10 ** 6))
    server = Server(db, database, os.path.join(workdir, "bad.log")).start()
    rng = random.Random(seed)
    before = server_rows(db, database, "sales")
    figures = Figures(**{"bad inputs tried": 0, "5xx answers": 0})
    for _ in range(count):
        body = rng.choice(BAD_BODIES)
        if rng.random() < 0.3:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        headers = {}
        if rng.random() < 0.2:
            headers["Content-Encoding"] = rng.choice(["gzip", "br"])
            if headers["Content-Encoding"] == "gzip" and rng.random() < 0.5:
                body = gzip.compress(body)
        method = rng.choice(["POST", "POST", "POST", "GET", "PUT", "DELETE"])
        path = rng.choice(["/sync/push", "/sync/pull", "/sync", "/sync/status", "/nope", "/sync/push/x"])
        status, _, payload = request(server.url, method, path, body, headers=headers)
        figures.add("bad inputs tried")
        if status >= 500 or status == 0:
            figures.add("5xx answers")
    figures["database changed"] = server_rows(db, database, "sales") != before
    server.stop()
    return figures


# ---------------------------------------------------------------------------
# Fault scenarios (issue 21): each fault under load, with what legitimate clients
# saw, /health latency during the fault, and cloudsync's memory
# ---------------------------------------------------------------------------
# Server settings are passed as upper-case keywords (THREADS=4); QUICK holds each
# scenario's small form, which the tests run.


def count_writes(figures, db, database, acknowledged, prefix, table="sales"):
    """Add the acknowledged writes, and those lost (absent) or doubled (inserted twice), to figures."""
    present = {row[0] for row in db.sql("SELECT id FROM %s WHERE id LIKE '%s%%'" % (table, prefix), database)}
    figures.add("acknowledged writes", len(acknowledged))
    figures.add("lost writes", len(set(acknowledged) - present))
    figures.add("doubled writes", doubled_inserts(db, database, prefix, table))


def count_memory(figures, watch, settle_seconds):
    """Peak resident memory of the server, and what stays `settle_seconds` after the load."""
    figures["peak RSS (MiB)"] = watch.peak()
    figures["settled RSS (MiB)"] = watch.settled(settle_seconds) if not watch.capped else None
    watch.stop()


def recovered(url):
    """Whether the server answers /sync/status (it reads the database) with 200 within 10 s."""
    return request(url, "GET", "/sync/status", timeout=10)[0] == 200


def scenario_frozen_database(db, workdir, devices=8, freeze_seconds=40.0, settle_seconds=5.0,
                             memory_cap_mib=None, **settings):
    """Freeze the database (a proxy stops forwarding) while devices push and pull through one server."""
    database = db.create_database("frozen_%d" % random.randrange(10 ** 6))
    proxy = TcpProxy(db.port)
    server = Server(db, database, os.path.join(workdir, "frozen.log"), DB_PORT=proxy.port, **settings).start()
    watch = MemoryWatch(server.process.pid, memory_cap_mib)
    figures = Figures(**{"faults injected": 1, "requests": 0, "device failures": 0,
                         "database wait (s)": float(settings.get("DB_WAIT_SECONDS", 10))})
    stop = threading.Event()
    threads, acknowledged, started = sync_devices([server.url], figures, devices, stop, "f", pause=0.1)
    started.wait(30)
    time.sleep(0.5)
    probe = HealthProbe(server.url).start()
    frozen_at = time.monotonic()
    proxy.freeze()
    time.sleep(freeze_seconds)
    proxy.resume()
    resumed_at = time.monotonic()
    probe.stop()
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    figures["frozen for (s)"] = round(resumed_at - frozen_at, 1)
    figures["slowest answer during the fault (s)"] = figures.slowest(frozen_at, resumed_at)
    figures.update(probe.figures())
    count_writes(figures, db, database, acknowledged, "f")
    figures["recovered without restart"] = recovered(server.url)
    count_memory(figures, watch, settle_seconds)
    server.stop()
    proxy.close()
    return figures


def scenario_killed_database(db, workdir, devices=8, outage_seconds=5.0, settle_seconds=5.0,
                             memory_cap_mib=None, **settings):
    """Under load, reset every database connection, then kill MariaDB (SIGKILL) and start it again."""
    database = db.create_database("killed_db_%d" % random.randrange(10 ** 6))
    proxy = TcpProxy(db.port)
    server = Server(db, database, os.path.join(workdir, "killed-db.log"), DB_PORT=proxy.port, **settings).start()
    watch = MemoryWatch(server.process.pid, memory_cap_mib)
    figures = Figures(**{"faults injected": 2, "requests": 0, "device failures": 0})
    stop = threading.Event()
    threads, acknowledged, started = sync_devices([server.url], figures, devices, stop, "k", pause=0.1)
    started.wait(30)
    time.sleep(0.5)
    probe = HealthProbe(server.url).start()
    fault_at = time.monotonic()
    proxy.kill_connections()               # queries in flight lose their connection
    time.sleep(1.0)
    db.stop(kill=True)                     # transactions in flight die with the database
    time.sleep(outage_seconds)
    db.start()
    back_at = time.monotonic()
    probe.stop()
    time.sleep(1.0)                        # devices retry their failed batches against the database
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    figures["slowest answer during the fault (s)"] = figures.slowest(fault_at, back_at)
    figures.update(probe.figures())
    count_writes(figures, db, database, acknowledged, "k")
    figures["recovered without restart"] = recovered(server.url)
    count_memory(figures, watch, settle_seconds)
    server.stop()
    proxy.close()
    return figures


def scenario_killed_server(db, workdir, devices=8, kills=3, load_seconds=3.0, settle_seconds=5.0,
                           memory_cap_mib=None, **settings):
    """Kill cloudsync (SIGKILL) under load and start it again at once; devices retry with batch ids.

    /health is asked after the last restart, while every device retries against the fresh process.
    """
    database = db.create_database("killed_server_%d" % random.randrange(10 ** 6))
    server = Server(db, database, os.path.join(workdir, "killed-server.log"), **settings).start()
    figures = Figures(**{"faults injected": kills, "requests": 0, "device failures": 0})
    stop = threading.Event()
    threads, acknowledged, started = sync_devices([server.url], figures, devices, stop, "s", pause=0.05)
    started.wait(30)
    slowest_restart = 0.0
    for _ in range(kills):
        time.sleep(load_seconds)
        killed_at = time.monotonic()
        server.stop(kill=True)
        server.start()
        slowest_restart = max(slowest_restart, time.monotonic() - killed_at)
    watch = MemoryWatch(server.process.pid, memory_cap_mib)
    probe = HealthProbe(server.url).start()
    time.sleep(load_seconds)
    probe.stop()
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    figures["slowest restart (s)"] = round(slowest_restart, 3)
    figures.update(probe.figures())
    count_writes(figures, db, database, acknowledged, "s")
    count_memory(figures, watch, settle_seconds)
    server.stop()
    return figures


def scenario_connection_flood(db, workdir, idle=2000, slowloris=200, flood_seconds=30.0, devices=2,
                              settle_seconds=5.0, memory_cap_mib=None, **settings):
    """Idle keep-alive and slowloris connections from 127.0.0.2 while 127.0.0.1 asks /health and pushes."""
    database = db.create_database("flood_%d" % random.randrange(10 ** 6))
    server = Server(db, database, os.path.join(workdir, "flood.log"), **settings).start()
    watch = MemoryWatch(server.process.pid, memory_cap_mib)
    figures = Figures(**{"faults injected": 1, "requests": 0, "device failures": 0})
    stop = threading.Event()
    threads, acknowledged, started = sync_devices([server.url], figures, devices, stop, "c", pause=0.2)
    started.wait(30)
    flood = ConnectionFlood(server.port, idle, slowloris).open()
    flood_at = time.monotonic()
    probe = HealthProbe(server.url).start()
    time.sleep(flood_seconds)
    ended_at = time.monotonic()
    figures["flood connections open"] = len(flood.sockets)
    figures["flood reconnections"] = flood.reopened
    flood.close()
    probe.stop()
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    pushes = [(seconds, status) for began, seconds, status, path in figures.calls
              if path == "/sync/push" and flood_at <= began <= ended_at]
    figures["pushes during the fault"] = len(pushes)
    figures["pushes within 1 s"] = sum(1 for seconds, status in pushes if status == 200 and seconds <= 1)
    figures["slowest answer during the fault (s)"] = figures.slowest(flood_at, ended_at)
    figures.update(probe.figures())
    count_writes(figures, db, database, acknowledged, "c")
    count_memory(figures, watch, settle_seconds)
    server.stop()
    return figures


LARGE_TABLE = "attachments"
ROW_MARK = re.compile(rb"BIGROW:([\w-]+):")     # the start of each large row's text


def stream_pull(url, body, timeout):
    """A pull, gzipped as the reference client asks, whose answer is read and inflated in pieces,
    never held whole (it may be gigabytes).

    Returns (status, size of the JSON answer, {row id: times seen}, checkpoint, has_more). Rows
    are recognised by the mark their text starts with; checkpoint and has_more are the answer's
    last fields.
    """
    sent = urllib.request.Request(url + "/sync/pull", data=json.dumps(body).encode(), method="POST",
                                  headers={"Content-Type": "application/json", "Accept-Encoding": "gzip"})
    seen, size, carry = {}, 0, b""
    try:
        with urllib.request.urlopen(sent, timeout=timeout) as response:
            inflate = zlib.decompressobj(wbits=31) if response.headers.get("Content-Encoding") == "gzip" else None
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                for piece in ([chunk] if inflate is None else inflated(inflate, chunk)):
                    size += len(piece)
                    window = carry + piece
                    for match in ROW_MARK.finditer(window):
                        if match.end() > len(carry):     # a match inside carry was counted last turn
                            seen[match.group(1)] = seen.get(match.group(1), 0) + 1
                    carry = window[-65536:]
    except urllib.error.HTTPError as error:
        return error.code, size, seen, None, False
    except (OSError, zlib.error):
        return 0, size, seen, None, False
    tail = carry.decode("ascii", "replace")
    checkpoint = re.search(r'"checkpoint":\s*"([^"]+)"', tail)
    has_more = re.search(r'"has_more":\s*(true|false)', tail)
    if not checkpoint or not has_more:
        return -1, size, seen, None, False   # not the answer a pull gives
    return 200, size, seen, checkpoint.group(1), has_more.group(1) == "true"


def inflated(inflate, data, most=1 << 20):
    """What gzipped `data` inflates to, in pieces of at most `most` bytes: a MiB of one repeated
    letter inflates a thousandfold."""
    while data:
        yield inflate.decompress(data, most)
        data = inflate.unconsumed_tail


def large_row_server(db, workdir, name, memory_cap_mib, settings):
    """A database with the large table (MEDIUMTEXT rows) and a server on it, watched:
    (database, server, MemoryWatch, Figures)."""
    database = db.create_database("%s_%d" % (name, random.randrange(10 ** 6)))
    db.sql("CREATE TABLE %s (id VARCHAR(64) PRIMARY KEY, body MEDIUMTEXT) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
           % LARGE_TABLE, database)
    server = Server(db, database, os.path.join(workdir, "%s.log" % name), ALLOWED_TABLES=TABLES + "," + LARGE_TABLE,
                    **settings).start()
    watch = MemoryWatch(server.process.pid, memory_cap_mib)
    return database, server, watch, Figures(**{"requests": 0, "device failures": 0, "pull failures": 0,
                                              "baseline RSS (MiB)": watch.now()})


def large_row_push(device, ids, row_bytes):
    """A push inserting a large row of `row_bytes` for each id, its text starting with the id's mark."""
    return {"device_id": device, "batch_id": "%s-%s" % (device, ids[0]),
            "operations": [{"table": LARGE_TABLE, "action": "insert",
                            "data": {"id": i, "body": ("BIGROW:%s:" % i).ljust(row_bytes, "x")}} for i in ids]}


def pull_every_large_row(url, figures, limit):
    """Follow the pull loop over the large table from null: {row id: times seen}, or None on a failure."""
    since, seen = None, {}
    while True:
        began = time.monotonic()
        status, size, page, since, has_more = stream_pull(
            url, {"tables": [LARGE_TABLE], "since": since, "limit": limit}, timeout=600)
        figures.add("large pulls")
        figures.add("large pull MiB", round(size / 2 ** 20))
        figures.maximum("slowest large pull (s)", round(time.monotonic() - began, 1))
        if status != 200:
            figures.add("pull failures")
            return None
        for key, times in page.items():
            seen[key] = seen.get(key, 0) + times
        if not has_more:
            return seen


def scenario_large_rows(db, workdir, rows=1008, row_bytes=1 << 20, rows_per_push=9, pullers=3, limit=5000,
                        devices=2, settle_seconds=5.0, memory_cap_mib=8192, **settings):
    """A device pushes rows of 1 MiB text (9 a push); then several devices pull them at once with a
    large limit (gzipped, as the reference client asks), while 127.0.0.1 asks /health and other
    devices push and pull small rows.

    Every puller follows the pull loop (has_more) and must see each row exactly once.
    `memory_cap_mib` stops a server that grows past it (SIGKILL); it is then started again.
    """
    database, server, watch, figures = large_row_server(db, workdir, "large", memory_cap_mib, settings)
    began = time.monotonic()
    large = []
    for first in range(0, rows, rows_per_push):
        ids = ["big-%05d" % n for n in range(first, min(rows, first + rows_per_push))]
        push_until_acknowledged([server.url], figures, large_row_push("camera", ids, row_bytes), timeout=120)
        large.extend(ids)
    figures["large rows pushed"] = len(large)
    figures["push seconds"] = round(time.monotonic() - began, 1)
    figures["peak RSS while pushing (MiB)"] = watch.peak()

    stop = threading.Event()
    threads, acknowledged, started = sync_devices([server.url], figures, devices, stop, "g", pause=0.2)
    started.wait(30)
    probe = HealthProbe(server.url).start()
    seen_by = {}

    def puller(number):
        seen = pull_every_large_row(server.url, figures, limit)
        if seen is not None:
            seen_by[number] = seen

    pulls_at = time.monotonic()
    for thread in start_devices(puller, pullers, figures):
        thread.join()
    pulls_ended = time.monotonic()
    probe.stop()
    figures["killed at the memory cap"] = watch.capped
    count_memory(figures, watch, settle_seconds)
    if figures["killed at the memory cap"]:
        server.start()                     # the small devices finish against a fresh process
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    every_row_once = {key.encode(): 1 for key in large}
    figures["pullers that got every row once"] = sum(1 for seen in seen_by.values() if seen == every_row_once)
    figures["slowest answer during the fault (s)"] = figures.slowest(pulls_at, pulls_ended)
    figures.update(probe.figures())
    count_writes(figures, db, database, large, "big-", LARGE_TABLE)
    count_writes(figures, db, database, acknowledged, "g")
    server.stop()
    return figures


def scenario_memory_storm(db, workdir, rows=144, row_bytes=1 << 20, rows_per_push=9, pushers=16, pullers=16,
                          seed_pulls=40, settle_seconds=2.0, memory_cap_mib=8192, **settings):
    """Memory with the default settings under the heaviest valid requests at once: `pushers` pushes of
    `rows_per_push` 1 MiB rows (bodies near MAX_BODY_BYTES) and `pullers` pull loops of every large row,
    all at the same time, after `seed_pulls` different seed pulls of the large rows (the seed cache full).

    Reports the server's resident memory before, at its peak and `settle_seconds` after, and whether
    every puller got every row once.
    """
    database, server, watch, figures = large_row_server(db, workdir, "storm", memory_cap_mib, settings)
    large = []
    for first in range(0, rows, rows_per_push):
        ids = ["big-%05d" % n for n in range(first, min(rows, first + rows_per_push))]
        push_until_acknowledged([server.url], figures, large_row_push("camera", ids, row_bytes), timeout=120)
        large.extend(ids)
    for limit in range(1, seed_pulls + 1):          # each limit is an entry of the seed cache
        exchange(figures, server.url, "POST", "/sync/pull", {"tables": [LARGE_TABLE], "limit": limit}, timeout=120)
    figures["RSS with the seed cache full (MiB)"] = watch.now()
    seen_by, pushed = {}, []

    def pusher(number):
        ids = ["storm%02d-%05d" % (number, n) for n in range(rows_per_push)]
        push_until_acknowledged([server.url], figures, large_row_push("storm%02d" % number, ids, row_bytes),
                                timeout=120)
        pushed.extend(ids)

    def puller(number):
        seen = pull_every_large_row(server.url, figures, 5000)
        if seen is not None:
            seen_by[number] = seen
    probe = HealthProbe(server.url).start()
    began = time.monotonic()
    threads = start_devices(pusher, pushers, figures) + start_devices(puller, pullers, figures)
    for thread in threads:
        thread.join()
    ended = time.monotonic()
    probe.stop()
    figures["storm seconds"] = round(ended - began, 1)
    figures["slowest answer during the fault (s)"] = figures.slowest(began, ended)
    figures.update(probe.figures())
    figures["killed at the memory cap"] = watch.capped
    count_memory(figures, watch, settle_seconds)
    # every row pushed before the storm exactly once (a row the storm pushed while a puller scanned may
    # come once in the scan and once more from the log after it: the device upserts it again)
    figures["pullers that got every row once"] = sum(
        1 for seen in seen_by.values() if all(seen.get(key.encode()) == 1 for key in large))
    count_writes(figures, db, database, large + pushed, "", LARGE_TABLE)
    server.stop()
    return figures


FAULTS = {                                 # name (for --only): (title, scenario)
    "frozen-db": ("frozen database (proxy stops forwarding)", scenario_frozen_database),
    "killed-db": ("killed database (connections reset, then SIGKILL)", scenario_killed_database),
    "killed-cloudsync": ("killed cloudsync (SIGKILL, restart)", scenario_killed_server),
    "flood": ("connection flood from 127.0.0.2", scenario_connection_flood),
    "large-rows": ("large-row pulls (1 MiB rows)", scenario_large_rows),
    "memory": ("16 maximum pushes and 16 large pulls at once, seed cache full", scenario_memory_storm),
}

QUICK = {                                  # the small forms, for the tests and --quick
    # DB_WAIT_SECONDS=2 and a 10 s freeze: a bounded server answers 503 long before the database returns
    "frozen-db": dict(devices=6, freeze_seconds=10.0, settle_seconds=1.0, THREADS=4, DB_POOL_SIZE=4,
                      DB_WAIT_SECONDS=2),
    "killed-db": dict(devices=4, outage_seconds=2.0, settle_seconds=1.0),
    "killed-cloudsync": dict(devices=4, kills=1, load_seconds=1.5, settle_seconds=1.0),
    # more connections than MAX_CONNECTIONS (1000), for 5 s
    "flood": dict(idle=1200, slowloris=100, flood_seconds=5.0, settle_seconds=1.0),
    # 144 rows of 1 MiB (16 pushes), 3 pulls at once: over a GiB when a pull is bounded in rows only
    "large-rows": dict(rows=144, pullers=3, settle_seconds=2.0, memory_cap_mib=4096),
    "memory": dict(rows=36, seed_pulls=20, memory_cap_mib=4096),
}


def fault_summary(results):
    """docs/performance.md's table of the fault scenarios: one line each, the figures issue 21 asks for.

    A /health probe gives up when connecting or reading waits 10 s: a p95 of about 10 s means at
    least one question in twenty got no answer.
    """
    lines = ["| fault | writes acknowledged / lost / doubled | /health p50 / p95 / max (s) | /health within 1 s "
             "| slowest answer during the fault (s) | 503 / other 5xx / timeouts | RSS peak / settled (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for title, figures in results:
        lines.append("| %s | %s / %s / %s | %s / %s / %s | %s of %s | %s | %s / %s / %s | %s / %s |" % (
            title, figures["acknowledged writes"], figures["lost writes"], figures["doubled writes"],
            figures["/health p50 (s)"], figures["/health p95 (s)"], figures["/health max (s)"],
            figures["/health within 1 s"], figures["/health asked"],
            figures.get("slowest answer during the fault (s)", "-"),
            figures.get("503 answers", 0), figures.get("other 5xx answers", 0), figures.get("timeouts", 0),
            figures["peak RSS (MiB)"],
            "killed at the cap" if figures["settled RSS (MiB)"] is None else figures["settled RSS (MiB)"]))
    return "\n".join(lines)


def galera_figures(args, workdir):
    """Issue 25's measurements: [(scenario, figures)], and InnoDB's report of the sequencer deadlock."""
    results = []
    cluster = GaleraCluster()
    try:
        results.append(("Galera cluster start", {"nodes": len(cluster.nodes),
                                                 "seconds": round(cluster.started_in, 1)}))
        results.append(("what Galera does", galera_behaviour(cluster)))
        for name, dbs in (("one instance per node", cluster.nodes),
                          ("3 instances on node 1", [cluster.nodes[0]] * 3)):
            database = cluster.create_database("instances_%d" % random.randrange(10 ** 6))
            results.append(("Galera, %s" % name,
                            scenario_instances(dbs, database, workdir, args.devices, args.rounds)))
        results.append(("Galera, node 3 behind", scenario_lagging_node(cluster, workdir)))
        results.append(("Galera, node 3 read-only", scenario_read_only_node(cluster, workdir)))
    finally:
        cluster.close()
    db = PrivateMariaDB(workdir)
    db.start()
    try:
        database = db.create_database("instances_%d" % random.randrange(10 ** 6))
        results.append(("plain MariaDB, 3 instances",
                        scenario_instances([db] * 3, database, workdir, args.devices, args.rounds)))
        figures, report = sequencer_deadlock(db)
        results.append(("plain MariaDB, sequencer deadlock", figures))
    finally:
        db.close()
    return results, report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=50, help="simulated devices in the load scenario")
    parser.add_argument("--rounds", type=int, default=8, help="push+pull rounds per device")
    parser.add_argument("--quick", action="store_true",
                        help="every scenario in the small form the tests run (about two minutes)")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated scenarios to run: restart, crash, load, bad-inputs, "
                             + ", ".join(FAULTS) + " (default: all)")
    parser.add_argument("--memory-cap-mib", type=int, default=8192,
                        help="large-rows kills cloudsync past this resident memory, to spare the machine")
    parser.add_argument("--galera", action="store_true",
                        help="issue 25's measurements instead: a 3-node Galera cluster, then a plain MariaDB")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else ["restart", "crash", "load", "bad-inputs"] + list(FAULTS)
    unknown = set(chosen) - {"restart", "crash", "load", "bad-inputs"} - set(FAULTS)
    if unknown:
        parser.error("unknown scenario: %s" % ", ".join(sorted(unknown)))
    missing = galera_missing() if args.galera else "" if mariadb_available() else MARIADBD
    if missing:
        print("needs %s (apt-get install mariadb-server%s)" % (missing, " galera-4 rsync" if args.galera else ""))
        return 2
    rounds = min(args.rounds, 4) if args.quick else args.rounds
    workdir = tempfile.mkdtemp(prefix="cloudsync-reliability-")
    results, faults, report = [], [], None
    if args.galera:
        results, report = galera_figures(args, workdir)
        chosen = []
    db = PrivateMariaDB(workdir) if chosen else None
    try:
        if db is not None:
            db.start()
        if "restart" in chosen:
            results.append(("restart MariaDB under load",
                            scenario_restart(db, workdir, devices=6 if args.quick else 8)))
        if "crash" in chosen:
            results.append(("SIGKILL mid-push", scenario_crash(db, workdir, 5000 if args.quick else 8000)))
        if "load" in chosen:
            results.append(("load: %d devices, 2 instances" % args.devices,
                            scenario_load(db, workdir, args.devices, rounds)))
        if "bad-inputs" in chosen:
            results.append(("bad inputs over HTTP", scenario_bad_inputs(db, workdir, 200 if args.quick else 400)))
        for name, (title, scenario) in FAULTS.items():
            if name in chosen:
                keywords = dict(QUICK[name]) if args.quick else {}
                if name == "large-rows" and not args.quick:
                    keywords["memory_cap_mib"] = args.memory_cap_mib
                faults.append((title, scenario(db, workdir, **keywords)))
                print("%s: done" % title, file=sys.stderr)
    finally:
        if db is not None:
            db.close()
    print("| scenario | figures |")
    print("|---|---|")
    for name, figures in results + faults:
        print("| %s | %s |" % (name, ", ".join("%s: %s" % item for item in figures.items())))
    if faults:
        print()
        print(fault_summary(faults))
    if report:
        print("\nInnoDB's report of the sequencer deadlock:\n\n" + report)
    return 0

if __name__ == "__main__":
    sys.exit(main())
