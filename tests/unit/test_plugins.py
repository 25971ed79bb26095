"""Plugins: the README's two examples (samples/plugins/) load and work, a broken plugin is
reported in one line and skipped, plugin parameter schemas are validated like built-ins."""
import os
import re
import textwrap
import time

import pytest

import sshlog

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "samples", "plugins")


@pytest.fixture(autouse=True)
def registries():
    """Each test starts and ends with the built-in registries only."""
    saved = dict(sshlog.FILTERS), dict(sshlog.ACTIONS), dict(sshlog.PLUGIN_SOURCES)
    yield
    for registry, old in zip((sshlog.FILTERS, sshlog.ACTIONS, sshlog.PLUGIN_SOURCES), saved):
        registry.clear()
        registry.update(old)


def write(directory, name, text):
    os.makedirs(str(directory), exist_ok=True)
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def config(yaml_text):
    return sshlog.parse_config([("t.yaml", textwrap.dedent(yaml_text).encode())])


def problems(yaml_text):
    with pytest.raises(sshlog.ConfigError) as e:
        config(yaml_text)
    return e.value.problems


def event(cls=sshlog.CommandFinish, ts=None, **kw):
    base = dict(timestamp=ts or time.time(), hostname="web1", ptm_pid=7, session_id="s",
                username="alice", client_ip="203.0.113.7", client_port=4000, tty_id=1)
    if cls is sshlog.CommandFinish:
        base.update(filename="/usr/bin/id", argv=("id", "-un"), exit_code=0)
    return cls(**dict(base, **kw))


def local_ts(hour, minute, weekday):
    """An epoch time whose local time is `weekday` (0 = Monday) at hour:minute."""
    t = time.mktime((2024, 1, 1 + weekday, hour, minute, 0, 0, 0, -1))   # 2024-01-01 = Monday
    assert time.localtime(t).tm_wday == weekday
    return t


# --------------------------------------------------------------- the README examples

def test_readme_examples_are_the_sample_files():
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Plugins"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    for name in ("outside_hours_filter.py", "csv_action.py"):
        with open(os.path.join(EXAMPLES, name)) as f:
            assert f.read() in blocks, "README's copy of %s differs from the file" % name


def test_examples_load_and_register():
    loaded, probs = sshlog.load_plugins([EXAMPLES])
    assert probs == []
    assert sorted(os.path.basename(p) for p in loaded) == ["csv_action.py",
                                                           "outside_hours_filter.py"]
    assert issubclass(sshlog.FILTERS["outside_hours"], sshlog.Filter)
    assert issubclass(sshlog.ACTIONS["csv_action"], sshlog.Action)
    assert sshlog.PLUGIN_SOURCES[("action", "csv_action")].endswith("csv_action.py")
    # loading the same files again (as a second check-config would) is no clash
    assert sshlog.load_plugins([EXAMPLES])[1] == []


def test_filter_example_matches_outside_hours():
    sshlog.load_plugins([EXAMPLES])
    flt = sshlog.make_filter("outside_hours", "08:00-18:00 Mon-Fri")
    assert flt.match(event(ts=local_ts(9, 30, 2))) is False        # Wednesday morning
    assert flt.match(event(ts=local_ts(19, 0, 2))) is True         # Wednesday evening
    assert flt.match(event(ts=local_ts(10, 0, 5))) is True         # Saturday
    inverse = sshlog.make_filter("not_outside_hours", "08:00-18:00")
    assert inverse.match(event(ts=local_ts(10, 0, 5))) is True
    night = sshlog.make_filter("outside_hours", "22:00-24:00 Fri-Mon")
    assert night.triggers == frozenset(sshlog.EVENT_TYPES)
    assert night.match(event(ts=local_ts(23, 0, 0))) is False      # Monday 23:00


def test_action_example_writes_csv_through_the_pipeline(tmp_path):
    sshlog.load_plugins([EXAMPLES])
    out = tmp_path / "sub" / "commands.csv"
    cfg = config("""
        events:
          - event: night_commands
            triggers: [command_finish]
            filters: {outside_hours: "00:00-00:01"}
            actions:
              - {action: csv, plugin: csv_action, path: "%s",
                 fields: [username, client_ip, args, exit_code]}
        """ % out)
    p = sshlog.Pipeline(cfg)
    p.dispatch(event(ts=local_ts(12, 0, 2), argv=("id", "-un, \"x\"")))   # never in the window
    p.stop()
    assert p.stats()["csv"]["delivered"] == 1
    assert out.read_text().splitlines() == ["username,client_ip,args,exit_code",
                                            'alice,203.0.113.7,"/usr/bin/id -un, ""x""",0']


# --------------------------------------------------------------- schemas are validated

def test_plugin_parameters_validated_like_builtins():
    sshlog.load_plugins([EXAMPLES])
    probs = problems("""
        actions:
          - {action: a, plugin: csv_action, fields: [x]}
          - {action: b, plugin: csv_action, path: /tmp/x.csv, feilds: [x]}
          - {action: c, plugin: csv_action, path: [1], fields: "not a list"}
          - {action: d, plugin: csv_action, path: /tmp/y.csv, fields: []}
          - {action: e, plugin: csv_actoin, path: /tmp/y.csv}
        events:
          - event: e1
            triggers: [command_start]
            filters: {outside_hours: "lunchtime"}
            actions: [{action: a}]
          - event: e2
            triggers: [command_start]
            filters: {outside_hours: [1, 2]}
            actions: [{action: a}]
        """)
    assert "t.yaml: actions[0].path: missing required parameter" in probs
    assert "t.yaml: actions[1].feilds: unknown parameter (did you mean 'fields'?)" in probs
    assert any(p.startswith("t.yaml: actions[2].path: expected a string") for p in probs)
    assert any(p.startswith("t.yaml: actions[2].fields: expected a list") for p in probs)
    assert "t.yaml: actions[3].fields: name at least one event field" in probs
    assert any(p.startswith("t.yaml: actions[4].plugin: unknown plugin 'csv_actoin' "
                            "(did you mean 'csv_action'?)") for p in probs)
    assert any(p.startswith("t.yaml: events[0].filters.outside_hours: expected 'HH:MM-HH:MM'")
               for p in probs)
    assert any(p.startswith("t.yaml: events[1].filters.outside_hours: expected a string")
               for p in probs)


def test_plugin_filter_misspelt_gets_did_you_mean():
    sshlog.load_plugins([EXAMPLES])
    probs = problems("""
        events:
          - event: e
            triggers: [connection_established]
            filters: {outside_hour: "08:00-18:00"}
            actions: [{action: x, plugin: eventlogfile_action, log_file_path: /tmp/x}]
        """)
    assert probs == ["t.yaml: events[0].filters.outside_hour: unknown filter "
                     "(did you mean 'outside_hours'?)"]


# --------------------------------------------------------------- broken plugins

GOOD = """\
    import sshlog
    SSHLOG_PLUGIN_API = "1.0"

    @sshlog.register_filter("is_alice", ["connection_established"], "bool", "user is alice")
    class IsAlice(sshlog.Filter):
        def match(self, event):
            return (event.username == "alice") == self.arg
    """


@pytest.mark.parametrize("name,text,message", [
    ("syntax.py", "def broken(:\n", r"SyntaxError: .* \(line 1\)"),
    ("raises.py", "import sshlog\nSSHLOG_PLUGIN_API = '1.0'\nx = 1\nraise RuntimeError('boom')\n",
     r"RuntimeError: boom \(line 4\)"),
    ("imports.py", "import no_such_module_here\n", r"ModuleNotFoundError: .*no_such_module_here"),
    ("exits.py", "import sys\nsys.exit(3)\n", r"SystemExit: 3 \(line 2\)"),
    ("noapi.py", "import sshlog\n", r"does not declare SSHLOG_PLUGIN_API"),
    ("newapi.py", "SSHLOG_PLUGIN_API = '1.7'\n", r"needs plugin API '1.7'"),
    ("oldmajor.py", "SSHLOG_PLUGIN_API = '0.9'\n", r"needs plugin API '0.9'"),
    ("redefine.py", """\
        import sshlog
        SSHLOG_PLUGIN_API = "1.0"
        @sshlog.register_action("slack_action")
        class Mine(sshlog.Action):
            pass
        """, r"redefines the action 'slack_action'"),
    ("badkind.py", """\
        import sshlog
        SSHLOG_PLUGIN_API = "1.0"
        @sshlog.register_action("weird_action")
        class Weird(sshlog.Action):
            PARAMS = (sshlog.Param("size", "bytes", 1),)
        """, r"action 'weird_action': parameter 'size': unknown kind 'bytes'"),
    ("baddefault.py", """\
        import sshlog
        SSHLOG_PLUGIN_API = "1.0"
        @sshlog.register_action("weird_action")
        class Weird(sshlog.Action):
            PARAMS = (sshlog.Param("n", "int", "ten"),)
        """, r"parameter 'n': default expected an integer"),
    ("badtrigger.py", """\
        import sshlog
        SSHLOG_PLUGIN_API = "1.0"
        @sshlog.register_filter("odd", "command_start", "bool")
        class Odd(sshlog.Filter):
            pass
        """, r"filter 'odd': triggers must be a list of event types"),
    ("notaction.py", """\
        import sshlog
        SSHLOG_PLUGIN_API = "1.0"
        @sshlog.register_action("plain_action")
        class Plain:
            PARAMS = ()
        """, r"not a subclass of sshlog.Action"),
])
def test_broken_plugin_is_reported_in_one_line_and_skipped(tmp_path, name, text, message):
    write(tmp_path, "a_good.py", GOOD)
    bad = write(tmp_path, name, text)
    before = dict(sshlog.ACTIONS)
    loaded, probs = sshlog.load_plugins([str(tmp_path)])
    assert [os.path.basename(p) for p in loaded] == ["a_good.py"]
    assert len(probs) == 1 and "\n" not in probs[0]
    assert probs[0].startswith("plugin %s skipped: " % bad)
    assert re.search(message, probs[0]), probs[0]
    assert "is_alice" in sshlog.FILTERS, "the good plugin keeps working"
    assert sshlog.ACTIONS == before, "the broken plugin's registrations are undone"


def test_plugin_files_order_and_hidden_files(tmp_path):
    write(tmp_path / "one", "b.py", GOOD)
    write(tmp_path / "one", "_helper.py", "raise RuntimeError('never imported')\n")
    write(tmp_path / "one", ".hidden.py", "raise RuntimeError('never imported')\n")
    write(tmp_path / "one", "notes.txt", "")
    write(tmp_path / "two", "a.py", "SSHLOG_PLUGIN_API = '1.0'\n")
    files = sshlog.plugin_files([str(tmp_path / "one"), str(tmp_path / "missing"),
                                 str(tmp_path / "two")])
    assert [os.path.relpath(f, str(tmp_path)) for f in files] == ["one/b.py", "two/a.py"]


# --------------------------------------------------------------- wiring: check-config, daemon

def test_plugin_dirs():
    assert sshlog.plugin_dirs("/srv/cfg", ["/x"]) == ["/srv/cfg/plugins", "/x"]
    assert sshlog.plugin_dirs(None) == [sshlog.PLUGIN_DIR]


def test_plugin_dir_constant_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setattr(sshlog, "PLUGIN_DIR", str(tmp_path))
    assert sshlog.plugin_dirs(None, None) == [str(tmp_path)]


def test_check_config_with_plugin_dir(tmp_path, capsys):
    cfg = tmp_path / "cfg"
    write(cfg / "conf.d", "a.yaml", """\
        events:
          - event: after_hours_logins
            triggers: [connection_established]
            filters: {outside_hours: "07:00-19:00 Mon-Fri", is_alice: true}
            actions:
              - {action: csv, plugin: csv_action, path: /tmp/logins.csv}
        """)
    write(cfg / "plugins", "alice.py", GOOD)                  # <config-dir>/plugins
    write(tmp_path / "extra", "broken.py", "raise ValueError('nope')\n")
    rc = sshlog.main(["check-config", "--config-dir", str(cfg), "--plugin-dir", EXAMPLES,
                      "--plugin-dir", str(tmp_path / "extra")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "configuration OK: 1 file(s), 1 event(s), 1 action(s)" in out
    assert "plugin loaded: %s" % os.path.join(EXAMPLES, "csv_action.py") in out
    assert err == "warning: plugin %s skipped: ValueError: nope (line 1)\n" % (
        tmp_path / "extra" / "broken.py")


def test_check_config_without_the_plugin_fails_with_did_you_mean(tmp_path, capsys):
    cfg = tmp_path / "cfg"
    write(cfg / "conf.d", "a.yaml", """\
        actions:
          - {action: csv, plugin: csv_action, path: /tmp/logins.csv}
        """)
    assert sshlog.main(["check-config", "--config-dir", str(cfg)]) == 2
    assert "a.yaml: actions[0].plugin: unknown plugin 'csv_action'" in capsys.readouterr().err


def test_explain_lists_plugins_with_their_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sshlog, "PLUGIN_DIR", str(tmp_path))
    assert sshlog.main(["check-config", "--plugin-dir", EXAMPLES, "--explain"]) == 0
    out = capsys.readouterr().out
    assert "#### `csv_action` (plugin %s)" % os.path.join(EXAMPLES, "csv_action.py") in out
    assert "| `path` | string | **required** | CSV file to append to |" in out
    assert "| `outside_hours` (plugin " in out


def test_daemon_loads_plugins_before_config(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sshlog, "PLUGIN_DIR", EXAMPLES)
    write(tmp_path, "broken.py", "raise ValueError('nope')\n")
    d = sshlog.Daemon(config_dir=None, plugin_dirs=None)
    assert d.plugin_dirs is None
    import logging
    with caplog.at_level(logging.INFO, logger="sshlog"):
        d.load_plugins()                                  # PLUGIN_DIR, read at call time
        sshlog.Daemon(plugin_dirs=[str(tmp_path)]).load_plugins()
    assert "csv_action" in sshlog.ACTIONS
    assert "plugins loaded: %s" % os.path.join(EXAMPLES, "csv_action.py") in caplog.text
    assert "plugin %s skipped: ValueError: nope (line 1)" % (tmp_path / "broken.py") \
        in caplog.text


def test_plugin_imports_sshlog_when_it_runs_as_main(tmp_path):
    """`python3 sshlog.py daemon` runs the module as __main__: a plugin's `import sshlog`
    must still register into the running registries, not a second copy."""
    import subprocess
    import sys
    plugin_dir = tmp_path / "plugins"
    write(plugin_dir, "alice.py", GOOD)
    cfg = tmp_path / "cfg"
    write(cfg / "conf.d", "a.yaml", """\
        events:
          - event: e
            triggers: [connection_established]
            filters: {is_alice: true}
            actions: [{action: x, plugin: eventlogfile_action, log_file_path: /tmp/x.log}]
        """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO, os.path.join(REPO, "build", "vendor")]))
    r = subprocess.run([sys.executable, os.path.join(REPO, "sshlog.py"), "check-config",
                        "--config-dir", str(cfg), "--plugin-dir", str(plugin_dir)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout
