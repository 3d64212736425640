// cloudsync_client.mjs against a live server (test_cloudsync.py starts it, on both backends):
// the scenarios of the Python client's tests. The tests share the server: each names its rows.
import assert from "node:assert/strict";
import {mkdtempSync, readdirSync, readFileSync} from "node:fs";
import {tmpdir} from "node:os";
import {join} from "node:path";
import {test} from "node:test";
import {Client, CloudsyncError, FileStorage} from "../cloudsync_client.mjs";
import {NOWHERE, URL, assertEqualToServer, device, ids, recordRequests, serverRows, sql, until} from "./helpers.mjs";

const codes = (letters) => letters.map((letter) => [letter.code, letter.data.id ?? letter.data.product_id]);

test("two devices edit offline and converge; a conflict nobody resolves keeps the server's row", async () => {
  const id = ids("converge");
  const a = await device("converge-a", {batchSize: 2, pullLimit: 2});      // small: several batches and pages
  const b = await device("converge-b", {batchSize: 2, pullLimit: 2});
  for (const n of [1, 2, 3, 4]) await a.insert("sales", {id: id(`s${n}`), total: `${n}.00`, note: "new"});
  await a.insert("products", {id: id("p1"), name: "Coffee", price: "2.50"});
  assert.ok((await a.sync()).ok && (await b.sync()).ok);
  assert.deepEqual(b.get("sales", id("s3")), a.get("sales", id("s3")));
  a.url = b.url = NOWHERE;                  // offline: both edit s1, and each makes independent changes
  await a.update("sales", id("s1"), {note: "from a"});
  await b.update("sales", id("s1"), {note: "from b", total: "9.00"});
  await a.insert("sales", {id: id("s5"), total: "5.00"});
  await a.update("sales", id("s3"), {total: "3.30"});
  await b.delete("sales", id("s2"));
  await b.insert("customers", {id: id("c1"), name: "Ann"});
  await b.upsert("products", {id: id("p1"), name: "Espresso"});
  await b.update("sales", id("s4"), {note: "b again"});
  const offline = await b.sync();
  assert.ok(offline.offline && !offline.ok && /could not be reached/.test(offline.reason));
  assert.equal(b.pending(), 5);
  assert.equal(b.get("sales", id("s2")), null);                 // the device's own view meanwhile
  a.url = b.url = URL;
  assert.ok((await a.sync()).ok);
  const result = await b.sync();
  assert.ok(!result.ok);                    // a conflict nobody resolved needs the user's attention
  assert.deepEqual(result.conflicts.map((conflict) => [conflict.key, conflict.columns]), [[id("s1"), ["note"]]]);
  assert.deepEqual(codes(b.deadLetters()), [["conflict", id("s1")]]);
  assert.ok((await a.sync()).ok && (await b.sync()).ok && (await a.sync()).ok);   // nothing left to move
  assert.equal(a.pending() + b.pending(), 0);
  await assertEqualToServer(a, b);
  const sales = Object.fromEntries(a.rows("sales").map((row) => [row.id, row]));
  assert.equal(sales[id("s1")].note, "from a");                 // the first writer's
  assert.equal(sales[id("s1")].total, "1.00");                  // the refused operation's other column too
  assert.ok(!(id("s2") in sales));
  assert.equal(sales[id("s3")].total, "3.30");
  assert.equal(sales[id("s4")].note, "b again");
  assert.equal(a.get("products", id("p1")).name, "Espresso");
  assert.equal(a.get("customers", id("c1")).name, "Ann");
});

test("an office edit made in the database is never overwritten without a conflict", async () => {
  const id = ids("office");
  const till = await device("office-till");
  await till.insert("sales", {id: id("s1"), total: "1.00", note: "till"});
  assert.ok((await till.sync()).ok);
  await till.update("sales", id("s1"), {note: "till again"});            // offline: not pushed yet
  sql("UPDATE sales SET note = ?, customer_id = ? WHERE id = ?", ["office", "cust-1", id("s1")]);
  const result = await till.sync();
  assert.deepEqual(result.conflicts.map((conflict) => conflict.columns), [["note"]]);
  assert.deepEqual(codes(till.deadLetters()), [["conflict", id("s1")]]);
  assert.deepEqual([till.get("sales", id("s1")).note, till.get("sales", id("s1")).customer_id], ["office", "cust-1"]);
  // an edit of another column is no conflict: both stand
  await till.update("sales", id("s1"), {total: "5.00"});
  sql("UPDATE sales SET customer_id = ? WHERE id = ?", ["cust-2", id("s1")]);
  const again = await till.sync();
  assert.ok(again.conflicts.length === 0 && again.rejected.length === 0);
  const [row] = (await serverRows("sales")).filter((sale) => sale.id === id("s1"));
  assert.deepEqual([row.note, row.customer_id, row.total], ["office", "cust-2", "5.00"]);
  await assertEqualToServer(till);
});

for (const choice of ["server", "mine", "merged"]) {
  test(`onConflict answers "${choice}" and onChange tells the app`, async () => {
    const id = ids(`hook-${choice}`);
    const seen = [];
    const changes = [];
    const a = await device(`hook-${choice}-a`);
    const b = await device(`hook-${choice}-b`, {
      onConflict: async (localOp, serverRow) => {           // it may ask the user: a promise is waited for
        seen.push([localOp.action, localOp.data.note, serverRow.note]);
        return choice === "merged" ? {...serverRow, note: serverRow.note + " + " + localOp.data.note} : choice;
      },
      onChange: (table, upserted, deleted) => {
        const mine = upserted.filter((row) => String(row.id).startsWith(id(""))).map((row) => row.id);
        if (mine.length) changes.push([table, mine, deleted]);
      },
    });
    await a.insert("sales", {id: id("s1"), total: "1.00"});
    assert.ok((await a.sync()).ok && (await b.sync()).ok);
    assert.deepEqual(changes, [["sales", [id("s1")], []]]);
    await a.update("sales", id("s1"), {note: "from a"});
    await b.update("sales", id("s1"), {note: "from b"});
    assert.ok((await a.sync()).ok);
    sql("UPDATE sales SET customer_id = 'office' WHERE id = ?", [id("s1")]);  // and the office, another column
    const result = await b.sync();
    assert.ok(result.ok);                   // resolved: nothing needs attention
    assert.deepEqual(result.conflicts.map((conflict) => conflict.key), [id("s1")]);
    assert.deepEqual(seen, [["update", "from b", "from a"]]);
    assert.deepEqual(b.deadLetters(), []);
    assert.ok((await a.sync()).ok && (await b.sync()).ok);
    const note = {server: "from a", mine: "from b", merged: "from a + from b"}[choice];
    for (const till of [a, b]) {
      assert.deepEqual([till.get("sales", id("s1")).note, till.get("sales", id("s1")).customer_id], [note, "office"]);
    }
    await assertEqualToServer(a, b);
  });
}

test("a conflict with a deleted row deletes it locally, from the conflict itself", async () => {
  const id = ids("gone");
  const a = await device("gone-a");
  const b = await device("gone-b");
  await a.insert("sales", {id: id("s1"), total: "1.00"});
  assert.ok((await a.sync()).ok && (await b.sync()).ok);
  await a.delete("sales", id("s1"));
  await b.update("sales", id("s1"), {note: "kept?"});
  await b.insert("sales", {id: id("s2"), total: "2.00"});
  assert.ok((await a.sync()).ok);
  recordRequests(b, (path) => path === "/sync/pull");         // the pull fails: what b holds came from the push
  const result = await b.sync();
  assert.ok(!result.ok && result.offline);
  assert.equal(result.conflicts[0].server_row, null);
  assert.equal(b.get("sales", id("s1")), null);
  assert.ok(b.get("sales", id("s2")) !== null);
  assert.equal(b.pending(), 0);
  delete b._request;                        // the network is back
  assert.ok((await b.sync()).ok && (await a.sync()).ok);
  assert.deepEqual(codes(b.deadLetters()), [["conflict", id("s1")]]);
  await assertEqualToServer(a, b);
});

test("refused operations become dead letters, to fix and resend or to discard; the rest goes through", async () => {
  const id = ids("refused");
  const schema = (await device("refused-describe")).tables;
  schema.products.columns.push("colour");                     // the app is newer than the server
  const till = await device("refused-till", {tables: schema});
  assert.ok((await till.sync()).ok);
  await till.insert("sales", {id: id("s1"), total: "1.00"});
  await till.insert("products", {id: id("p1"), name: "Tea", colour: "green"});     // 400 Unknown column
  await till.insert("products", {id: id("p2"), name: null});                       // 400 NOT NULL
  await till.insert("sales", {id: id("s2"), total: "not-a-number"});                // 400 Invalid value
  await till.insert("sales", {id: id("s3"), total: "3.00"});
  const result = await till.sync();
  assert.ok(!result.ok && !result.offline);
  // (a text in a DECIMAL column: cloudsync refuses it before any SQL, on both backends)
  assert.deepEqual(codes(result.rejected).sort(), [["data_refused", id("p2")], ["invalid_value", id("s2")],
    ["unknown_column", id("p1")]].sort());
  assert.equal(till.pending(), 0);
  assert.match(till.warnings.join("\n"), /kept as a dead letter/);
  // the local rows went back to the server's version: the refused rows are gone
  assert.deepEqual([till.get("products", id("p1")), till.get("products", id("p2")), till.get("sales", id("s2"))],
    [null, null, null]);
  assert.ok(till.get("sales", id("s1")) && till.get("sales", id("s3")));
  const [letter] = till.deadLetters().filter((dead) => dead.data.id === id("s2"));
  assert.ok(letter.status === 400 && /total/.test(letter.detail) && Number.isInteger(letter.answer.op), letter.detail);
  await till.resend(letter.id, {...letter.data, total: "12.5"});
  assert.equal(till.get("sales", id("s2")).total, "12.50");
  for (const dead of till.deadLetters().filter((other) => other.table === "products")) await till.discard(dead.id);
  assert.ok((await till.sync()).ok);
  assert.deepEqual(till.deadLetters(), []);
  const plain = await device("refused-check");
  await plain.sync();
  await assertEqualToServer(plain);
  assert.deepEqual(plain.rows("sales").filter((row) => row.id.startsWith(id(""))), till.rows("sales")
    .filter((row) => row.id.startsWith(id(""))));
});

test("an increment of a row the server no longer has is a dead letter (missing), never dropped", async () => {
  const id = ids("missing");
  sql("INSERT INTO product_stock (product_id, store_id, qty) VALUES (?, 1, 5)", [id("p1")]);
  const p1 = {product_id: id("p1"), store_id: 1};
  const till = await device("missing-till");
  assert.ok((await till.sync()).ok);
  await till.increment("product_stock", p1, {qty: -1});
  sql("DELETE FROM product_stock WHERE product_id = ?", [id("p1")]);      // the office deletes it meanwhile
  const result = await till.sync();
  assert.ok(!result.ok && result.pushed === 0);
  assert.deepEqual(codes(result.rejected), [["missing", id("p1")]]);
  assert.deepEqual(till.deadLetters()[0].data, {product_id: id("p1"), store_id: 1, qty: -1});
  assert.equal(till.get("product_stock", p1), null);
  await assertEqualToServer(till);
});

test("increments from two tills all count, exactly, and survive a conflict on the row", async () => {
  const id = ids("increments");
  sql("INSERT INTO product_stock (product_id, store_id, qty) VALUES (?, 1, 10)", [id("p1")]);
  const p1 = {product_id: id("p1"), store_id: 1};
  const a = await device("increments-a");
  const b = await device("increments-b");
  await a.insert("sales", {id: id("s1"), total: "1.00"});
  assert.ok((await a.sync()).ok && (await b.sync()).ok);
  await a.increment("product_stock", p1, {qty: -2});   // both sell offline
  await b.increment("product_stock", p1, {qty: "-1"});
  await a.increment("sales", id("s1"), {total: "0.10"});          // decimals add exactly
  await b.increment("sales", id("s1"), {total: 0.25});
  assert.equal(a.get("product_stock", p1).qty, 8);
  assert.equal(b.get("sales", id("s1")).total, "1.25");
  assert.ok((await a.sync()).ok && (await b.sync()).ok && (await a.sync()).ok);
  for (const till of [a, b]) {
    assert.equal(till.get("product_stock", p1).qty, 7);
    assert.equal(till.get("sales", id("s1")).total, "1.35");
  }
  // a conflict on another column of the row keeps the pending increment: the server's row plus ours
  await a.increment("sales", id("s1"), {total: "1.00"});
  await a.update("sales", id("s1"), {note: "mine"});
  await b.update("sales", id("s1"), {note: "theirs"});
  assert.ok((await b.sync()).ok);
  const result = await a.sync();
  assert.ok(!result.ok && result.conflicts.length === 1);
  assert.deepEqual([a.get("sales", id("s1")).total, a.get("sales", id("s1")).note], ["2.35", "theirs"]);
  assert.deepEqual(a.deadLetters().map((letter) => letter.action), ["update"]);
  assert.ok((await b.sync()).ok);
  await assertEqualToServer(a, b);
});

test("a merged row never undoes a pending increment, and each conflicting operation is one dead letter", async () => {
  const id = ids("merge-increment");
  const a = await device("merge-increment-a", {onConflict: (localOp, serverRow) =>
    ({...serverRow, note: `${serverRow.note}+${localOp.data.note}`})});      // the server's total with it
  const b = await device("merge-increment-b");
  await a.insert("sales", {id: id("s1"), total: "1.00"});
  assert.ok((await a.sync()).ok && (await b.sync()).ok);
  await a.increment("sales", id("s1"), {total: "1.00"});
  await a.update("sales", id("s1"), {note: "a"});
  await b.update("sales", id("s1"), {note: "b"});
  assert.ok((await b.sync()).ok);
  assert.ok((await a.sync()).ok && (await b.sync()).ok);
  for (const till of [a, b]) assert.deepEqual([till.get("sales", id("s1")).total, till.get("sales", id("s1")).note], ["2.00", "b+a"]);
  // two operations on the row both conflict: the default keeps each once
  await b.update("sales", id("s1"), {note: "b2", total: "5.00"});
  assert.ok((await b.sync()).ok);
  await a.close();
  const c = await device("merge-increment-c", {storage: a.storage});     // a, without a hook
  await c.update("sales", id("s1"), {note: "c"});
  await c.update("sales", id("s1"), {total: "7.00"});
  const result = await c.sync();
  assert.equal(result.conflicts.length, 2);
  assert.deepEqual(c.deadLetters().map((letter) => letter.data), [{id: id("s1"), note: "c"}, {id: id("s1"), total: "7.00"}]);
  await assertEqualToServer(b, c);
});

test("a lost answer is sent again under the same batch id and applied once, also after a restart", async () => {
  const id = ids("lost");
  sql("INSERT INTO product_stock (product_id, store_id, qty) VALUES (?, 1, 10)", [id("p1")]);
  const p1 = {product_id: id("p1"), store_id: 1};
  const till = await device("lost-till");
  assert.ok((await till.sync()).ok);
  await till.insert("sales", {id: id("s1"), total: "1.00"});
  await till.increment("product_stock", p1, {qty: -3});
  let lose = true;
  const calls = recordRequests(till, (path) => path === "/sync/push" && lose);
  const lost = await till.sync();
  assert.ok(lost.offline && till.pending() === 2);
  assert.equal(calls[0].status, 200);                             // the server applied it
  lose = false;
  assert.ok((await till.sync()).ok);
  assert.equal(calls[1].body.batch_id, calls[0].body.batch_id);
  assert.deepEqual(calls[1].body.operations, calls[0].body.operations);
  assert.equal(calls[1].answer.replayed, true);
  assert.equal(till.get("product_stock", p1).qty, 7);  // counted once, here and on the server
  assert.deepEqual(sql("SELECT qty FROM product_stock WHERE product_id = ?", [id("p1")]), [[7]]);
  assert.deepEqual(sql("SELECT COUNT(*) FROM cloudsync_changes WHERE table_name = 'sales' AND row_key LIKE ?",
    [`%${id("s1")}%`]), [[1]]);
  // a crash between sending and storing the answer: the device restarts from its storage
  await till.increment("product_stock", p1, {qty: -1});
  const first = recordRequests(till, (path) => path === "/sync/push");
  await till.sync();
  const restarted = await device("lost-till", {storage: till.storage});
  assert.equal(restarted.pending(), 1);
  const retried = recordRequests(restarted);
  assert.ok((await restarted.sync()).ok);
  assert.equal(retried[0].body.batch_id, first[0].body.batch_id);
  assert.equal(retried[0].answer.replayed, true);
  assert.deepEqual(sql("SELECT qty FROM product_stock WHERE product_id = ?", [id("p1")]), [[6]]);
  await assertEqualToServer(restarted);
});

test("an unreachable server keeps the batch id for the next sync", async () => {
  const id = ids("unreachable");
  const till = await device("unreachable-till");
  till.url = NOWHERE;
  await till.insert("sales", {id: id("s1"), total: "1.00"});
  const calls = recordRequests(till);
  const [first, second] = [await till.sync(), await till.sync()];
  assert.ok(first.offline && !first.ok && !second.ok && till.pending() === 1);
  assert.equal(calls[1].body.batch_id, calls[0].body.batch_id);
  till.url = URL;
  assert.ok((await till.sync()).ok);
  assert.ok(calls[2].status === 200 && calls[2].body.batch_id === calls[0].body.batch_id);
  await assertEqualToServer(till);
});

test("a push holds at most batchSize operations, all made from the same checkpoint", async () => {
  const id = ids("batches");
  const till = await device("batches-till", {batchSize: 3});
  for (let n = 0; n < 7; n += 1) await till.insert("sales", {id: id(`s${n}`), total: "1.00"});
  const calls = recordRequests(till);
  assert.ok((await till.sync()).ok);
  const pushes = calls.filter((call) => call.path === "/sync/push").map((call) => call.body);
  assert.deepEqual(pushes.map((body) => body.operations.length), [3, 3, 1]);
  assert.equal(new Set(pushes.map((body) => body.batch_id)).size, 3);
  // an edit made while a pull is on its way, and one made after it: two checkpoints, two pushes
  const other = await device("batches-other");
  await other.insert("sales", {id: id("elsewhere"), total: "1.00"});
  assert.ok((await other.sync()).ok);
  const request = till._request.bind(till);
  till._request = async (path, body, options) => {
    if (path === "/sync/pull") {
      delete till._request;
      await till.update("sales", id("s1"), {note: "during the pull"});
    }
    return request(path, body, options);
  };
  await till.sync();
  await till.update("sales", id("s2"), {note: "after it"});
  const later = recordRequests(till);
  assert.ok((await till.sync()).ok);
  const [during, after] = later.filter((call) => call.path === "/sync/push").map((call) => call.body);
  assert.notEqual(during.checkpoint, after.checkpoint);
  for (const body of [during, after]) {
    assert.equal(body.operations.length, 1);
    assert.equal(body.operations[0].checkpoint, body.checkpoint);
  }
  await assertEqualToServer(till);
});

test("a pull never overwrites a local edit waiting in the outbox, and counts no increment twice", async () => {
  const id = ids("overlay");
  const a = await device("overlay-a");
  const b = await device("overlay-b");
  await a.insert("sales", {id: id("s1"), total: "1.00"});
  assert.ok((await a.sync()).ok && (await b.sync()).ok);
  await b.update("sales", id("s1"), {note: "from b", total: "2.00"});
  assert.ok((await b.sync()).ok);
  const request = a._request.bind(a);
  a._request = async (path, body, options) => {
    if (path === "/sync/pull") {            // the app writes while the pull is on its way
      delete a._request;
      await a.update("sales", id("s1"), {note: "from a"});
      await a.increment("sales", id("s1"), {total: "0.50"});
    }
    return request(path, body, options);
  };
  assert.ok((await a.sync()).upToDate);
  // the pulled row is b's, with a's pending operations over it
  assert.deepEqual([a.get("sales", id("s1")).note, a.get("sales", id("s1")).total, a.pending()], ["from a", "2.50", 2]);
  const result = await a.sync();            // the note was set by b after the edit's checkpoint: a conflict
  assert.deepEqual(result.conflicts.map((conflict) => conflict.key), [id("s1")]);
  assert.deepEqual(a.deadLetters().map((letter) => letter.data.note), ["from a"]);
  assert.ok((await b.sync()).ok);
  assert.deepEqual([b.get("sales", id("s1")).note, b.get("sales", id("s1")).total], ["from b", "2.50"]);
  await assertEqualToServer(a, b);
});

test("run() long-polls, pushes as soon as the app writes, and stop() cuts the wait short", {timeout: 20000}, async () => {
  const id = ids("run");
  const office = await device("run-office");
  const synced = [];
  const till = await device("run-till", {onSync: (result) => synced.push(result)});
  assert.ok((await office.sync()).ok && (await till.sync()).ok);
  const running = till.run({wait: 25});     // a stop() that waited for the poll would take 25 s
  await office.insert("sales", {id: id("from-office"), total: "2.00"});
  assert.ok((await office.sync()).ok);
  await until(() => till.get("sales", id("from-office")) !== null);    // a long poll woke it
  await till.insert("sales", {id: id("from-till"), total: "3.00"});    // pushed without a sync() call
  await until(async () => (await serverRows("sales")).some((row) => row.id === id("from-till")));
  await until(() => till.pending() === 0);
  await till.stop();
  await running;
  assert.ok(synced.filter((result) => result.ok).length >= 2);
  assert.ok((await office.sync()).ok);
  await assertEqualToServer(office, till);
});

test("a JSON file keeps the local copy, the outbox and the batch ids across restarts", async () => {
  const id = ids("file");
  const directory = mkdtempSync(join(tmpdir(), "cloudsync-js-"));
  const path = join(directory, "till.json");
  const till = await device("file-till", {storage: new FileStorage(path)});
  assert.ok((await till.sync()).ok);
  await till.transaction((t) => {
    t.insert("sales", {id: id("s1"), total: 3.5});
    t.insert("item_sales", {id: id("i1"), sale_id: id("s1"), product_id: "p", qty: "2", price: "1.75"});
  });
  recordRequests(till, (path) => path === "/sync/push");            // sent, and the answer lost
  await till.sync();
  await till.close();
  assert.deepEqual(readdirSync(directory), ["till.json"]);          // replaced whole: no half-written file
  const reopened = await device("file-till", {storage: new FileStorage(path), tables: null, url: NOWHERE});
  assert.deepEqual(Object.keys(reopened.tables).sort(), ["customers", "item_sales", "product_stock", "products",
    "sales"]);                                                     // the schema is kept: it starts offline
  assert.deepEqual([reopened.get("sales", id("s1")).total, reopened.get("item_sales", id("i1")).qty], ["3.50", 2]);
  assert.equal(reopened.pending(), 2);
  reopened.url = URL;
  const calls = recordRequests(reopened);
  assert.ok((await reopened.sync()).ok);
  assert.equal(calls[0].answer.replayed, true);
  assert.deepEqual(Object.keys(JSON.parse(readFileSync(path, "utf8")).outbox ?? {}), []);
  await assertEqualToServer(reopened);
  await reopened.close();
});

test("local writes say what is wrong, and a failed transaction stores none of its writes", async () => {
  const id = ids("local");
  const till = await device("local-till");
  await till.insert("sales", {id: id("s1"), total: "1.00"});
  const refused = async (write, code) => {
    await assert.rejects(write, (error) => error instanceof CloudsyncError && error.code === code);
  };
  await refused(till.insert("sales", {id: id("s1"), total: "2.00"}), "duplicate");
  await refused(till.insert("sales", {id: id("s2"), colour: "red"}), "unknown_column");
  await refused(till.update("sales", id("nope"), {note: "x"}), "not_found");
  await refused(till.update("sales", id("s1"), {id: id("s9")}), "key_change");
  await refused(till.insert("sales", {total: "1.00"}), "missing_key");
  await refused(till.increment("sales", id("s1"), {total: "ten"}), "invalid_value");
  assert.throws(() => till.rows("nope"), (error) => error.code === "unknown_table");
  await refused(till.transaction((t) => {
    t.insert("sales", {id: id("s3"), total: "3.00"});
    t.increment("product_stock", {product_id: id("no-such-stock"), store_id: 1}, {qty: -1});
  }), "not_found");
  assert.equal(till.get("sales", id("s3")), null);
  assert.equal(till.pending(), 1);
  const ruled = await Client.open({url: URL, deviceId: "local-ruled", tables: {
    sales: {columns: ["id", "total", "note"], primary_key: ["id"], types: {total: "decimal(12,2)"},
      rules: {insert_only: true, read_only_columns: ["note"]}},
    products: {columns: ["id", "name"], primary_key: ["id"], rules: {read_only: true}}}});
  await ruled.insert("sales", {id: id("r1"), total: 2});
  assert.equal(ruled.get("sales", id("r1")).total, "2.00");
  await refused(ruled.update("sales", id("r1"), {total: "3.00"}), "insert_only_table");
  await refused(ruled.insert("sales", {id: id("r2"), note: "x"}), "read_only_column");
  await refused(ruled.insert("products", {id: id("p1"), name: "x"}), "read_only_table");
  assert.equal(ruled.pending(), 1);
});
