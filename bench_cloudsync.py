#!/usr/bin/env python3
"""Benchmark cloudsync against the original Node.js service, side by side, in one run.

    python3 bench_cloudsync.py                 # cloudsync alone
    python3 bench_cloudsync.py --with-original # and the Node service from ../shared/anchors/node-seed
    python3 bench_cloudsync.py --scopes        # row scopes: 1,000,000 rows over 100 stores

Both servers use the same MariaDB (CLOUDSYNC_BENCH_DB_HOST/PORT/USER/PASS,
default 127.0.0.1:3306 root) in a fresh database created for the run, on the
same machine, under the same wrk load. Prints one table: scenario, cloudsync,
original, ratio, target, pass/fail. Load comes from wrk when installed
(apt-get install wrk), else from a small standard-library load generator
(slower: use it for smoke runs only). Figures move with the machine: compare
only the ratios of one run.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHORS = os.path.join(HERE, "..", "shared", "anchors")
DB = {"host": os.environ.get("CLOUDSYNC_BENCH_DB_HOST", "127.0.0.1"),
      "port": int(os.environ.get("CLOUDSYNC_BENCH_DB_PORT", "3306")),
      "user": os.environ.get("CLOUDSYNC_BENCH_DB_USER", "root"),
      "password": os.environ.get("CLOUDSYNC_BENCH_DB_PASS", "")}
TABLES = "sales,products,customers,item_sales,product_stock,catalogue_small,catalogue_big"

PUSH_LUA = """
local BATCH = tonumber(os.getenv("BATCH") or "50")
local counter = 0
local nthreads = 0
function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
end
request = function()
  counter = counter + 1
  local ops = {}
  for i = 1, BATCH do
    local id = string.format("t%d-r%d-o%d-%s", tid, counter, i, os.getenv("RUN") or "x")
    ops[#ops + 1] = string.format(
      '{"table":"sales","action":"insert","data":{"id":"%s","customer_id":"C%d","total":%d.50,"note":"bench"}}',
      id, i, i)
  end
  local body = '{"device_id":"bench_' .. tid .. '","operations":[' .. table.concat(ops, ",") .. ']}'
  return wrk.format("POST", "/sync/push", {["Content-Type"] = "application/json"}, body)
end
function response(status, headers, body)
  if status ~= 200 then io.stderr:write("status " .. status .. "\\n") end
end
"""
PULL_LUA = """
local LIMIT = os.getenv("LIMIT") or "1000"
request = function()
  return wrk.format("POST", "/sync/pull", {["Content-Type"] = "application/json"},
    '{"tables":["products"],"limit":' .. LIMIT .. '}')
end
function response(status, headers, body)
  if status ~= 200 then io.stderr:write("status " .. status .. "\\n") end
end
"""
STATUS_LUA = 'request = function() return wrk.format("GET", "/sync/status") end\n'
HEALTH_LUA = 'request = function() return wrk.format("GET", "/health") end\n'
MIXED_LUA = """
local n = 0
request = function()
  n = n + 1
  if n % 3 == 0 then return wrk.format("GET", "/sync/status") end
  if n % 3 == 1 then
    return wrk.format("POST", "/sync/pull", {["Content-Type"] = "application/json"}, '{"tables":["products"],"limit":1000}')
  end
  local id = string.format("m%d-%d-%s", n, math.random(1, 1000000000), os.getenv("RUN") or "x")
  return wrk.format("POST", "/sync/push", {["Content-Type"] = "application/json"},
    '{"device_id":"mixed","operations":[{"table":"sales","action":"insert","data":{"id":"' .. id .. '","total":"1.00"}}]}')
end
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect(database=None):
    import mysql.connector
    return mysql.connector.connect(database=database, autocommit=True, **DB)


def sql(statement, database=None, params=()):
    conn = connect(database)
    try:
        cursor = conn.cursor()
        cursor.execute(statement, params)
        rows = cursor.fetchall() if cursor.with_rows else []
        cursor.close()
        return rows
    finally:
        conn.close()


def create_database(name, big_rows):
    """The example tables plus two catalogues (1,000 and big_rows rows) for the checkpoint scenario."""
    sql("CREATE DATABASE %s CHARACTER SET utf8mb4" % name)
    for statement in open(os.path.join(HERE, "schema-mysql.sql")).read().split(";"):
        if "CREATE" in statement:
            sql(statement, name)
    for table, rows in (("catalogue_small", 1000), ("catalogue_big", big_rows)):
        sql("CREATE TABLE %s (id INT PRIMARY KEY, name VARCHAR(100), price DECIMAL(12,2)) ENGINE=InnoDB" % table, name)
        # MariaDB's sequence engine makes the rows without a round trip each
        sql("INSERT INTO %s SELECT seq, CONCAT('item ', seq), seq %% 1000 + 0.99 FROM seq_1_to_%d" % (table, rows), name)
    sql("INSERT INTO products (id, name, price, barcode) SELECT CONCAT('p', LPAD(seq, 5, '0')), CONCAT('product ', seq),"
        " seq % 100 + 0.5, CONCAT('40', seq) FROM seq_1_to_5000", name)


class Process:
    """A server process on a loopback port."""

    def __init__(self, command, env, cwd, port, log_path):
        self.port = port
        self.url = "http://127.0.0.1:%d" % port
        log = open(log_path, "ab")
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        raise RuntimeError("server did not start; see %s" % log_path)

    def rss_mib(self):
        with open("/proc/%d/status" % self.process.pid) as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_cloudsync(database, workdir, threads):
    port = free_port()
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(port), DB_HOST=DB["host"], DB_PORT=str(DB["port"]),
               DB_USER=DB["user"], DB_PASS=DB["password"], DB_NAME=database, ALLOWED_TABLES=TABLES,
               TOKENS_FILE="", LOG_LEVEL="WARNING", THREADS=str(threads), DB_POOL_SIZE=str(threads))
    return Process([sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", "", "serve"], env, workdir,
                   port, os.path.join(workdir, "cloudsync.log"))


def start_original(database, workdir):
    """The Node.js reference service, installed into a copy of ../shared/anchors/node-seed."""
    source = os.path.join(ANCHORS, "node-seed")
    target = os.path.join(workdir, "node-seed")
    shutil.copytree(source, target)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=target, check=True,
                   capture_output=True)
    port = free_port()
    with open(os.path.join(target, ".env"), "w") as handle:
        handle.write("DB_HOST=%s\nDB_PORT=%d\nDB_USER=%s\nDB_PASS=%s\nDB_NAME=%s\nALLOWED_TABLES=%s\nPORT=%d\n"
                     % (DB["host"], DB["port"], DB["user"], DB["password"], database, TABLES, port))
    return Process(["node", "server.js"], dict(os.environ), target, port, os.path.join(workdir, "node.log"))


LOAD_GENERATOR = "auto"     # --load: wrk when installed, or the standard-library generator


def run_load(url, script, seconds, connections, workdir, env=None):
    """Requests per second under load: wrk when installed, else a small thread-based generator."""
    if LOAD_GENERATOR == "wrk" or LOAD_GENERATOR == "auto" and shutil.which("wrk"):
        path = os.path.join(workdir, "script-%d.lua" % abs(hash(script)))
        with open(path, "w") as handle:
            handle.write(script)
        result = subprocess.run(["wrk", "-t2", "-c%d" % connections, "-d%ds" % seconds, "-s", path, url],
                                capture_output=True, text=True, env=dict(os.environ, **(env or {})))
        for line in result.stdout.splitlines():
            if line.startswith("Requests/sec:"):
                return float(line.split()[1])
        raise RuntimeError("wrk said: %s %s" % (result.stdout, result.stderr))
    return _python_load(url, script, seconds, min(connections, 8), env or {})


def _python_load(url, script, seconds, connections, env):
    """Fallback load: keep-alive HTTP from threads, doing what each wrk script above does."""
    host, port = url.replace("http://", "").split(":")
    counts = [0] * connections
    stop = time.monotonic() + seconds
    kind = {PUSH_LUA: "push", PULL_LUA: "pull", STATUS_LUA: "status", HEALTH_LUA: "health", MIXED_LUA: "mixed"}[script]

    def worker(number):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        n = 0
        while time.monotonic() < stop:
            n += 1
            now = kind if kind != "mixed" else ("status", "pull", "push")[n % 3]
            if now == "health":
                conn.request("GET", "/health")
            elif now == "status":
                conn.request("GET", "/sync/status")
            elif now == "pull":
                conn.request("POST", "/sync/pull", '{"tables":["products"],"limit":%s}' % env.get("LIMIT", "1000"),
                             {"Content-Type": "application/json"})
            else:
                batch = int(env.get("BATCH", "1"))
                ops = ",".join('{"table":"sales","action":"insert","data":{"id":"py%d-%d-%d-%s","total":"1.50"}}'
                               % (number, n, i, env.get("RUN", "x")) for i in range(batch))
                conn.request("POST", "/sync/push", '{"device_id":"py","operations":[%s]}' % ops,
                             {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures.append("%s answered %d" % (now, response.status))
                return
            counts[number] += 1
        conn.close()
    failures = []
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(connections)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError("load failed: %s" % failures[0])
    return sum(counts) / (time.monotonic() - began)


def mariadb_cpu_seconds():
    """CPU seconds the local mariadbd/mysqld has used so far, or None when it is not on this machine."""
    for name in ("mariadbd", "mysqld"):
        found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
        if found:
            try:
                with open("/proc/%s/stat" % found[0]) as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                return None
    return None


def wait_numbered(database, timeout=600):
    """Seconds until cloudsync has numbered every pending change (its change log caught up)."""
    began = time.monotonic()
    while sql("SELECT COUNT(*) FROM cloudsync_pending", database)[0][0]:
        if time.monotonic() - began > timeout:
            raise RuntimeError("the change log did not catch up in %d s" % timeout)
        time.sleep(0.05)
    return time.monotonic() - began


def checkpoint_pull_ms(url, table, database, samples):
    """Median milliseconds of a checkpoint pull that finds 10 changed rows in `table`."""
    def post(body):
        request = urllib.request.Request(url + "/sync/pull", json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    # the device first syncs the whole table (not timed), then times pulls of 10 changes each
    checkpoint = None
    while True:
        answer = post({"tables": [table], "since": checkpoint, "limit": 5000})
        checkpoint = answer["checkpoint"]
        if not answer["has_more"]:
            break
    times = []
    for round_ in range(samples):
        sql("UPDATE %s SET price = price + 1 WHERE id IN (%s)" % (table, ",".join(
            str(1 + (round_ * 10 + n) % 1000) for n in range(10))), database)
        began = time.perf_counter()
        answer = post({"tables": [table], "since": checkpoint, "limit": 1000})
        times.append((time.perf_counter() - began) * 1000)
        assert len(answer["changes"][table]["upserted"]) == 10, answer
        checkpoint = answer["checkpoint"]
    return statistics.median(times)


def _post(url, body, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    request = urllib.request.Request(url + "/sync/pull", json.dumps(body).encode(), headers, method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def scope_bench(workdir, rows, stores, others, samples, threads):
    """Row scopes: a store's first sync page by page, and a pull behind other stores' changes.

    One scoped table of `rows` rows over `stores` stores; the device is store 7's till.
    Returns the result rows of the table main() prints.
    """
    database = "cloudsync_bench_scopes_%d" % os.getpid()
    sql("CREATE DATABASE %s CHARACTER SET utf8mb4" % database)
    try:
        sql("CREATE TABLE scoped_sales (id INT PRIMARY KEY, store_id INT NOT NULL, total DECIMAL(12,2),"
            " note VARCHAR(40), KEY scoped_sales_by_store (store_id, id)) ENGINE=InnoDB", database)
        sql("INSERT INTO scoped_sales SELECT seq, seq %% %d + 1, seq %% 1000 + 0.99, 'sale'"
            " FROM seq_1_to_%d" % (stores, rows), database)
        port = free_port()
        env = dict(os.environ, HOST="127.0.0.1", PORT=str(port), DB_HOST=DB["host"], DB_PORT=str(DB["port"]),
                   DB_USER=DB["user"], DB_PASS=DB["password"], DB_NAME=database, ALLOWED_TABLES="scoped_sales",
                   ROW_SCOPES="scoped_sales.store_id", TOKENS="till7:t7;store_id=7", TOKENS_FILE="",
                   LOG_LEVEL="WARNING", THREADS=str(threads), DB_POOL_SIZE=str(threads))
        server = Process([sys.executable, os.path.join(HERE, "cloudsync.py"), "--env-file", "", "serve"], env,
                         workdir, port, os.path.join(workdir, "cloudsync-scopes.log"))
        try:
            # the first sync of store 7's rows (rows / stores of them), 1,000 a page, each page timed;
            # one warm-up round, then the median of each page over five rounds
            rounds, page_rows = [], min(1000, rows // stores // 4)
            for _ in range(6):
                pages, since, held = [], None, 0
                while True:
                    began = time.perf_counter()
                    answer = _post(server.url, {"tables": ["scoped_sales"], "since": since,
                                                "limit": page_rows}, "t7")
                    got = len(answer["changes"]["scoped_sales"]["upserted"])
                    if got == page_rows:        # full pages only: the last one may hold few rows or none
                        pages.append((time.perf_counter() - began) * 1000)
                    held += got
                    since = answer["checkpoint"]
                    if not answer["has_more"]:
                        break
                assert held == rows // stores, held
                rounds.append(pages)
            pages = [statistics.median(times) for times in zip(*rounds[1:])]
            own = [6 + stores * n for n in range(10)]          # ten rows of store 7 (id % 100 == 6)

            def own_changes(ids):
                sql("UPDATE scoped_sales SET total = total + 1 WHERE id IN (%s)" % ",".join(map(str, ids)),
                    database)

            def timed_pulls(checkpoint):
                times = []
                for _ in range(samples):
                    began = time.perf_counter()
                    answer = _post(server.url, {"tables": ["scoped_sales"], "since": checkpoint,
                                                "limit": 1000}, "t7")
                    times.append((time.perf_counter() - began) * 1000)
                    assert len(answer["changes"]["scoped_sales"]["upserted"]) == 10, answer
                return statistics.median(times)
            # baseline: behind by 10 changes of its own store only
            baseline_checkpoint = since
            own_changes(own)
            wait_numbered(database)
            baseline = timed_pulls(baseline_checkpoint)
            # busy: behind by 10 of its own and `others` changes of other stores
            busy_checkpoint = _post(server.url, {"tables": ["scoped_sales"], "since": baseline_checkpoint,
                                                 "limit": 1000}, "t7")["checkpoint"]
            own_changes(own[:5])
            sql("UPDATE scoped_sales SET note = 'busy' WHERE store_id <> 7 ORDER BY id LIMIT %d" % others,
                database)
            own_changes(own[5:])
            wait_numbered(database)
            busy = timed_pulls(busy_checkpoint)
        finally:
            server.stop()
    finally:
        sql("DROP DATABASE IF EXISTS %s" % database)
    flat = max(pages) / min(pages)
    return [
        ("scoped first sync of store 7's %s rows, %s a page: first full page (median ms)"
         % (format(rows // stores, ","), format(page_rows, ",")), {"cloudsync": pages[0]}, None),
        ("  ... last full page (median ms)", {"cloudsync": pages[-1]}, None),
        ("  ... slowest / fastest full page", {"cloudsync": flat}, "flat"),
        ("scoped pull, 10 own changes, no other stores' (median ms)", {"cloudsync": baseline}, None),
        ("scoped pull, 10 own + %s other stores' changes (median ms)" % format(others, ","),
         {"cloudsync": busy}, "< 20 ms and <= baseline x2"),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with-original", action="store_true", help="also run the Node.js reference service")
    parser.add_argument("--seconds", type=int, default=10, help="seconds per load scenario (default 10)")
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="rows in the big catalogue")
    parser.add_argument("--threads", type=int, default=8, help="cloudsync THREADS and DB_POOL_SIZE")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works")
    parser.add_argument("--scopes", action="store_true",
                        help="only the row-scope scenarios: a table of --big-rows rows over 100 stores")
    parser.add_argument("--load", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator: wrk when installed (auto), or the slower standard-library one")
    args = parser.parse_args(argv)
    global LOAD_GENERATOR
    LOAD_GENERATOR = args.load
    if args.smoke:
        args.seconds, args.big_rows = 1, 2000
    workdir = tempfile.mkdtemp(prefix="cloudsync-bench-")
    if args.scopes:
        try:
            results = scope_bench(workdir, args.big_rows if not args.smoke else 20_000, 100,
                                  1000 if args.smoke else 100_000, 5 if args.smoke else 100, args.threads)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return print_results(results)
    database = "cloudsync_bench_%d" % os.getpid()
    create_database(database, args.big_rows)
    servers = {"cloudsync": start_cloudsync(database, workdir, args.threads)}
    if args.with_original:
        servers["original"] = start_original(database, workdir)
    results = []
    try:
        scenarios = [
            ("health: no database, the HTTP stack's ceiling (req/s)", HEALTH_LUA, {}, 16, None),
            ("push, 1 insert per batch (req/s)", PUSH_LUA, {"BATCH": "1"}, 16, 1.0),
            ("push, 50 inserts per batch (rows/s)", PUSH_LUA, {"BATCH": "50"}, 16, 2.0),
            ("pull of 1,000 unchanged rows (req/s)", PULL_LUA, {"LIMIT": "1000"}, 8, 3.0),
            ("status (req/s)", STATUS_LUA, {}, 16, None),
        ]
        for name, script, env, connections, target in scenarios:
            figures, database_cpu = {}, {}
            for label, server in servers.items():
                env_run = dict(env, RUN="%s%d" % (label, time.monotonic_ns()))
                cpu_before = mariadb_cpu_seconds()
                rate = run_load(server.url, script, args.seconds, connections, workdir, env_run)
                seconds = args.seconds
                if label == "cloudsync" and "push" in name:
                    # cloudsync numbers a plain push's changes after it answers: the time to
                    # finish numbering them counts, so the figure is what it sustains
                    seconds += wait_numbered(database)
                    rate *= args.seconds / seconds
                rows = rate * seconds * (50 if "50 inserts" in name else 1)
                if cpu_before is not None and "push" in name:
                    database_cpu[label] = (mariadb_cpu_seconds() - cpu_before) * 1000 / rows * 1000
                figures[label] = rate * (50 if "50 inserts" in name else 1)
            results.append((name, figures, target))
            if database_cpu:
                results.append(("  MariaDB CPU per 1,000 rows pushed (ms)", database_cpu, None))
        # pulls of rows that change between requests: a writer updates products all the time
        stop = threading.Event()

        def writer():
            n = 0
            while not stop.is_set():
                n += 1
                sql("UPDATE products SET price = price + 0.01 WHERE id = 'p%05d'" % (1 + n % 1000), database)
                time.sleep(0.002)
        thread = threading.Thread(target=writer)
        thread.start()
        figures = {}
        try:
            for label, server in servers.items():
                figures[label] = run_load(server.url, PULL_LUA, args.seconds, 8, workdir, {"LIMIT": "1000"})
        finally:
            stop.set()
            thread.join()
        results.append(("pull of 1,000 changing rows (req/s)", figures, 1.0))
        # checkpoint pulls: 10 changes, small table vs big table
        url = servers["cloudsync"].url
        small = checkpoint_pull_ms(url, "catalogue_small", database, 20 if args.smoke else 200)
        big = checkpoint_pull_ms(url, "catalogue_big", database, 20 if args.smoke else 200)
        results.append(("checkpoint pull, 10 changes, 1,000-row table (median ms)", {"cloudsync": small}, None))
        results.append(("checkpoint pull, 10 changes, %s-row table (median ms)" % format(args.big_rows, ","),
                        {"cloudsync": big}, "< 5 ms and <= small x1.5"))
        # memory: 64 connections doing mixed work
        peak = [0.0]
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], servers["cloudsync"].rss_mib())
                time.sleep(0.1)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            run_load(url, MIXED_LUA, args.seconds, 64, workdir, {"RUN": "mem%d" % time.monotonic_ns()})
        finally:
            sampling.set()
            sampler.join()
        results.append(("resident memory, 64 connections mixed (MiB)", {"cloudsync": peak[0]}, "< 80"))
    finally:
        for server in servers.values():
            server.stop()
        sql("DROP DATABASE IF EXISTS %s" % database)
        shutil.rmtree(workdir, ignore_errors=True)
    return print_results(results)


def print_results(results):
    """The results as a Markdown table, each target checked."""
    print("| scenario | cloudsync | original | ratio | target | result |")
    print("|---|---|---|---|---|---|")
    for name, figures, target in results:
        ours, theirs = figures.get("cloudsync"), figures.get("original")
        ratio = ours / theirs if ours and theirs else None
        if isinstance(target, float):
            verdict = "n/a" if ratio is None else ("pass" if ratio >= target else "FAIL")
            target_text = "≥ %.0fx" % target
        elif target == "< 80":
            verdict, target_text = ("pass" if ours < 80 else "FAIL"), "< 80 MiB"
        elif target and target.startswith("< 5 ms"):
            small = [f for n, f, t in results if "1,000-row" in n][0]["cloudsync"]
            verdict, target_text = ("pass" if ours < 5 and ours <= small * 1.5 else "FAIL"), target
        elif target and target.startswith("< 20 ms"):
            baseline = [f for n, f, t in results if "no other stores" in n][0]["cloudsync"]
            verdict, target_text = ("pass" if ours < 20 and ours <= baseline * 2 else "FAIL"), target
        elif target == "flat":
            verdict, target_text = ("pass" if ours <= 2 else "FAIL"), "≤ 2 (flat)"
        else:
            verdict, target_text = "", "-"
        print("| %s | %s | %s | %s | %s | %s |" % (
            name, "%.1f" % ours if ours is not None else "-", "%.1f" % theirs if theirs else "-",
            "%.2fx" % ratio if ratio else "-", target_text, verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
