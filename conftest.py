"""pytest configuration: the `slow` marker, given by what a test does, not by hand.

A test is slow when it starts processes or machines of its own (a cloudsync
server, a command line run, a private MariaDB, a Galera cluster, Node.js, a
browser, a benchmark's smoke run), is a hypothesis property, runs on MySQL (its
MySQL parametrization: each is a database made, migrated and dropped on the
server, whose every DDL and commit waits for the disk), or goes through every
column type on MySQL's cursor path. The rest runs in process on fresh SQLite
databases (and a few short MySQL checks that take no parameter): `pytest -m
"not slow"` is the edit-test loop (under a minute), and README's test command
still runs everything.
"""

import inspect

import pytest

# fixtures that start a server, a database server or a cluster of their own
SLOW_FIXTURES = {"server", "device", "demo_server", "private_mariadb", "galera_cluster", "fault_figures",
                 "mysql_server_restartable"}
# what a test's own source calls when it starts a process
SLOW_CALLS = ("LiveServer(", "_cli(", "subprocess.", "reliability_cloudsync.", "bench_cloudsync", "_bench(",
              "_node()", "time.sleep(")
# what its name says it is: a benchmark's smoke run, a property over many examples, real tools; and
# test_every_type_survives_the_cursor_path, every column type through MySQL's cursor path (~20 s, on MySQL
# without a parameter saying so)
SLOW_NAMES = ("benchmark", "property", "real_tools", "pt_osc", "dump_reload", "survives_the_cursor_path")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes, servers, clusters or a browser, is a long "
                                       "property, or runs on MySQL; deselect with -m \"not slow\"")


def _on_mysql(item):
    """The MySQL parametrization of a test: a backend-like fixture's (or a `kind`) parameter "mysql"."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(value == "mysql" for value in params.values()) or "[mysql" in item.name


def _is_slow(item):
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or _on_mysql(item) \
            or any(name in item.name for name in SLOW_NAMES):
        return True
    function = getattr(item, "function", None)
    if function is None:
        return False
    if getattr(function, "is_hypothesis_test", False) or hasattr(function, "hypothesis"):
        return True
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in SLOW_CALLS)


def pytest_collection_modifyitems(items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
