// The web till of `cloudsync.py demo` in headless Chromium (playwright-core): two tills, one
// sells offline, comes back, and the other shows its sales and the new stock within 2 s; a sale
// written into the database by another program reaches both. test_cloudsync.py starts the demo
// (CLOUDSYNC_URL, its database in DB_PATH) and names Chromium (CLOUDSYNC_CHROMIUM) and where the
// screenshot goes (CLOUDSYNC_SCREENSHOT).
import assert from "node:assert/strict";
import {after, before, test} from "node:test";
import {chromium} from "playwright-core";
import {URL, sql, until} from "./helpers.mjs";

let browser;

before(async () => {
  // launch() gives Chromium a fresh profile (--user-data-dir) of its own, removed when it closes
  browser = await chromium.launch({executablePath: process.env.CLOUDSYNC_CHROMIUM, args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"]});
});

after(async () => {
  await browser?.close();
});

/** A till in a browser context of its own (its own IndexedDB), open at /demo/ and online. */
async function openTill() {
  const context = await browser.newContext({viewport: {width: 1100, height: 720}});
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(error.message));
  await page.goto(URL + "/demo/");
  await page.waitForSelector("#network[data-state=online]");
  return {context, page, errors};
}

const stock = (page, product) => page.textContent(`[data-product="${product}"] .stock`).then(Number);
const sales = (page) => page.$$eval("#sales [data-sale]", (items) => items.map((item) => item.dataset.sale));
const text = (page, selector) => page.textContent(selector);

test("a till sells offline, and within 2 s of coming back the other till shows it", async (t) => {
  const a = await openTill();
  const b = await openTill();
  const before = {espresso: await stock(b.page, "espresso"), croissant: await stock(b.page, "croissant")};
  assert.deepEqual(before, {espresso: await stock(a.page, "espresso"), croissant: await stock(a.page, "croissant")});

  await a.context.setOffline(true);
  await a.page.waitForSelector("#network[data-state=offline]");
  for (const product of ["espresso", "croissant", "croissant"]) {      // three sales, one item each
    await a.page.click(`[data-product="${product}"]`);
    await a.page.click("#pay");
    await until(async () => (await text(a.page, "#cart-total")) === "0.00");
  }
  const name = await text(a.page, "#till-name");
  const sold = (await sales(a.page)).filter((id) => id.startsWith(name));
  assert.equal(sold.length, 3);
  assert.equal((await text(a.page, "#outbox")).trim(), "9");           // each sale: the sale, its line, its stock
  assert.equal(await stock(a.page, "croissant"), before.croissant - 2);  // shown at once, offline
  const shown = async () => (await sales(b.page)).filter((id) => sold.includes(id)).length;
  assert.equal(await shown(), 0);

  await a.context.setOffline(false);
  const back = Date.now();
  await until(async () => await shown() === 3 && await stock(b.page, "espresso") === before.espresso - 1 &&
    await stock(b.page, "croissant") === before.croissant - 2, 15);
  const seconds = (Date.now() - back) / 1000;
  t.diagnostic(`the other till showed the sales ${seconds} s after the network came back`);
  assert.ok(seconds <= 2, `the other till showed the sales after ${seconds} s`);
  await until(async () => (await text(a.page, "#outbox")).trim() === "0");
  await a.page.waitForSelector("#network[data-state=online]");

  // a sale made in the database by another program (the office's system) reaches both tills
  sql("INSERT INTO sales (id, total, note, sold_at) VALUES ('office-sale-1', '4.40', 'office: 2× Espresso', ?)",
    [new Date().toISOString()]);
  sql("INSERT INTO item_sales (id, sale_id, product_id, qty, price) VALUES ('office-sale-1-1', 'office-sale-1', " +
    "'espresso', 2, '2.20')");
  sql("UPDATE product_stock SET qty = qty - 2 WHERE product_id = 'espresso' AND store_id = 1");
  for (const till of [a, b]) {
    await till.page.waitForSelector('#sales [data-sale="office-sale-1"]');
    await until(async () => await stock(till.page, "espresso") === before.espresso - 3);
  }
  assert.equal((await text(b.page, "#dead-count")).trim(), "0");
  assert.deepEqual([...a.errors, ...b.errors], []);
  await a.page.screenshot({path: process.env.CLOUDSYNC_SCREENSHOT});
});

test("a till's sales survive a reload while the server cannot be reached (IndexedDB), then go out", async () => {
  const till = await openTill();
  const before = await stock(till.page, "brownie");
  await till.context.route("**/sync/**", (route) => route.abort());   // the page loads; the API does not answer
  await till.page.click('[data-product="brownie"]');
  await till.page.click("#pay");
  await till.page.waitForSelector("#network[data-state=offline]");
  const name = await text(till.page, "#till-name");
  const [sale] = (await sales(till.page)).filter((id) => id.startsWith(name));
  await till.page.reload();                                           // the same tab: the same till
  await till.page.waitForSelector(`#sales [data-sale="${sale}"]`);
  assert.equal((await text(till.page, "#outbox")).trim(), "3");
  assert.equal(await stock(till.page, "brownie"), before - 1);
  await till.context.unroute("**/sync/**");
  await until(async () => (await text(till.page, "#outbox")).trim() === "0", 30);   // its back-off ends
  assert.deepEqual(sql("SELECT qty FROM product_stock WHERE product_id = 'brownie' AND store_id = 1"), [[before - 1]]);
  assert.deepEqual(sql("SELECT COUNT(*) FROM sales WHERE id = ?", [sale]), [[1]]);
  assert.deepEqual(till.errors, []);
});
