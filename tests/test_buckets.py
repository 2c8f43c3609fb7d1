import pytest

from qwen3vl_compile.buckets import parse_bucket, parse_buckets
from qwen3vl_compile.cli import main
from qwen3vl_compile.errors import UsageError


def test_square_and_rectangular():
    b = parse_bucket("448")
    assert (b.height, b.width, b.grid_thw, b.num_tokens) == (448, 448, (1, 28, 28), 196)
    r = parse_bucket("448x672")
    assert (r.height, r.width, r.grid_thw, r.name) == (448, 672, (1, 28, 42), "448x672")
    assert [x.name for x in parse_buckets("224, 448,448x672")] == ["224", "448", "448x672"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("225", "nearest valid: 224 or 256"),
        ("448x650", "nearest valid: 640 or 672"),
        ("0", "positive multiple of 32"),
        ("-32", "positive"),
        ("abc", "not a size"),
        ("224,,448", "no empty entries"),
        ("", "no empty entries"),
        ("224,224", "repeats"),
        ("448,448x448", "repeats"),
        ("32x", "not a size"),
        ("10", "nearest valid: 32"),
    ],
)
def test_bad_bucket_strings(text, fragment):
    with pytest.raises(UsageError) as e:
        parse_buckets(text)
    assert fragment in str(e.value)
    assert e.value.exit_code == 2


def test_cli_exits_2_on_bad_bucket(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", "tiny-random", "--buckets", "300", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nearest valid: 288 or 320" in err and "\n" == err[-1] and err.count("\n") == 1
    assert not out.exists()


def test_cli_exits_2_on_unknown_precision(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--precision", "int3", "-o", str(tmp_path / "o")])
    assert e.value.code == 2
