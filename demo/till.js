// The web till of `cloudsync.py demo`: sells the catalogue (products), counts stock down
// (product_stock, one row per product and store: its qty goes down by increments, so two tills
// selling the last units offline both count), records each sale (sales) with its lines
// (item_sales). Everything is written to the browser's copy first (IndexedDB), so the till sells
// with the network off; run() pushes and long-polls whenever the server can be reached.
import {Client, IndexedDBStorage, SyncError} from "/demo/cloudsync_client.mjs";

const TABLES = ["products", "product_stock", "sales", "item_sales"];
const LOW_STOCK = 5;
const STORE = 1;                      // the demo's one store (a chain scopes each till to its own: ROW_SCOPES)
const cart = new Map();               // product id -> quantity
const conflicts = [];                 // the last ones the server reported, newest first
let till = null;
let lastResult = null;

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (text is set as text, never parsed as HTML). */
function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value);
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

const cents = (price) => Math.round(Number(price) * 100);
const money = (amount) => (amount / 100).toFixed(2);

/** Each browser tab is a till of its own: its id lives in the tab (sessionStorage), its copy in IndexedDB. */
function tillId(fresh = false) {
  let id = sessionStorage.getItem("cloudsync-till");
  if (!id || fresh) {
    id = "web-till-" + Math.random().toString(36).slice(2, 6);
    sessionStorage.setItem("cloudsync-till", id);
  }
  return id;
}

async function open() {
  let deviceId = tillId();
  for (;;) {
    try {
      return await Client.open({url: location.origin, deviceId, tables: TABLES,
        storage: new IndexedDBStorage("cloudsync-" + deviceId), onChange: render,
        onSync: (result) => {
          lastResult = result;
          conflicts.unshift(...result.conflicts);
          conflicts.splice(10);
          render();
        }});
    } catch (error) {
      if (error.code === "storage_busy") {
        deviceId = tillId(true);           // a duplicated tab: the same till is open next door
      } else if (error instanceof SyncError && error.status === null) {
        showNetwork("offline", "the first start needs the server");
        await new Promise((resolve) => setTimeout(resolve, 2000));
      } else {
        throw error;
      }
    }
  }
}

async function pay() {
  const lines = [...cart].map(([id, qty]) => ({product: till.get("products", id), qty}));
  const total = lines.reduce((sum, {product, qty}) => sum + cents(product.price) * qty, 0);
  const saleId = `${till.deviceId}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 5)}`;
  await till.transaction((t) => {             // the sale, its lines and the stock: all stored, or none
    t.insert("sales", {id: saleId, store_id: STORE, total: money(total), sold_at: new Date().toISOString(),
      note: `${till.deviceId}: ` + lines.map(({product, qty}) => `${qty}× ${product.name}`).join(", ")});
    lines.forEach(({product, qty}, index) => {
      t.insert("item_sales", {id: `${saleId}-${index + 1}`, sale_id: saleId, product_id: product.id, qty,
        price: product.price, store_id: STORE});
      const stock = {product_id: product.id, store_id: STORE};
      if (t.get("product_stock", stock)) t.increment("product_stock", stock, {qty: -qty});
    });
  });
  cart.clear();
  render();
}

function showNetwork(state, title = "") {
  $("network").dataset.state = state;
  $("network").textContent = state;
  $("network").title = title;
}

function render() {
  if (!till) return;
  const stock = new Map(till.rows("product_stock").filter((row) => row.store_id === STORE)
    .map((row) => [row.product_id, row.qty]));
  const products = till.rows("products").sort((a, b) => a.name.localeCompare(b.name));
  $("products").replaceChildren(...products.map((product) => {
    const left = stock.get(product.id);
    return el("button", {class: "product" + (left !== undefined && left <= LOW_STOCK ? " low" : ""),
      "data-product": product.id, onclick: () => { cart.set(product.id, (cart.get(product.id) ?? 0) + 1); render(); }},
    el("span", {class: "price"}, product.price),
    el("span", {class: "name"}, product.name),
    el("span", {class: "stock-line"}, "stock ", el("b", {class: "stock"}, left ?? "–")));
  }));
  if (products.length === 0) $("products").replaceChildren(el("p", {class: "empty"}, "No products yet."));

  const lines = [...cart].map(([id, qty]) => ({product: till.get("products", id), qty})).filter((line) => line.product);
  $("cart").replaceChildren(...lines.map(({product, qty}) =>
    el("li", {}, el("span", {}, `${qty}× ${product.name}`), el("span", {}, money(cents(product.price) * qty)))));
  $("cart-total").textContent = money(lines.reduce((sum, {product, qty}) => sum + cents(product.price) * qty, 0));
  $("pay").disabled = lines.length === 0;

  const sales = till.rows("sales").sort((a, b) => (b.sold_at ?? "").localeCompare(a.sold_at ?? "")).slice(0, 12);
  $("sales").replaceChildren(...sales.map((sale) => el("li", {"data-sale": sale.id},
    el("span", {class: "note"}, sale.note ?? sale.id), el("span", {class: "amount"}, sale.total),
    el("span", {class: "when"}, String(sale.sold_at ?? "").replace("T", " ").slice(0, 19)))));

  const letters = till.deadLetters();
  $("dead").replaceChildren(...letters.map((letter) => el("li", {class: "letter", "data-letter": letter.id},
    `${letter.action} on ${letter.table} ${JSON.stringify(letter.data.id ?? "")} `,
    el("span", {class: "why"}, `${letter.code ?? letter.error}: ${letter.detail ?? ""}`),
    el("button", {class: "action quiet", onclick: () => till.resend(letter.id).then(render)}, "Resend"), " ",
    el("button", {class: "action quiet", onclick: () => till.discard(letter.id).then(render)}, "Discard"))));
  $("conflicts").replaceChildren(...conflicts.map((conflict) => el("li", {class: "letter"},
    `conflict on ${conflict.table} ${JSON.stringify(conflict.key)}: the server's row was taken`)));
  $("all-clear").hidden = letters.length + conflicts.length > 0;

  $("outbox").textContent = till.pending();
  $("dead-count").textContent = letters.length;
  $("conflict-count").textContent = conflicts.length;
  if (!navigator.onLine || lastResult?.offline) showNetwork("offline", lastResult?.reason ?? "");
  else if (lastResult) showNetwork("online");
}

$("pay").addEventListener("click", () => pay().catch((error) => alert(error.message)));
$("clear").addEventListener("click", () => { cart.clear(); render(); });
addEventListener("offline", render);
addEventListener("online", render);

till = await open();
$("till-name").textContent = till.deviceId;
document.title = `cloudsync till ${till.deviceId}`;
render();
till.run().catch((error) => showNetwork("offline", "the server refused this till: " + error.message));
