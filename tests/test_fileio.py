"""`read_jsonl`: the one JSON Lines reader shared by the training data and the prompt readers."""

import pytest

from safer_diffusion.fileio import probe_writable_dir, read_jsonl


def test_reads_objects_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2, "b": "x"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2, "b": "x"}]


@pytest.mark.parametrize(
    "text,argument,match",
    [
        ('{"a": 1}\n{"a": \n', None, r"rows\.jsonl:2 is not valid JSON"),
        ('{"a": 1}\n[1, 2]\n', None, r"rows\.jsonl:2 is a JSON list, expected an object"),
        ('{"a": 1}\n{"a": \n', "--prompts", r"`--prompts`='.*rows\.jsonl': line 2 is not valid JSON"),
        ('"just a string"\n', "--prompts", r"line 1 is a JSON str, expected an object"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path, text, argument, match):
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_jsonl(path, argument=argument)


def test_probe_writable_dir_creates_and_leaves_nothing(tmp_path):
    folder = probe_writable_dir(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_probe_writable_dir_raises_oserror_for_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        probe_writable_dir(blocker / "sub")


def test_atomic_write_text_replaces_whole_and_leaves_no_temp(tmp_path):
    from safer_diffusion.fileio import atomic_write_text

    target = tmp_path / "out.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_check_writable_dir_leaves_nothing_behind(tmp_path):
    from safer_diffusion.fileio import check_writable_dir

    assert check_writable_dir(tmp_path / "new" / "run", "--output_dir") == tmp_path / "new" / "run"
    assert list(tmp_path.iterdir()) == []  # folders made only for the probe are removed
    check_writable_dir(tmp_path / "kept", "--output_dir", keep_created=True)
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_check_writable_dir_names_the_argument(tmp_path):
    from safer_diffusion.fileio import check_writable_dir
    from safer_diffusion.options import BadInputError

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(BadInputError, match=r"^`--output_dir` '.*a_file' is a file, not a folder; pass a folder path\.$"):
        check_writable_dir(blocker, "--output_dir")
    with pytest.raises(BadInputError, match=r"^`--cache_dir` '.*a_file/sub' cannot be created: '.*a_file' is a file"):
        check_writable_dir(blocker / "sub", "--cache_dir")


def test_check_writable_dir_reports_an_unwritable_folder(tmp_path, monkeypatch):
    import errno

    from safer_diffusion import fileio
    from safer_diffusion.options import BadInputError

    def denied(folder):  # permissions do not bind root, so a read-only folder is simulated
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    monkeypatch.setattr(fileio, "probe_writable_dir", denied)
    with pytest.raises(BadInputError, match=r"is not a writable folder \(Permission denied\); pass a folder you can write to"):
        fileio.check_writable_dir(tmp_path / "ro", "--output_dir")


def test_check_output_file(tmp_path):
    from safer_diffusion.fileio import check_output_file
    from safer_diffusion.options import BadInputError

    assert check_output_file(tmp_path / "d" / "x.png", "--output", suffixes=("", ".png")) == tmp_path / "d" / "x.png"
    assert not (tmp_path / "d").exists()  # nothing is created by the check
    with pytest.raises(BadInputError, match=r"is a directory; pass a file path such as '.*results\.json'"):
        check_output_file(tmp_path, "--output")
    with pytest.raises(BadInputError, match=r"^`--output` '.*x\.jpg' must end in no suffix, '\.png'; rename it\.$"):
        check_output_file(tmp_path / "x.jpg", "--output", suffixes=("", ".png"))


def test_check_writable_dir_require_empty(tmp_path):
    from safer_diffusion.fileio import check_writable_dir
    from safer_diffusion.options import BadInputError

    check_writable_dir(tmp_path, "--output_dir", require_empty=True)  # empty: fine
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(BadInputError, match=r"exists and is not empty; choose a new folder or delete it\.$"):
        check_writable_dir(tmp_path, "--output_dir", require_empty=True)
    check_writable_dir(tmp_path, "--output_dir")  # without the flag a folder with files is fine
