"""Unit tier: no root, no bcc, no network beyond loopback.

Puts this folder on sys.path (for the shared `factories` helpers, whatever the
pytest import mode) and keeps the `sshlog` logger as each test found it, since
some CLI paths (cmd_daemon) install their own handler.
"""
import logging
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture(autouse=True)
def _restore_sshlog_logger():
    logger = logging.getLogger("sshlog")
    handlers, level = logger.handlers[:], logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def utc():
    """Local time is UTC for the duration of the test (text forms print local time)."""
    import time
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()
