#!/usr/bin/python3
"""Write a synthetic sshlog event log (text form or JSON Lines) for report tests
and the report benchmark.

Lines are made by sshlog's own event classes and `event_line`, so they are
exactly what `eventlogfile_action` writes.  The mix, per session: a login, the
login shell, commands (some failing, some sudo), now and then an upload, a
close; between sessions, failed logins from a few sources.  Deterministic for a
given seed.  `expected` counts what a report over the whole log must show.

    python3 tests/eventlog_gen.py OUT --events 1000000 [--json] [--start EPOCH]
"""
import argparse
import os
import random
import sys

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TOP not in sys.path:
    sys.path.insert(0, TOP)
import sshlog  # noqa: E402

USERS = ("alice", "bob", "carol", "deploy", "root")
SOURCES = ("203.0.113.7", "198.51.100.23", "2001:db8::42", "192.0.2.200")
ATTACKERS = ("203.0.113.99", "198.51.100.66", "192.0.2.13")
COMMANDS = (("/usr/bin/ls", "-la"), ("/usr/bin/cat", "/etc/hostname"), ("/usr/bin/id", "-un"),
            ("/usr/bin/grep", "-r", "needle", "."), ("/usr/bin/vim", "notes.txt"),
            ("/usr/bin/git", "status"), ("/usr/bin/false",))


def generate(out, events, as_json=False, start=1700000000.0, seed=1, step=0.5):
    """Write about `events` event lines to the file object `out` (text);
    return the expected totals."""
    rnd = random.Random(seed)
    exp = {"logins": 0, "failed": 0, "sessions": 0, "commands": 0, "sudo": 0, "uploads": 0,
           "failed_commands": 0, "events": 0}
    t = start
    ptm = 1000
    line = sshlog.event_line

    def emit(ev):
        out.write(line(ev, as_json) + "\n")
        exp["events"] += 1

    while exp["events"] < events:
        ptm += 1
        if rnd.random() < 0.2:
            t += step
            emit(sshlog.ConnectionAuthFailed(
                timestamp=t, hostname="bench", ptm_pid=ptm, session_id="f%d" % ptm,
                username=rnd.choice(("admin", "oracle", "test", "root")),
                client_ip=rnd.choice(ATTACKERS), client_port=40000 + ptm % 20000,
                auth_method="password", reason="authentication failed"))
            exp["failed"] += 1
            continue
        user = rnd.choice(USERS)
        base = dict(hostname="bench", ptm_pid=ptm, session_id="s%08d" % ptm, username=user,
                    user_id=1000 + USERS.index(user), tty_id=ptm % 8,
                    client_ip=rnd.choice(SOURCES), client_port=50000 + ptm % 10000,
                    server_ip="192.0.2.1", server_port=22, sshd_pid=1, start_time=t)
        t += step
        emit(sshlog.ConnectionEstablished(timestamp=t, **base))
        exp["logins"] += 1
        exp["sessions"] += 1
        pid = ptm * 100
        for i in range(rnd.randint(3, 30)):
            if rnd.random() < 0.05:
                argv = ("sudo", "/usr/bin/systemctl", "restart", "nginx")
                filename = "/usr/bin/sudo"
                exp["sudo"] += 1
            else:
                cmd = rnd.choice(COMMANDS)
                filename, argv = cmd[0], (os.path.basename(cmd[0]),) + cmd[1:]
            pid += 1
            t += step
            emit(sshlog.CommandStart(timestamp=t, pid=pid, parent_pid=ptm, filename=filename,
                                     argv=argv, **base))
            t += step
            code = 1 if filename == "/usr/bin/false" else 0
            exp["failed_commands"] += code != 0
            emit(sshlog.CommandFinish(timestamp=t, pid=pid, parent_pid=ptm, filename=filename,
                                      argv=argv, command_start=t - step, duration_ms=500,
                                      exit_code=code, stdout="ok\n", stdout_size=3, **base))
            exp["commands"] += 1
        if rnd.random() < 0.1:
            t += step
            emit(sshlog.FileUpload(timestamp=t, pid=pid + 1, target_path="/home/%s/up%d.tgz"
                                   % (user, ptm), file_mode="644", bytes=12345, **base))
            exp["uploads"] += 1
        t += step
        emit(sshlog.ConnectionClose(timestamp=t, end_time=t, duration_ms=1000, **base))
    exp["end"] = t
    return exp


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--events", type=int, default=1000000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--start", type=float, default=1700000000.0)
    args = ap.parse_args()
    with open(args.out, "w", encoding="utf-8") as f:
        exp = generate(f, args.events, args.json, args.start)
    print(exp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
