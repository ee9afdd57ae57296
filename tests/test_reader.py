"""The reader: aligned buffers, short reads at EOF, concurrent submits, errors, and the Python fallback."""

import os
import random
import zlib

import pytest
import torch

from hetero.flash import reader as rd

READERS = ["python"] + (["native"] if rd._LIB is not None else [])


@pytest.fixture(params=READERS)
def reader(request):
    r = rd.NativeReader() if request.param == "native" else rd.PythonReader()
    yield r
    r.close()


@pytest.fixture
def data(tmp_path):
    """A file of 5 pages and 100 bytes (its end is not aligned), and its bytes."""
    blob = os.urandom(5 * 4096 + 100)
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    return path, blob


def test_the_native_reader_is_built():
    # CI installs with a compiler; a missing extension there is a build problem, not a fallback
    if os.environ.get("CI"):
        assert rd._LIB is not None


@pytest.mark.parametrize("n", [1, 4095, 4096, 3 * 4096 + 7, 2**20, 3 * 2**20 + 5, 70 * 2**20])
def test_buffers_are_page_aligned(n):
    b = rd.aligned_empty(n)
    assert b.data_ptr() % rd.ALIGN == 0 and b.numel() == n and b.dtype == torch.uint8
    b[-1] = 7  # writable to the last byte


@pytest.mark.parametrize("n", [5 * 2**20 + 100, 8 * 2**20])
def test_a_large_buffer_holds_no_more_memory_than_asked_for(n):
    # its mapping asks for huge pages, but only whole ones below n: what the accountant counts is held
    b = rd.aligned_empty(n)
    b.fill_(1)
    rss_kb = _mapping_rss_kb(b.data_ptr())
    assert rss_kb is not None and rss_kb * 1024 <= -(-n // rd.ALIGN) * rd.ALIGN


def _mapping_rss_kb(addr: int):
    """Rss of the mapping holding `addr`, from /proc/self/smaps (None if not found)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    return None


def test_reads_and_checksums_match_the_file(reader, data):
    path, blob = data
    fd, _direct = rd.open_file(path)
    try:
        buf = rd.aligned_empty(2 * 4096)
        r = reader.wait(reader.submit(fd, buf, 4096, checksum=True))
        assert r.nbytes == 8192 and bytes(buf.numpy()) == blob[4096:12288]
        assert r.crc == zlib.crc32(blob[4096:12288]) and r.done_ns >= r.start_ns
        r = reader.wait(reader.submit(fd, buf, 0))
        assert r.crc == 0  # not asked for
    finally:
        os.close(fd)


def test_short_read_at_end_of_file(reader, data):
    path, blob = data
    fd, _ = rd.open_file(path)
    try:
        buf = rd.aligned_empty(4 * 4096)
        r = reader.wait(reader.submit(fd, buf, 4 * 4096, checksum=True))  # 4196 bytes are left
        assert r.nbytes == 4096 + 100 and bytes(buf[:r.nbytes].numpy()) == blob[4 * 4096:]
        assert r.crc == zlib.crc32(blob[4 * 4096:])
        r = reader.wait(reader.submit(fd, buf, 8 * 4096))  # past the end
        assert r.nbytes == 0
    finally:
        os.close(fd)


def test_concurrent_submits(reader, data):
    path, blob = data
    fd, _ = rd.open_file(path)
    rng = random.Random(0)
    try:
        jobs = []
        for _ in range(64):
            page = rng.randrange(5)
            buf = rd.aligned_empty(4096)
            jobs.append((reader.submit(fd, buf, page * 4096, checksum=True), page, buf))
        rng.shuffle(jobs)
        for h, page, buf in jobs:
            r = reader.wait(h)
            assert r.nbytes == 4096 and bytes(buf.numpy()) == blob[page * 4096:(page + 1) * 4096]
            assert r.crc == zlib.crc32(blob[page * 4096:(page + 1) * 4096])
    finally:
        os.close(fd)


def test_poll_says_when_a_read_is_done(reader, data):
    path, _ = data
    fd, _ = rd.open_file(path)
    try:
        h = reader.submit(fd, rd.aligned_empty(4096), 0)
        for _ in range(100000):
            if reader.poll(h):
                break
        assert reader.poll(h)
        assert reader.wait(h).nbytes == 4096
    finally:
        os.close(fd)


def test_a_failed_read_raises_oserror(reader, data):
    path, _ = data
    fd, _ = rd.open_file(path)
    os.close(fd)  # now a bad descriptor
    with pytest.raises(OSError):
        reader.wait(reader.submit(fd, rd.aligned_empty(4096), 0))


def test_native_crc32_is_zlibs():
    if rd._LIB is None:
        pytest.skip("native reader not built")
    for n in (0, 1, 7, 8, 9, 4096, 100003):
        b = os.urandom(n)
        buf = torch.frombuffer(bytearray(b), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        assert rd._LIB.hr_crc32(0, buf.data_ptr(), n) == zlib.crc32(b)


def test_fallback_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(rd, "_LIB", None)
    monkeypatch.setattr(rd, "_said", set())
    with pytest.warns(RuntimeWarning, match="pure-Python reader"):
        r = rd.make_reader()
    assert isinstance(r, rd.PythonReader)
    r.close()
    with pytest.raises(RuntimeError):
        rd.make_reader(native=True)


def test_buffered_fallback_where_o_direct_is_refused(monkeypatch, data):
    path, blob = data
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real = os.open

    def refuse(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(p, flags, *a)

    monkeypatch.setattr(os, "open", refuse)
    monkeypatch.setattr(rd, "_said", set())
    with pytest.warns(RuntimeWarning, match="refuses O_DIRECT"):
        fd, direct = rd.open_file(path)
    assert not direct
    r = rd.PythonReader()
    buf = rd.aligned_empty(4096)
    assert r.wait(r.submit(fd, buf, 0)).nbytes == 4096 and bytes(buf.numpy()) == blob[:4096]
    r.close()
    os.close(fd)


@pytest.mark.skipif(rd._LIB is None, reason="the native reader is not built")
def test_an_urgent_read_goes_ahead_of_the_queued_ones(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(16 * 2**22))  # 16 reads of 4 MiB: a queue that takes a while to drain
    r = rd.NativeReader(threads=1)
    fd = os.open(path, os.O_RDONLY)
    try:
        bufs = [rd.aligned_empty(2**22) for _ in range(17)]
        normal = [r.submit(fd, bufs[i], i * 2**22) for i in range(16)]
        urgent = r.submit(fd, bufs[16], 0, urgent=True)
        starts = {h: r.wait(h).start_ns for h in normal + [urgent]}
    finally:
        os.close(fd)
        r.close()
    later = [h for h in normal if starts[h] > starts[urgent]]
    assert len(later) >= 8  # one worker: the urgent read ran before most of what was queued before it
    assert bytes(bufs[16].numpy()) == bytes(bufs[0].numpy())
