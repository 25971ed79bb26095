"""The harness against both targets: host OpenSSH 9.2 and OpenSSH 10 in a Debian 13 chroot.

The ``target`` fixture runs each test once per flavour, so these also prove that
ChrootSshd really has the same interface as Sshd (OPENSSH10-NOTES §6).
"""
import os

import pytest

import harness

pytestmark = pytest.mark.root


def test_login_notty(target):
    u = target.users["sshlogt1"]
    cp = harness.ssh_run(target.sshd, u, "id -u; id -un; exit 4")
    assert cp.returncode == 4, cp.stderr
    assert cp.stdout.split() == [str(u.uid), u.name], cp.stdout


def test_pty_session(target):
    u = target.users["sshlogt2"]
    with harness.PtySession(target.sshd, u, rows=24, cols=80) as s:
        assert s.run("id -un") == 0 and s.last_output.strip() == u.name, s.last_output
        assert isinstance(s.tty_name(), int)
        s.resize(33, 99)
        harness.wait_for(lambda: s.run("stty size") == 0 and s.last_output.strip() == "33 99",
                         timeout=10, desc="stty size to show 33 99")
        assert s.run("sh -c 'exit 5'") == 5


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "legacy-scp"])
def test_scp(target, tmp_path, legacy):
    u = target.users["sshlogt1"]
    local = tmp_path / "f.bin"
    local.write_bytes(os.urandom(54321))
    remote = "%s/chroot-scp-%d.bin" % (u.home, legacy)
    cp = harness.scp_upload(target.sshd, u, str(local), remote, legacy=legacy)
    assert cp.returncode == 0, cp.stderr
    on_host = target.sshd.host_path(remote)
    st = os.stat(on_host)
    assert (st.st_size, st.st_uid) == (54321, u.uid)
    os.unlink(on_host)


def test_sftp_put(target, tmp_path):
    u = target.users["sshlogt2"]
    local = tmp_path / "g.txt"
    local.write_bytes(b"z" * 777)
    cp = harness.sftp_put(target.sshd, u, [(str(local), "chroot-sftp.txt")])
    assert cp.returncode == 0, cp.stderr
    on_host = target.sshd.host_path(os.path.join(u.home, "chroot-sftp.txt"))
    assert os.path.getsize(on_host) == 777
    os.unlink(on_host)


def test_auth_failures_and_password(target):
    u = target.users["sshlogt1"]
    assert harness.ssh_bad_key(target.sshd, u).returncode == 255
    cp = harness.ssh_password(target.sshd, u.name, u.password, "id -un")
    assert cp.returncode == 0 and cp.stdout.strip() == u.name, cp
    assert harness.ssh_password(target.sshd, u.name, "wrong", "true").returncode != 0
    assert harness.ssh_unknown_user(target.sshd, "nosuchuser-sshlog", "x").returncode != 0


def test_ipv6(target):
    u = target.users["sshlogt2"]
    cp = harness.ssh_run(target.sshd, u, "echo $SSH_CONNECTION", host="::1")
    assert cp.returncode == 0 and cp.stdout.split()[0] == "::1", cp


# -- OpenSSH 10 specifics: the chroot really runs the trixie sshd -------------------------

@pytest.mark.chroot
def test_chroot_runs_openssh10(chroot_sshd, users):
    srv = chroot_sshd
    assert os.readlink("/proc/%d/exe" % srv.pid) == srv.root + harness.SSHD_BIN, \
        "the recorded pid must be sshd itself (unshare/sh/chroot exec in place)"
    u = srv.users["sshlogt1"]
    assert u.uid == users["sshlogt1"].uid, "chroot users get the host uid by default"
    with harness.PtySession(srv, u) as s:
        # OpenSSH >= 9.8 re-execs each connection as /usr/lib/openssh/sshd-session.
        monitors = harness.wait_for(srv.session_pids, timeout=5, desc="a per-connection process")
        exes = {os.readlink("/proc/%d/exe" % p) for p in monitors}
        assert exes == {srv.root + "/usr/lib/openssh/sshd-session"}, exes
        assert s.run("cat /etc/debian_version") == 0
        assert s.last_output.strip().startswith("13"), s.last_output
    cp = harness._run(["chroot", srv.root, harness.SSHD_BIN, "-V"], check=False)
    assert b"OpenSSH_10" in cp.stderr + cp.stdout, cp


@pytest.mark.chroot
def test_chroot_stop_cleans_up(tmp_path, users):
    """A private chroot sshd: stop() ends its sessions, leaves no mounts, deletes the root."""
    srv = harness.ChrootSshd(str(tmp_path), listen=("127.0.0.1",))
    s = None
    try:
        u = srv.add_user(users["sshlogt1"])
        srv.start()
        s = harness.PtySession(srv, u)
        tree = harness.proc_tree(srv.pid)
        assert len(tree) >= 3, tree
    finally:
        srv.stop()
    assert s is not None
    try:
        s.wait(timeout=10)  # the client sees the connection drop
    finally:
        s.close()
    assert not any(harness._alive(p) for p in tree)
    assert not os.path.exists(srv.root)
    assert harness._mounts_under(str(tmp_path)) == []
