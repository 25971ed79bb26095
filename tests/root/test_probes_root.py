"""The BPF programs loaded in-process, read by both ring readers: records of a
tracked process tree arrive whole and in order, across the ring's wrap-around
(mmap reader), with nothing dropped; a record its ring refuses arrives through
the other ring, in its place."""
import itertools
import subprocess
import threading
import time

import pytest

import harness
import sshlog

pytestmark = pytest.mark.root


PAD = "p" * 1000                    # ~2.4 KB of ring per command: 6000 wrap the 4 MiB ring 3x


@pytest.mark.parametrize("ring_mmap,commands", [(True, 6000), (False, 300)],
                         ids=["mmap", "bcc-callback"])
def test_tracked_tree_records_arrive_whole_and_in_order(ring_mmap, commands):
    probes = sshlog.Probes(sshlog.probe_plan(), ring_mmap=ring_mmap)
    try:
        child = subprocess.Popen(
            ["/bin/sh", "-c", "read go; i=0; while [ $i -lt %d ]; do "
             "/bin/echo ring-test-$i %s; i=$((i+1)); done" % (commands, PAD)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        probes.track(child.pid, child.pid, 0, sshlog.F_USER)
        child.stdin.write(b"go\n")
        child.stdin.close()
        records = []
        while child.poll() is None:          # drained as the daemon does
            records += probes.drain()
            time.sleep(0.02)
        time.sleep(0.1)
        records += probes.drain(final=True)
        drops, bad = probes.drops(), probes.decode_errors
        ctl_read = probes.readers[0].spans()[1] if ring_mmap else 0   # bytes consumed
    finally:
        probes.close()
    # Nothing is lost silently: every control record that did not arrive was counted.
    # (Kernel 6.18 here refuses about one reservation in 20,000 in this storm with the
    # ring never more than ~135 KB of 4 MiB full, and an immediate second try in the
    # same ring fails too; the terminal ring takes such a record.  Both refusing the
    # same record has not been seen; it would be counted.)
    assert drops["tty"] == 0 and bad == 0 and drops["ctl"] <= 1
    # (the shell's own exec may land after track(): Popen returns once exec began)
    execs = [d for d in records if isinstance(d, sshlog.Exec) and d.sess == child.pid
             and d.filename == "/bin/echo"]
    want = [("/bin/echo", "ring-test-%d" % i, PAD) for i in range(commands)]
    got = [d.argv for d in execs]
    arrived = set(got)
    assert got == [a for a in want if a in arrived]           # in order, none invented
    assert ctl_read > (2 * sshlog.CTL_PAGES * 4096 if ring_mmap else -1)
    outs = [d for d in records if isinstance(d, sshlog.Data)
            and d.type == sshlog.REC_STDOUT and d.sess == child.pid]
    want_out = [(b"ring-test-%d %s\n" % (i, PAD.encode()))[:sshlog.STDOUT_CAP]
                for i in range(commands)]
    arrived = {d.data for d in outs}
    assert [d.data for d in outs] == [o for o in want_out if o in arrived]
    echo_pids = {d.pid for d in execs} | {d.pid for d in outs}
    exits = [d for d in records if isinstance(d, sshlog.Exit) and d.pid in echo_pids]
    assert all(d.status == 0 for d in exits)
    started = {}
    for d in sorted(execs + outs, key=lambda r: r.ts):
        started.setdefault(d.pid, d.ts)
    assert [d.pid for d in exits] == sorted((d.pid for d in exits), key=started.get)
    assert 3 * commands - len(execs) - len(outs) - len(exits) == drops["ctl"]
    assert [r.ts for r in records] == sorted(r.ts for r in records)


def test_a_refused_record_arrives_through_the_other_ring_in_its_place(sshd, users):
    """Every 7th first try at a ring refused (-DREFUSE_EVERY=7, a test-only
    parameter): each such record is taken by the other ring, and the reader
    puts it back in its place.  A flood's terminal stream arrives whole and in
    order; a command loop's commands all start and finish, in order."""
    plan = sshlog.probe_plan()
    probes = sshlog.Probes(sshlog.ProbePlan(plan.cflags + ("-DREFUSE_EVERY=7",),
                                            plan.exit_code_offset, plan.group_dead))
    tracker = sshlog.Tracker()
    events, stop = [], threading.Event()

    def capture():                       # the daemon's loop, without its actions
        while not stop.is_set():
            for rec in probes.drain():
                events.extend(tracker.handle(rec))
            stop.wait(0.02)
    thread = threading.Thread(target=capture)
    try:
        tracker.discover(probes)
        thread.start()
        with harness.PtySession(sshd, users["sshlogt1"]) as s:
            tty = s.tty_name()
            assert s.run("seq 1 200000", timeout=60) == 0
            assert s.run("for i in $(seq 300); do /bin/true reroute-$i; done", timeout=60) == 0
            s.sendline("exit")
            s.wait(30)
            client = s.output
        time.sleep(0.3)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        for rec in probes.drain(final=True):
            events.extend(tracker.handle(rec))
        drops, rerouted = probes.drops(), probes.rerouted()
        probes.close()
    assert drops == {"ctl": 0, "tty": 0} and probes.decode_errors == 0
    assert rerouted["ctl"] > 20 and rerouted["tty"] > 20, rerouted
    ptm = [e.ptm_pid for e in events if e.type == "connection_established"
           and e.tty_id == tty][-1]
    mine = [e for e in events if e.ptm_pid == ptm]
    updates = [e for e in mine if e.type == "terminal_update"]
    assert [e.offset for e in updates] == list(itertools.accumulate(
        [0] + [e.data_len for e in updates[:-1]]))
    recorded = b"".join(e.raw for e in updates)
    k = len(client) - len(recorded)       # the client's pty echoed its type-ahead first
    assert 0 <= k < 400 and client[k:] == recorded
    assert b"\r\n".join(b"%d" % i for i in range(1, 200001)) + b"\r\n" in recorded
    loop = ["reroute-%d" % i for i in range(1, 301)]
    assert [e.argv[1] for e in mine if e.type == "command_start"
            and e.argv[1:2] and e.argv[1].startswith("reroute-")] == loop
    assert [e.argv[1] for e in mine if e.type == "command_finish"
            and e.argv[1:2] and e.argv[1].startswith("reroute-")] == loop
