"""Configuration: the embedded default, malformed files (file + key path + did-you-mean),
and `check-config` on the command line."""
import glob
import os
import textwrap

import pytest

import sshlog

HERE = os.path.dirname(sshlog.__file__)

GOOD = textwrap.dedent("""\
    events:
      - event: log_logins
        triggers: [connection_established, connection_close]
        filters:
          username: "*"
        actions:
          - action: log_events
    actions:
      - action: log_events
        plugin: eventlogfile_action
        log_file_path: /tmp/sshlog-test/event.log
    """)


def event_yaml(triggers="[command_finish]", filters="", action=None, name="e1"):
    """One event with an inline eventlogfile action (or `action` as the actions list)."""
    action = action or ("[{action: a1, plugin: eventlogfile_action, "
                        "log_file_path: /tmp/sshlog-test/x.log}]")
    text = "events:\n  - event: %s\n    triggers: %s\n" % (name, triggers)
    if filters:
        text += "    filters: %s\n" % filters
    return text + "    actions: %s\n" % action


def parse(files):
    """parse_config on {name: text-or-bytes}, in the given order."""
    return sshlog.parse_config([(name, data if isinstance(data, bytes) else data.encode())
                                for name, data in files.items()])


def problems_of(files):
    with pytest.raises(sshlog.ConfigError) as info:
        parse(files)
    return info.value.problems


# ---------------------------------------------------------------------------------------
# The default configuration.

def test_embedded_default_config_loads():
    sources = [("<embedded>/conf.d/" + n, data) for n, data in sshlog.embedded_config_files()]
    assert sources, "conf.d/ ships at least one file"
    config = sshlog.parse_config(sources)
    assert config.warnings == []
    (rule,) = [r for r in config.rules if r.name == "log_general_activity"]
    assert rule.triggers == {"connection_established", "connection_auth_failed",
                             "connection_close", "command_start", "command_finish",
                             "file_upload"}
    plugin, params, _src = config.actions[rule.actions[0]]
    assert plugin == "eventlogfile_action"
    assert params["log_file_path"] == "/var/log/sshlog/event.log"
    assert params["output_json"] is False          # defaults filled in


def test_conf_d_files_on_disk_parse():
    paths = sorted(glob.glob(os.path.join(HERE, "conf.d", "*.y*ml")))
    assert paths
    config = sshlog.parse_config([(p, open(p, "rb").read()) for p in paths])
    assert config.files == paths and config.rules


def test_load_config_without_a_directory_uses_the_embedded_default(tmp_path):
    config = sshlog.load_config(None, default_dir=str(tmp_path / "absent"))
    assert all(f.startswith("<embedded>/conf.d/") for f in config.files)


def test_load_config_reads_main_file_then_conf_d_in_order(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "sshlog.yaml").write_text(GOOD)
    (tmp_path / "conf.d" / "b.yml").write_text(event_yaml(name="b", action="[{action: log_events}]"))
    (tmp_path / "conf.d" / "a.yaml").write_text(event_yaml(name="a", action="[{action: log_events}]"))
    (tmp_path / "conf.d" / "notes.txt").write_text("not: [yaml")
    config = sshlog.load_config(str(tmp_path))
    assert [os.path.relpath(f, str(tmp_path)) for f in config.files] == [
        "sshlog.yaml", os.path.join("conf.d", "a.yaml"), os.path.join("conf.d", "b.yml")]
    assert [r.name for r in config.rules] == ["log_logins", "a", "b"]


def test_actions_may_be_shared_across_files():
    config = parse({"actions.yaml": "actions:\n  - action: shared\n    plugin: eventlogfile_action"
                                    "\n    log_file_path: /tmp/x.log\n",
                    "events.yaml": event_yaml(action="[{action: shared}]")})
    assert config.rules[0].actions == ["shared"]


def test_parameters_are_normalised():
    config = parse({"a.yaml": event_yaml(
        triggers="command_finish",                       # a single trigger as a string
        action="[{action: a1, plugin: eventlogfile_action, log_file_path: /tmp/x, "
               "max_size_mb: 0.5, number_of_log_files: 3, output_json: true}]")})
    assert config.rules[0].triggers == {"command_finish"}
    params = config.actions["a1"][1]
    assert (params["max_size_mb"], params["number_of_log_files"], params["output_json"]) == (
        0.5, 3, True)


def test_comment_only_file_is_only_a_warning():
    config = parse({"empty.yaml": "# nothing here yet\n", "good.yaml": GOOD})
    assert config.warnings == ["empty.yaml: file has no content"]
    assert [r.name for r in config.rules] == ["log_logins"]


def test_empty_file_alone_gives_an_empty_config():
    config = parse({"empty.yaml": ""})
    assert (config.rules, config.actions, config.warnings) == (
        [], {}, ["empty.yaml: file has no content"])


# ---------------------------------------------------------------------------------------
# Malformed configurations: (id, files, fragments that one problem must contain).

MALFORMED = [
    ("yaml-syntax", {"a.yaml": "events:\n  - event: x\n    triggers: [command_start\n"},
     ["a.yaml:", "YAML syntax error", "line"]),
    ("yaml-bad-indent", {"a.yaml": "events:\n  - event: x\n   triggers: []\n"},
     ["a.yaml:", "YAML syntax error"]),
    ("yaml-tab", {"a.yaml": "events:\n\t- event: x\n"}, ["a.yaml:", "YAML syntax error"]),
    ("top-level-list", {"a.yaml": "- event: x\n- event: y\n"},
     ["a.yaml:", "top level must be a mapping"]),
    ("top-level-scalar", {"a.yaml": "hello\n"}, ["a.yaml:", "top level must be a mapping"]),
    ("unknown-top-level-key", {"a.yaml": GOOD + "event:\n  - x\n"},
     ["a.yaml:", "event: unknown top-level key", "did you mean 'events'"]),
    ("events-not-a-list", {"a.yaml": "events:\n  name: x\n"}, ["a.yaml:", "events: must be a list"]),
    ("actions-not-a-list", {"a.yaml": "actions: {a: 1}\n"}, ["a.yaml:", "actions: must be a list"]),
    ("event-not-a-mapping", {"a.yaml": "events: [just_a_name]\n"},
     ["a.yaml:", "events[0]: must be a mapping"]),
    ("unknown-event-key", {"a.yaml": event_yaml() + "    trigger: [command_start]\n"},
     ["a.yaml:", "events[0].trigger: unknown key", "did you mean 'triggers'"]),
    ("missing-event-name", {"a.yaml": event_yaml().replace("event: e1", "event:")},
     ["a.yaml:", "events[0].event: missing event name"]),
    ("unknown-trigger", {"a.yaml": event_yaml(triggers="[command_start, command_strat]")},
     ["a.yaml:", "events[0].triggers[1]: unknown trigger 'command_strat'",
      "did you mean 'command_start'"]),
    ("no-triggers", {"a.yaml": event_yaml(triggers="[]")},
     ["a.yaml:", "events[0].triggers: an event needs a list of triggers"]),
    ("triggers-a-mapping", {"a.yaml": event_yaml(triggers="{command_start: 1}")},
     ["a.yaml:", "events[0].triggers:"]),
    ("no-actions", {"a.yaml": event_yaml(action="[]")},
     ["a.yaml:", "events[0].actions: an event needs a list of actions"]),
    ("actions-missing", {"a.yaml": "events:\n  - event: x\n    triggers: [command_start]\n"},
     ["a.yaml:", "events[0].actions: an event needs a list of actions"]),
    ("event-action-not-a-mapping", {"a.yaml": event_yaml(action="[log_events]")},
     ["a.yaml:", "events[0].actions[0]: must be a mapping"]),
    ("event-action-without-name", {"a.yaml": event_yaml(action="[{max_size_mb: 3}]")},
     ["a.yaml:", "events[0].actions[0].action: missing action name"]),
    ("unknown-filter", {"a.yaml": event_yaml(filters="{usrname: alice}")},
     ["a.yaml:", "events[0].filters.usrname: unknown filter", "did you mean 'username'"]),
    ("unknown-not-filter", {"a.yaml": event_yaml(filters="{not_usernme: alice}")},
     ["a.yaml:", "events[0].filters.not_usernme: unknown filter"]),
    ("filters-not-a-mapping", {"a.yaml": event_yaml(filters="[username]")},
     ["a.yaml:", "events[0].filters: must be a mapping"]),
    ("filter-wrong-type", {"a.yaml": event_yaml(filters="{require_tty: maybe}")},
     ["a.yaml:", "events[0].filters.require_tty: expected true or false"]),
    ("filter-wrong-list", {"a.yaml": event_yaml(filters="{username: [alice, [bob]]}")},
     ["a.yaml:", "events[0].filters.username: expected a string or a list of strings"]),
    ("invalid-regex", {"a.yaml": event_yaml(filters="{command_name_regex: '(unclosed'}")},
     ["a.yaml:", "events[0].filters.command_name_regex: invalid regular expression"]),
    ("regex-not-a-string", {"a.yaml": event_yaml(filters="{username_regex: [a]}")},
     ["a.yaml:", "events[0].filters.username_regex: expected a regular expression"]),
    ("invalid-exit-code-expr", {"a.yaml": event_yaml(filters="{command_exit_code: '> one'}")},
     ["a.yaml:", "events[0].filters.command_exit_code: invalid exit-code expression"]),
    ("exit-code-operator-typo", {"a.yaml": event_yaml(filters="{command_exit_code: '=> 1'}")},
     ["a.yaml:", "events[0].filters.command_exit_code: invalid exit-code expression"]),
    ("exit-code-bool", {"a.yaml": event_yaml(filters="{command_exit_code: true}")},
     ["a.yaml:", "events[0].filters.command_exit_code:"]),
    ("exit-code-list-of-text", {"a.yaml": event_yaml(filters="{command_exit_code: [one]}")},
     ["a.yaml:", "events[0].filters.command_exit_code: a list of exit codes must hold integers"]),
    ("invalid-cidr", {"a.yaml": event_yaml(filters="{client_ip: [10.0.0.0/33]}")},
     ["a.yaml:", "events[0].filters.client_ip: invalid address or network"]),
    ("filter-cannot-apply", {"a.yaml": event_yaml(triggers="[connection_established]",
                                                  filters="{command_exit_code: 0}")},
     ["a.yaml:", "events[0].filters.command_exit_code: filter applies to command_finish, "
      "none of this event's triggers"]),
    ("unknown-plugin", {"a.yaml": event_yaml(
        action="[{action: a1, plugin: eventlogfile, log_file_path: /tmp/x}]")},
     ["a.yaml:", "events[0].actions[0].plugin: unknown plugin 'eventlogfile'",
      "did you mean 'eventlogfile_action'"]),
    ("top-level-action-without-plugin", {"a.yaml": "actions:\n  - action: lonely\n"},
     ["a.yaml:", "actions[0].plugin:"]),
    ("top-level-action-not-a-mapping", {"a.yaml": "actions: [lonely]\n"},
     ["a.yaml:", "actions[0]: must be a mapping"]),
    ("top-level-action-without-name", {"a.yaml": "actions:\n  - plugin: eventlogfile_action\n"
                                                 "    log_file_path: /tmp/x\n"},
     ["a.yaml:", "actions[0].action: missing action name"]),
    ("missing-required-param", {"a.yaml": event_yaml(
        action="[{action: a1, plugin: eventlogfile_action}]")},
     ["a.yaml:", "events[0].actions[0].log_file_path: missing required parameter"]),
    ("required-param-null", {"a.yaml": event_yaml(
        action="[{action: a1, plugin: eventlogfile_action, log_file_path: null}]")},
     ["a.yaml:", "events[0].actions[0].log_file_path: missing required parameter"]),
    ("unknown-param", {"a.yaml": event_yaml(
        action="[{action: a1, plugin: eventlogfile_action, log_file_path: /x, "
               "max_size: 3}]")},
     ["a.yaml:", "events[0].actions[0].max_size: unknown parameter",
      "did you mean 'max_size_mb'"]),
    ("param-wrong-type-number", {"a.yaml": event_yaml(
        action="[{action: a1, plugin: eventlogfile_action, log_file_path: /x, "
               "max_size_mb: big}]")},
     ["a.yaml:", "events[0].actions[0].max_size_mb: expected a number"]),
    ("param-wrong-type-int", {"a.yaml": event_yaml(
        action="[{action: a1, plugin: eventlogfile_action, log_file_path: /x, "
               "number_of_log_files: 2.5}]")},
     ["a.yaml:", "events[0].actions[0].number_of_log_files: expected an integer"]),
    ("param-wrong-type-bool", {"a.yaml": event_yaml(
        action="[{action: a1, plugin: eventlogfile_action, log_file_path: /x, "
               "output_json: sometimes}]")},
     ["a.yaml:", "events[0].actions[0].output_json: expected true or false"]),
    ("param-bool-for-string", {"a.yaml": event_yaml(
        action="[{action: a1, plugin: eventlogfile_action, log_file_path: true}]")},
     ["a.yaml:", "events[0].actions[0].log_file_path: expected a string"]),
    ("param-in-top-level-action", {"a.yaml": "actions:\n  - action: a1\n"
                                             "    plugin: eventlogfile_action\n"
                                             "    log_file_pth: /x\n"},
     ["a.yaml:", "actions[0].log_file_pth: unknown parameter", "did you mean 'log_file_path'"]),
    ("undefined-action", {"a.yaml": GOOD.replace("      - action: log_events",
                                                 "      - action: log_evnts")},
     ["a.yaml:", "events[0].actions[0].action: undefined action 'log_evnts'",
      "did you mean 'log_events'"]),
    ("duplicate-event-in-one-file", {"a.yaml": event_yaml() + event_yaml(
        action="[{action: a2, plugin: eventlogfile_action, log_file_path: /y}]")
        .replace("events:\n", "")},
     ["a.yaml: events[1].event: duplicate event name 'e1' (also in a.yaml events[0])"]),
    ("duplicate-event-across-files", {
        "first.yaml": event_yaml(),
        "second.yaml": event_yaml(action="[{action: a2, plugin: eventlogfile_action, "
                                         "log_file_path: /y}]")},
     ["second.yaml: events[0].event: duplicate event name 'e1'", "first.yaml events[0]"]),
    ("duplicate-action-name", {"a.yaml": GOOD + "  - action: log_events\n"
                                                "    plugin: eventlogfile_action\n"
                                                "    log_file_path: /other\n"},
     ["a.yaml: actions[1].action: duplicate action name 'log_events'", "a.yaml actions[0]"]),
    ("duplicate-inline-action-across-files", {
        "a.yaml": GOOD,
        "b.yaml": event_yaml(name="e2", action="[{action: log_events, plugin: "
                                               "eventlogfile_action, log_file_path: /y}]")},
     ["b.yaml: events[0].actions[0].action: duplicate action name 'log_events'", "a.yaml"]),
    ("not-utf8", {"a.yaml": b"events:\n  - event: caf\xe9\n"}, ["a.yaml:", "not UTF-8 text"]),
]


@pytest.mark.parametrize("files,fragments", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_configuration_is_rejected(files, fragments):
    problems = problems_of(files)
    assert any(all(f in p for f in fragments) for p in problems), problems
    for p in problems:
        assert any(p.startswith(name + ":") for name in files), p


def test_at_least_25_malformed_cases():
    assert len(MALFORMED) >= 25


def test_every_problem_is_reported_at_once():
    files = {"a.yaml": textwrap.dedent("""\
        events:
          - event: one
            triggers: [command_strat]
            filters: {usrname: x}
            actions: [{action: nowhere}]
          - event: two
            triggers: [command_finish]
            actions:
              - action: inline
                plugin: eventlog
        """), "b.yaml": "[not, a, mapping]\n", "c.yaml": b"\xff\xfe"}
    problems = problems_of(files)
    assert len(problems) == 6, problems
    for fragment in ("a.yaml: events[0].triggers[0]: unknown trigger",
                     "a.yaml: events[0].filters.usrname: unknown filter",
                     "a.yaml: events[0].actions[0].action: undefined action 'nowhere'",
                     "a.yaml: events[1].actions[0].plugin: unknown plugin 'eventlog'",
                     "b.yaml: top level must be a mapping", "c.yaml: not UTF-8 text"):
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)


def test_yaml_is_loaded_safely():
    problems = problems_of({"a.yaml": "events: !!python/object/apply:os.system ['true']\n"})
    assert any("a.yaml:" in p and "YAML syntax error" in p for p in problems)


ODD_VALUES = [
    pytest.param(event_yaml(filters="{command_name_regex: 'a{99999999999}'}"),
                 "events[0].filters.command_name_regex", id="regex-repeat-too-large"),
    pytest.param(event_yaml(triggers="[[command_start]]"), "events[0].triggers[0]",
                 id="trigger-is-a-list"),
    pytest.param(event_yaml(action="[{action: a1, plugin: [eventlogfile_action], "
                                   "log_file_path: /x}]"),
                 "events[0].actions[0].plugin", id="plugin-is-a-list"),
    pytest.param(event_yaml(filters="{username: {alice: 1}}"), "events[0].filters.username",
                 id="filter-arg-mapping"),
    pytest.param(event_yaml(filters="{command_exit_code: {a: 1}}"),
                 "events[0].filters.command_exit_code", id="exit-code-mapping"),
    pytest.param("events:\n  - event: [a]\n    triggers: [command_start]\n"
                 "    actions: [{action: x, plugin: eventlogfile_action, log_file_path: /a}]\n",
                 "events[0].event", id="event-name-a-list"),
]


@pytest.mark.parametrize("text,keypath", ODD_VALUES)
def test_odd_yaml_values_never_escape_as_exceptions(text, keypath):
    problems = problems_of({"a.yaml": text})
    assert any(p.startswith("a.yaml: " + keypath) for p in problems), problems


# ---------------------------------------------------------------------------------------
# check-config on the command line.

def write_dir(base, files):
    conf_d = base / "conf.d"
    conf_d.mkdir(parents=True)
    for name, text in files.items():
        (conf_d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(base)


def test_check_config_good_directory(tmp_path, capsys):
    d = write_dir(tmp_path / "cfg", {"10-good.yaml": GOOD, "20-empty.yaml": "# later\n"})
    assert sshlog.main(["check-config", "--config-dir", d]) == 0
    out, err = capsys.readouterr()
    assert "configuration OK: 2 file(s), 1 event(s), 1 action(s)" in out
    assert "warning: " in out and "20-empty.yaml: file has no content" in out
    assert "log_logins" in out and "eventlogfile_action" in out
    assert err == ""


def test_check_config_bad_directory_lists_every_problem(tmp_path, capsys):
    d = write_dir(tmp_path / "cfg", {
        "a.yaml": event_yaml(triggers="[command_strat]"),
        "b.yaml": event_yaml(action="[{action: nowhere}]")})
    assert sshlog.main(["check-config", "--config-dir", d]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert any("a.yaml: events[0].triggers[0]: unknown trigger 'command_strat'" in l
               for l in lines)
    assert any("b.yaml: events[0].actions[0].action: undefined action 'nowhere'" in l
               for l in lines)
    assert any("duplicate event name 'e1'" in l for l in lines)
    assert lines[-1] == "sshlog: error: configuration rejected (3 problem(s))"
    assert "Traceback" not in out + err


def test_check_config_missing_directory_exit_status(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert sshlog.main(["check-config", "--config-dir", missing]) == 2
    out, err = capsys.readouterr()
    assert missing in err and "does not exist" in err
    assert out == "" and "Traceback" not in err


def test_check_config_missing_directory_is_one_line(tmp_path, capsys):
    sshlog.main(["check-config", "--config-dir", str(tmp_path / "nope")])
    _out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1


def test_check_config_never_prints_a_traceback_for_bad_yaml(tmp_path, capsys):
    d = write_dir(tmp_path / "cfg", {"a.yaml": "events: [\n", "b.yaml": b"\x80\x81"})
    assert sshlog.main(["check-config", "--config-dir", d]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "a.yaml" in err and "b.yaml" in err
