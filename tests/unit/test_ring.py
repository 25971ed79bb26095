"""RingReader: the BPF ring buffer read in place.  The kernel's layout is laid
out in a file (consumer page, producer page, data twice -- the kernel maps the
same pages twice; here the second copy is written by hand) and read back."""
import contextlib
import ctypes
import mmap
import os
import struct
import time

import pytest

import sshlog

PAGE = mmap.PAGESIZE
SIZE = 4 * PAGE


class FakeRing:
    def __init__(self, path, start=0):
        self.path = path
        self.pos = start                      # producer position
        with open(path, "wb") as f:
            f.write(b"\0" * (2 * PAGE + 2 * SIZE))
        self.put_pos(0, start)
        self.put_pos(PAGE, start)

    def put_pos(self, at, value):
        with open(self.path, "r+b") as f:
            f.seek(at)
            f.write(struct.pack("<Q", value))

    def consumer(self):
        with open(self.path, "rb") as f:
            return struct.unpack("<Q", f.read(8))[0]

    def add(self, body, flags=0):
        """A record at the producer position, mirrored like the double mapping."""
        record = struct.pack("<II", len(body) | flags, 0) + body
        record += b"\0" * (-len(record) % 8)
        with open(self.path, "r+b") as f:
            for i, byte in enumerate(record):
                off = (self.pos + i) % SIZE
                for base in (2 * PAGE, 2 * PAGE + SIZE):
                    if base + off < 2 * PAGE + 2 * SIZE:
                        f.seek(base + off)
                        f.write(bytes([byte]))
        self.pos += len(record)
        self.put_pos(PAGE, self.pos)

    def reader(self):
        f = open(self.path, "r+b")
        return f, sshlog.RingReader(f.fileno(), SIZE)


def data_record(payload, kind=sshlog.REC_TTY_OUT):
    """A data record at its exact size, as bpf_ringbuf_output puts it in the ring."""
    return struct.pack("<IIIIQiI", kind, 10, 20, len(payload), 123, 5, 0) + payload


def read_all(ring):
    f, reader = ring.reader()
    out = []
    try:
        reader.read(out)
    finally:
        reader.close()
        f.close()
    return out


def test_records_are_read_whole_and_in_order(tmp_path):
    ring = FakeRing(tmp_path / "ring")
    ring.add(data_record(b"hello"))
    exit_rec = struct.pack("<IIIIQiI", sshlog.REC_EXIT, 1, 2, 0, 9, 256, 0)
    ring.add(exit_rec)
    f, reader = ring.reader()
    out = []
    reader.read(out)
    assert out == [data_record(b"hello"), exit_rec]          # no padding, no header
    assert sshlog.decode_record(out[0]).data == b"hello"
    assert ring.consumer() == ring.pos == reader.released     # headers and padding too
    out.clear()
    reader.read(out)                                         # nothing new: nothing read
    assert out == [] and ring.consumer() == ring.pos and reader.released == 0
    reader.close()
    f.close()


def test_busy_record_stops_the_read_and_discarded_ones_are_skipped(tmp_path):
    ring = FakeRing(tmp_path / "ring")
    ring.add(data_record(b"gone"), flags=sshlog.RingReader.DISCARD)
    ring.add(data_record(b"kept"))
    busy_at = ring.pos
    ring.add(data_record(b"later"), flags=sshlog.RingReader.BUSY)
    assert [sshlog.decode_record(r).data for r in read_all(ring)] == [b"kept"]
    assert ring.consumer() == busy_at       # the busy record is read next time


def test_a_record_that_wraps_reads_as_one(tmp_path):
    start = SIZE - 3000                       # the 4 KiB record crosses the end of the data
    ring = FakeRing(tmp_path / "ring", start=start)
    ring.add(data_record(b"w" * 4000))
    assert [sshlog.decode_record(r).data for r in read_all(ring)] == [b"w" * 4000]
    assert ring.consumer() == ring.pos > SIZE


def test_records_of_odd_lengths_keep_their_alignment(tmp_path):
    ring = FakeRing(tmp_path / "ring")
    payloads = [b"a" * n for n in (0, 1, 7, 8, 9, 100, 1001)]
    for p in payloads:
        ring.add(data_record(p))
    assert [sshlog.decode_record(r).data for r in read_all(ring)] == payloads
    assert ring.consumer() == ring.pos and ring.pos % 8 == 0


def test_ring_size_must_be_a_power_of_two(tmp_path):
    ring = FakeRing(tmp_path / "ring")
    f = open(ring.path, "r+b")
    with pytest.raises(ValueError):
        sshlog.RingReader(f.fileno(), 3 * PAGE)
    f.close()


# ---------------------------------------------------------------------------------------
# Probes.drain: both rings, decoded, merged by time, with either reader.

def exit_record(sess, ts, pid=99):
    return struct.pack("<IIIIQiI", sshlog.REC_EXIT, pid, sess, 0, ts, 0, sshlog.F_MONITOR)


def tty_record(sess, data, ts):
    return struct.pack("<IIIIQiI", sshlog.REC_TTY_OUT, 7, sess, len(data), ts, 9, 0) + data


CTL = [exit_record(2, 40), exit_record(1, 25)]     # committed out of time order
TTY = [tty_record(1, b"a", 10), tty_record(2, b"x", 15), tty_record(1, b"b", 20),
       tty_record(1, b"c", 30), tty_record(2, b"y", 35), tty_record(2, b"z", 50)]
# session 1's exit at 25 falls between its "b" and "c"; session 2's at 40 after its "y"
DRAINED = [sshlog.Data(sshlog.REC_TTY_OUT, 10, 7, 1, 9, b"ab", 0),
           sshlog.Data(sshlog.REC_TTY_OUT, 15, 7, 2, 9, b"xy", 0),
           sshlog.Exit(25, 99, 1, 0, sshlog.F_MONITOR),
           sshlog.Data(sshlog.REC_TTY_OUT, 30, 7, 1, 9, b"c", 0),
           sshlog.Exit(40, 99, 2, 0, sshlog.F_MONITOR),
           sshlog.Data(sshlog.REC_TTY_OUT, 50, 7, 2, 9, b"z", 0)]


@contextlib.contextmanager
def mapped_probes(*rings):
    """Probes reading the laid-out rings (control, terminal) through RingReader."""
    files = [open(ring.path, "r+b") for ring in rings]
    probes = unloaded_probes(readers=tuple(sshlog.RingReader(f.fileno(), SIZE) for f in files))
    try:
        yield probes
    finally:
        for reader in probes.readers:
            reader.close()
        for f in files:
            f.close()


# what drain() reads to have the kernel flush its merge slots (none here)
NO_KERNEL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def unloaded_probes(readers=None, bpf=None):
    probes = object.__new__(sshlog.Probes)       # the BPF side is not loaded here
    probes.raw, probes.readers, probes.bpf = ([], []), readers, bpf
    probes.flush_fd = NO_KERNEL
    probes.held = []
    probes.decode_errors = probes.callback_errors = 0
    probes.fill = 0.0
    return probes


def test_drain_reads_both_mapped_rings_in_time_order(tmp_path):
    ctl, tty = FakeRing(tmp_path / "ctl"), FakeRing(tmp_path / "tty", start=SIZE - 40)
    for raw in CTL:
        ctl.add(raw)
    for raw in TTY:                               # the terminal ring wraps around meanwhile
        tty.add(raw)
    tty.add(tty_record(3, b"gone", 60), flags=sshlog.RingReader.DISCARD)
    tty.add(b"\x01\x02\x03")                     # undecodable: counted
    with mapped_probes(ctl, tty) as probes:
        assert probes.drain() == DRAINED
        assert (ctl.consumer(), tty.consumer()) == (ctl.pos, tty.pos)
        assert probes.decode_errors == 1
        assert probes.fill == (tty.pos - (SIZE - 40)) / SIZE > ctl.pos / SIZE
        assert probes.drain() == []               # everything was released
        assert probes.fill == 0


class CallbackBpf:
    """bcc's reader: a C callback per record, for the records `pending` (control,
    terminal) at the next ring_buffer_consume()."""

    def __init__(self, ctl, tty):
        self.pending, self.collectors = [ctl, tty], []

    def ring_buffer_consume(self):
        for collect, records in zip(self.collectors, self.pending):
            for raw in records:
                c_copy = ctypes.create_string_buffer(raw, len(raw))
                collect(None, ctypes.addressof(c_copy), len(raw))
        self.pending = [[], []]


def callback_probes(ctl, tty):
    bpf = CallbackBpf(ctl, tty)
    probes = unloaded_probes(bpf=bpf)
    bpf.collectors = [probes._collector(raw) for raw in probes.raw]
    return probes


def test_drain_with_bccs_reader_gives_the_same_records():
    probes = callback_probes(CTL, TTY)
    assert probes.drain() == DRAINED
    tty_bytes = sum(len(raw) + 8 for raw in TTY)  # the records and their headers
    assert probes.fill == tty_bytes / (sshlog.TTY_PAGES * PAGE)
    assert probes.raw == ([], []) and probes.drain() == []
    assert probes.fill == 0


def test_drain_orders_control_records_committed_out_of_time_order(tmp_path):
    ctl, tty = FakeRing(tmp_path / "ctl"), FakeRing(tmp_path / "tty")
    for raw in CTL:                               # two CPUs: committed in the other order
        ctl.add(raw)
    with mapped_probes(ctl, tty) as probes:
        assert [r.ts for r in probes.drain()] == [25, 40]


def test_drain_holds_the_newest_records_back_for_the_next_drain(tmp_path):
    """A record stamped first may reach its ring after a drain read a later one (a
    reservation the control ring refused, taken by the terminal ring): records younger
    than HOLD_NS wait, so the two leave in time order across drains."""
    now = time.monotonic_ns()
    ctl, tty = FakeRing(tmp_path / "ctl"), FakeRing(tmp_path / "tty")
    ctl.add(exit_record(1, now - 10 ** 9, pid=11))
    ctl.add(exit_record(1, now, pid=13))                      # young: held back
    with mapped_probes(ctl, tty) as probes:
        assert [r.pid for r in probes.drain()] == [11]
        tty.add(exit_record(1, now - 1000, pid=12))           # stamped before 13, late
        time.sleep(probes.HOLD_NS / 1e9)
        assert [r.pid for r in probes.drain()] == [12, 13]
        ctl.add(exit_record(1, time.monotonic_ns(), pid=14))
        assert [r.pid for r in probes.drain()] == []
        assert [r.pid for r in probes.drain(final=True)] == [14]   # at shutdown: all
        assert probes.held == []


def test_drain_holds_a_sessions_young_reads_behind_a_record_still_on_its_way(tmp_path):
    """A terminal read the terminal ring refused goes to the control ring; a drain that
    read the control ring just before it arrived finds the reads around it in the
    terminal ring.  The younger of those wait, so the late read is not overtaken."""
    now = time.monotonic_ns()
    ctl, tty = FakeRing(tmp_path / "ctl"), FakeRing(tmp_path / "tty")
    tty.add(tty_record(1, b"a", now - 10 ** 9))
    tty.add(tty_record(1, b"c", now))                        # "b" is on its way
    with mapped_probes(ctl, tty) as probes:
        assert [r.data for r in probes.drain()] == [b"a"]
        ctl.add(tty_record(1, b"b", now - 1000))
        time.sleep(probes.HOLD_NS / 1e9)
        assert [r.data for r in probes.drain()] == [b"b", b"c"]


def test_bccs_reader_holds_young_terminal_reads_too():
    now = time.monotonic_ns()
    probes = callback_probes([], [tty_record(1, b"a", now - 10 ** 9), tty_record(1, b"c", now)])
    assert [r.data for r in probes.drain()] == [b"a"]
    probes.bpf.pending = [[tty_record(1, b"b", now - 1000)], []]
    time.sleep(probes.HOLD_NS / 1e9)
    assert [r.data for r in probes.drain()] == [b"b", b"c"]
    assert probes.raw == ([], [])


def test_the_daemon_drains_sooner_under_ring_pressure_or_for_live_viewers():
    daemon = object.__new__(sshlog.Daemon)           # the loop's timing alone
    daemon.probes = unloaded_probes()
    daemon.watchers, daemon.attach_hub = [], sshlog.AttachHub()
    assert daemon.next_drain() == daemon.TICK > daemon.FAST_TICK
    daemon.probes.fill = daemon.RING_PRESSURE * 1.01
    assert daemon.next_drain() == daemon.FAST_TICK
    daemon.probes.fill = 0.0
    daemon.watchers = [object()]
    assert daemon.next_drain() == daemon.FAST_TICK
    daemon.watchers = []
    daemon.attach_hub.clients[1234] = [object()]
    assert daemon.next_drain() == daemon.FAST_TICK
