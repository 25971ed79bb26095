"""BPF wire format: ctypes layouts against bpf_probes.c, decode_record, BTF, audit fields."""
import ctypes
import os
import re
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sshlog

C_SOURCE = os.path.join(os.path.dirname(sshlog.__file__), "bpf_probes.c")
ARGV_CAP = sshlog.ARGV_CAP

# ---------------------------------------------------------------------------------------
# Layouts, computed by hand from the C definitions (u8 1, u16 2, u32/s32 4, u64 8 bytes;
# every struct below has its members naturally aligned, so there is no padding).

EXPECTED_SIZES = [
    # rec_hdr: type, pid, sess, len (4 x u32) + ts (u64)
    (sshlog.RecHdr, 4 * 4 + 8),                                       # 24
    # rec_connect: hdr + listener u32 + family u16 + port u16 + addr u8[16]
    #              + server_addr u8[16] + server_port u16 + pad u16[3]
    (sshlog.RecConnect, 24 + 4 + 2 + 2 + 16 + 16 + 2 + 6),            # 72
    # rec_exec: hdr + ppid + uid + argc u16 + truncated u16 + fname_len u32
    #           + fname[FNAME_CAP 256] + argv[ARGV_CAP + LAST_ARG_CAP]
    (sshlog.RecExec, 24 + 4 + 4 + 2 + 2 + 4 + 256 + (ARGV_CAP + 256)),  # 8744 with ARGV_CAP 8192
    # rec_exit: hdr + status s32 + flags u32
    (sshlog.RecExit, 24 + 4 + 4),                                     # 32
    # rec_u32: hdr + value u32 + fd u32
    (sshlog.RecU32, 24 + 4 + 4),                                      # 32
    # rec_winsz: hdr + rows u16 + cols u16 + fd u32
    (sshlog.RecWinsz, 24 + 2 + 2 + 4),                                # 32
    # rec_data_head (rec_data_big without data[]): hdr + fd u32 + lost u32
    (sshlog.RecDataHead, 24 + 4 + 4),                                 # 32
    # rec_upload_open: hdr + fd s32 + flags + mode + pad (u32) + path[PATH_CAP 4096]
    (sshlog.RecUploadOpen, 24 + 4 + 4 + 4 + 4 + 4096),                # 4136
    # rec_upload_close: hdr + fd s32 + pad u32 + bytes u64
    (sshlog.RecUploadClose, 24 + 4 + 4 + 8),                          # 40
    # struct proc (the `tracked` map value): sess ppid flags out_left status pad, u32 each;
    # fds_marked fds_ptmx, u64 each
    (sshlog.ProcEntry, 6 * 4 + 2 * 8),                                # 40
    # struct fd_key: tgid u32 + fd s32
    (sshlog.FdKey, 4 + 4),                                            # 8
    # struct fd_val: kind u32 + pad u32 + bytes u64
    (sshlog.FdVal, 4 + 4 + 8),                                        # 16
]


@pytest.mark.parametrize("cls,size", EXPECTED_SIZES, ids=[c.__name__ for c, _ in EXPECTED_SIZES])
def test_ctypes_size_matches_c_layout(cls, size):
    assert ctypes.sizeof(cls) == size


def test_hand_computed_totals():
    # the totals above, spelled out once so a change of cap shows up as a number
    assert ctypes.sizeof(sshlog.RecExec) == 8744
    assert ctypes.sizeof(sshlog.RecUploadOpen) == 4136
    # the per-CPU scratch record a data record is built in: fixed part + data[BIG_CAP]
    assert ctypes.sizeof(sshlog.RecDataHead) + sshlog.BIG_CAP == 24 + 4 + 4 + 16384 == 16416
    # the decoder's structs for the fixed parts it reads without ctypes
    assert sshlog._DATA_HDR.size == ctypes.sizeof(sshlog.RecDataHead)
    assert sshlog._EXIT_REC.size == ctypes.sizeof(sshlog.RecExit)
    assert sshlog._EXEC_HDR.size == sshlog.RecExecHead.fname.offset


def test_struct_decoders_read_what_ctypes_reads():
    """The struct formats of the hot records name the same fields at the same
    offsets as the ctypes layouts."""
    r = sshlog.RecExecHead()
    r.h.type, r.h.pid, r.h.sess, r.h.len, r.h.ts = sshlog.REC_EXEC, 11, 12, 13, 2**40 + 14
    r.ppid, r.uid, r.argc, r.truncated, r.fname_len = 15, 16, 17, 18, 19
    assert sshlog._EXEC_HDR.unpack_from(bytes(r)) == (
        sshlog.REC_EXEC, 11, 12, 13, 2**40 + 14, 15, 16, 17, 18, 19)
    x = sshlog.RecExit()
    x.h.type, x.h.pid, x.h.sess, x.h.len, x.h.ts = sshlog.REC_EXIT, 21, 22, 0, 2**41 + 23
    x.status, x.flags = -24, 25
    assert sshlog._EXIT_REC.unpack_from(bytes(x)) == (
        sshlog.REC_EXIT, 21, 22, 0, 2**41 + 23, -24, 25)


@pytest.mark.parametrize("argv_cap", [256, 4096, 65536])
def test_rec_exec_size_follows_argv_cap(argv_cap):
    cls = sshlog.make_rec_exec(argv_cap)
    assert ctypes.sizeof(cls) == 24 + 4 + 4 + 2 + 2 + 4 + 256 + argv_cap + 256
    assert cls.argv.size == argv_cap + 256


OFFSETS = [
    # the offsets decode_record slices at, and the header fields every record shares
    (sshlog.RecHdr, "type", 0), (sshlog.RecHdr, "len", 12), (sshlog.RecHdr, "ts", 16),
    (sshlog.RecConnect, "listener", 24), (sshlog.RecConnect, "family", 28),
    (sshlog.RecConnect, "port", 30), (sshlog.RecConnect, "addr", 32),
    (sshlog.RecConnect, "server_addr", 48), (sshlog.RecConnect, "server_port", 64),
    (sshlog.RecExec, "ppid", 24), (sshlog.RecExec, "uid", 28), (sshlog.RecExec, "argc", 32),
    (sshlog.RecExec, "truncated", 34), (sshlog.RecExec, "fname_len", 36),
    (sshlog.RecExec, "fname", 40),                       # 24 + 4 + 4 + 2 + 2 + 4
    (sshlog.RecExec, "argv", 296),                       # 40 + FNAME_CAP 256
    (sshlog.RecExit, "status", 24), (sshlog.RecExit, "flags", 28),
    (sshlog.RecU32, "value", 24), (sshlog.RecU32, "fd", 28),
    (sshlog.RecWinsz, "rows", 24), (sshlog.RecWinsz, "cols", 26), (sshlog.RecWinsz, "fd", 28),
    (sshlog.RecDataHead, "fd", 24),
    (sshlog.RecDataHead, sshlog.RecDataHead._fields_[2][0], 28),   # pad, now `lost`
    (sshlog.RecUploadOpen, "fd", 24), (sshlog.RecUploadOpen, "mode", 32),
    (sshlog.RecUploadOpen, "path", 40),                  # 24 + 4 x 4
    (sshlog.RecUploadClose, "fd", 24), (sshlog.RecUploadClose, "bytes", 32),
]


@pytest.mark.parametrize("cls,field,offset", OFFSETS,
                         ids=["%s.%s" % (c.__name__, f) for c, f, _ in OFFSETS])
def test_field_offsets(cls, field, offset):
    assert getattr(cls, field).offset == offset


def test_data_head_is_where_data_starts():
    assert sshlog._DATA_HEAD == 32


# ---------------------------------------------------------------------------------------
# The C text and the Python mirror agree on names, order and constants.

def _c_text():
    with open(C_SOURCE) as f:
        return f.read()


def _c_struct_members(name):
    m = re.search(r"struct %s \{(.*?)\};" % name, _c_text(), re.S)
    assert m, "struct %s not found in bpf_probes.c" % name
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return re.findall(r"(?:struct \w+|u8|u16|u32|u64|s32|char)\s+(\w+)(?:\[[^\]]*\])?\s*;", body)


STRUCT_MIRRORS = [
    ("rec_hdr", sshlog.RecHdr, []),
    ("rec_connect", sshlog.RecConnect, []),
    ("rec_exec", sshlog.RecExec, []),
    ("rec_exit", sshlog.RecExit, []),
    ("rec_u32", sshlog.RecU32, []),
    ("rec_winsz", sshlog.RecWinsz, []),
    ("rec_data_head", sshlog.RecDataHead, []),
    ("rec_data_big", sshlog.RecDataHead, ["data"]),
    ("rec_upload_open", sshlog.RecUploadOpen, []),
    ("rec_upload_close", sshlog.RecUploadClose, []),
    ("proc", sshlog.ProcEntry, []),
]


@pytest.mark.parametrize("c_name,cls,extra", STRUCT_MIRRORS, ids=[s[0] for s in STRUCT_MIRRORS])
def test_ctypes_mirrors_c_members(c_name, cls, extra):
    assert _c_struct_members(c_name) == [f[0] for f in cls._fields_] + extra


PY_REC_TYPES = {n: getattr(sshlog, n) for n in dir(sshlog)
                if re.fullmatch(r"REC_[A-Z_]+", n) and isinstance(getattr(sshlog, n), int)}


def test_record_type_numbers_match_c_enum():
    enum = re.search(r"enum rec_type \{(.*?)\};", _c_text(), re.S).group(1)
    c_values = {k: int(v) for k, v in re.findall(r"(REC_\w+)\s*=\s*(\d+)", enum)}
    assert len(c_values) >= 13
    assert c_values == PY_REC_TYPES


@pytest.mark.parametrize("name", ["FNAME_CAP", "LAST_ARG_CAP", "BIG_CAP",
                                  "PATH_CAP", "F_LISTENER", "F_SSHD", "F_USER", "F_CMD",
                                  "F_XFER", "F_MONITOR"])
def test_c_defines_match_python(name):
    m = re.search(r"#define %s\s+(0x[0-9a-fA-F]+|\d+)" % name, _c_text())
    assert m, name
    assert int(m.group(1), 0) == getattr(sshlog, name)


def test_fd_kinds_match_c_enum():
    enum = re.search(r"enum fd_kind \{(.*?)\};", _c_text(), re.S).group(1)
    c_values = dict((k, int(v)) for k, v in re.findall(r"(FD_\w+)\s*=\s*(\d+)", enum))
    assert c_values == {k: getattr(sshlog, k) for k in ("FD_PTMX", "FD_AUDIT", "FD_BTMP",
                                                        "FD_UPLOAD")}


# ---------------------------------------------------------------------------------------
# Crafted records through decode_record.

def hdr(rtype, pid=1805, sess=2062, length=0, ts=123456789):
    return struct.pack("<IIIIQ", rtype, pid, sess, length, ts)


def rec_connect(family, addr, port=52566, listener=700, server_addr=b"", server_port=0):
    return hdr(sshlog.REC_CONNECT) + struct.pack("<IHH16s16sH6x", listener, family, port, addr,
                                                 server_addr, server_port)


def rec_exec(argv_blob, argc, truncated=0, fname=b"/usr/bin/id", argv_cap=ARGV_CAP,
             length=None):
    fixed = struct.pack("<IIHHI256s", 2061, 1001, argc, truncated, len(fname) + 1, fname)
    return (hdr(sshlog.REC_EXEC, length=len(argv_blob) if length is None else length) + fixed
            + argv_blob.ljust(argv_cap + 256, b"\0"))


def rec_data(rtype, data, cap, fd=9):
    return hdr(rtype, length=len(data)) + struct.pack("<II", fd, 0) + data.ljust(cap, b"\0")


def test_connect_ipv4():
    raw = rec_connect(socket.AF_INET, socket.inet_aton("211.249.71.117"))
    assert sshlog.decode_record(raw) == sshlog.Connect(
        ts=123456789, pid=1805, sess=2062, listener=700, ip="211.249.71.117", port=52566,
        server_ip="", server_port=0)


def test_connect_carries_our_end_when_the_kernel_saw_it():
    raw = rec_connect(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "2001:db8::7"), 40022,
                      server_addr=socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
                      server_port=22)
    rec = sshlog.decode_record(raw)
    assert (rec.ip, rec.port, rec.server_ip, rec.server_port) == (
        "2001:db8::7", 40022, "2001:db8::1", 22)


def test_connect_ipv6():
    raw = rec_connect(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "2001:db8::7"), 40022)
    rec = sshlog.decode_record(raw)
    assert (rec.ip, rec.port) == ("2001:db8::7", 40022)


def test_connect_v4_mapped_ipv6_is_shown_as_ipv4():
    raw = rec_connect(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::ffff:203.0.113.9"))
    assert sshlog.decode_record(raw).ip == "203.0.113.9"


def test_connect_unknown_family_has_no_address():
    assert sshlog.decode_record(rec_connect(socket.AF_UNIX, b"\x01" * 16)).ip == ""


def test_exec_argv_nul_separated():
    rec = sshlog.decode_record(rec_exec(b"id\0-un\0", argc=2))
    assert rec == sshlog.Exec(ts=123456789, pid=1805, sess=2062, ppid=2061, uid=1001,
                              filename="/usr/bin/id", argv=("id", "-un"), truncated=False)


def test_exec_empty_arguments_are_kept():
    rec = sshlog.decode_record(rec_exec(b"printf\0\0x\0", argc=3, fname=b"/usr/bin/printf"))
    assert rec.argv == ("printf", "", "x")
    assert rec.truncated is False


def test_exec_invalid_utf8_is_backslash_escaped_not_dropped():
    rec = sshlog.decode_record(rec_exec(b"cat\0caf\xe9.txt\0\xff\0", argc=3,
                                        fname=b"/tmp/\xfe/cat"))
    assert rec.argv == ("cat", "caf\\xe9.txt", "\\xff")
    assert rec.filename == "/tmp/\\xfe/cat"


def test_exec_utf8_arguments_decoded():
    rec = sshlog.decode_record(rec_exec("echo\0héllo wörld\0".encode(), argc=2,
                                        fname=b"/bin/echo"))
    assert rec.argv == ("echo", "héllo wörld")


def test_exec_truncated_flag_from_kernel():
    blob = b"A" * ARGV_CAP             # the kernel stopped at ARGV_CAP, mid-string
    rec = sshlog.decode_record(rec_exec(blob, argc=1, truncated=1))
    assert rec.truncated is True
    assert rec.argv == ("A" * ARGV_CAP,)


def test_exec_argc_larger_than_strings_without_terminator_is_truncated():
    # the blob ends mid-string: only two strings, the third cut short
    rec = sshlog.decode_record(rec_exec(b"id\0-un\0par", argc=4))
    assert rec.truncated is True
    assert rec.argv[:2] == ("id", "-un")


def test_exec_argc_larger_than_strings_present_is_truncated():
    rec = sshlog.decode_record(rec_exec(b"id\0-un\0", argc=3))
    assert rec.argv == ("id", "-un")
    assert rec.truncated is True


def test_exec_len_beyond_buffer_is_clamped():
    rec = sshlog.decode_record(rec_exec(b"ls\0-l\0", argc=2, length=0xFFFFFFFF,
                                        fname=b"/bin/ls"))
    assert rec.argv == ("ls", "-l")


def test_exec_records_decode_at_their_exact_size():
    """bpf_probes.c builds rec_exec in a per-CPU scratch record and puts it in the
    ring only up to h.len bytes of argv; the decoder needs only that."""
    blob = b"ls\0-la\0/tmp\0"
    whole = rec_exec(blob, argc=3, fname=b"/bin/ls")
    exact = whole[:ctypes.sizeof(sshlog.RecExecHead) + len(blob)]
    for raw in (exact, whole):
        assert sshlog.decode_record(raw).argv == ("ls", "-la", "/tmp")
    assert ctypes.sizeof(sshlog.RecExecHead) == sshlog.RecExec.argv.offset


@pytest.mark.parametrize("status", [0, 1 << 8, 15, -1])
def test_exit(status):
    raw = hdr(sshlog.REC_EXIT) + struct.pack("<iI", status, sshlog.F_CMD)
    assert sshlog.decode_record(raw) == sshlog.Exit(123456789, 1805, 2062, status, sshlog.F_CMD)


@pytest.mark.parametrize("rtype", [sshlog.REC_SETUID, sshlog.REC_PTY])
def test_u32_records(rtype):
    raw = hdr(rtype) + struct.pack("<II", 4, 7)
    assert sshlog.decode_record(raw) == sshlog.Value(rtype, 123456789, 1805, 2062, 4, 7)


def test_winsz():
    raw = hdr(sshlog.REC_WINSZ) + struct.pack("<HHI", 50, 132, 7)
    assert sshlog.decode_record(raw) == sshlog.Winsz(123456789, 1805, 2062, 50, 132, 7)


DATA_TYPES = [sshlog.REC_TTY_OUT, sshlog.REC_TTY_IN, sshlog.REC_STDOUT, sshlog.REC_AUDIT,
              sshlog.REC_BTMP]


@pytest.mark.parametrize("rtype", DATA_TYPES)
@pytest.mark.parametrize("cap,data", [
    (0, b""),
    (None, b"$ ls\r\n\x1b[0m"),                           # exact size, as the ring holds it
    (None, bytes(range(256))),
    (sshlog.BIG_CAP, b"x" * 300 + b"\xff\x00tail"),          # the whole scratch record
    (sshlog.BIG_CAP, bytes(range(256)) * 64),              # exactly BIG_CAP
], ids=["empty", "exact", "exact-256", "big", "big-full"])
def test_data_records(rtype, cap, data):
    rec = sshlog.decode_record(rec_data(rtype, data, len(data) if cap is None else cap))
    assert rec == sshlog.Data(rtype, 123456789, 1805, 2062, 9, data)
    assert isinstance(rec.data, bytes)


def test_data_len_beyond_buffer_is_rejected():
    raw = hdr(sshlog.REC_TTY_OUT, length=257) + struct.pack("<II", 9, 0) + b"x" * 256
    with pytest.raises(ValueError):
        sshlog.decode_record(raw)


def test_data_record_carries_the_lost_byte_count():
    raw = hdr(sshlog.REC_TTY_OUT, length=2) + struct.pack("<II", 9, 70000) + b"ok"
    rec = sshlog.decode_record(raw)
    assert (rec.data, rec.lost) == (b"ok", 70000)


def test_upload_open():
    path = b"/home/mapoo/a.tgz"
    raw = (hdr(sshlog.REC_UPLOAD_OPEN, length=len(path) + 1)
           + struct.pack("<iIII", 5, os.O_WRONLY | os.O_CREAT, 0o644, 0) + path.ljust(4096, b"\0"))
    assert sshlog.decode_record(raw) == sshlog.UploadOpen(
        123456789, 1805, 2062, 5, os.O_WRONLY | os.O_CREAT, 0o644, "/home/mapoo/a.tgz")


def test_upload_open_relative_invalid_utf8_path():
    raw = (hdr(sshlog.REC_UPLOAD_OPEN) + struct.pack("<iIII", 5, 1, 0o600, 0)
           + b"d\xe9j\xe0.txt".ljust(4096, b"\0"))
    assert sshlog.decode_record(raw).path == "d\\xe9j\\xe0.txt"


def test_upload_close():
    raw = hdr(sshlog.REC_UPLOAD_CLOSE) + struct.pack("<iIQ", 5, 0, 5 * 2 ** 32 + 7)
    assert sshlog.decode_record(raw) == sshlog.UploadClose(123456789, 1805, 2062, 5,
                                                           5 * 2 ** 32 + 7)


FULL_RECORDS = {
    sshlog.REC_CONNECT: rec_connect(socket.AF_INET, b"\x7f\0\0\x01"),
    sshlog.REC_EXEC: rec_exec(b"", argc=0)[:ctypes.sizeof(sshlog.RecExecHead)],
    sshlog.REC_EXIT: hdr(sshlog.REC_EXIT) + struct.pack("<iI", 0, 0),
    sshlog.REC_SETUID: hdr(sshlog.REC_SETUID) + struct.pack("<II", 1001, 0),
    sshlog.REC_PTY: hdr(sshlog.REC_PTY) + struct.pack("<II", 3, 7),
    sshlog.REC_WINSZ: hdr(sshlog.REC_WINSZ) + struct.pack("<HHI", 24, 80, 7),
    sshlog.REC_AUDIT: rec_data(sshlog.REC_AUDIT, b"", 0),
    sshlog.REC_TTY_OUT: rec_data(sshlog.REC_TTY_OUT, b"", 0),
    sshlog.REC_TTY_IN: rec_data(sshlog.REC_TTY_IN, b"", 0),
    sshlog.REC_STDOUT: rec_data(sshlog.REC_STDOUT, b"", 0),
    sshlog.REC_UPLOAD_OPEN: (hdr(sshlog.REC_UPLOAD_OPEN) + struct.pack("<iIII", 5, 1, 0, 0)
                             + b"\0" * 4096),
    sshlog.REC_UPLOAD_CLOSE: hdr(sshlog.REC_UPLOAD_CLOSE) + struct.pack("<iIQ", 5, 0, 1),
    sshlog.REC_BTMP: rec_data(sshlog.REC_BTMP, b"", 0),
}
if hasattr(sshlog, "REC_TTY_LOSS"):     # bytes lost at a connection's end (a rec_u32)
    FULL_RECORDS[sshlog.REC_TTY_LOSS] = hdr(sshlog.REC_TTY_LOSS) + struct.pack("<II", 4096, 0)


def test_every_record_type_has_a_crafted_sample():
    assert sorted(FULL_RECORDS) == sorted(PY_REC_TYPES.values())


@pytest.mark.parametrize("rtype", sorted(FULL_RECORDS))
def test_each_type_decodes_at_full_size_and_rejects_one_byte_less(rtype):
    raw = FULL_RECORDS[rtype]
    assert sshlog.decode_record(raw) is not None
    with pytest.raises(ValueError):
        sshlog.decode_record(raw[:-1])


@pytest.mark.parametrize("n", [0, 1, 23])
def test_shorter_than_header_raises_value_error(n):
    with pytest.raises(ValueError, match="short"):
        sshlog.decode_record(b"\x02" * n)


@pytest.mark.parametrize("rtype", [0, max(FULL_RECORDS) + 1, 99, 0xFFFFFFFF])
def test_unknown_type_raises_value_error(rtype):
    with pytest.raises(ValueError, match="unknown record type"):
        sshlog.decode_record(hdr(rtype) + b"\0" * 64)


RECORD_SIZES = sorted({len(r) for r in FULL_RECORDS.values()} | {288, 4128, 16416})


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.binary(max_size=400))
def test_decode_arbitrary_bytes_raises_only_value_error(raw):
    try:
        sshlog.decode_record(raw)
    except ValueError:
        pass


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rtype=st.integers(0, 15), pid=st.integers(0, 2 ** 32 - 1),
       length=st.one_of(st.integers(0, 20000), st.integers(0, 2 ** 32 - 1)),
       size=st.sampled_from(RECORD_SIZES), delta=st.integers(-9, 9),
       fill=st.binary(min_size=1, max_size=64))
def test_decode_plausible_headers_raise_only_value_error(rtype, pid, length, size, delta, fill):
    body_len = max(size + delta - 24, 0)
    body = (fill * (body_len // len(fill) + 1))[:body_len]
    try:
        rec = sshlog.decode_record(hdr(rtype, pid=pid, length=length) + body)
    except ValueError:
        return
    assert type(rec).__name__ in ("Connect", "Exec", "Exit", "Value", "Winsz", "Data",
                                  "UploadOpen", "UploadClose")
    assert rec.pid == pid


# ---------------------------------------------------------------------------------------
# BTF: a tiny hand-built blob, and the running kernel's.

class StrTab:
    def __init__(self):
        self.data = b"\0"

    def __call__(self, name):
        off = len(self.data)
        self.data += name.encode() + b"\0"
        return off


def btf_blob(kflag=False, exit_code_byte=1234):
    """header + types + strings, as in the kernel's Documentation/bpf/btf.rst."""
    s = StrTab()
    t = b""
    # [1] INT "int": btf_type + u32 encoding
    t += struct.pack("<III", s("int"), 1 << 24, 4) + struct.pack("<I", 32)
    # [2] ARRAY: btf_type + btf_array {type, index_type, nelems}
    t += struct.pack("<III", 0, 3 << 24, 0) + struct.pack("<III", 1, 1, 16)
    # [3] ENUM "state" with 2 values: btf_type + 2 x btf_enum {name_off, val}
    t += struct.pack("<III", s("state"), 6 << 24 | 2, 4)
    t += struct.pack("<Ii", s("RUNNING"), 0) + struct.pack("<Ii", s("STOPPED"), 4)
    # [4] FUNC_PROTO with one parameter: btf_type + btf_param {name_off, type}
    t += struct.pack("<III", 0, 13 << 24 | 1, 1) + struct.pack("<II", 0, 1)
    # [5] STRUCT "sock" holding a decoy exit_code at byte 8
    t += struct.pack("<III", s("sock"), 4 << 24 | 1, 16)
    t += struct.pack("<III", s("exit_code"), 1, 64)
    # [6] UNION "task_struct" (same name, other kind): must be skipped
    t += struct.pack("<III", s("task_struct"), 5 << 24 | 1, 4)
    t += struct.pack("<III", s("exit_code"), 1, 0)
    # [7] VAR + DATASEC with one entry (fixed 4 bytes; 12 per entry)
    t += struct.pack("<III", s("v"), 14 << 24, 1) + struct.pack("<I", 1)
    t += struct.pack("<III", s(".data"), 15 << 24 | 1, 4) + struct.pack("<III", 7, 0, 4)
    # [9] STRUCT "task_struct": state, exit_code, and a 1-bit field in_execve
    info = (1 << 31 if kflag else 0) | 4 << 24 | 3
    t += struct.pack("<III", s("task_struct"), info, 4096)
    t += struct.pack("<III", s("state"), 1, 0)
    t += struct.pack("<III", s("exit_code"), 1, exit_code_byte * 8)
    bitfield = (1 << 24 | (exit_code_byte + 6) * 8 + 3) if kflag else (exit_code_byte + 6) * 8 + 3
    t += struct.pack("<III", s("in_execve"), 1, bitfield)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(t), len(t), len(s.data))
    return header + t + s.data


@pytest.mark.parametrize("kflag", [False, True], ids=["plain", "kind_flag"])
def test_btf_member_offset_tiny_blob(tmp_path, kflag):
    path = tmp_path / "vmlinux"
    path.write_bytes(btf_blob(kflag=kflag))
    assert sshlog.btf_member_offset("task_struct", "exit_code", str(path)) == 1234
    assert sshlog.btf_member_offset("task_struct", "state", str(path)) == 0
    assert sshlog.btf_member_offset("task_struct", "in_execve", str(path)) == 1240
    assert sshlog.btf_member_offset("sock", "exit_code", str(path)) == 8
    assert sshlog.btf_member_offset("task_struct", "nope", str(path)) is None
    assert sshlog.btf_member_offset("mm_struct", "exit_code", str(path)) is None


def test_btf_missing_file_or_bad_magic_is_none(tmp_path):
    assert sshlog.btf_member_offset("task_struct", "exit_code", str(tmp_path / "none")) is None
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00" + btf_blob()[2:])
    assert sshlog.btf_member_offset("task_struct", "exit_code", str(bad)) is None


def test_btf_truncated_file_is_none(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(btf_blob()[:10])
    assert sshlog.btf_member_offset("task_struct", "exit_code", str(short)) is None


@pytest.mark.skipif(not os.access(sshlog.BTF_VMLINUX, os.R_OK),
                    reason="%s not readable" % sshlog.BTF_VMLINUX)
def test_btf_vmlinux_has_task_struct_exit_code():
    off = sshlog.btf_member_offset("task_struct", "exit_code")
    assert isinstance(off, int)
    assert 0 < off < 16384 and off % 4 == 0     # an int member inside task_struct
    assert sshlog.btf_member_offset("task_struct", "no_such_member_xyz") is None


def _fake_tracefs(tmp_path, group_dead):
    os.makedirs(str(tmp_path / "events" / "syscalls"))
    fmt = tmp_path / "events" / "sched" / "sched_process_exit"
    os.makedirs(str(fmt))
    fields = "\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n"
    if group_dead:
        fields += "\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n"
    (fmt / "format").write_text("name: sched_process_exit\nformat:\n" + fields)
    return str(tmp_path)


def test_probe_plan_flags(tmp_path):
    tracefs = _fake_tracefs(tmp_path / "t", group_dead=True)
    btf = tmp_path / "btf"
    btf.write_bytes(btf_blob(exit_code_byte=2468))
    plan = sshlog.probe_plan(tracefs=tracefs, btf=str(btf), argv_cap=4096, stdout_cap=100)
    assert plan.cflags == ("-DCTL_PAGES=1024", "-DTTY_PAGES=2048", "-DARGV_CAP=4096",
                           "-DSTDOUT_CAP=100", "-DCAPTURE_INPUT=0", "-DTRACK_MAX=65536",
                           "-DMERGE_SPAN_NS=10000000", "-DHAVE_GROUP_DEAD=1",
                           "-DOFF_EXIT_CODE=2468")
    assert plan.exit_code_offset == 2468 and plan.group_dead is True


def test_probe_plan_without_btf_or_group_dead(tmp_path):
    tracefs = _fake_tracefs(tmp_path / "t", group_dead=False)
    plan = sshlog.probe_plan(tracefs=tracefs, btf=str(tmp_path / "missing"))
    assert not any(f.startswith(("-DOFF_EXIT_CODE", "-DHAVE_GROUP_DEAD")) for f in plan.cflags)
    assert (plan.exit_code_offset, plan.group_dead) == (None, False)


@pytest.mark.parametrize("argv_cap", [1000, 128, 131072])
def test_probe_plan_rejects_bad_argv_cap(tmp_path, argv_cap):
    tracefs = _fake_tracefs(tmp_path / "t", group_dead=False)
    with pytest.raises(sshlog.ConfigError):
        sshlog.probe_plan(tracefs=tracefs, btf=str(tmp_path / "none"), argv_cap=argv_cap)


def test_probe_plan_without_tracefs_says_how_to_mount(tmp_path):
    with pytest.raises(sshlog.SshlogError, match="mount -t tracefs"):
        sshlog.probe_plan(tracefs=str(tmp_path / "none"))


# ---------------------------------------------------------------------------------------
# Audit message fields.

AUDIT_CASES = [
    # sshd (libaudit audit_log_acct_message), known user: acct quoted
    ('op=login acct="alice" exe="/usr/sbin/sshd" hostname=? addr=127.0.0.1 terminal=sshd '
     'res=failed',
     {"op": "login", "acct": "alice", "exe": "/usr/sbin/sshd", "hostname": "?",
      "addr": "127.0.0.1", "terminal": "sshd", "res": "failed"}),
    # unknown user: libaudit hex-encodes a value with a space, unquoted
    ('op=login acct=28696E76616C6964207573657229 exe="/usr/sbin/sshd" hostname=? addr=::1 '
     'terminal=sshd res=failed',
     {"acct": "(invalid user)", "addr": "::1", "res": "failed"}),
    # PAM (libpam's audit via sshd) for a password attempt
    ('op=PAM:authentication grantors=? acct="mallory" exe="/usr/sbin/sshd" '
     'hostname=203.0.113.9 addr=203.0.113.9 terminal=ssh res=failed',
     {"op": "PAM:authentication", "grantors": "?", "acct": "mallory",
      "hostname": "203.0.113.9", "res": "failed"}),
    # session open: no account name, the uid instead
    ('op=login id=1001 exe="/usr/sbin/sshd" hostname=? addr=? terminal=/dev/pts/4 res=success',
     {"op": "login", "id": "1001", "terminal": "/dev/pts/4", "res": "success"}),
    # a hex-encoded exe (path with a space) and invalid UTF-8 in a hex acct
    ('op=login acct=6361FE exe=2F6F707420782F73736864 res=failed',
     {"acct": "ca\\xfe", "exe": "/opt x/sshd"}),
]


@pytest.mark.parametrize("text,expected", AUDIT_CASES, ids=["acct-quoted", "acct-hex",
                                                            "pam", "session-open", "hex-exe"])
def test_parse_audit_fields(text, expected):
    fields = sshlog.parse_audit_fields(text)
    assert {k: fields.get(k) for k in expected} == expected


def test_parse_audit_fields_hex_acct_with_a_stray_space():
    # `acct=28696E76616C69642075736572 29` (the hex run broken by a space, as it sometimes
    # appears in hand-copied logs; libaudit itself never emits it): the hex run is decoded,
    # the stray `29` (no key) is ignored, the following fields still parse.
    fields = sshlog.parse_audit_fields(
        'op=login acct=28696E76616C69642075736572 29 exe="/usr/sbin/sshd" res=failed')
    assert fields["acct"] == "(invalid user"
    assert fields["exe"] == "/usr/sbin/sshd" and fields["res"] == "failed"


def test_parse_audit_fields_only_decodes_hex_for_encoded_keys():
    # terminal/addr/res are never hex-encoded: "beef" stays text there
    fields = sshlog.parse_audit_fields("terminal=beef addr=1234 acct=626F62")
    assert fields == {"terminal": "beef", "addr": "1234", "acct": "bob"}


def test_parse_audit_fields_hostname_is_never_hex_decoded():
    assert sshlog.parse_audit_fields("hostname=cafe res=failed")["hostname"] == "cafe"


# ---------------------------------------------------------------------------------------
# Terminal records of one drain are merged per session, order kept.

def _tty(sess, data, ts=1, lost=0, rtype=None):
    return sshlog.Data(rtype or sshlog.REC_TTY_OUT, ts, 7, sess, 10, data, lost)


def _ring(*recs, pad=3):
    """Records laid out as in a ring (here `pad` bytes apart): the buffer and
    the (start, length) of each."""
    buf, spans = b"", []
    for r in recs:
        raw = r if isinstance(r, bytes) else struct.pack(
            "<IIIIQiI", r.type, r.pid, r.sess, len(r.data), r.ts, r.fd, r.lost) + r.data
        buf += b"\xee" * pad
        spans.append((len(buf), len(raw)))
        buf += raw
    return buf, spans


def _merge(*recs, breaks=None, limit=sshlog.COALESCE_LIMIT):
    merged, errors = sshlog.merge_terminal(*_ring(*recs), breaks=breaks, limit=limit)
    assert errors == []
    return merged


def test_merge_joins_each_sessions_consecutive_output():
    # interleaved sessions each get one record, with the time of its first read
    assert _merge(_tty(1, b"a", ts=1), _tty(2, b"x", ts=2), _tty(1, b"b", ts=3),
                  _tty(2, b"y", ts=7), _tty(1, b"c", ts=8)) == [_tty(1, b"abc", ts=1),
                                                                _tty(2, b"xy", ts=2)]


def test_merge_splits_where_a_control_record_of_the_session_falls():
    recs = (_tty(1, b"a", ts=1), _tty(2, b"x", ts=2), _tty(1, b"b", ts=3),
            _tty(1, b"c", ts=6), _tty(2, b"y", ts=7))
    # session 2's exec at ts 5 splits only session 2's output
    assert _merge(*recs, breaks={2: [5]}) == [_tty(1, b"abc", ts=1), _tty(2, b"x", ts=2),
                                              _tty(2, b"y", ts=7)]
    # at the very time of a read the control record goes first (the sort is stable,
    # control records first): that read starts a new group
    assert _merge(*recs, breaks={1: [6]})[:2] == [_tty(1, b"ab", ts=1), _tty(2, b"xy", ts=2)]
    # before the first read or after the last: no split
    assert _merge(*recs, breaks={1: [1, 9], 2: [0]}) == _merge(*recs)


def test_merge_starts_a_group_at_a_loss_and_at_the_other_direction():
    recs = [_tty(1, b"a"), _tty(1, b"b", lost=4096), _tty(1, b"k", rtype=sshlog.REC_TTY_IN),
            _tty(1, b"c")]
    assert _merge(*recs) == recs


def test_merge_limit():
    out = _merge(*[_tty(1, b"x" * 100) for _ in range(5)], limit=250)
    assert [len(r.data) for r in out] == [200, 200, 100]


def test_merge_decodes_other_records_in_place_and_counts_bad_ones():
    exit_rec = struct.pack("<IIIIQiI", sshlog.REC_EXIT, 9, 1, 0, 4, 256, 0)
    buf, spans = _ring(_tty(1, b"a", ts=1), exit_rec, _tty(1, b"b", ts=5), b"\x01\x02",
                       struct.pack("<I", 99) + bytes(40), _tty(1, b"c", ts=6))
    merged, errors = sshlog.merge_terminal(buf, spans)
    # a non-terminal record ends the session's group, as a control record would
    assert merged == [_tty(1, b"a", ts=1), sshlog.Exit(4, 9, 1, 256, 0), _tty(1, b"bc", ts=5)]
    assert [str(e) for e in errors] == ["short record: 2 bytes", "unknown record type 99"]
    # a data record claiming more bytes than it has is refused, not read past its end
    short = struct.pack("<IIIIQiI", sshlog.REC_TTY_OUT, 7, 1, 50, 1, 10, 0) + b"abc"
    merged, errors = sshlog.merge_terminal(*_ring(short, _tty(1, b"d", ts=2)))
    assert merged == [_tty(1, b"d", ts=2)] and len(errors) == 1


def _merge_by_definition(recs, breaks, limit):
    """What merge_terminal must return, the slow way: put the control records
    where they fall in time (before reads of the same time), then walk
    everything in that order, growing each session's group while it can."""
    timeline = sorted([(b, 0, i, sess) for sess, times in breaks.items()
                       for i, b in enumerate(times)] +
                      [(r.ts, 1, i, r) for i, r in enumerate(recs)],
                      key=lambda x: (x[0], x[1], x[2]))
    out, open_group = [], {}
    for _ts, kind, _i, item in timeline:
        if kind == 0:
            open_group.pop(item, None)
            continue
        g = open_group.get(item.sess)
        if g is not None and out[g].type == item.type and not item.lost and \
                len(out[g].data) + len(item.data) <= limit:
            out[g] = out[g]._replace(data=out[g].data + item.data)
            continue
        open_group[item.sess] = len(out)
        out.append(item)
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from([sshlog.REC_TTY_OUT,
                                                             sshlog.REC_TTY_IN]),
                          st.binary(max_size=20), st.sampled_from([0, 0, 0, 5])),
                max_size=30),
       st.dictionaries(st.integers(1, 3), st.lists(st.integers(0, 32), max_size=3)),
       st.integers(1, 60))
def test_merge_matches_its_definition(reads, breaks, limit):
    recs = [_tty(sess, data, ts=i + 1, lost=lost, rtype=t)
            for i, (sess, t, data, lost) in enumerate(reads)]
    assert _merge(*recs, breaks=breaks, limit=limit) == \
        _merge_by_definition(recs, breaks, limit)
