"""`sshlog install` / `uninstall` into a temporary root: nothing touches the real system."""
import os
import subprocess

import pytest

import sshlog


class Runner:
    """Stands in for subprocess.run: records argv, answers rc 0."""

    def __init__(self, rc=0):
        self.calls, self.rc = [], rc

    def __call__(self, argv, **_kw):
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(argv, self.rc, b"boom" if self.rc else b"")


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    src = tmp_path / "sshlog.pyz"
    src.write_bytes(b"#!/usr/bin/python3\nPK fake zipapp v1\n")
    paths = dict(bin_path=str(r / "usr/local/bin/sshlog"), conf_dir=str(r / "etc/sshlog"),
                 unit_path=str(r / "etc/systemd/system/sshlog.service"),
                 systemd_dir=str(r / "run/systemd/system"),
                 manifest=str(r / "var/lib/sshlog/install.json"), log_dir=str(r / "var/log/sshlog"))
    return r, str(src), paths


def do_install(src, paths, group="sshlog-test-nogroup", run=None, said=None):
    return sshlog.install(src, group=group, run=run or Runner(),
                          say=(said.append if said is not None else lambda *_: None), **paths)


def do_uninstall(paths, purge=False, run=None, said=None):
    kw = dict(paths)
    return sshlog.uninstall(purge=purge, run=run or Runner(),
                            say=(said.append if said is not None else lambda *_: None), **kw)


def test_install_creates_program_config_group_and_unit(root):
    r, src, paths = root
    run, said = Runner(), []
    m = do_install(src, paths, run=run, said=said)
    assert open(paths["bin_path"], "rb").read() == open(src, "rb").read()
    assert os.stat(paths["bin_path"]).st_mode & 0o777 == 0o755
    conf = paths["conf_dir"]
    for sub in ("conf.d", "plugins", "samples"):
        assert os.path.isdir(os.path.join(conf, sub))
    embedded = dict(sshlog.embedded_config_files("conf.d"))
    assert sorted(os.listdir(os.path.join(conf, "conf.d"))) == sorted(embedded)
    for name, data in embedded.items():
        assert open(os.path.join(conf, "conf.d", name), "rb").read() == data
    samples = dict(sshlog.embedded_config_files("samples"))
    assert sorted(os.listdir(os.path.join(conf, "samples"))) == sorted(samples)
    assert run.calls == [["groupadd", "--system", "sshlog-test-nogroup"]]
    assert m["group_created"] == "sshlog-test-nogroup"
    unit = open(paths["unit_path"]).read()
    assert "ExecStart=%s daemon\n" % paths["bin_path"] in unit
    assert "Restart=on-failure\n" in unit and "ExecReload=/bin/kill -HUP $MAINPID\n" in unit
    assert "Type=simple\n" in unit and "WantedBy=multi-user.target" in unit
    # no systemd here: it says so and how to start the daemon
    text = "\n".join(said)
    assert "systemd is not running" in text and "%s daemon" % paths["bin_path"] in text
    assert os.path.exists(paths["manifest"])


def test_install_keeps_the_administrators_files(root):
    r, src, paths = root
    conf = paths["conf_dir"]
    os.makedirs(os.path.join(conf, "conf.d"))
    os.makedirs(os.path.join(conf, "samples"))
    mine = os.path.join(conf, "conf.d", "site.yaml")
    open(mine, "w").write("# mine\n")
    sample = os.path.join(conf, "samples", "log_events.yaml")
    open(sample, "w").write("# my edited sample\n")
    m = do_install(src, paths, group="root")          # the group exists: no groupadd
    assert os.listdir(os.path.join(conf, "conf.d")) == ["site.yaml"]
    assert open(mine).read() == "# mine\n"
    assert open(sample).read() == "# my edited sample\n"
    assert sample not in m["files"] and "group_created" not in m


def test_a_main_configuration_file_counts_as_configuration(root):
    r, src, paths = root
    os.makedirs(paths["conf_dir"])
    open(os.path.join(paths["conf_dir"], "sshlog.yaml"), "w").write("events: []\n")
    do_install(src, paths, group="root")
    assert os.listdir(os.path.join(paths["conf_dir"], "conf.d")) == []


def test_reinstall_updates_the_program_and_is_otherwise_idempotent(root):
    r, src, paths = root
    do_install(src, paths)
    said = []
    run = Runner()
    do_install(src, paths, group="root", run=run, said=said)
    assert "already this version" in said[0] and run.calls == []
    open(src, "wb").write(b"#!/usr/bin/python3\nPK fake zipapp v2\n")
    said = []
    m = do_install(src, paths, group="root", said=said)
    assert "updated" in said[0] and open(paths["bin_path"], "rb").read().endswith(b"v2\n")
    assert m["group_created"] == "sshlog-test-nogroup"       # remembered from the first run


def test_install_enables_the_service_where_systemd_runs(root):
    r, src, paths = root
    os.makedirs(paths["systemd_dir"])
    run = Runner()
    do_install(src, paths, group="root", run=run)
    assert run.calls == [["systemctl", "daemon-reload"],
                         ["systemctl", "enable", "sshlog.service"],
                         ["systemctl", "restart", "sshlog.service"]]
    run = Runner()
    do_uninstall(paths, run=run)
    assert run.calls == [["systemctl", "disable", "--now", "sshlog.service"],
                         ["systemctl", "daemon-reload"]]


def test_failures_are_one_line_errors(root):
    r, src, paths = root
    with pytest.raises(sshlog.SshlogError, match="groupadd sshlog-test-nogroup failed: boom"):
        do_install(src, paths, run=Runner(rc=9))
    blocked = dict(paths, bin_path=os.path.join(src, "bin", "sshlog"))   # under a file
    with pytest.raises(sshlog.SshlogError, match="install: .*Not a directory"):
        do_install(src, blocked, group="root")


def test_uninstall_removes_what_install_created_and_keeps_config_and_logs(root):
    r, src, paths = root
    do_install(src, paths)
    os.makedirs(paths["log_dir"])
    open(os.path.join(paths["log_dir"], "event.log"), "w").write("evidence\n")
    run, said = Runner(), []
    do_uninstall(paths, run=run, said=said)
    assert not os.path.exists(paths["bin_path"]) and not os.path.exists(paths["unit_path"])
    assert not os.path.exists(paths["manifest"])
    assert run.calls == [["groupdel", "sshlog-test-nogroup"]]
    assert os.path.isdir(os.path.join(paths["conf_dir"], "conf.d"))
    assert os.path.exists(os.path.join(paths["log_dir"], "event.log"))
    assert any("--purge" in s for s in said)


def test_uninstall_purge_removes_configuration_and_logs(root):
    r, src, paths = root
    do_install(src, paths, group="root")
    os.makedirs(paths["log_dir"])
    run = Runner()
    do_uninstall(paths, purge=True, run=run)
    assert not os.path.exists(paths["conf_dir"]) and not os.path.exists(paths["log_dir"])
    assert run.calls == []                                   # the group was not ours


def test_cli_install_refuses_a_checkout_and_honours_the_constants(root, monkeypatch, capsys):
    r, src, paths = root
    if os.geteuid() != 0:
        assert sshlog.main(["install"]) == 1
        assert "needs root" in capsys.readouterr().err
        return
    # run from a checkout (sshlog.py), not the zipapp: nothing to copy
    assert sshlog.main(["install", "--prefix", str(r / "opt")]) == 1
    assert "build it with `make`" in capsys.readouterr().err
    monkeypatch.setattr(sshlog, "running_zipapp", lambda: src)
    for name, key in (("CONF_DIR", "conf_dir"), ("SYSTEMD_UNIT", "unit_path"),
                      ("SYSTEMD_RUNNING", "systemd_dir"), ("INSTALL_MANIFEST", "manifest"),
                      ("LOG_DIR", "log_dir")):
        monkeypatch.setattr(sshlog, name, paths[key])
    monkeypatch.setattr(sshlog, "SOCKET_GROUP", "root")
    assert sshlog.main(["install", "--prefix", str(r / "opt")]) == 0
    assert os.path.exists(str(r / "opt/bin/sshlog"))
    assert "ExecStart=%s daemon" % (r / "opt/bin/sshlog") in open(paths["unit_path"]).read()
    assert sshlog.main(["uninstall", "--prefix", str(r / "opt")]) == 0
    assert not os.path.exists(str(r / "opt/bin/sshlog"))


def test_running_zipapp_finds_the_pyz(tmp_path):
    import zipfile
    pyz = tmp_path / "x.pyz"
    with zipfile.ZipFile(pyz, "w") as z:
        z.writestr("__main__.py", "")
    assert sshlog.running_zipapp(str(pyz)) == str(pyz)
    with pytest.raises(sshlog.SshlogError):
        sshlog.running_zipapp(str(tmp_path))
