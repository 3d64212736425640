-- Example point-of-sale schema for SQLite: the same five tables as schema-mysql.sql (products
-- shared, the others one store's each, by store_id, indexed for ROW_SCOPES).
-- `python cloudsync.py demo` creates them.
CREATE TABLE IF NOT EXISTS customers (
  id TEXT PRIMARY KEY, name TEXT, phone TEXT,
  updated_at TIMESTAMP DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')), store_id INTEGER
);
CREATE INDEX IF NOT EXISTS customers_by_store ON customers (store_id);
CREATE TABLE IF NOT EXISTS products (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, price DECIMAL(12,2) NOT NULL DEFAULT 0,
  barcode TEXT, updated_at TIMESTAMP DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
CREATE TABLE IF NOT EXISTS sales (
  id TEXT PRIMARY KEY, customer_id TEXT, total DECIMAL(12,2) NOT NULL DEFAULT 0,
  note TEXT, sold_at DATETIME, store_id INTEGER
);
CREATE INDEX IF NOT EXISTS sales_by_store ON sales (store_id);
CREATE TABLE IF NOT EXISTS item_sales (
  id TEXT PRIMARY KEY, sale_id TEXT NOT NULL, product_id TEXT NOT NULL,
  qty INTEGER NOT NULL DEFAULT 1, price DECIMAL(12,2) NOT NULL DEFAULT 0, store_id INTEGER
);
CREATE INDEX IF NOT EXISTS item_sales_by_store ON item_sales (store_id);
-- each store's stock of each product: tills count it down with increments
CREATE TABLE IF NOT EXISTS product_stock (
  product_id TEXT NOT NULL, store_id INTEGER NOT NULL, qty INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (product_id, store_id)
);
CREATE INDEX IF NOT EXISTS product_stock_by_store ON product_stock (store_id);
