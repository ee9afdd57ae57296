import pytest

from hetero.errors import HeteroError
from hetero.sizes import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("300KB", 300_000), ("1.5GiB", int(1.5 * 2**30)),
    ("200mb", 200 * 10**6), ("4G", 4 * 2**30), (" 12 MB ", 12 * 10**6), ("1024", 1024), (4096, 4096), (None, None),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "12XB", "-5MB", "1e9", "8 G B", -1, True])
def test_parse_size_rejects_nonsense_with_a_clear_message(bad):
    with pytest.raises(HeteroError, match="--ram"):
        parse_size(bad, "--ram")


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(3 * 2**30) == "3.0 GiB"
    assert format_size(None) == "-"
