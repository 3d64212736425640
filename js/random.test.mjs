// A seeded random loop: three tills and the office edit the same rows, online and offline, with
// lost answers, restarts and edits made while pulls are on their way. At the end every till holds
// exactly the server's rows, every increment counted once, every sale a till made is on the server
// (unless a till deleted it), and every office edit still stands (unless the row was deleted or a
// till's edit of the same column conflicted with it, which the till's dead letters or hook show).
import assert from "node:assert/strict";
import {test} from "node:test";
import {NOWHERE, URL, assertEqualToServer, device, recordRequests, serverRows, sql} from "./helpers.mjs";

const SEEDS = (process.env.CLOUDSYNC_JS_SEEDS ?? "1,2,3").split(",").map(Number);
const STEPS = 150;

/** mulberry32: a small seeded generator, so that a failure can be replayed with its seed. */
function generator(seed) {
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    chance: (p) => next() < p,
    integer: (low, high) => low + Math.floor(next() * (high - low + 1)),
    pick: (items) => items[Math.floor(next() * items.length)],
  };
}

// how each till answers a conflict: none (a dead letter), its own changes, the server's row, a merge
const HOOKS = {
  a: null,
  b: () => "mine",
  c: (localOp, serverRow) => (serverRow && localOp.data.note !== undefined
    ? {...serverRow, note: `${serverRow.note ?? ""}+${localOp.data.note}`.slice(-40)} : "server"),
};

for (const seed of SEEDS) {
  test(`seed ${seed}: devices edit offline and online, and end equal to the server`, async () => {
    const random = generator(seed);
    const prefix = `r${seed}`;
    const products = [1, 2, 3].map((n) => `${prefix}-p${n}`);
    for (const product of products) sql("INSERT INTO product_stock (product_id, store_id, qty) VALUES (?, 1, 100)", [product]);
    const tills = {};
    const lose = {};                        // per till: the chance that a push's answer is lost
    for (const name of Object.keys(HOOKS)) {
      tills[name] = await device(`${prefix}-${name}`, {onConflict: HOOKS[name], batchSize: 4, pullLimit: 7});
      lose[name] = 0;
      recordRequests(tills[name], (path) => path === "/sync/push" && random.chance(lose[name]));
    }
    const added = Object.fromEntries(products.map((product) => [product, 0]));  // every increment made
    const made = new Set();                 // sales the tills inserted
    const deleted = new Set();              // ... and those some till or the office deleted
    const office = new Map();               // sale -> the customer_id the office set last
    let count = 0;
    const sales = (till) => till.rows("sales").map((row) => row.id).filter((id) => id.startsWith(prefix));

    for (let step = 0; step < STEPS; step += 1) {
      const name = random.pick(Object.keys(tills));
      const till = tills[name];
      const roll = random.integer(0, 99);
      const known = sales(till);
      if (roll < 18) {
        const id = `${prefix}-${name}-${(count += 1)}`;
        await till.insert("sales", {id, total: `${random.integer(1, 50)}.${random.integer(0, 99)}`, note: "new"});
        made.add(id);
      } else if (roll < 34 && known.length) {
        await till.update("sales", random.pick(known), random.chance(0.7) ? {note: `${name}${step}`}
          : {total: `${random.integer(1, 9)}.50`});
      } else if (roll < 38 && known.length) {
        const id = random.pick(known);
        await till.delete("sales", id);
        deleted.add(id);
      } else if (roll < 56) {
        const product = random.pick(products);
        const delta = random.integer(-3, 3) || 1;
        if (till.get("product_stock", {product_id: product, store_id: 1})) {
          await till.increment("product_stock", {product_id: product, store_id: 1}, {qty: delta});
          added[product] += delta;
        }
      } else if (roll < 64) {
        till.url = till.url === URL ? NOWHERE : URL;          // the network comes and goes
      } else if (roll < 68) {
        lose[name] = lose[name] ? 0 : 0.5;                    // a flaky link: answers lost on the way back
      } else if (roll < 72) {
        // a restart from the till's storage, in the middle of whatever it was doing
        const url = till.url;
        tills[name] = await device(`${prefix}-${name}`, {storage: till.storage, onConflict: HOOKS[name],
          batchSize: 4, pullLimit: 7});
        tills[name].url = url;
        recordRequests(tills[name], (path) => path === "/sync/push" && random.chance(lose[name]));
      } else if (roll < 80) {
        const rows = (await serverRows("sales")).filter((row) => row.id.startsWith(prefix));
        if (rows.length) {
          const id = random.pick(rows).id;
          if (random.chance(0.85)) {
            sql("UPDATE sales SET customer_id = ? WHERE id = ?", [`office${step}`, id]);
            office.set(id, `office${step}`);
          } else {
            sql("DELETE FROM sales WHERE id = ?", [id]);
            deleted.add(id);
          }
        }
      } else if (roll < 86 && known.length) {
        // an edit made while the pull is on its way: the pull does not overwrite it (nor revive the row)
        const id = random.pick(known);
        const note = `${name}${step}-during`;
        const request = till._request;
        let edited = false;
        till._request = async (path, body, options) => {
          if (path === "/sync/pull") {
            till._request = request;
            edited = Boolean(till.get("sales", id));
            if (edited) await till.update("sales", id, {note});
          }
          return request(path, body, options);
        };
        await till.sync();
        till._request = request;
        assert.ok(!edited || [undefined, note].includes(till.get("sales", id)?.note), `${id} lost its pending edit`);
      } else {
        await till.sync();
      }
    }

    // the network is back for good: sync until nothing moves, then once more so everyone has everything
    for (const name of Object.keys(tills)) {
      tills[name].url = URL;
      lose[name] = 0;
    }
    for (let round = 0; round < 5; round += 1) {
      for (const till of Object.values(tills)) assert.ok(!(await till.sync()).offline);
    }
    const all = Object.values(tills);
    for (const till of all) assert.equal(till.pending(), 0, till.deviceId);
    await assertEqualToServer(...all);

    const stock = Object.fromEntries((await serverRows("product_stock")).map((row) => [row.product_id, row.qty]));
    for (const product of products) assert.equal(stock[product], 100 + added[product], product);  // once each
    const onServer = new Map((await serverRows("sales")).map((row) => [row.id, row]));
    for (const id of made) assert.ok(onServer.has(id) || deleted.has(id), `sale ${id} was lost`);
    const mine = all.flatMap((till) => till.deadLetters());
    for (const [id, customer] of office) {
      // a till edits no customer_id: only a deletion, or a till re-creating a row the office had
      // deleted under its edit ("mine" sends its whole row then), may remove an office edit
      if (onServer.has(id) && !deleted.has(id)) assert.equal(onServer.get(id).customer_id, customer, id);
    }
    assert.ok(mine.every((letter) => ["conflict", "missing"].includes(letter.code)), JSON.stringify(mine));
  });
}
