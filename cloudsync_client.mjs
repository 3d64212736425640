/**
 * cloudsync_client.mjs: a device-side client for the cloudsync protocol, for browsers and Node.js 18+.
 *
 * One dependency-free ES module; it uses `fetch` and nothing else from outside the language (the
 * JSON-file storage imports `node:fs` when it is used). It gives a JavaScript app the guarantees
 * of cloudsync_client.py:
 *
 * - A local copy of the synced tables, behind a small storage interface: `IndexedDBStorage` in a
 *   browser, `MemoryStorage` and `FileStorage` (one JSON file, replaced atomically) in Node. The
 *   copy is loaded into memory when the client opens, so reads (`get`, `rows`, `pending`) are
 *   immediate; a write resolves once it is stored.
 * - Each local write changes the local copy and appends to the outbox in ONE storage
 *   transaction (`transaction()` groups several writes, such as a sale and its lines): neither is
 *   ever stored without the other.
 * - Every outbox operation keeps the checkpoint of the last pull applied before it was made. A
 *   push carries it, per operation and for the push (a push holds consecutive operations with the
 *   same checkpoint, so a server that reads only the push's checkpoint judges each operation
 *   exactly as one that reads the operation's), and conflicts are judged against what the user saw.
 * - Batch ids are stored before a push is sent, and an operation leaves the outbox only after the
 *   server's 200. A crash or a lost answer sends the same operations under the same batch id
 *   again, and the server applies them once (its answer then says `replayed`).
 * - Pulls may come at any time, also while edits wait in the outbox (the long-poll loop pulls
 *   continuously). The client keeps the server's version of each row that has pending operations
 *   (its base) and shows that base with the pending operations applied over it: a pull never
 *   overwrites a local edit, and an increment is never counted twice (the server's value plus
 *   this device's increments not yet acknowledged).
 * - Nothing is dropped silently. An operation the server refuses, an update or increment of a row
 *   the server does not have (`missing`), and a conflict the app does not resolve become dead
 *   letters, kept with the server's answer for the app to show, fix and `resend`, or `discard`;
 *   the local row goes back to the server's version.
 * - Conflicts: `onConflict(localOp, serverRow)` answers "server", "mine" (the device's changes are
 *   sent again over the server's row: the columns it set win, the others keep the server's
 *   values), or a merged row (sent over the server's); any other answer keeps the operation as a
 *   dead letter, with the server's row taken. A column with increments pending is never sent as a
 *   value after a conflict: the increments still add to it.
 * - Errors are told apart by the server's machine-readable `code` (falling back on the English
 *   `error` text of servers that do not send one). 5xx, 429 and network errors leave everything
 *   as it is (`offline`); a refusal retrying cannot fix (a bad token) throws a SyncError.
 * - 410 (checkpoint expired): the tables the server names (`reset_tables`), or all of them, are
 *   wiped and pulled again; pending operations stay and are shown over what comes back.
 * - The tables are described by the server (GET /sync/status) and kept, so a restart works offline;
 *   a column added on the server is learned. Decimals take the server's form ("3.5" is kept as
 *   "3.50" for a DECIMAL(12,2)) and whole numbers of integer columns are numbers, so a value has
 *   one form before and after a sync.
 * - `run()` keeps the device in sync: long polls (a change elsewhere arrives within about a
 *   second), a push as soon as the app writes, back-off with jitter after failures, and a `stop()`
 *   that aborts what is in flight and returns at once.
 *
 * Numbers travel as JSON numbers: a BIGINT value beyond 2^53 loses precision in JavaScript.
 */

const ACTIONS = ["insert", "update", "upsert", "delete", "increment"];

// Refusals that name one operation: it becomes a dead letter and the rest goes on.
const OPERATION_REFUSALS = new Set([
  "invalid_operation", "invalid_table", "invalid_action", "unknown_column", "missing_key", "invalid_value",
  "value_too_large", "data_refused", "duplicate", "read_only_table", "table_not_permitted", "rejected",
  "out_of_scope", "insert_only_table", "read_only_column", "too_large"]);

// For servers that do not send `code` yet: the code of each `error` text (REFUSALS in cloudsync.py).
const CODE_OF_ERROR = {
  "Invalid JSON": "invalid_json", "Invalid request": "invalid_request", "Invalid payload": "invalid_payload",
  "Too deeply nested": "too_deep", "Invalid operation": "invalid_operation", "Invalid table": "invalid_table",
  "Invalid action": "invalid_action", "Unknown column": "unknown_column", "Missing key": "missing_key",
  "Invalid value": "invalid_value", "Invalid checkpoint": "invalid_checkpoint", "Invalid limit": "invalid_limit",
  "Invalid wait": "invalid_wait", "Batch id required": "batch_id_required", "No tables configured": "no_tables",
  "Unauthorized": "unauthorized", "Forbidden": "forbidden", "Read-only table": "read_only_table",
  "Table not permitted": "table_not_permitted", "Insert-only table": "insert_only_table",
  "Read-only column": "read_only_column", "Out of scope": "out_of_scope", "Conflict": "conflict",
  "Batch id reused": "batch_reused", "Checkpoint expired": "expired", "Payload too large": "too_large",
  "Too many operations": "too_many_operations", "Value too large": "value_too_large",
  "Unsupported content encoding": "unsupported_encoding", "Rejected": "rejected",
  "Pull sync failed": "pull_failed", "Database unavailable": "database_unavailable",
};
// "Sync failed" is four refusals, told apart by the status
const SYNC_FAILED = {400: "data_refused", 409: "duplicate", 500: "push_failed", 503: "push_unavailable"};

/** The machine-readable code of an answer: the server's `code`, or the one its `error` text stands for. */
export function codeOf(status, answer) {
  if (answer && typeof answer.code === "string") return answer.code;
  const error = answer && answer.error;
  if (error === "Sync failed") return SYNC_FAILED[status] ?? null;
  return CODE_OF_ERROR[error] ?? null;
}

/** A write the client refuses itself (`code` says why, as the server would), or a storage problem. */
export class CloudsyncError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "CloudsyncError";
    this.code = code;
  }
}

/** The server refused the sync for a reason retrying will not fix (a token, the device id, the settings). */
export class SyncError extends CloudsyncError {
  constructor(message, status = null, answer = null) {
    super(codeOf(status, answer) ?? "sync_refused", message);
    this.name = "SyncError";
    this.status = status;
    this.answer = answer;
  }
}

/** What one sync() did. `ok` is false when the user should know: offline, or new dead letters. */
export class SyncResult {
  constructor() {
    this.pushed = 0;          // operations the server applied
    this.pulled = 0;          // rows and deleted keys taken from the server
    this.conflicts = [];      // the server's conflict entries (op, table, key, columns, server_row)
    this.rejected = [];       // dead letters this sync made (refused, missing, unresolved conflicts)
    this.offline = false;     // the server could not be reached, or failed: try again later
    this.reason = null;       // why, when offline
    this.upToDate = false;    // the pull reached the server's newest changes
  }

  get ok() {
    return !this.offline && this.rejected.length === 0;
  }
}

// -- values in the server's form ------------------------------------------------------------

const DECIMAL_TYPE = /^\s*(?:decimal|numeric)\s*\(\s*\d+\s*,\s*(\d+)\s*\)/i;
const INTEGER_TYPE = /^\s*(?:tiny|small|medium|big)?int(?:eger)?\b/i;
const NUMBER_TEXT = /^\s*([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?\s*$/;

/** A number or numeric text as an exact decimal {units, scale} (value = units / 10^scale), or null. */
function parseDecimal(value) {
  if (typeof value !== "number" && typeof value !== "string") return null;
  if (typeof value === "number" && !Number.isFinite(value)) return null;
  const found = NUMBER_TEXT.exec(String(value));
  if (!found || (found[2] + (found[3] ?? "")) === "") return null;
  const fraction = found[3] ?? "";
  let units = BigInt(found[1] + (found[2] + fraction || "0"));
  let scale = fraction.length - Number(found[4] ?? 0);
  if (scale < 0) {
    units *= 10n ** BigInt(-scale);
    scale = 0;
  }
  return {units, scale};
}

/** Rounded half away from zero to `scale` places, as MySQL rounds a DECIMAL. */
function quantize({units, scale}, places) {
  if (scale <= places) return {units: units * 10n ** BigInt(places - scale), scale: places};
  const divisor = 10n ** BigInt(scale - places);
  const negative = units < 0n;
  const magnitude = negative ? -units : units;
  let rounded = magnitude / divisor;
  if ((magnitude % divisor) * 2n >= divisor) rounded += 1n;
  return {units: negative ? -rounded : rounded, scale: places};
}

function formatDecimal({units, scale}) {
  const negative = units < 0n;
  const digits = (negative ? -units : units).toString().padStart(scale + 1, "0");
  const text = scale ? digits.slice(0, -scale) + "." + digits.slice(-scale) : digits;
  return negative ? "-" + text : text;
}

function addDecimals(a, b) {
  const scale = Math.max(a.scale, b.scale);
  return {units: quantize(a, scale).units + quantize(b, scale).units, scale};
}

// -- storages ---------------------------------------------------------------------------------
// A storage keeps records (store, key) -> JSON value, both strings. The client asks it for two
// things: load() everything when it opens, and commit(changes), a list of [store, key, value]
// (value undefined: delete the record) stored all or nothing, durable when the promise resolves.
// One client at a time may use a storage.

function applyChanges(data, changes) {
  for (const [store, key, value] of changes) {
    if (!data.has(store)) data.set(store, new Map());
    if (value === undefined) data.get(store).delete(key);
    else data.get(store).set(key, value);
  }
}

/** Records in memory: a copy that lasts as long as the process (tests, and apps that sync a cache). */
export class MemoryStorage {
  constructor() {
    this._data = new Map();
  }

  async load() {
    return structuredClone(this._data);
  }

  async commit(changes) {
    applyChanges(this._data, structuredClone(changes));
  }

  async close() {}
}

/** Records in one JSON file (Node.js). Each commit writes a new file and renames it over the old one,
 * so a crash leaves the old state or the new one, never half of each. */
export class FileStorage {
  constructor(path) {
    this.path = path;
    this._data = null;
    this._fs = null;
  }

  async load() {
    this._fs = await import("node:fs/promises");
    let text = null;
    try {
      text = await this._fs.readFile(this.path, "utf8");
    } catch (error) {
      if (error.code !== "ENOENT") throw error;
    }
    const stored = text === null ? {} : JSON.parse(text);
    this._data = new Map(Object.entries(stored).map(([store, records]) => [store, new Map(Object.entries(records))]));
    return structuredClone(this._data);
  }

  async commit(changes) {
    const next = structuredClone(this._data);
    applyChanges(next, changes);
    const plain = {};
    for (const [store, records] of next) plain[store] = Object.fromEntries(records);
    const temporary = this.path + ".tmp";
    const file = await this._fs.open(temporary, "w");
    try {
      await file.writeFile(JSON.stringify(plain));
      await file.sync();                      // on disk before it replaces the old state
    } finally {
      await file.close();
    }
    await this._fs.rename(temporary, this.path);
    await this._syncDirectory();              // the rename itself survives a power cut
    this._data = next;
  }

  async _syncDirectory() {
    const separator = Math.max(this.path.lastIndexOf("/"), this.path.lastIndexOf("\\"));
    let directory;
    try {
      directory = await this._fs.open(separator >= 0 ? this.path.slice(0, separator) || "/" : ".", "r");
      await directory.sync();
    } catch (error) {
      if (!["EISDIR", "EPERM", "EINVAL", "EACCES"].includes(error.code)) throw error;  // Windows cannot
    } finally {
      await directory?.close();
    }
  }

  async close() {}
}

/** Records in an IndexedDB database of this name (browsers). A Web Lock keeps a second tab from
 * opening the same storage while one holds it. */
export class IndexedDBStorage {
  constructor(name, indexedDB = globalThis.indexedDB) {
    this.name = name;
    this._indexedDB = indexedDB;
    this._db = null;
    this._release = null;
  }

  async load() {
    const locks = globalThis.navigator?.locks;
    if (locks) {
      const granted = await new Promise((resolve) => {
        locks.request("cloudsync-client:" + this.name, {ifAvailable: true}, (lock) => {
          resolve(lock !== null);
          return lock && new Promise((release) => { this._release = release; });
        });
      });
      if (!granted) throw new CloudsyncError("storage_busy", `storage ${this.name} is open in another tab`);
    }
    this._db = await new Promise((resolve, reject) => {
      const request = this._indexedDB.open(this.name, 1);
      request.onupgradeneeded = () => request.result.createObjectStore("records");
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
    return new Promise((resolve, reject) => {
      const records = this._db.transaction("records", "readonly").objectStore("records");
      const keys = records.getAllKeys();
      const values = records.getAll();
      values.onsuccess = () => {
        const data = new Map();
        applyChanges(data, keys.result.map(([store, key], index) => [store, key, values.result[index]]));
        resolve(data);
      };
      values.onerror = () => reject(values.error);
    });
  }

  commit(changes) {
    return new Promise((resolve, reject) => {
      // strict: the promise resolves once the records are on disk, not merely handed to the OS
      const transaction = this._db.transaction("records", "readwrite", {durability: "strict"});
      const records = transaction.objectStore("records");
      for (const [store, key, value] of changes) {
        if (value === undefined) records.delete([store, key]);
        else records.put(value, [store, key]);
      }
      transaction.oncomplete = () => resolve();
      transaction.onabort = transaction.onerror = () => reject(transaction.error);
    });
  }

  async close() {
    this._db?.close();
    this._release?.();
  }
}

// -- the client's own records -------------------------------------------------------------------
// meta: schema, checkpoint ({tables, value}), reset, counters. outbox: seq -> operation. dead:
// id -> dead letter. rows/<table>: key -> the local row. base/<table>: key -> the server's version
// of a row that has pending operations (null: the server has no such row), for exactly those rows.

const ROWS = "rows/";
const BASE = "base/";
const ORDER = (n) => String(n).padStart(15, "0");      // record keys sort as the numbers do

/** A storage transaction: reads see its own writes; nothing is stored before commit. */
class Transaction {
  constructor(data) {
    this.data = data;
    this.staged = new Map();
  }

  get(store, key) {
    const staged = this.staged.get(store);
    if (staged && staged.has(key)) return staged.get(key);
    return this.data.get(store)?.get(key);
  }

  set(store, key, value) {
    if (!this.staged.has(store)) this.staged.set(store, new Map());
    this.staged.get(store).set(key, value);
  }

  delete(store, key) {
    this.set(store, key, undefined);
  }

  keys(store) {
    const keys = new Set(this.data.get(store)?.keys() ?? []);
    for (const [key, value] of this.staged.get(store) ?? []) {
      if (value === undefined) keys.delete(key);
      else keys.add(key);
    }
    return [...keys];
  }

  values(store) {
    return this.keys(store).sort().map((key) => this.get(store, key));
  }

  changes() {
    return [...this.staged].flatMap(([store, records]) => [...records].map(([key, value]) => [store, key, value]));
  }
}

function compareValues(a, b) {
  const rank = (value) => (value === null || value === undefined ? 0 : typeof value === "number" ? 1 : 2);
  if (rank(a) !== rank(b)) return rank(a) - rank(b);
  if (rank(a) === 1) return a - b;
  return a < b ? -1 : a > b ? 1 : 0;
}

function sleep(seconds, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, seconds * 1000);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, {once: true});
  });
}

function newId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  // Node 18 has no global crypto: time, a counter and randomness keep ids of one device apart
  newId.count = (newId.count ?? 0) + 1;
  return `${Date.now().toString(36)}-${newId.count.toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/** A flag to wait for (the app wrote; the loop should stop). */
class Signal {
  constructor() {
    this.clear();
  }

  set() {
    this._resolve();
  }

  clear() {
    this.promise = new Promise((resolve) => { this._resolve = resolve; });
  }
}

/** The writes of one transaction(): each checked, applied to the local copy and queued, synchronously. */
class Writes {
  constructor(client, tx) {
    this._client = client;
    this._tx = tx;
  }

  /** Insert a row; CloudsyncError "duplicate" if its key is here already. */
  insert(table, row) {
    const client = this._client;
    row = client._checked(table, "insert", row);
    if (client._view(this._tx, table, client._keyText(table, row)) !== null) {
      throw new CloudsyncError("duplicate", `${table} already has a row with key ${client._keyText(table, row)}`);
    }
    client._queue(this._tx, table, "insert", row);
  }

  /** Set `changes` on the row with `key`; CloudsyncError "not_found" if it is not here. */
  update(table, key, changes) {
    this._queue(table, "update", key, changes);
  }

  /** Insert the row, or set the given columns on it if its key exists. */
  upsert(table, row) {
    this._client._queue(this._tx, table, "upsert", this._client._checked(table, "upsert", row));
  }

  /** Delete the row with `key` (nothing to do locally if it is not here; the server is told anyway). */
  delete(table, key) {
    this._client._queue(this._tx, table, "delete", this._client._checked(table, "delete", this._client._keyRow(table, key)));
  }

  /** Add `deltas` ({column: number}) to the row with `key`, here and, as an increment, on the server. */
  increment(table, key, deltas) {
    this._queue(table, "increment", key, deltas);
  }

  /** The row as this transaction sees it. */
  get(table, key) {
    const row = this._client._view(this._tx, table, this._client._keyText(table, key));
    return row && {...row};
  }

  _queue(table, action, key, changes) {
    const client = this._client;
    const keyRow = client._keyRow(table, key);
    if (changes === null || typeof changes !== "object") {
      throw new CloudsyncError("invalid_operation", `${action} on ${table}: pass the changes as an object`);
    }
    if (Object.keys(changes).some((name) => name in keyRow)) {
      throw new CloudsyncError("key_change", `an ${action} cannot change the key of ${table}: delete the row and insert it again`);
    }
    if (action === "increment" && (Object.keys(changes).length === 0 ||
        Object.values(changes).some((delta) => typeof delta === "boolean" || parseDecimal(delta) === null))) {
      throw new CloudsyncError("invalid_value", `an increment adds numbers to columns besides the key, not ${JSON.stringify(changes)}`);
    }
    const data = client._checked(table, action, {...keyRow, ...changes});
    if (client._view(this._tx, table, client._keyText(table, data)) === null) {
      throw new CloudsyncError("not_found", `${table} has no row with key ${client._keyText(table, data)}`);
    }
    client._queue(this._tx, table, action, data);
  }
}

/**
 * One device: a local copy of `tables`, synced with a cloudsync server at `url`. Open it with
 * `await Client.open({...})`.
 */
export class Client {
  /**
   * @param {object} options
   * @param {string} options.url the server, e.g. "https://sync.example.com"
   * @param {string[]|object|null} [options.tables] table names described by the server (null: every table
   *   the token allows), or {name: {columns, primary_key, types?, rules?}} declared by the app
   * @param {string} options.deviceId this device's id (the token's device when there is a token)
   * @param {string} [options.token] the device's token
   * @param {object} [options.storage] a storage (MemoryStorage when left out)
   * @param {function} [options.onConflict] (localOp, serverRow) => "server" | "mine" | merged row (may be async)
   * @param {function} [options.onChange] (table, upsertedRows, deletedKeys) after pulled rows are stored
   * @param {function} [options.onSync] (SyncResult) after each sync, run()'s too
   */
  static async open(options) {
    const client = new Client(options);
    await client._open(options.tables ?? null);
    return client;
  }

  constructor({url, deviceId, token = null, storage = new MemoryStorage(), batchSize = 500, pullLimit = 1000,
    timeout = 30, onConflict = null, onChange = null, onSync = null, log = console}) {
    if (!url || !deviceId) throw new CloudsyncError("invalid_option", "url and deviceId are required");
    this.url = url.replace(/\/+$/, "");
    this.deviceId = deviceId;
    this.token = token;
    this.storage = storage;
    this.batchSize = batchSize;
    this.pullLimit = pullLimit;
    this.timeout = timeout;             // seconds
    this.onConflict = onConflict;
    this.onChange = onChange;
    this.onSync = onSync;
    this.log = log;
    this.lastResult = null;
    this._data = null;                  // every record, as committed
    this._queueTail = Promise.resolve();  // local transactions, one at a time
    this._syncTail = Promise.resolve();   // syncs, one at a time
    this._written = new Signal();       // the app wrote: run() pushes
    this._requests = new Set();         // AbortControllers of the requests in flight
    this._loop = null;
  }

  async _open(tables) {
    this._data = await this.storage.load();
    const stored = this._data.get("meta")?.get("schema") ?? null;
    let schema;
    if (tables && !Array.isArray(tables)) {
      schema = {};
      for (const [name, table] of Object.entries(tables)) {
        schema[name] = {columns: [...table.columns], primary_key: [...table.primary_key],
          types: {...table.types}, rules: table.rules ?? null};
      }
    } else if (stored && (tables ?? Object.keys(stored)).every((name) => name in stored)) {
      schema = Object.fromEntries((tables ?? Object.keys(stored)).map((name) => [name, stored[name]]));
    } else {
      schema = await this._describe(tables);
    }
    if (JSON.stringify(schema) !== JSON.stringify(stored)) await this._tx((tx) => tx.set("meta", "schema", schema));
  }

  /** The server's description of `names` (null: every table it lets this device sync). */
  async _describe(names) {
    const {status, answer, reason} = await this._request("/sync/status");
    if (status !== 200) {
      throw new SyncError(status === null
        ? `the server's description of the tables is needed once and it cannot be reached (${reason}); ` +
          "start with the server reachable, or declare the tables"
        : `GET /sync/status answered ${status}: ${answer?.detail ?? ""}`, status, answer);
    }
    const wanted = names ?? Object.keys(answer.tables);
    const missing = wanted.filter((name) => !(name in answer.tables));
    if (missing.length) throw new SyncError(`the server does not sync ${missing.join(", ")}`, status, answer);
    return Object.fromEntries(wanted.map((name) => {
      const table = answer.tables[name];
      return [name, {columns: table.columns, primary_key: table.primary_key, types: table.types ?? {},
        rules: table.rules ?? null}];
    }));
  }

  /** The tables as the client knows them: {name: {columns, primary_key, types, rules}}. */
  get tables() {
    return structuredClone(this._meta("schema"));
  }

  /** The checkpoint of the last pull applied to the local copy (null: pull everything). */
  get checkpoint() {
    return this._checkpointIn(null);
  }

  /** Stop run(), cut off what is in flight, and close the storage once the last write is stored. */
  async close() {
    await this.stop();
    for (const request of this._requests) request.abort();
    await this._syncTail;
    await this._queueTail;
    await this.storage.close();
  }

  // -- reading the local copy ---------------------------------------------------------------------

  /** The local row with this key (a value, or {column: value} for a composite key), or null. */
  get(table, key) {
    const row = this._data.get(ROWS + table)?.get(this._keyText(table, key));
    return row ? {...row} : null;
  }

  /** Every local row of `table`, in key order. */
  rows(table) {
    const names = this._schema(table).primary_key;
    return [...(this._data.get(ROWS + table)?.values() ?? [])]
      .map((row) => ({...row}))
      .sort((a, b) => names.reduce((order, name) => order || compareValues(a[name], b[name]), 0));
  }

  /** How many local operations the server has not acknowledged yet. */
  pending() {
    return this._data.get("outbox")?.size ?? 0;
  }

  /** Operations the server refused or did not apply, and conflicts nobody resolved, with its answer. */
  deadLetters() {
    return [...(this._data.get("dead")?.entries() ?? [])].sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([, letter]) => structuredClone(letter));
  }

  // -- writing ---------------------------------------------------------------------------------

  /** Run `write(t)`, where `t` has insert, update, upsert, delete, increment and get: all its writes are
   * stored together or none is (a sale and its lines). `write` must be synchronous. */
  transaction(write) {
    return this._tx((tx) => {
      const value = write(new Writes(this, tx));
      if (value && typeof value.then === "function") {
        throw new CloudsyncError("invalid_transaction", "the function given to transaction() must be synchronous");
      }
      return value;
    });
  }

  insert(table, row) {
    return this.transaction((t) => t.insert(table, row));
  }

  update(table, key, changes) {
    return this.transaction((t) => t.update(table, key, changes));
  }

  upsert(table, row) {
    return this.transaction((t) => t.upsert(table, row));
  }

  delete(table, key) {
    return this.transaction((t) => t.delete(table, key));
  }

  increment(table, key, deltas) {
    return this.transaction((t) => t.increment(table, key, deltas));
  }

  /** Apply a dead letter locally again (with corrected `data` if given) and queue it; it leaves the list. */
  resend(id, data = null) {
    return this._tx((tx) => {
      const letter = tx.get("dead", ORDER(id));
      if (letter === undefined) throw new CloudsyncError("not_found", `no dead letter ${id}`);
      this._queue(tx, letter.table, letter.action, this._checked(letter.table, letter.action, data ?? letter.data));
      tx.delete("dead", ORDER(id));
    });
  }

  /** Let a dead letter go (the server's version stands). */
  discard(id) {
    return this._tx((tx) => tx.delete("dead", ORDER(id)));
  }

  // -- syncing ---------------------------------------------------------------------------------

  /** Push the outbox, then pull until up to date. Resolves to a SyncResult; throws a SyncError when
   * the server refuses the sync itself (a token, the settings). */
  sync() {
    return this._sync(null);
  }

  _sync(polled) {
    const run = async () => {
      const result = new SyncResult();
      try {
        if (await this._push(result)) await this._pull(result, polled);
      } finally {
        this.lastResult = result;
      }
      this._call("onSync", result);
      return result;
    };
    const done = this._syncTail.then(run);
    this._syncTail = done.catch(() => {});
    return done;
  }

  /**
   * Keep the device in sync until stop(): long polls (pulls that wait up to `wait` seconds for a
   * change), a push as soon as the app writes, and after a failure a wait that grows (up to
   * `maxBackoff` seconds, with jitter, so that a fleet coming back does not come all at once). In a
   * browser the `online` event ends that wait. Resolves when stopped; rejects with the SyncError
   * that ends it (a refusal retrying cannot fix).
   */
  async run({wait = 25, maxBackoff = 60} = {}) {
    if (this._loop) throw new CloudsyncError("running", "run() is running already");
    const loop = this._loop = {stopped: false, pause: new AbortController(), finished: new Signal()};
    const online = () => this.wake();
    globalThis.addEventListener?.("online", online);
    const pusher = this._pushWhenWritten(loop);
    let failures = 0;
    let polled = null;
    try {
      while (!loop.stopped) {
        const result = await this._sync(polled);
        polled = null;
        if (loop.stopped) break;
        if (result.offline) {
          failures += 1;
          await this._pause(loop, Math.min(maxBackoff, 0.5 * 2 ** Math.min(failures, 16)) * (0.5 + Math.random()));
          continue;
        }
        failures = 0;
        const since = this.checkpoint;
        if (since === null) continue;
        const answer = await this._request("/sync/pull", {device_id: this.deviceId, tables: this._tableNames(), since,
          limit: this.pullLimit, wait}, {timeout: wait + 15, interruptible: true});
        if (answer.interrupted) continue;       // wake() or stop(): no answer to use
        if (answer.status === 200 && answer.answer.retry_after) {
          await this._pause(loop, answer.answer.retry_after * (0.5 + Math.random()));  // the server is full
        }
        polled = {since, ...answer};            // the next sync stores it, if nothing moved meanwhile
      }
    } finally {
      loop.stopped = true;
      this._written.set();
      await pusher;
      globalThis.removeEventListener?.("online", online);
      this._loop = null;
      loop.finished.set();
    }
  }

  /** End run(): what is in flight is cut off (a push whose answer is lost goes again, same batch id). */
  async stop() {
    const loop = this._loop;
    if (!loop) return;
    loop.stopped = true;
    loop.pause.abort();
    for (const request of this._requests) request.abort();
    this._written.set();
    await loop.finished.promise;
  }

  /** Sync now, in run(): ends a back-off wait and the long poll in flight (the network is back). */
  wake() {
    const loop = this._loop;
    if (!loop) return;
    loop.pause.abort();
    loop.pause = new AbortController();
    for (const request of this._requests) {
      if (request.interruptible) request.abort();
    }
  }

  async _pause(loop, seconds) {
    await sleep(seconds, loop.pause.signal);
  }

  async _pushWhenWritten(loop) {
    while (!loop.stopped) {
      await this._written.promise;
      this._written.clear();
      if (loop.stopped) return;
      try {
        await this.sync();
      } catch (error) {
        this.log.warn(`cloudsync: push failed (${error.message}); run() reports it at its next sync`);
      }
    }
  }

  // -- push --------------------------------------------------------------------------------------

  async _push(result) {
    let size = this.batchSize;
    for (;;) {
      const batch = await this._tx((tx) => this._batch(tx, size));
      if (batch === null) return true;
      const body = {device_id: this.deviceId, batch_id: batch.id, on_conflict: "abort",
        operations: batch.operations.map(({table, action, data, checkpoint}) =>
          (checkpoint === null ? {table, action, data} : {table, action, data, checkpoint}))};
      if (batch.checkpoint !== null) body.checkpoint = batch.checkpoint;
      const {status, answer, reason} = await this._request("/sync/push", body);
      const code = codeOf(status, answer);
      if (status === 200) {
        await this._tx((tx) => this._acknowledge(tx, batch, answer, result));
      } else if (code === "conflict") {
        await this._resolve(batch, answer, result);
      } else if ((code === "expired" || code === "invalid_checkpoint") && batch.checkpoint !== null) {
        // nothing of the batch was applied, and its changes can no longer be checked for conflicts:
        // they go again without a checkpoint (the device's changes win), as a new batch
        this.log.warn(`cloudsync: checkpoint refused (${answer.error}): pushing without conflict detection`);
        await this._tx((tx) => {
          for (const op of batch.operations) tx.set("outbox", ORDER(op.seq), {...op, batch: null, checkpoint: null});
        });
      } else if (code === "batch_reused") {
        await this._tx((tx) => this._unmark(tx, batch));   // another batch holds the id: take a new one
      } else if ((code === "too_large" || code === "too_many_operations") && batch.operations.length > 1) {
        size = Math.max(1, Math.floor(batch.operations.length / 2));
        await this._tx((tx) => this._unmark(tx, batch));
      } else if (status >= 400 && status < 500 && (Number.isInteger(answer?.op) || OPERATION_REFUSALS.has(code))) {
        if (!Number.isInteger(answer?.op) && batch.operations.length > 1) {
          size = 1;                             // which operation is unknown: send them one at a time
          await this._tx((tx) => this._unmark(tx, batch));
          continue;
        }
        const op = batch.operations[answer.op ?? 0];
        if (op === undefined) throw new SyncError(`push refused for operation ${answer.op}, not in the batch`, status, answer);
        this.log.warn(`cloudsync: the server refused ${op.action} on ${op.table} (${answer.error}: ` +
          `${answer.detail}); kept as a dead letter`);
        await this._tx((tx) => {
          tx.delete("outbox", ORDER(op.seq));
          this._bury(tx, op, status, answer, result);
          this._settle(tx, op.table, op.key, tx.get(BASE + op.table, op.key));
          this._unmark(tx, batch);
        });
      } else if (status === null || status >= 500 || status === 429) {
        return this._offline(result, `push of batch ${batch.id}`, status, reason);
      } else {
        throw new SyncError(`push refused: ${status} ${answer?.error}: ${answer?.detail}`, status, answer);
      }
    }
  }

  /** The pending batch, marked in storage before it is sent: consecutive operations with the same
   * checkpoint. A batch marked before (its answer lost) goes again as it was. */
  _batch(tx, size) {
    const outbox = tx.values("outbox");
    if (outbox.length === 0) return null;
    let operations = outbox.filter((op) => op.batch !== null);
    if (operations.length === 0) {
      const id = newId();
      const first = outbox[0];
      const end = outbox.findIndex((op) => op.checkpoint !== first.checkpoint);
      operations = outbox.slice(0, Math.min(size, end === -1 ? outbox.length : end)).map((op) => ({...op, batch: id}));
      for (const op of operations) tx.set("outbox", ORDER(op.seq), op);
    }
    return {id: operations[0].batch, checkpoint: operations[0].checkpoint, operations};
  }

  _unmark(tx, batch) {
    for (const op of batch.operations) {
      const stored = tx.get("outbox", ORDER(op.seq));
      if (stored !== undefined) tx.set("outbox", ORDER(op.seq), {...stored, batch: null});
    }
  }

  /** A 200: the operations leave the outbox and their rows' bases take them in; those listed as
   * missing (no such row on the server) become dead letters. */
  _acknowledge(tx, batch, answer, result) {
    const missing = new Set((answer.missing ?? []).map((entry) => entry.op));
    const bases = new Map();
    batch.operations.forEach((op, index) => {
      tx.delete("outbox", ORDER(op.seq));
      const id = op.table + "\n" + op.key;
      const base = bases.has(id) ? bases.get(id).base : tx.get(BASE + op.table, op.key);
      bases.set(id, {op, base: missing.has(index) ? null : this._apply(op.table, base ?? null, op)});
      if (missing.has(index)) {
        this._bury(tx, op, 200, {error: "Missing", code: "missing", detail: `operation ${index} ` +
          `(${op.action} on ${op.table}) changed nothing: the server has no such row`, answer}, result);
      }
    });
    for (const {op, base} of bases.values()) this._settle(tx, op.table, op.key, base);
    result.pushed += batch.operations.length - missing.size;
    // the answer's checkpoint skips the push's own changes only when the server proved this device holds
    // them; it is ours only if it was computed from our checkpoint (a replay's belongs to the first answer)
    if (!answer.replayed && answer.checkpoint && batch.checkpoint !== null && batch.checkpoint === this._checkpointIn(tx)) {
      this._setCheckpoint(tx, answer.checkpoint);
    }
  }

  /** A 409 Conflict, nothing applied: for each conflicting operation (and the later ones on its row, which
   * would only conflict again), what onConflict decides; the rest goes again as a new batch. */
  async _resolve(batch, answer, result) {
    const conflicts = answer.conflicts ?? [];
    if (conflicts.length === 0 || conflicts.some((conflict) => !batch.operations[conflict.op])) {
      throw new SyncError("a 409 Conflict that names no operation of the batch", 409, answer);
    }
    const decisions = [];
    for (const conflict of conflicts) {
      const op = batch.operations[conflict.op];
      const choice = this.onConflict
        ? await this.onConflict({table: op.table, action: op.action, data: structuredClone(op.data)},
          conflict.server_row && {...conflict.server_row})
        : null;
      decisions.push({conflict, op, choice});
    }
    const changed = new Map();
    await this._tx((tx) => {
      for (const {conflict, op, choice} of decisions) {
        result.conflicts.push(conflict);
        if (tx.get("outbox", ORDER(op.seq)) === undefined) continue;    // resolved with an earlier one
        const {table, key} = op;
        // pending increments are not resolved away: they never conflict, and still count
        const resolved = tx.values("outbox").filter((other) => other.table === table && other.key === key &&
          (other.seq === op.seq || other.action !== "increment"));
        for (const other of resolved) tx.delete("outbox", ORDER(other.seq));
        const server = conflict.server_row && this._full(table, conflict.server_row);
        const keyRow = this._keyRow(table, this._keyValue(table, key));
        // a column with increments still pending is left to them: sent as a value, it would undo them
        const incremented = new Set(tx.values("outbox").filter((other) => other.table === table && other.key === key)
          .flatMap((other) => Object.keys(other.data)));
        const sent = (row, names) => Object.fromEntries(Object.entries(row).filter(([name]) =>
          name in keyRow || (names.has(name) && !incremented.has(name))));
        if (choice === "mine") {
          // this device's changes go again, over the server's row and without a checkpoint: the columns
          // its operations set (the others keep the server's values), or its whole row where the server
          // has none any more
          const mine = server ? resolved.reduce((row, other) => this._apply(table, row, other), server) : this._view(tx, table, key);
          const names = new Set(server ? resolved.flatMap((other) => Object.keys(other.data)) : this._schema(table).columns);
          if (mine === null) this._queue(tx, table, "delete", keyRow, null);
          else this._queue(tx, table, "upsert", sent(mine, names), null);
        } else if (choice !== null && typeof choice === "object") {
          const merged = this._checked(table, "upsert", {...choice, ...keyRow});
          this._queue(tx, table, "upsert", sent(merged, new Set(Object.keys(merged))), null);
        } else if (choice !== "server") {
          for (const kept of resolved) {
            this._bury(tx, kept, 409, {...conflict, error: "Conflict", code: "conflict",
              detail: "changed on the server since this device pulled"}, result);
          }
        }
        this._settle(tx, table, key, server);
        this._changed(changed, table, conflict.server_row ? [conflict.server_row] : [], conflict.server_row ? [] : [conflict.key]);
      }
      this._unmark(tx, batch);
    });
    this._report(changed);
  }

  // -- pull ---------------------------------------------------------------------------------------

  async _pull(result, polled) {
    for (;;) {
      const since = this._meta("reset") ? null : this.checkpoint;
      const {status, answer, reason} = polled && since !== null && polled.since === since ? polled
        : await this._request("/sync/pull", {device_id: this.deviceId, tables: this._tableNames(), since,
          limit: this.pullLimit});
      polled = null;
      const code = codeOf(status, answer);
      if (since !== null && (code === "expired" || code === "invalid_checkpoint")) {
        const tables = answer.reset_tables;
        this.log.warn(`cloudsync: checkpoint refused (${answer.error}): pulling ${tables ? tables.join(", ") : "every table"} again`);
        const changed = new Map();
        await this._tx((tx) => {
          if (Array.isArray(tables) && answer.checkpoint) {
            for (const table of tables.filter((name) => name in this._meta("schema"))) this._wipe(tx, table, changed);
            this._setCheckpoint(tx, answer.checkpoint);
          } else {
            tx.set("meta", "reset", true);
          }
        });
        this._report(changed);
        continue;
      }
      if (status !== 200) {
        if (status === null || status >= 500 || status === 429) return this._offline(result, "pull", status, reason);
        throw new SyncError(`pull refused: ${status} ${answer?.error}: ${answer?.detail}`, status, answer);
      }
      if (await this._learnColumns(answer)) continue;
      // its own transaction first: the rows below are formed with the new columns
      await this._tx((tx) => this._addColumns(tx, answer.added_columns ?? {}));
      if (Object.keys(answer.added_columns ?? {}).length) await this._learnTypes(answer.added_columns);
      const changed = new Map();
      await this._tx((tx) => {
        if (since === null) {
          // from scratch: rows deleted meanwhile are never listed, so start from an empty copy
          for (const table of this._tableNames()) this._wipe(tx, table, changed);
          tx.delete("meta", "reset");
        }
        const pending = this._pending(tx);
        for (const [table, change] of Object.entries(answer.changes)) {
          for (const row of change.upserted) this._settle(tx, table, this._keyText(table, row), this._full(table, row), pending);
          for (const key of change.deleted) this._settle(tx, table, this._keyText(table, key), null, pending);
          result.pulled += change.upserted.length + change.deleted.length;
          this._changed(changed, table, change.upserted, change.deleted);
        }
        this._setCheckpoint(tx, answer.checkpoint);
      });
      this._report(changed);
      if (!answer.has_more) {
        result.upToDate = true;
        return true;
      }
    }
  }

  /** Pulled rows carry columns the client does not know, and the answer does not say what they are (a
   * server without `added_columns`): learn them and pull everything again, so that every row has them. */
  async _learnColumns(answer) {
    const schema = this._meta("schema");
    const added = answer.added_columns ?? {};
    const unknown = {};
    for (const [table, change] of Object.entries(answer.changes)) {
      const names = Object.keys(change.upserted[0] ?? {}).filter((name) =>
        !schema[table].columns.includes(name) && !(name in (added[table] ?? {})));
      if (names.length) unknown[table] = names;
    }
    if (Object.keys(unknown).length === 0) return false;
    this.log.warn(`cloudsync: the server's tables have new columns (${Object.entries(unknown)
      .flatMap(([table, names]) => names.map((name) => table + "." + name)).join(", ")}): pulling them again`);
    let described = null;
    try {
      described = await this._describe(this._tableNames());
    } catch (error) {
      if (!(error instanceof SyncError)) throw error;     // the columns are enough; their types can wait
    }
    await this._tx((tx) => {
      const next = structuredClone(this._meta("schema"));
      for (const [table, names] of Object.entries(unknown)) {
        for (const name of names) {
          if (!next[table].columns.includes(name)) next[table].columns.push(name);
          const type = described?.[table]?.types?.[name];
          if (type) next[table].types[name] = type;
        }
      }
      tx.set("meta", "schema", next);
      tx.set("meta", "reset", true);       // rows pulled before lack the new columns
    });
    return true;
  }

  /** The types of the columns `added_columns` announced, from the server's description (they can
   * wait when it cannot be reached: the columns and their values are what counts). */
  async _learnTypes(added) {
    let described = null;
    try {
      described = await this._describe(this._tableNames());
    } catch (error) {
      if (!(error instanceof SyncError)) throw error;
      return;
    }
    await this._tx((tx) => {
      const next = structuredClone(tx.get("meta", "schema"));
      for (const [table, columns] of Object.entries(added)) {
        for (const name of Object.keys(columns)) {
          const type = described[table]?.types?.[name];
          if (type && next[table]) next[table].types[name] = type;
        }
      }
      tx.set("meta", "schema", next);
    });
  }

  /** `added_columns` of a pull: {table: {column: default}}, added here with that value in every row. */
  _addColumns(tx, added) {
    const schema = structuredClone(tx.get("meta", "schema"));
    let changed = false;
    for (const [table, columns] of Object.entries(added)) {
      if (!(table in schema)) continue;
      for (const [name, value] of Object.entries(columns)) {
        if (schema[table].columns.includes(name)) continue;
        schema[table].columns.push(name);
        changed = true;
        for (const store of [ROWS + table, BASE + table]) {
          for (const key of tx.keys(store)) {
            const row = tx.get(store, key);
            if (row !== null) tx.set(store, key, {...row, [name]: value});
          }
        }
      }
    }
    if (changed) tx.set("meta", "schema", schema);
  }

  /** Empty a table locally: its rows are pulled again. Rows with pending operations keep them. */
  _wipe(tx, table, changed) {
    const keys = new Set([...tx.keys(ROWS + table), ...tx.keys(BASE + table)]);
    const pending = this._pending(tx);
    for (const key of keys) this._settle(tx, table, key, null, pending);
    this._changed(changed, table, [], [...keys].map((key) => this._keyValue(table, key)));
  }

  // -- the local copy: bases and pending operations --------------------------------------------

  /** Append an operation to the outbox and apply it to the local row; the row's base is kept first. */
  _queue(tx, table, action, data, checkpoint = this._checkpointIn(tx)) {
    const key = this._keyText(table, data);
    const view = this._view(tx, table, key);
    if (tx.get(BASE + table, key) === undefined) tx.set(BASE + table, key, view);
    const seq = (tx.get("meta", "seq") ?? 0) + 1;
    tx.set("meta", "seq", seq);
    tx.set("outbox", ORDER(seq), {seq, table, action, data, key, batch: null, checkpoint});
    this._put(tx, table, key, this._apply(table, view, {action, data}));
  }

  /** The row's base is now `base` (the server's version; null: none): the local row is that base with
   * the row's pending operations over it, and the base is kept only while there are some. */
  _settle(tx, table, key, base, pending = this._pending(tx)) {
    pending = pending.get(table + "\n" + key) ?? [];
    this._put(tx, table, key, pending.reduce((row, op) => this._apply(table, row, op), base ?? null));
    if (pending.length) tx.set(BASE + table, key, base ?? null);
    else if (tx.get(BASE + table, key) !== undefined) tx.delete(BASE + table, key);
  }

  /** The pending operations of each row ("table\nkey"), in order. */
  _pending(tx) {
    const pending = new Map();
    for (const op of tx.values("outbox")) {
      const id = op.table + "\n" + op.key;
      if (!pending.has(id)) pending.set(id, []);
      pending.get(id).push(op);
    }
    return pending;
  }

  /** An operation applied to a row (null: no row), as the server would apply it. */
  _apply(table, row, {action, data}) {
    if (action === "delete") return null;
    if (action === "insert" || action === "upsert") return this._full(table, {...row, ...data});
    if (row === null) return null;                        // an update or increment of no row changes nothing
    if (action === "update") return {...row, ...data};
    const names = this._schema(table).primary_key;
    const types = this._schema(table).types ?? {};
    const sum = {...row};
    for (const [name, delta] of Object.entries(data)) {
      if (names.includes(name)) continue;
      const current = row[name] ?? 0;
      if (DECIMAL_TYPE.test(types[name] ?? "") || typeof delta === "string" || typeof current === "string") {
        const total = addDecimals(parseDecimal(current) ?? {units: 0n, scale: 0}, parseDecimal(delta));
        sum[name] = this._formed(table, name, formatDecimal(total));
      } else {
        sum[name] = current + delta;
      }
    }
    return sum;
  }

  _view(tx, table, key) {
    return tx.get(ROWS + table, key) ?? null;
  }

  _put(tx, table, key, row) {
    if (row === null) {
      if (tx.get(ROWS + table, key) !== undefined) tx.delete(ROWS + table, key);
    } else {
      tx.set(ROWS + table, key, row);
    }
  }

  _bury(tx, op, status, answer, result) {
    const id = (tx.get("meta", "letter") ?? 0) + 1;
    tx.set("meta", "letter", id);
    const letter = {id, table: op.table, action: op.action, data: op.data, status, code: codeOf(status, answer),
      error: answer?.error ?? null, detail: answer?.detail ?? null, answer: answer ?? null, at: new Date().toISOString()};
    tx.set("dead", ORDER(id), letter);
    result.rejected.push(letter);
  }

  _offline(result, what, status, reason) {
    result.offline = true;
    result.reason = status === null ? `the server could not be reached (${reason})` : `the server answered ${status}`;
    this.log.warn(`cloudsync: ${what}: ${result.reason}; ${this.pending()} operation(s) kept for the next sync`);
    return false;
  }

  // -- rows, keys and values ---------------------------------------------------------------------

  _schema(table) {
    const schema = this._meta("schema")[table];
    if (!schema) {
      throw new CloudsyncError("unknown_table", `this client does not sync table ${JSON.stringify(table)} ` +
        `(it syncs ${this._tableNames().join(", ")})`);
    }
    return schema;
  }

  _tableNames() {
    return Object.keys(this._meta("schema"));
  }

  /** The values of the key of `key` (a value, or an object holding the key columns, such as a row). */
  _keyValues(table, key) {
    const names = this._schema(table).primary_key;
    if (key !== null && typeof key === "object") {
      const absent = names.filter((name) => key[name] === undefined || key[name] === null);
      if (absent.length) throw new CloudsyncError("missing_key", `${table}: the key needs ${absent.join(", ")}`);
      return names.map((name) => this._formed(table, name, key[name]));
    }
    if (names.length !== 1) {
      throw new CloudsyncError("missing_key", `${table} has a composite key: pass {${names.join(", ")}}`);
    }
    return [this._formed(table, names[0], key)];
  }

  _keyText(table, key) {
    return JSON.stringify(this._keyValues(table, key));
  }

  _keyRow(table, key) {
    const names = this._schema(table).primary_key;
    const values = this._keyValues(table, key);
    return Object.fromEntries(names.map((name, index) => [name, values[index]]));
  }

  /** A key as the server writes it in `deleted`: the value, or {column: value} for a composite key. */
  _keyValue(table, keyText) {
    const values = JSON.parse(keyText);
    const names = this._schema(table).primary_key;
    return names.length === 1 ? values[0] : Object.fromEntries(names.map((name, index) => [name, values[index]]));
  }

  /** Every column of the table, in its order (null where the row has none). */
  _full(table, row) {
    return Object.fromEntries(this._schema(table).columns.map((name) => [name, row[name] ?? null]));
  }

  /** Data of an operation in the server's form, after what the client can tell the server would refuse:
   * an unknown column, and the table's rules when the server describes them. */
  _checked(table, action, data) {
    const {columns, rules} = this._schema(table);
    if (data === null || typeof data !== "object" || Array.isArray(data)) {
      throw new CloudsyncError("invalid_operation", `${action} on ${table}: data must be an object`);
    }
    const unknown = Object.keys(data).filter((name) => !columns.includes(name));
    if (unknown.length) {
      throw new CloudsyncError("unknown_column", `table ${table} has no column ${JSON.stringify(unknown[0])} ` +
        `(its columns: ${columns.join(", ")})`);
    }
    if (rules) {
      const refuse = (code, why) => { throw new CloudsyncError(code, `${action} on ${table}: ${why}`); };
      if (rules.read_only) refuse("read_only_table", "devices may pull this table but not write to it");
      if (rules.insert_only && action !== "insert") refuse("insert_only_table", "this table is only inserted into");
      if (rules.actions && !rules.actions.includes(action)) refuse("action_not_allowed", `allowed: ${rules.actions.join(", ")}`);
      const fixed = action === "delete" ? [] : Object.keys(data).filter((name) => (rules.read_only_columns ?? []).includes(name));
      if (fixed.length) refuse("read_only_column", `column ${fixed[0]} is set by the office only`);
    }
    this._keyValues(table, data);
    return Object.fromEntries(Object.entries(data).map(([name, value]) => [name, this._formed(table, name, value)]));
  }

  /** A value as the server sends it back: a DECIMAL(p,s) as text with s decimals, a whole number of an
   * integer column as a number. Anything else stays as it is (the server judges it). */
  _formed(table, name, value) {
    const type = (this._meta("schema")[table]?.types ?? {})[name] ?? "";
    const decimal = DECIMAL_TYPE.exec(type);
    if (decimal && typeof value !== "boolean") {
      const parsed = parseDecimal(value);
      return parsed ? formatDecimal(quantize(parsed, Number(decimal[1]))) : value;
    }
    if (INTEGER_TYPE.test(type) && typeof value === "string" && /^\s*[+-]?\d+\s*$/.test(value)) {
      const number = Number(value);
      return Number.isSafeInteger(number) ? number : value;
    }
    return value;
  }

  // -- state and transactions -------------------------------------------------------------------

  _meta(name) {
    return this._data.get("meta")?.get(name) ?? null;
  }

  /** The stored checkpoint, if it was pulled with this client's tables (another set starts from null). */
  _checkpointIn(tx) {
    const stored = tx ? tx.get("meta", "checkpoint") : this._meta("checkpoint");
    const tables = JSON.stringify(Object.keys(tx ? tx.get("meta", "schema") : this._meta("schema")).sort());
    return stored && JSON.stringify(stored.tables) === tables ? stored.value : null;
  }

  _setCheckpoint(tx, value) {
    tx.set("meta", "checkpoint", {tables: Object.keys(tx.get("meta", "schema")).sort(), value});
  }

  /** Run `work(tx)` (synchronous) after the transactions before it, and store what it wrote at once. */
  _tx(work) {
    const run = async () => {
      const tx = new Transaction(this._data);
      const value = work(tx);
      const changes = tx.changes();
      if (changes.length) {
        await this.storage.commit(changes);
        applyChanges(this._data, changes);
        if (changes.some(([store, , record]) => store === "outbox" && record !== undefined && record.batch === null)) {
          this._written.set();              // run() pushes it now
        }
      }
      return value;
    };
    const done = this._queueTail.then(run);
    this._queueTail = done.catch(() => {});
    return done;
  }

  _changed(changed, table, upserted, deleted) {
    if (!upserted.length && !deleted.length) return;
    if (!changed.has(table)) changed.set(table, [[], []]);
    changed.get(table)[0].push(...upserted);
    changed.get(table)[1].push(...deleted);
  }

  _report(changed) {
    for (const [table, [upserted, deleted]] of changed) this._call("onChange", table, upserted, deleted);
  }

  /** An app hook that informs (onChange, onSync): its failure is logged, and the sync goes on. */
  _call(hook, ...args) {
    if (!this[hook]) return;
    try {
      const value = this[hook](...args);
      value?.catch?.((error) => this.log.warn(`cloudsync: ${hook} failed: ${error?.stack ?? error}`));
    } catch (error) {
      this.log.warn(`cloudsync: ${hook} failed: ${error?.stack ?? error}`);
    }
  }

  // -- HTTP --------------------------------------------------------------------------------------

  /** GET (no body) or POST JSON: {status, answer}, status null when no answer came (with the reason). */
  async _request(path, body = null, {timeout = this.timeout, interruptible = false} = {}) {
    const controller = new AbortController();
    controller.interruptible = interruptible;
    this._requests.add(controller);
    const timer = setTimeout(() => {
      controller.timedOut = true;
      controller.abort();
    }, timeout * 1000);
    const headers = body === null ? {} : {"Content-Type": "application/json"};
    if (this.token) headers.Authorization = "Bearer " + this.token;
    try {
      const response = await fetch(this.url + path, {method: body === null ? "GET" : "POST", headers,
        body: body === null ? undefined : JSON.stringify(body), signal: controller.signal});
      const text = await response.text();
      try {
        return {status: response.status, answer: JSON.parse(text)};
      } catch {
        // a proxy's HTML error page, a cut-off body
        return {status: response.status >= 500 ? response.status : null, answer: null, reason: "the answer is not JSON"};
      }
    } catch (error) {
      // refused, reset, timed out, cut off: the answer may be lost (a push goes again with its batch id)
      return {status: null, answer: null, reason: error.cause?.code ?? error.message,
        interrupted: controller.signal.aborted && interruptible && !controller.timedOut};
    } finally {
      clearTimeout(timer);
      this._requests.delete(controller);
    }
  }
}
