-- The web till's catalogue: `cloudsync.py demo` adds it to cloudsync-demo.db, keeping the rows
-- already there (stock sold in an earlier run stays sold). A product's stock is the
-- product_stock row with the product's id; tills count it down with increments.
INSERT OR IGNORE INTO products (id, name, price, barcode) VALUES
  ('espresso', 'Espresso', 2.20, '2000000000015'),
  ('cappuccino', 'Cappuccino', 3.10, '2000000000022'),
  ('croissant', 'Croissant', 1.90, '2000000000039'),
  ('bagel', 'Sesame bagel', 2.60, '2000000000046'),
  ('orange-juice', 'Orange juice', 3.50, '2000000000053'),
  ('brownie', 'Brownie', 2.40, '2000000000060');
INSERT OR IGNORE INTO product_stock (id, quantity) VALUES
  ('espresso', 120), ('cappuccino', 80), ('croissant', 24), ('bagel', 18), ('orange-juice', 30),
  ('brownie', 12);
