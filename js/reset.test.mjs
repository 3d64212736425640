// What changes the whole server, in a file (and a database) of its own: a compacted change log
// (410, every table pulled again) and a column added by the office.
import assert from "node:assert/strict";
import {test} from "node:test";
import {URL, assertEqualToServer, cloudsync, device, ids, recordRequests, sql} from "./helpers.mjs";

test("an expired checkpoint: pending edits are pushed, then the tables it names are wiped and pulled again", async () => {
  const id = ids("expired");
  const a = await device("expired-a");
  const b = await device("expired-b");
  await a.insert("sales", {id: id("s1"), total: "1.00"});
  await a.insert("sales", {id: id("s2"), total: "2.00"});
  assert.ok((await a.sync()).ok && (await b.sync()).ok);
  await b.delete("sales", id("s1"));
  await b.insert("sales", {id: id("s3"), total: "3.00"});
  assert.ok((await b.sync()).ok);
  // the log is compacted: a's checkpoint (and its pending edit's) is older than what is left
  assert.match(cloudsync("compact", "--older-than", "0"), /removed \d+ change-log entries/);
  await a.insert("sales", {id: id("s4"), total: "4.00"});
  const request = a._request.bind(a);
  let refused = null;
  a._request = async (path, body, options) => {
    if (path === "/sync/pull" && refused) {
      delete a._request;                  // an edit made while the tables are pulled again survives it
      await a.insert("sales", {id: id("s5"), total: "5.00", note: "during the reset"});
    }
    const answer = await request(path, body, options);
    if (path === "/sync/pull" && answer.status === 410) refused = answer.answer;
    return answer;
  };
  const calls = recordRequests(a);
  const result = await a.sync();
  assert.ok(result.ok && result.upToDate);
  assert.deepEqual(calls.map((call) => [call.path, call.status]), [
    ["/sync/push", 410], ["/sync/push", 200], ["/sync/pull", 410], ["/sync/pull", 200]]);
  assert.equal(calls[1].body.checkpoint, undefined);      // pushed without conflict detection: it wins
  // the 410 names the table to pull again, and the checkpoint to go on with (not from null)
  assert.deepEqual(refused.reset_tables, ["sales"]);
  assert.equal(calls[3].body.since, refused.checkpoint);
  assert.deepEqual(a.rows("sales").filter((row) => row.id.startsWith(id(""))).map((row) => [row.id, row.note]),
    [[id("s2"), null], [id("s3"), null], [id("s4"), null], [id("s5"), "during the reset"]]);   // s1 is gone
  assert.equal(a.pending(), 1);
  assert.ok((await a.sync()).ok && (await b.sync()).ok);
  await assertEqualToServer(a, b);
});

test("a column added on the server is learned, and kept for a start without the server", async () => {
  const id = ids("column");
  const till = await device("column-till", {tables: ["sales", "products"]});
  await till.insert("sales", {id: id("s1"), total: 3.5});
  assert.equal(till.get("sales", id("s1")).total, "3.50");            // one form before and after a sync
  assert.ok((await till.sync()).ok);
  assert.equal(till.get("sales", id("s1")).total, "3.50");
  const mysql = Boolean(process.env.DB_HOST);
  sql(`ALTER TABLE sales ADD COLUMN payment ${mysql ? "VARCHAR(20)" : "TEXT"}`);   // the office
  sql("UPDATE sales SET payment = 'cash'");
  sql("INSERT INTO sales (id, total, payment) VALUES (?, 2, 'card')", [id("s2")]);
  await new Promise((resolve) => setTimeout(resolve, 1100));          // status re-reads columns once a second
  await fetch(URL + "/sync/status");                                  // the server sees it at once (else in 10 s)
  assert.ok((await till.sync()).ok);
  assert.ok(till.tables.sales.columns.includes("payment") && till.tables.sales.types.payment);
  assert.deepEqual(till.rows("sales").filter((row) => row.id.startsWith(id(""))).map((row) => [row.id, row.payment]),
    [[id("s1"), "cash"], [id("s2"), "card"]]);
  assert.ok(till.rows("sales").every((row) => "payment" in row));
  await till.update("sales", id("s2"), {payment: "voucher"});
  assert.ok((await till.sync()).ok);
  assert.deepEqual(sql("SELECT payment FROM sales WHERE id = ?", [id("s2")]), [["voucher"]]);
  await assertEqualToServer(till);
  const offline = await device("column-till", {storage: till.storage, tables: ["sales"], url: "http://127.0.0.1:9"});
  assert.ok(offline.tables.sales.columns.includes("payment"));
  assert.equal(offline.get("sales", id("s2")).payment, "voucher");
});
