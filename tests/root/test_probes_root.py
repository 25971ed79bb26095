"""The BPF programs loaded in-process, read by both ring readers: records of a
tracked process tree arrive whole and in order, across the ring's wrap-around
(mmap reader), with nothing dropped."""
import subprocess
import time

import pytest

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
        records += probes.drain()
        drops, bad = probes.drops(), probes.decode_errors
        ctl_read = probes.readers[0].spans()[1] if ring_mmap else 0   # bytes consumed
    finally:
        probes.close()
    # Nothing is lost silently: every control record that did not arrive was counted.
    # (Kernel 6.18 here fails about one reservation in 20,000 in this storm with the
    # ring never more than ~135 KB of 4 MiB full, and an immediate second try fails
    # too: its ring buffer takes a spinlock that may give up.  The product counts it.)
    assert drops["tty"] == 0 and bad == 0 and drops["ctl"] <= 3
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
