"""Root-tier fixtures: a private sshlog daemon watching the harness's sshd."""
import pytest

from sshlog_daemon import SshlogDaemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, sshd, users):
    """One daemon per test module (loading the BPF programs takes seconds);
    tests tell their sessions apart by ptm_pid and unique tokens."""
    d = SshlogDaemon(tmp_path_factory.mktemp("sshlog")).start()
    yield d
    rc = d.stop()
    assert rc == 0, "daemon exit status %s\n%s" % (rc, d.stderr_text())
