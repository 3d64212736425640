-- The web till's catalogue: `cloudsync.py demo` adds it to cloudsync-demo.db, keeping the rows
-- already there (stock sold in an earlier run stays sold). A product's stock is its
-- product_stock row at store 1 (the demo's one store); tills count it down with increments.
INSERT OR IGNORE INTO products (id, name, price, barcode) VALUES
  ('espresso', 'Espresso', 2.20, '2000000000015'),
  ('cappuccino', 'Cappuccino', 3.10, '2000000000022'),
  ('croissant', 'Croissant', 1.90, '2000000000039'),
  ('bagel', 'Sesame bagel', 2.60, '2000000000046'),
  ('orange-juice', 'Orange juice', 3.50, '2000000000053'),
  ('brownie', 'Brownie', 2.40, '2000000000060');
INSERT OR IGNORE INTO product_stock (product_id, store_id, qty) VALUES
  ('espresso', 1, 120), ('cappuccino', 1, 80), ('croissant', 1, 24), ('bagel', 1, 18),
  ('orange-juice', 1, 30), ('brownie', 1, 12);
