"""README's configuration reference is the generated one, so the two cannot drift."""
import os
import re

import sshlog

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_reference_equals_generated_text():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    m = re.search(r"<!-- reference:begin -->\n(.*)<!-- reference:end -->", readme, re.S)
    assert m, "README.md lacks the <!-- reference:begin/end --> markers"
    generated = sshlog.config_reference()
    assert m.group(1).strip("\n") == generated.strip("\n"), \
        "README's configuration reference is stale: run `make readme`"


def test_reference_covers_every_trigger_filter_action_and_parameter():
    text = sshlog.config_reference()
    for trigger in sshlog.EVENT_TYPES:
        assert "| `%s` |" % trigger in text
    for name in sshlog.FILTERS:
        if ("filter", name) not in sshlog.PLUGIN_SOURCES:
            assert "| `%s` |" % name in text
    for name, cls in sshlog.ACTIONS.items():
        if ("action", name) in sshlog.PLUGIN_SOURCES:
            continue
        section = text[text.index("#### `%s`" % name):]
        section = section[:section.find("\n#### ", 1) if "\n#### " in section[1:] else None]
        for p in cls.PARAMS:
            assert "| `%s` |" % p.name in section, (name, p.name)
    assert "| `port` | integer | `514` |" in text
    assert "| `slack_webhook_url` | string | **required** |" in text
    assert "| `udp` | boolean | `true` |" in text


def test_explain_prints_the_reference(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sshlog, "PLUGIN_DIR", str(tmp_path))    # not this machine's plugins
    assert sshlog.main(["check-config", "--explain"]) == 0
    assert capsys.readouterr().out == sshlog.config_reference(include_plugins=True)
