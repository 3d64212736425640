"""Another program writing to the test database: the JavaScript tests' office and migrations.

    python js/sql.py "UPDATE sales SET note = ? WHERE id = ?" '["from the office", "s1"]'

Runs one statement on the database the environment names, with cloudsync's own settings
(DB_HOST, DB_PORT, DB_USER, DB_PASS, DB_NAME for MySQL/MariaDB, else DB_PATH for SQLite), and
prints the rows it returned as JSON, or the number of rows it changed.
"""

import json
import os
import sqlite3
import sys


def run(statement, params):
    if os.environ.get("DB_HOST"):
        import mysql.connector
        conn = mysql.connector.connect(host=os.environ["DB_HOST"], port=int(os.environ.get("DB_PORT", "3306")),
                                       user=os.environ.get("DB_USER", ""), password=os.environ.get("DB_PASS", ""),
                                       database=os.environ["DB_NAME"], autocommit=True, charset="utf8mb4")
        cursor = conn.cursor()
        cursor.execute(statement.replace("?", "%s"), params)
        result = cursor.fetchall() if cursor.with_rows else cursor.rowcount
    else:
        conn = sqlite3.connect(os.environ["DB_PATH"], isolation_level=None, timeout=10)
        cursor = conn.execute(statement, params)
        result = cursor.fetchall() if cursor.description else cursor.rowcount
    conn.close()
    return result


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else []), default=str))
