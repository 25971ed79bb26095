"""Validation of action parameters: types, cross-parameter rules, safety rules, and the
original agent's parameter names.  Every problem names the file and the key path."""
import json
import textwrap

import pytest

import sshlog


def one(plugin, **params):
    return json.dumps({"actions": [dict({"action": "a", "plugin": plugin}, **params)]})


def problems_of(text):
    with pytest.raises(sshlog.ConfigError) as e:
        sshlog.parse_config([("site.yaml", text.encode())])
    return e.value.problems


@pytest.mark.parametrize("plugin,params,expected", [
    ("syslog_action", dict(server_address="h", facility="kernel"),
     "site.yaml: actions[0].facility: unknown facility 'kernel' (did you mean 'kern'?)"),
    ("syslog_action", dict(server_address="h", facility=24),
     "site.yaml: actions[0].facility: unknown facility '24'"),
    ("syslog_action", dict(server_address="h", severity="warn1ng"),
     "site.yaml: actions[0].severity: unknown severity 'warn1ng' (did you mean 'warning'?)"),
    ("syslog_action", dict(server_address="h", transport="tsl"),
     "site.yaml: actions[0].transport: 'tsl' is not one of udp, tcp, tls (did you mean 'tls'?)"),
    ("syslog_action", dict(server_address="h", tls_key_file="/k"),
     "site.yaml: actions[0].tls_key_file: needs tls_cert_file"),
    ("syslog_action", dict(server_address="h", port="514x"),
     "site.yaml: actions[0].port: expected an integer, got '514x'"),
    ("syslog_action", dict(port=514),
     "site.yaml: actions[0].server_address: missing required parameter"),
    ("syslog_action", dict(server_address="h", timeout=0),
     "site.yaml: actions[0].timeout: must be greater than 0"),
    ("statsd_action", dict(server_address="h", tags="datadog"),
     "site.yaml: actions[0].tags: 'datadog' is not one of dogstatsd, influx, none, plain"),
    ("statsd_action", dict(server_address="h", statsd_prefix="a b|c"),
     "site.yaml: actions[0].statsd_prefix: use letters, digits, '_', '-' and '.' only"),
    ("statsd_action", dict(server_address="h", extra_tags=["client_port"]),
     "site.yaml: actions[0].extra_tags: unknown tag 'client_port' (did you mean 'client_ip'?)"),
    ("slack_action", dict(slack_webhook_url="hooks.slack.com/services/x"),
     "site.yaml: actions[0].slack_webhook_url: must be an http:// or https:// URL"),
    ("slack_action", dict(slack_webhook_url="https://x", retries=-1),
     "site.yaml: actions[0].retries: must not be negative"),
    ("slack_action", dict(slack_webhook=1),
     "site.yaml: actions[0].slack_webhook: unknown parameter (did you mean "
     "'slack_webhook_url'?)"),
    ("webhook_action", dict(webhook_url="http://x", headers={"X-A": "v\r\nX-Evil: 1"}),
     "site.yaml: actions[0].headers.X-A: a header value cannot hold a line break"),
    ("webhook_action", dict(webhook_url="http://x", headers={"Bad Name": "v"}),
     "site.yaml: actions[0].headers.Bad Name: not a valid header name"),
    ("webhook_action", dict(webhook_url="http://x", headers=["X-A: v"]),
     "site.yaml: actions[0].headers: expected a mapping of header name: value"),
    ("webhook_action", dict(webhook_url="http://x", headers={"X-A": {"nested": 1}}),
     "site.yaml: actions[0].headers.X-A: expected a string"),
    ("webhook_action", dict(webhook_url="http://x", hmac_header="X Sig"),
     "site.yaml: actions[0].hmac_header: not a valid header name"),
    ("webhook_action", dict(webhook_url="ftp://x"),
     "site.yaml: actions[0].webhook_url: must be an http:// or https:// URL"),
    ("webhook_action", dict(webhook_url="http://x", do_get_request="yes"),
     "site.yaml: actions[0].do_get_request: expected true or false, got 'yes'"),
    ("email_action", dict(sender="a@b", recipient="c@d\nBcc: e@f"),
     "site.yaml: actions[0].recipient: 'c@d\\nBcc: e@f' is not an address"),
    ("email_action", dict(sender="a@b\r\n", recipient="c@d"),
     "site.yaml: actions[0].sender: 'a@b\\r\\n' is not an address"),
    ("email_action", dict(sender="a@b", recipient="c@d", username="u"),
     "site.yaml: actions[0].username: username and password go together"),
    ("email_action", dict(sender="a@b", recipient="c@d", security="ssl"),
     "site.yaml: actions[0].security: 'ssl' is not one of starttls, tls, none"),
    ("email_action", dict(sender="a@b", recipient="c@d", smtp_port="25"),
     "site.yaml: actions[0].smtp_port: expected an integer, got '25'"),
    ("run_command_action", dict(command="/usr/bin/python3", args=["-c", "print('{{args}}')"]),
     "site.yaml: actions[0].args: a {{field}} inside python3 code could run what a user "
     "typed; read the SSHLOG_<FIELD> environment variables instead"),
    ("run_command_action", dict(command="perl", args=["-w", "-e", "print '{{username}}'"]),
     "site.yaml: actions[0].args: a {{field}} inside perl code could run what a user typed; "
     "read the SSHLOG_<FIELD> environment variables instead"),
    ("run_command_action", dict(command="/bin/echo", args="{{username}}"),
     "site.yaml: actions[0].args: expected a list of strings, got '{{username}}'"),
    ("run_command_action", dict(command="/bin/echo", timeout=0),
     "site.yaml: actions[0].timeout: must be greater than 0"),
    ("eventlogfile_action", dict(log_file_path="/x", output_json="true"),
     "site.yaml: actions[0].output_json: expected true or false, got 'true'"),
])
def test_action_parameter_problems(plugin, params, expected):
    probs = problems_of(one(plugin, **params))
    assert expected in probs, probs


def test_inline_action_problems_have_the_event_key_path():
    probs = problems_of(textwrap.dedent("""\
        events:
          - event: e
            triggers: [command_start]
            actions:
              - {action: a, plugin: syslog_action, server_address: h, facility: nope}
        """))
    assert probs == ["site.yaml: events[0].actions[0].facility: unknown facility 'nope'"]


def test_safe_templates_are_accepted():
    """Templates outside code, and in shell scripts (they become variables), are fine."""
    sshlog.parse_config([("s.yaml", one("run_command_action", command="/bin/bash",
                                        args=["-c", "echo {{username}}"]).encode())])
    sshlog.parse_config([("s.yaml", one("run_command_action", command="/usr/bin/python3",
                                        args=["/opt/hook.py", "{{username}}"]).encode())])


def test_original_parameter_names_and_values_still_work():
    """The original agent's samples, as written (integers for facility/severity, udp true,
    quoted exit-code comparison, bash -c with templates)."""
    text = textwrap.dedent("""\
        events:
          - event: log_activity_to_syslog
            triggers: [connection_established, connection_auth_failed, connection_close,
                       command_start, command_finish, file_upload]
            filters: {ignore_existing_logins: True}
            actions:
              - action: syslog_server
                plugin: syslog_action
                server_address: localhost
                port: 5140
                udp: True
                output_json: False
                program_name: sshlog
                facility: 3
                severity: 6
          - event: sudo_successful
            triggers: [command_finish]
            filters: {command_name: 'sudo', command_exit_code: '= 0', require_tty: True}
            actions:
              - action: say
                plugin: run_command_action
                command: bash
                args: ['-c', 'echo "Hi {{username}}" | write {{username}} /dev/pts/{{tty_id}}']
              - action: stats
                plugin: statsd_action
                server_address: localhost
                port: 8125
                statsd_prefix: sshlog.servers
              - action: hook
                plugin: webhook_action
                webhook_url: http://localhost/x
                do_get_request: True
              - action: mail
                plugin: email_action
                sender: a@example.com
                recipient: b@example.com
                subject: sudo by {{username}}
                smtp_server: localhost
                smtp_port: 587
                body: ''
                username: u
                password: p
        """)
    cfg = sshlog.parse_config([("orig.yaml", text.encode())])
    plugin, params, _ = cfg.actions["syslog_server"]
    action = sshlog.ACTIONS[plugin]("syslog_server", dict(params))
    assert action.pri == 30 and action.transport == "udp"
    tcp = sshlog.Syslog("x", dict(params, udp=False))
    assert tcp.transport == "tcp"


@pytest.mark.parametrize("name", sorted(sshlog.ACTIONS))
def test_builtin_action_schemas_are_sound(name):
    cls = sshlog.ACTIONS[name]
    names = [p.name for p in cls.PARAMS]
    assert len(names) == len(set(names)) and cls.help
    for p in cls.PARAMS:
        assert p.help or p.default is sshlog.REQUIRED or name == "eventlogfile_action", p
        if p.default not in (sshlog.REQUIRED, None):
            sshlog.coerce(p.kind, p.default)
    required = {p.name: "x" for p in cls.PARAMS if p.default is sshlog.REQUIRED}
    params = dict(required)
    assert sshlog.validate_params(cls.PARAMS, params) == []
    # the defaults with placeholder required values pass the action's own check,
    # except where a placeholder is deliberately not good enough (URLs, addresses)
    problems = cls.check(params)
    assert all(":" in p for p in problems)


def test_action_that_cannot_start_is_named(tmp_path):
    cfg = sshlog.parse_config([("s.yaml", one(
        "webhook_action", webhook_url="https://x", tls_ca_file=str(tmp_path / "no.pem")
    ).encode())])
    with pytest.raises(sshlog.SshlogError) as e:
        sshlog.Pipeline(cfg)
    assert "action a (webhook_action, s.yaml) cannot start" in str(e.value)


def test_check_config_prints_every_problem_and_exits_2(tmp_path, capsys):
    d = tmp_path / "cfg" / "conf.d"
    d.mkdir(parents=True)
    (d / "a.yaml").write_text(one("syslog_action", server_address="h", facility="x",
                                  severity="y"))
    (d / "b.yaml").write_text(one("webhook_action", webhook_url="x"))
    assert sshlog.main(["check-config", "--config-dir", str(tmp_path / "cfg")]) == 2
    err = capsys.readouterr().err
    assert "a.yaml: actions[0].facility: unknown facility 'x'" in err
    assert "a.yaml: actions[0].severity: unknown severity 'y'" in err
    assert "b.yaml: actions[0].webhook_url: must be an http:// or https:// URL" in err
    assert "b.yaml: actions[0].action: duplicate action name 'a'" in err
    assert "Traceback" not in err
