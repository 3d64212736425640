// What the JavaScript tests share: the live server the pytest test started (CLOUDSYNC_URL), devices
// on it, the server's rows as a new device would pull them, and SQL on its database (js/sql.py).
import assert from "node:assert/strict";
import {execFileSync} from "node:child_process";
import {join} from "node:path";
import {Client, MemoryStorage} from "../cloudsync_client.mjs";

export const URL = process.env.CLOUDSYNC_URL;
export const TABLES = ["sales", "products", "customers", "item_sales", "product_stock"];
export const NOWHERE = "http://127.0.0.1:9";          // a closed port: the device is offline

/** A device on the live server; `storage` kept in `device.storage` for a restart. */
export async function device(name, options = {}) {
  const warnings = [];
  const client = await Client.open({url: URL, deviceId: name, tables: TABLES, storage: new MemoryStorage(),
    log: {warn: (message) => warnings.push(message)}, ...options});
  client.warnings = warnings;
  return client;
}

/** A unique prefix for a test's row ids: the tests of a file share one database. */
export function ids(name) {
  return (suffix) => `${name}-${suffix}`;
}

/** Run SQL on the server's database, as another program would; rows, or the count of changed rows. */
export function sql(statement, params = []) {
  const out = execFileSync(process.env.CLOUDSYNC_PYTHON, [join(process.env.CLOUDSYNC_DIR, "js", "sql.py"),
    statement, JSON.stringify(params)], {env: process.env, encoding: "utf8"});
  return JSON.parse(out);
}

/** Run a cloudsync.py command with the server's settings. */
export function cloudsync(...args) {
  return execFileSync(process.env.CLOUDSYNC_PYTHON, [join(process.env.CLOUDSYNC_DIR, "cloudsync.py"),
    "--env-file", "", ...args], {env: process.env, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"]});
}

async function post(path, body) {
  const response = await fetch(URL + path, {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body)});
  return {status: response.status, answer: await response.json()};
}

export function byKey(keyColumns) {
  return (a, b) => {
    for (const name of keyColumns) {
      const [x, y] = [a[name], b[name]];
      if (x !== y) return typeof x === typeof y ? (x < y ? -1 : 1) : typeof x === "number" ? -1 : 1;
    }
    return 0;
  };
}

/** The server's rows of `table`, read with a sync-mode pull from null, as a new device would. */
export async function serverRows(table) {
  const rows = [];
  let since = null;
  for (;;) {
    const {status, answer} = await post("/sync/pull", {tables: [table], since, limit: 1000});
    assert.equal(status, 200, JSON.stringify(answer));
    rows.push(...answer.changes[table].upserted);
    since = answer.checkpoint;
    if (!answer.has_more) return rows;
  }
}

/** Every device holds exactly the server's rows of every table. */
export async function assertEqualToServer(...clients) {
  for (const table of Object.keys(clients[0].tables)) {
    const order = byKey(clients[0].tables[table].primary_key);
    const expected = (await serverRows(table)).sort(order);
    for (const client of clients) {
      assert.deepEqual(client.rows(table).sort(order), expected, `${client.deviceId}: ${table}`);
    }
  }
}

/** Record the client's requests: [{path, body, status, answer}]. `lose(path, body)` true: the request
 * reaches the server, and its answer is lost on the way back. */
export function recordRequests(client, lose = () => false) {
  const calls = [];
  const request = client._request.bind(client);
  client._request = async (path, body = null, options = {}) => {
    const answer = await request(path, body, options);
    calls.push({path, body, ...answer});
    return lose(path, body) ? {status: null, answer: null, reason: "the answer was lost"} : answer;
  };
  return calls;
}

/** Wait for `check` to hold (a bound on how long a test may hang, not a timing assertion). */
export async function until(check, seconds = 10) {
  const deadline = Date.now() + seconds * 1000;
  while (!(await check())) {
    assert.ok(Date.now() < deadline, `waited ${seconds} s`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
