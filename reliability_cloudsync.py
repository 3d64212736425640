#!/usr/bin/env python3
"""Fault and load scenarios for cloudsync, against a private MariaDB it starts itself.

    python3 reliability_cloudsync.py [--devices 50] [--rounds 8]

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
  change the database.

It prints the figures README's reliability section quotes. The test suite runs
the same scenarios with smaller numbers.

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
import gzip
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

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
                        ALLOWED_TABLES=TABLES, TOKENS_FILE="", LOG_LEVEL="WARNING", DB_CONNECT_TIMEOUT_SECONDS="2")
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
    """(status, headers, JSON payload); status 0 when the connection failed."""
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
    except (OSError, ValueError):
        return 0, {}, None


class Figures(dict):
    """Counters shared by threads."""

    def __init__(self, **start):
        super().__init__(start)
        self._lock = threading.Lock()

    def add(self, name, amount=1):
        with self._lock:
            self[name] = self.get(name, 0) + amount


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


def push_until_acknowledged(urls, figures, body, attempts=600):
    """Send a push (with its batch id) until it gets a 200; return the answer."""
    for attempt in range(attempts):
        status, _, payload = request(random.choice(urls), "POST", "/sync/push", body)
        figures.add("requests")
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
        status, _, payload = request(random.choice(urls), "POST", "/sync/pull",
                                     {"tables": tables, "since": checkpoint, "limit": 200})
        figures.add("requests")
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
                rows.setdefault(table, {})[row["id"]] = row
            for key in change["deleted"]:
                rows.setdefault(table, {}).pop(key, None)
        checkpoint = payload["checkpoint"]
        if not payload["has_more"]:
            return checkpoint
    raise AssertionError("pull loop did not finish")


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
    return {row["id"]: json.loads(json.dumps(row, default=_plain)) for row in rows}


def _plain(value):
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _comparable(rows):
    return {key: json.loads(json.dumps(row, default=_plain)) for key, row in rows.items()}


def change_log_gaps(db, database):
    """Missing sequence numbers between the compaction mark and the newest change."""
    count, low, high = db.sql("SELECT COUNT(*), MIN(seq), MAX(seq) FROM cloudsync_changes", database)[0]
    return 0 if not count else (high - low + 1) - count


def doubled_inserts(db, database, prefix):
    """Rows whose insert was recorded more than once (an acknowledged write applied twice)."""
    return db.sql("SELECT COUNT(*) FROM (SELECT row_key FROM cloudsync_changes WHERE table_name = 'sales' AND op = 'I'"
                  " AND row_key LIKE '[\"%s%%' GROUP BY row_key HAVING COUNT(*) > 1) AS twice" % prefix, database)[0][0]


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


def scenario_restart(db, workdir, devices=8, rows_per_batch=5, outage_seconds=2.0):
    """Stop and restart MariaDB while devices push and pull through one server."""
    database = db.create_database("restart_%d" % random.randrange(10 ** 6))
    server = Server(db, database, os.path.join(workdir, "restart.log")).start()
    figures = Figures(**{"faults injected": 1, "requests": 0, "device failures": 0})
    acknowledged = []
    started, stop = threading.Event(), threading.Event()

    def device(number):
        checkpoint, rows, batch = None, {}, 0
        while not stop.is_set() and batch < 1000:
            ids = ["r%d-%d-%d" % (number, batch, n) for n in range(rows_per_batch)]
            body = {"device_id": "dev%d" % number, "batch_id": "b%d" % batch,
                    "operations": [{"table": "sales", "action": "insert", "data": {"id": i, "total": "1.00"}}
                                   for i in ids]}
            push_until_acknowledged([server.url], figures, body)
            acknowledged.extend(ids)
            checkpoint = pull_until_done([server.url], figures, ["sales"], checkpoint, rows)
            started.set()
            batch += 1

    threads = start_devices(device, devices, figures)
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
                               "data": {"id": "shared-%d" % rng.randrange(5), "quantity": rng.randrange(100)}})
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
                    table.pop(data["id"], None)
                else:
                    table[data["id"]] = dict(table.get(data["id"], {}), **data)
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
                    "id": row_id, "customer_id": None, "total": "1.00", "note": "new", "sold_at": None}})
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
                                   "data": {"id": "shared-%d" % rng.randrange(5), "quantity": rng.randrange(100)}})
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

    Two connections play the statements of ChangeLog.sequence_in_transaction
    (as it is when this was written) on a database migrated by cloudsync:

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
    parser.add_argument("--galera", action="store_true",
                        help="issue 25's measurements instead: a 3-node Galera cluster, then a plain MariaDB")
    args = parser.parse_args(argv)
    missing = galera_missing() if args.galera else "" if mariadb_available() else MARIADBD
    if missing:
        print("needs %s (apt-get install mariadb-server%s)" % (missing, " galera-4 rsync" if args.galera else ""))
        return 2
    workdir = tempfile.mkdtemp(prefix="cloudsync-reliability-")
    report = None
    if args.galera:
        results, report = galera_figures(args, workdir)
    else:
        db = PrivateMariaDB(workdir)
        db.start()
        results = []
        try:
            results.append(("restart MariaDB under load", scenario_restart(db, workdir)))
            results.append(("SIGKILL mid-push", scenario_crash(db, workdir)))
            results.append(("load: %d devices, 2 instances" % args.devices,
                            scenario_load(db, workdir, args.devices, args.rounds)))
            results.append(("bad inputs over HTTP", scenario_bad_inputs(db, workdir)))
        finally:
            db.close()
    print("| scenario | figures |")
    print("|---|---|")
    for name, figures in results:
        print("| %s | %s |" % (name, ", ".join("%s: %s" % item for item in figures.items())))
    if report:
        print("\nInnoDB's report of the sequencer deadlock:\n\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
