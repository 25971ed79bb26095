"""Filters (SPEC §6.3), the not_ prefix, and the Pipeline failing closed."""
import logging
import threading

import pytest

import sshlog
from factories import command_finish, make_event


def start(**kw):
    base = dict(ptm_pid=1805, username="mapoo", user_id=1001, pid=3001, parent_pid=3000,
                filename="/usr/bin/sudo", argv=("sudo", "-i"))
    return make_event(sshlog.CommandStart, **dict(base, **kw))


def established(**kw):
    return make_event(sshlog.ConnectionEstablished, **kw)


def upload(path, **kw):
    return make_event(sshlog.FileUpload, target_path=path, file_mode="644", bytes=10, **kw)


# (filter, argument, event, expected)
CASES = [
    # command_name: argv[0], its basename, or the full path executed
    ("command_name", "sudo", start(), True),
    ("command_name", "/usr/bin/sudo", start(), True),
    ("command_name", "sudo", start(filename="/usr/local/bin/sudo", argv=("/usr/local/bin/sudo",)),
     True),
    ("command_name", "vi", start(filename="/usr/bin/vim.basic", argv=("vi", "x")), True),
    ("command_name", ["su", "sudo"], start(), True),
    ("command_name", "su", start(), False),
    ("command_name", "sud", start(), False),
    ("command_name", ["ls", "cat"], start(), False),
    ("command_name", "sudo", command_finish(filename="/usr/bin/sudo", argv=("sudo",)), True),
    # command_name_regex: searched in the path executed
    ("command_name_regex", r"/s?bin/(sudo|su)$", start(), True),
    ("command_name_regex", r"^sudo$", start(), False),
    ("command_name_regex", r"python3?", start(filename="/usr/bin/python3.11"), True),
    # command_exit_code: `exit_code <op> N`
    ("command_exit_code", "> 1", command_finish(exit_code=2), True),
    ("command_exit_code", "> 1", command_finish(exit_code=1), False),
    ("command_exit_code", "> 1", command_finish(exit_code=0), False),
    ("command_exit_code", ">1", command_finish(exit_code=143), True),
    ("command_exit_code", ">= 2", command_finish(exit_code=2), True),
    ("command_exit_code", ">= 2", command_finish(exit_code=1), False),
    ("command_exit_code", "< 1", command_finish(exit_code=0), True),
    ("command_exit_code", "< 1", command_finish(exit_code=1), False),
    ("command_exit_code", "!= 0", command_finish(exit_code=1), True),
    ("command_exit_code", "!= 0", command_finish(exit_code=0), False),
    ("command_exit_code", "= 0", command_finish(exit_code=0), True),
    ("command_exit_code", "= 0", command_finish(exit_code=3), False),
    ("command_exit_code", "== 127", command_finish(exit_code=127), True),
    ("command_exit_code", "<= 3", command_finish(exit_code=3), True),
    ("command_exit_code", "<= 3", command_finish(exit_code=4), False),
    ("command_exit_code", " 2 ", command_finish(exit_code=2), True),
    ("command_exit_code", "!= -1", command_finish(exit_code=-1), False),
    ("command_exit_code", 0, command_finish(exit_code=0), True),
    ("command_exit_code", 0, command_finish(exit_code=1), False),
    ("command_exit_code", [1, 2], command_finish(exit_code=2), True),
    ("command_exit_code", [1, 2], command_finish(exit_code=0), False),
    ("command_exit_code", ["1", "2"], command_finish(exit_code=1), True),
    # command_output_contains(_regex): the captured first bytes of output
    ("command_output_contains", "denied", command_finish(stdout="Permission denied\n"), True),
    ("command_output_contains", "Denied", command_finish(stdout="Permission denied\n"), False),
    ("command_output_contains_regex", r"^uid=0\(", command_finish(stdout="uid=0(root) gid=0"),
     True),
    ("command_output_contains_regex", r"^uid=0\(", command_finish(stdout="uid=1001(m)"), False),
    # username: string, list, '*'
    ("username", "root", established(username="root"), True),
    ("username", "root", established(username="rooted"), False),
    ("username", ["alice", "root"], established(username="root"), True),
    ("username", ["alice", "bob"], established(username="root"), False),
    ("username", "*", established(username="anyone"), True),
    ("username", "*", established(username=""), True),
    ("username", ["*"], established(username="x"), True),
    ("username", "mapoo", start(), True),
    ("username", "mallory", make_event(sshlog.ConnectionAuthFailed, username="mallory"), True),
    # username_regex
    ("username_regex", r"^adm", established(username="admin"), True),
    ("username_regex", r"^adm", established(username="sysadm"), False),
    # require_tty
    ("require_tty", True, established(tty_id=0), True),
    ("require_tty", True, established(tty_id=-1), False),
    ("require_tty", False, established(tty_id=-1), True),
    ("require_tty", False, established(tty_id=3), True),
    # ignore_existing_logins: drops only sessions open before the daemon started
    ("ignore_existing_logins", True, established(existing=True), False),
    ("ignore_existing_logins", True, established(existing=False), True),
    ("ignore_existing_logins", False, established(existing=True), True),
    ("ignore_existing_logins", True, start(existing=True), False),
    # upload_file_path: string or list, compared as normalised paths
    ("upload_file_path", "/etc/passwd", upload("/etc/passwd"), True),
    ("upload_file_path", "/etc/passwd", upload("/etc/../etc/passwd"), True),
    ("upload_file_path", ["/etc/shadow", "/etc/passwd"], upload("/etc/passwd"), True),
    ("upload_file_path", ["/etc/shadow", "/etc/group"], upload("/etc/passwd"), False),
    ("upload_file_path", "/etc", upload("/etc/passwd"), False),
    # upload_file_path_regex
    ("upload_file_path_regex", r"\.(sh|py)$", upload("/tmp/run.sh"), True),
    ("upload_file_path_regex", r"\.(sh|py)$", upload("/tmp/run.sh.txt"), False),
    # client_ip: addresses or CIDR networks, IPv4 and IPv6
    ("client_ip", "211.249.71.117", established(), True),
    ("client_ip", "211.249.71.0/24", established(), True),
    ("client_ip", ["10.0.0.0/8", "2001:db8::/32"], established(client_ip="10.1.2.3"), True),
    ("client_ip", ["10.0.0.0/8", "2001:db8::/32"], established(client_ip="2001:db8::7"), True),
    ("client_ip", ["10.0.0.0/8", "2001:db8::/32"], established(client_ip="192.168.1.1"), False),
    ("client_ip", ["10.0.0.0/8", "2001:db8::/32"], established(client_ip="2001:db9::1"), False),
    ("client_ip", "::1", established(client_ip="::1"), True),
    ("client_ip", "127.0.0.0/8", established(client_ip="::1"), False),
]


def case_id(case):
    name, arg, event, expected = case
    return "%s-%r-%s-%s" % (name, arg, event.type, "match" if expected else "no")


@pytest.mark.parametrize("name,arg,event,expected", CASES, ids=[case_id(c) for c in CASES])
def test_filter(name, arg, event, expected):
    flt = sshlog.make_filter(name, arg)
    assert event.type in flt.triggers
    assert flt.match(event) is expected


@pytest.mark.parametrize("name,arg,event,expected", CASES, ids=[case_id(c) for c in CASES])
def test_not_prefix_inverts_any_filter(name, arg, event, expected):
    flt = sshlog.make_filter("not_" + name, arg)
    assert flt.name == "not_" + name
    assert flt.triggers == sshlog.FILTERS[name].triggers
    assert flt.match(event) is (not expected)


def test_every_builtin_filter_has_matching_and_non_matching_cases():
    builtin = {n for n, cls in sshlog.FILTERS.items() if cls.__module__ == sshlog.__name__}
    covered = {(c[0], c[3]) for c in CASES}
    missing = [(n, want) for n in sorted(builtin) for want in (True, False)
               if (n, want) not in covered]
    assert not missing


@pytest.mark.parametrize("name,triggers", [
    ("command_name", {"command_start", "command_finish"}),
    ("command_exit_code", {"command_finish"}),
    ("command_output_contains", {"command_finish"}),
    ("upload_file_path", {"file_upload"}),
    ("username", set(sshlog.EVENT_TYPES)),
])
def test_filter_triggers(name, triggers):
    assert sshlog.FILTERS[name].triggers == triggers


@pytest.mark.parametrize("name,arg", [
    ("command_exit_code", "> one"), ("command_exit_code", "=> 1"), ("command_exit_code", "1.5"),
    ("command_exit_code", True), ("command_exit_code", ["x"]), ("command_exit_code", None),
    ("username", {"a": 1}), ("username", [1, ["x"]]), ("require_tty", "yes"),
    ("require_tty", 1), ("command_name_regex", "(unclosed"), ("client_ip", "10.0.0.300"),
    ("client_ip", ["10.0.0.0/8", "nonsense"]), ("no_such_filter", 1), ("not_no_such", 1),
    ("not_not_username", "x"),
])
def test_bad_filter_arguments_raise_value_error(name, arg):
    with pytest.raises(ValueError):
        sshlog.make_filter(name, arg)


def test_unknown_filter_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'command_exit_code'"):
        sshlog.make_filter("command_exitcode", 0)


def test_client_ip_without_an_address_raises_and_fails_closed_in_not():
    flt = sshlog.make_filter("not_client_ip", "10.0.0.0/8")
    with pytest.raises(ValueError):
        flt.match(established(client_ip=""))


# ---------------------------------------------------------------------------------------
# Pipeline: rules, filters and actions; filters fail closed.

class Collect(sshlog.Action):
    """A test action: remembers what it was given."""

    PARAMS = ()

    def __init__(self, name, params):
        super().__init__(name, params)
        self.got = []

    def handle(self, event):
        self.got.append(event)


class Weird(sshlog.Filter):
    """A filter whose match() is whatever the test wants."""

    name = "weird"
    triggers = frozenset(sshlog.EVENT_TYPES)

    def __init__(self, behaviour):
        super().__init__(None)
        self.behaviour = behaviour

    def match(self, event):
        return self.behaviour(event)


def boom(_event):
    raise RuntimeError("filter bug")


@pytest.fixture
def pipeline_for(monkeypatch):
    monkeypatch.setitem(sshlog.ACTIONS, "test_collect", Collect)
    made = []

    def build(filters, triggers=("command_finish",)):
        rule = sshlog.Rule("r", frozenset(triggers), list(filters), ["sink"], "test.yaml")
        config = sshlog.Config([rule], {"sink": ("test_collect", {}, "test.yaml")},
                               ["test.yaml"], [])
        p = sshlog.Pipeline(config)
        made.append(p)
        return p

    yield build
    for p in made:
        p.stop(timeout=2)


def delivered(pipeline, *events):
    for ev in events:
        pipeline.dispatch(ev)
    pipeline.stop(timeout=2)
    return pipeline.runners["sink"].action.got


def test_matching_event_is_delivered(pipeline_for):
    p = pipeline_for([sshlog.make_filter("command_exit_code", "> 1")])
    got = delivered(p, command_finish(exit_code=2), command_finish(exit_code=1),
                    command_finish(exit_code=0))
    assert [e.exit_code for e in got] == [2]
    assert p.filter_errors == 0


def test_filters_only_apply_to_their_triggers(pipeline_for):
    p = pipeline_for([sshlog.make_filter("command_exit_code", "!= 0")],
                     triggers=("command_start", "command_finish"))
    got = delivered(p, start(), command_finish(exit_code=0), command_finish(exit_code=5),
                    established())
    assert [(e.type, getattr(e, "exit_code", None)) for e in got] == [
        ("command_start", None), ("command_finish", 5)]


def test_all_filters_must_match(pipeline_for):
    p = pipeline_for([sshlog.make_filter("username", "mapoo"),
                      sshlog.make_filter("command_exit_code", 0)])
    got = delivered(p, command_finish(username="mapoo", exit_code=0),
                    command_finish(username="root", exit_code=0),
                    command_finish(username="mapoo", exit_code=1))
    assert [(e.username, e.exit_code) for e in got] == [("mapoo", 0)]


@pytest.mark.parametrize("behaviour", [
    boom,
    lambda e: None,
    lambda e: 1,
    lambda e: "yes",
    lambda e: [True],
], ids=["raises", "None", "int-1", "str", "list"])
def test_pipeline_fails_closed(pipeline_for, behaviour, caplog):
    p = pipeline_for([Weird(behaviour)])
    with caplog.at_level(logging.ERROR, logger="sshlog"):
        got = delivered(p, command_finish(), command_finish())
    assert got == []
    assert p.filter_errors == 2
    errors = [r for r in caplog.records if "weird" in r.getMessage()]
    assert len(errors) == 1                    # logged once, counted every time


@pytest.mark.parametrize("behaviour", [boom, lambda e: None], ids=["raises", "None"])
def test_not_of_a_broken_filter_also_fails_closed(pipeline_for, behaviour):
    p = pipeline_for([sshlog.Not(Weird(behaviour))])
    assert delivered(p, command_finish()) == []
    assert p.filter_errors == 1


def test_a_broken_filter_does_not_stop_other_rules(monkeypatch):
    monkeypatch.setitem(sshlog.ACTIONS, "test_collect", Collect)
    rules = [sshlog.Rule("broken", frozenset(["command_finish"]), [Weird(boom)], ["a"], "t"),
             sshlog.Rule("fine", frozenset(["command_finish"]), [], ["b"], "t")]
    config = sshlog.Config(rules, {"a": ("test_collect", {}, "t"), "b": ("test_collect", {}, "t")},
                           ["t"], [])
    p = sshlog.Pipeline(config)
    p.dispatch(command_finish())
    p.stop(timeout=2)
    assert (len(p.runners["a"].action.got), len(p.runners["b"].action.got)) == (0, 1)
    assert p.wanted == {"command_finish"}


def test_pipeline_from_a_parsed_config(monkeypatch):
    monkeypatch.setitem(sshlog.ACTIONS, "test_collect", Collect)
    config = sshlog.parse_config([("c.yaml", b"""
events:
  - event: failed_sudo
    triggers: [command_finish]
    filters: {command_name: sudo, not_command_exit_code: 0, require_tty: true}
    actions: [{action: sink, plugin: test_collect}]
""")])
    p = sshlog.Pipeline(config)
    got = delivered(p,
                    command_finish(filename="/usr/bin/sudo", argv=("sudo", "x"), exit_code=1),
                    command_finish(filename="/usr/bin/sudo", argv=("sudo", "x"), exit_code=0),
                    command_finish(filename="/usr/bin/sudo", argv=("sudo",), exit_code=1,
                                   tty_id=-1),
                    command_finish(filename="/usr/bin/id", argv=("id",), exit_code=1))
    assert [(e.filename, e.exit_code, e.tty_id) for e in got] == [("/usr/bin/sudo", 1, 4)]
