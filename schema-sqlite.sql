-- Example point-of-sale schema for SQLite: the same five tables as
-- schema-mysql.sql. `python cloudsync.py demo` creates them.
CREATE TABLE IF NOT EXISTS customers (
  id TEXT PRIMARY KEY, name TEXT, phone TEXT,
  updated_at TIMESTAMP DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
CREATE TABLE IF NOT EXISTS products (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, price DECIMAL(12,2) NOT NULL DEFAULT 0,
  barcode TEXT, updated_at TIMESTAMP DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
);
CREATE TABLE IF NOT EXISTS sales (
  id TEXT PRIMARY KEY, customer_id TEXT, total DECIMAL(12,2) NOT NULL DEFAULT 0,
  note TEXT, sold_at DATETIME
);
CREATE TABLE IF NOT EXISTS item_sales (
  id TEXT PRIMARY KEY, sale_id TEXT NOT NULL, product_id TEXT NOT NULL,
  qty INTEGER NOT NULL DEFAULT 1, price DECIMAL(12,2) NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS product_stock (
  id TEXT PRIMARY KEY, quantity INTEGER NOT NULL DEFAULT 0
);
