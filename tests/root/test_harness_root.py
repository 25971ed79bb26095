"""Tests of tests/harness.py itself against the host's real OpenSSH 9.2 sshd.

If these fail, every root-tier result built on the harness is suspect, so each test checks
one promise the harness makes (a real pty, exit codes, uploads, auth failures, IPv6).
"""
import os

import pytest

import harness

pytestmark = pytest.mark.root


def test_free_port_avoids_reserved_ports():
    ports = {harness.free_port() for _ in range(20)}
    assert not ports & harness.FORBIDDEN_PORTS
    assert all(0 < p < 65536 for p in ports)


def test_sshd_listens_on_both_addresses(sshd):
    text = sshd.log_text()
    for addr in ("127.0.0.1", "::1"):
        assert "Server listening on %s port %d." % (addr, sshd.port) in text, text
    assert sshd.port not in harness.FORBIDDEN_PORTS
    # (cmdline is rewritten by sshd's setproctitle, so check exe)
    assert os.readlink("/proc/%d/exe" % sshd.pid) == harness.SSHD_BIN


def test_users_exist_with_keys(users):
    import pwd
    for name, u in users.items():
        assert pwd.getpwnam(name).pw_uid == u.uid
        assert os.path.exists(u.key) and os.path.exists(u.wrong_key)
        assert not u.key.startswith(u.home), "keys must live outside the user's home"
        ak = os.path.join(u.home, ".ssh", "authorized_keys")
        st = os.stat(ak)
        assert (st.st_uid, st.st_mode & 0o777) == (u.uid, 0o600)
        with open(ak) as f:
            keys = f.read()
        with open(u.key + ".pub") as f:
            assert f.read().split()[1] in keys
        with open(u.wrong_key + ".pub") as f:
            assert f.read().split()[1] not in keys


def test_create_user_is_idempotent(users, tmp_path):
    u = users["sshlogt2"]
    again = harness.create_user(u.name, u.password, key_dir=str(tmp_path))
    assert again.uid == u.uid
    # Both the session's key and the new one are authorized (merge, not overwrite).
    with open(os.path.join(u.home, ".ssh", "authorized_keys")) as f:
        keys = f.read()
    for k in (u.key, again.key):
        with open(k + ".pub") as f:
            assert f.read().split()[1] in keys


def test_pty_session_id_tty_and_resize(sshd, users):
    u = users["sshlogt1"]
    with harness.PtySession(sshd, u, rows=40, cols=120) as s:
        assert s.run("id -un") == 0
        assert s.last_output.strip() == u.name, repr(s.last_output)
        n = s.tty_name()
        assert isinstance(n, int) and n >= 0
        assert s.run("stty size") == 0
        assert s.last_output.strip() == "40 120", repr(s.last_output)
        s.resize(30, 100)
        # The resize travels client -> sshd -> pty asynchronously; poll for it.
        harness.wait_for(lambda: s.run("stty size") == 0 and s.last_output.strip() == "30 100",
                         timeout=10, desc="stty size to show 30 100")
        assert s.run("false") == 1
        assert s.run("sh -c 'exit 7'") == 7
        m = s.run("echo héllo") == 0 and s.last_output
        assert m.strip() == "héllo"
    assert s.returncode is not None, "ssh client still running after close()"


def test_pty_expect_timeout_reports_tail(sshd, users):
    with harness.PtySession(sshd, users["sshlogt1"]) as s:
        s.sendline("echo visible-text")
        with pytest.raises(AssertionError, match="visible-text"):
            s.expect(b"never-printed", timeout=1)


def test_two_pty_sessions_have_distinct_ttys(sshd, users):
    with harness.PtySession(sshd, users["sshlogt1"]) as a, \
            harness.PtySession(sshd, users["sshlogt2"]) as b:
        ta, tb = a.tty_name(), b.tty_name()
        assert ta != tb
        assert b.run("id -un") == 0 and b.last_output.strip() == "sshlogt2"


def test_pty_session_with_password(sshd, users):
    u = users["sshlogt2"]
    with harness.PtySession(sshd, u, password=u.password) as s:
        assert s.run("id -un") == 0 and s.last_output.strip() == u.name
    assert "Accepted password for %s" % u.name in sshd.log_text()


def test_non_pty_exit_status(sshd, users):
    cp = harness.ssh_run(sshd, users["sshlogt1"], "exit 3")
    assert cp.returncode == 3, cp.stderr
    cp = harness.ssh_run(sshd, users["sshlogt1"], "id -un; tty")
    assert cp.stdout.splitlines() == ["sshlogt1", "not a tty"], cp


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "legacy-scp"])
def test_scp_upload(sshd, users, tmp_path, legacy):
    u = users["sshlogt1"]
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(100_000))
    remote = "%s/scp-%s.bin" % (u.home, "legacy" if legacy else "sftp")
    cp = harness.scp_upload(sshd, u, str(local), remote, legacy=legacy)
    assert cp.returncode == 0, cp.stderr
    st = os.stat(remote)
    assert (st.st_size, st.st_uid) == (100_000, u.uid)
    os.unlink(remote)


def test_sftp_put(sshd, users, tmp_path):
    u = users["sshlogt2"]
    a, b = tmp_path / "a.txt", tmp_path / "b b.txt"
    a.write_bytes(b"x" * 1234)
    b.write_bytes(b"y" * 4321)
    cp = harness.sftp_put(sshd, u, [(str(a), "%s/sftp-a.txt" % u.home),
                                    (str(b), "sftp-b b.txt")])  # relative to home
    assert cp.returncode == 0, cp.stderr
    for name, size in (("sftp-a.txt", 1234), ("sftp-b b.txt", 4321)):
        path = os.path.join(u.home, name)
        assert os.path.getsize(path) == size
        os.unlink(path)


def test_password_login_and_wrong_password(sshd, users):
    u = users["sshlogt1"]
    cp = harness.ssh_password(sshd, u.name, u.password, "id -un")
    assert cp.returncode == 0 and cp.stdout.strip() == u.name, cp
    cp = harness.ssh_password(sshd, u.name, "not-the-password", "true", timeout=20)
    assert cp.returncode != 0, cp
    harness.wait_for(lambda: "Failed password for %s" % u.name in sshd.log_text(),
                     timeout=5, desc="'Failed password' in the sshd log")


def test_wrong_key_fails(sshd, users):
    cp = harness.ssh_bad_key(sshd, users["sshlogt1"])
    assert cp.returncode == 255, cp
    assert "Permission denied" in cp.stderr


def test_unknown_user_fails(sshd):
    cp = harness.ssh_unknown_user(sshd, "nosuchuser-sshlog", "whatever", timeout=20)
    assert cp.returncode != 0, cp
    harness.wait_for(lambda: "Invalid user nosuchuser-sshlog" in sshd.log_text(),
                     timeout=5, desc="'Invalid user' in the sshd log")


def test_ipv6_login(sshd, users):
    cp = harness.ssh_run(sshd, users["sshlogt1"], "echo $SSH_CONNECTION", host="::1")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split()[0] == "::1", cp.stdout
    with harness.PtySession(sshd, users["sshlogt2"], host="::1") as s:
        assert s.run("echo $SSH_CLIENT") == 0
        assert s.last_output.split()[0] == "::1"


def test_stop_kills_sessions(tmp_path, users):
    """A private sshd: stop() must end the listener and open sessions, by pid."""
    server = harness.Sshd(str(tmp_path), listen=("127.0.0.1",)).start()
    s = None
    try:
        s = harness.PtySession(server, users["sshlogt1"])
        harness.wait_for(server.session_pids, timeout=5, desc="a session process")
        tree = harness.proc_tree(server.pid)
        assert len(tree) >= 3, tree  # listener, monitor, session child (+ shell)
    finally:
        server.stop()
    assert s is not None
    try:
        harness.wait_for(lambda: not any(os.path.exists("/proc/%d" % p) and
                                         harness._alive(p) for p in tree),
                         timeout=10, desc="all sshd processes to exit")
        s.wait(timeout=10)  # the client sees the connection drop
    finally:
        s.close()
    assert server.proc is None
