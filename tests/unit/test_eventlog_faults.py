"""eventlogfile_action at run time: its file removed, replaced or unwritable; no crash,
errors reach the runner (reported once per interval), writing resumes by itself."""
import json
import logging
import os
import shutil
import time

import pytest

import sshlog
from factories import command_finish


def params(path, **kw):
    return dict({"log_file_path": str(path), "max_size_mb": 1, "number_of_log_files": 2,
                 "output_json": True}, **kw)


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_directory_removed_is_recreated(tmp_path):
    path = tmp_path / "logs" / "event.log"
    a = sshlog.EventLogFile("log", params(path))
    a.handle(command_finish(pid=1))
    shutil.rmtree(str(tmp_path / "logs"))
    a.handle(command_finish(pid=2))
    assert [e["pid"] for e in lines(path)] == [2]
    assert oct(os.stat(str(tmp_path / "logs")).st_mode & 0o777) == "0o700"
    assert os.stat(str(path)).st_mode & 0o777 == 0o600
    a.close()


def test_file_replaced_by_another_tool_is_followed(tmp_path):
    path = tmp_path / "event.log"
    a = sshlog.EventLogFile("log", params(path))
    a.handle(command_finish(pid=1))
    os.rename(str(path), str(path) + ".moved")         # logrotate's create mode
    a.handle(command_finish(pid=2))
    assert [e["pid"] for e in lines(path)] == [2]
    assert [e["pid"] for e in lines(str(path) + ".moved")] == [1]
    a.close()


def test_unwritable_then_back(tmp_path, caplog):
    path = tmp_path / "logs" / "event.log"
    a = sshlog.EventLogFile("log", params(path, output_json=False))
    a.handle(command_finish(pid=1))
    shutil.rmtree(str(tmp_path / "logs"))
    (tmp_path / "logs").write_text("a file where the directory was")
    runner = sshlog.ActionRunner(a)
    try:
        for pid in range(2, 6):
            runner.submit(command_finish(pid=pid))
        deadline = time.monotonic() + 10
        while runner.failed < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.failed == 4 and runner.thread.is_alive()
        reports = [r for r in caplog.records if "event lost" in r.getMessage()]
        assert len(reports) == 1, "reported once per interval, not once per event"
        os.unlink(str(tmp_path / "logs"))
        runner.submit(command_finish(pid=6))
        while runner.delivered < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.delivered == 1
    finally:
        runner.stop(timeout=5)
    with open(path) as f:
        text = f.read().splitlines()
    assert len(text) == 1 and "execute complete" in text[0]
    assert any("writing again" in r.getMessage() for r in caplog.records)


def test_a_cut_line_does_not_swallow_the_next_event(tmp_path):
    path = tmp_path / "event.log"
    path.write_text('{"event_type": "command_fin')      # a crash mid-line
    a = sshlog.EventLogFile("log", params(path))
    a.handle(command_finish(pid=7))
    a.close()
    text = path.read_text().splitlines()
    assert text[0] == '{"event_type": "command_fin' and json.loads(text[1])["pid"] == 7


def test_write_errors_are_raised_not_printed(tmp_path, capsys, monkeypatch):
    """A failed write (a full disk) reaches the runner as an exception: nothing on
    stderr, nothing half-written left to glue onto the next event."""
    path = tmp_path / "event.log"
    a = sshlog.EventLogFile("log", params(path))
    a.handle(command_finish(pid=1))
    real = sshlog.EventLogFile._write

    def half_then_enospc(fd, data):
        os.write(fd, data[:20])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sshlog.EventLogFile, "_write", staticmethod(half_then_enospc))
    with pytest.raises(OSError, match="No space left"):
        a.handle(command_finish(pid=2))
    monkeypatch.setattr(sshlog.EventLogFile, "_write", staticmethod(real))
    assert capsys.readouterr().err == ""
    a.handle(command_finish(pid=3))
    text = path.read_text().splitlines()
    assert len(text) == 3 and json.loads(text[0])["pid"] == 1 and json.loads(text[2])["pid"] == 3
    assert len(text[1]) == 20, "the cut line stands alone"
    a.close()


def test_rotation_keeps_number_of_log_files(tmp_path):
    path = tmp_path / "event.log"
    a = sshlog.EventLogFile("log", params(path, max_size_mb=0.01, number_of_log_files=2))
    for pid in range(60):                       # ~1 KB per event, 10 KB per file
        a.handle(command_finish(pid=pid))
    a.close()
    names = sorted(os.listdir(str(tmp_path)))
    assert names == ["event.log", "event.log.1", "event.log.2"]
    pids = []
    for name in ("event.log.2", "event.log.1", "event.log"):
        size = os.path.getsize(str(tmp_path / name))
        assert size <= 0.01 * 1024 * 1024
        pids += [e["pid"] for e in lines(str(tmp_path / name))]
    assert pids == sorted(pids) and pids[-1] == 59, "oldest first, nothing reordered"
    # and the report reads the rotations in order
    r = sshlog.EventReport()
    for p in sshlog.event_log_rotations(str(path)):
        r.read(p)
    assert r.result()["corrupt_lines"] == 0


def test_no_rotation_without_backups(tmp_path):
    path = tmp_path / "event.log"
    a = sshlog.EventLogFile("log", params(path, max_size_mb=0.001, number_of_log_files=0))
    for pid in range(10):
        a.handle(command_finish(pid=pid))
    a.close()
    assert os.listdir(str(tmp_path)) == ["event.log"] and len(lines(path)) == 10


def test_a_log_that_cannot_open_at_start_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        sshlog.EventLogFile("log", params(blocker / "sub" / "event.log"))


@pytest.fixture(autouse=True)
def _quiet_action_logger():
    logger = logging.getLogger("sshlog.action")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)
