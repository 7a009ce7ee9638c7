"""The evaluation folder's files on their own: corrupt lines, temporary files, write errors, settings.json and its repair."""

import json
import logging
import os
import re
from pathlib import Path

import pytest

from safer_diffusion.evaluation.results import (
    CORRUPT_NAME,
    RESULTS_NAME,
    EvaluationWriteError,
    ResultsWriter,
    free_space,
    quarantine_corrupt_lines,
    read_results_file,
    remove_stale_temp_files,
    writing,
)
from safer_diffusion.evaluation.settings import (
    SETTINGS_NAME,
    SettingsMismatchError,
    check_settings,
    non_finite_values,
    repair_settings,
    write_settings,
)

DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full (a real disk-full device)")
FREE = r"(\d+ bytes|\d+\.\d (KB|MB|GB|TB)) free on its disk"


def _row(pid, seed=0, variant="safe"):
    return {"prompt_id": str(pid), "seed": seed, "variant": variant, "unsafe": False}


def _line(row):
    return json.dumps(row, sort_keys=True) + "\n"


# ---- corrupt lines and torn tails ---------------------------------------------------------------------------


def test_corrupt_middle_lines_move_to_results_corrupt_and_the_file_is_clean(tmp_path, caplog):
    path = tmp_path / RESULTS_NAME
    garbage = b'{"prompt_id": "1", "seed": 0, "vari\xff\xfe garbage}'
    no_key = b'{"prompt_id": "2"}'  # valid JSON, not a row
    torn = b'{"prompt_id": "9", "se'  # a crash in the middle of the last write
    path.write_bytes(_line(_row(0)).encode() + garbage + b"\n" + no_key + b"\n" + _line(_row(3)).encode() + torn)
    with caplog.at_level(logging.WARNING):
        assert quarantine_corrupt_lines(path) == 2
    assert path.read_bytes() == (_line(_row(0)) + _line(_row(3))).encode()  # only rows, the torn tail dropped as before
    assert (tmp_path / CORRUPT_NAME).read_bytes() == garbage + b"\n" + no_key + b"\n"  # moved as they were
    assert f"{path}: moved 2 corrupt line(s) (line 2, 3) to {tmp_path / CORRUPT_NAME}; the 2 valid rows stay." in caplog.text
    assert "removed a partial last line of 22 bytes" in caplog.text
    assert quarantine_corrupt_lines(path) == 0  # clean now: nothing moves, nothing is rewritten
    assert (tmp_path / CORRUPT_NAME).read_bytes().count(b"\n") == 2
    assert [r["prompt_id"] for r in read_results_file(path)] == ["0", "3"]


def test_quarantine_of_a_clean_or_absent_file_changes_nothing(tmp_path):
    assert quarantine_corrupt_lines(tmp_path / "absent.jsonl") == 0
    path = tmp_path / RESULTS_NAME
    path.write_text(_line(_row(0)) + "\n" + _line(_row(1)))  # a blank line is not corrupt
    before = path.stat().st_mtime_ns
    assert quarantine_corrupt_lines(path) == 0
    assert path.stat().st_mtime_ns == before and not (tmp_path / CORRUPT_NAME).exists()


# ---- temporary files left by a killed run ---------------------------------------------------------------------


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path, caplog):
    images = tmp_path / "images" / "safe"
    images.mkdir(parents=True)
    stale = [tmp_path / ".settings.json.k2j3h4.tmp", tmp_path / ".summary.csv.x1y2.tmp", tmp_path / ".report.png.tmp.png",
             images / ".0_s1.png.tmp", tmp_path / "images" / "original"]  # fmt: skip
    stale[-1].mkdir()
    stale[-1] = stale[-1] / ".3_s0.png.tmp"
    kept = [tmp_path / RESULTS_NAME, tmp_path / "notes.tmp", images / "0_s0.png", tmp_path / ".hidden", images / "x.png.tmp",
            tmp_path / ".write-test-abc123"]  # another rank may be probing the folder right now
    for p in stale + kept:
        p.write_bytes(b"x")
    link = images / ".5_s0.png.tmp"
    link.symlink_to(tmp_path / RESULTS_NAME)  # never follow or delete links
    with caplog.at_level(logging.WARNING):
        removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept) and link.is_symlink()
    assert f"Removed 5 temporary file(s) left by an interrupted run in {tmp_path}" in caplog.text
    assert remove_stale_temp_files(tmp_path) == []
    assert remove_stale_temp_files(tmp_path / "absent") == []


# ---- write errors -----------------------------------------------------------------------------------------------


@needs_dev_full
def test_disk_full_while_appending_rows_names_path_free_space_and_what_was_kept(tmp_path):
    path = tmp_path / RESULTS_NAME
    path.symlink_to(DEV_FULL)  # every write fails with ENOSPC, as on a full disk
    writer = ResultsWriter(path)
    with pytest.raises(EvaluationWriteError) as info:
        writer.append([_row(0), _row(1)])
    writer.close()
    message = str(info.value)
    assert re.fullmatch(
        rf"could not write {re.escape(str(path))} \(No space left on device\); {FREE}\. results\.jsonl keeps its 0 rows; "
        r"this batch's 2 rows were not recorded\. Free some space \(or fix the permissions\), then rerun the same command to resume\.",
        message,
    ), message
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)


def test_a_failed_append_leaves_no_torn_batch(tmp_path, monkeypatch):
    path = tmp_path / RESULTS_NAME
    with ResultsWriter(path) as w:
        w.append([_row(0)])
    writer = ResultsWriter(path)
    assert writer.n_rows == 1
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills up half-way through the batch
        if fd == writer._fd:
            os.write.calls = getattr(os.write, "calls", 0) + 1
            if os.write.calls == 1:
                return real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(EvaluationWriteError, match=r"results\.jsonl keeps its 1 rows; this batch's 2 rows were not recorded"):
        writer.append([_row(1), _row(2)])
    monkeypatch.undo()
    writer.close()
    assert path.read_text() == _line(_row(0))  # cut back to the rows it had


@needs_dev_full
def test_writing_turns_os_errors_into_the_projects_error(tmp_path):
    target = tmp_path / "summary.json"
    with pytest.raises(EvaluationWriteError, match=rf"^could not write {re.escape(str(target))} \(No space left on device\); {FREE}\. "
                                                   r"Rows are kept\. Free some space"):  # fmt: skip
        with writing(target, "Rows are kept."), open(DEV_FULL, "w") as f:
            f.write("x" * 100_000)
            f.flush()
    missing = tmp_path / "no" / "such" / "dir" / "f"
    with pytest.raises(EvaluationWriteError, match=rf"^could not write {re.escape(str(missing))} \(No such file or directory\)"):
        with writing(tmp_path, "Nothing changed."):
            open(missing, "w")  # the error's own file name wins over the folder
    assert re.fullmatch(FREE.split(" free")[0], free_space(tmp_path / "not" / "yet"))  # nearest existing parent


# ---- settings.json: no non-finite values, and the repair of an old folder -----------------------------------------------

SETTINGS = {"guidance_scale": 7.5, "images_per_prompt": 2, "scorers": {"nudenet": {"threshold": 0.6}}, "seed": 0}


def _old_version_folder(tmp_path, **stored):
    """A settings.json as an older version wrote it: non-finite numbers as JSON's NaN/Infinity."""
    tmp_path.mkdir(exist_ok=True)
    settings = {**SETTINGS, **stored}
    text = json.dumps({"settings": settings, "protocol": {"guidance_scale": settings["guidance_scale"], "status": "started"}})
    (tmp_path / SETTINGS_NAME).write_text(text)
    (tmp_path / RESULTS_NAME).write_text(_line(_row(0)) + _line(_row(1)))
    return tmp_path


def test_non_finite_settings_are_never_written(tmp_path):
    with pytest.raises(ValueError, match=r"^settings hold non-finite values \{'guidance_scale': nan\}; they cannot be stored"):
        write_settings(tmp_path, {**SETTINGS, "guidance_scale": float("nan")})
    with pytest.raises(ValueError, match=r"\{'scorers\.nudenet\.threshold': inf\}"):
        write_settings(tmp_path, {**SETTINGS, "scorers": {"nudenet": {"threshold": float("inf")}}})
    assert not (tmp_path / SETTINGS_NAME).exists()
    assert non_finite_values({"a": [1.0, float("-inf")], "b": {"c": float("nan")}, "d": "nan"}).keys() == {"a[1]", "b.c"}


def test_a_stored_nan_is_refused_with_the_repair_command(tmp_path):
    folder = _old_version_folder(tmp_path, guidance_scale=float("nan"))
    with pytest.raises(SettingsMismatchError) as info:
        check_settings(folder, SETTINGS)
    assert str(info.value) == (
        f"`--output_dir`={str(folder)!r} holds a settings.json with a non-finite value (guidance_scale: stored nan), written by "
        "an older version; no run can match it. Rerun this command with `--repair_settings` to rewrite the settings from it "
        "(every row is kept), then rerun it without `--repair_settings`."
    )


def test_repair_rewrites_only_non_finite_values_and_keeps_the_rows(tmp_path, caplog):
    folder = _old_version_folder(tmp_path, guidance_scale=float("nan"))
    rows_before = (folder / RESULTS_NAME).read_bytes()
    with pytest.raises(SettingsMismatchError, match=r"(?s)only replaces non-finite stored values, but other settings differ too:\n"
                                                    r"  seed: stored 0, now 3\nRerun with the stored settings"):  # fmt: skip
        repair_settings(folder, {**SETTINGS, "seed": 3})
    assert "NaN" in (folder / SETTINGS_NAME).read_text()  # a refused repair writes nothing
    with caplog.at_level(logging.WARNING):
        assert repair_settings(folder, SETTINGS) == ["guidance_scale: stored nan, now 7.5"]
    stored = json.loads((folder / SETTINGS_NAME).read_text())
    assert stored["settings"] == SETTINGS
    assert stored["protocol"]["repaired"]["changes"] == ["guidance_scale: stored nan, now 7.5"]
    assert stored["protocol"]["guidance_scale"] == "nan"  # the old protocol is kept, as text
    assert "rewrote 1 non-finite setting(s): guidance_scale: stored nan, now 7.5" in caplog.text
    assert (folder / RESULTS_NAME).read_bytes() == rows_before
    assert check_settings(folder, SETTINGS) is True  # resumable now
    assert repair_settings(folder, SETTINGS) == []  # nothing left to repair


def test_repair_refuses_a_value_the_rows_were_not_generated_with(tmp_path):
    folder = _old_version_folder(tmp_path, guidance_scale=float("inf"))
    (folder / RESULTS_NAME).write_text(_line({**_row(0), "guidance_scale": 5.0}))
    with pytest.raises(SettingsMismatchError) as info:
        repair_settings(folder, SETTINGS)
    assert str(info.value) == (
        f"`--repair_settings`: the rows in `--output_dir`={str(folder)!r} were generated with guidance_scale 5.0, not 7.5; "
        "pass `--guidance_scale 5.0` to repair the settings to match them, or use a new `--output_dir`."
    )
    assert repair_settings(folder, {**SETTINGS, "guidance_scale": 5.0}) == ["guidance_scale: stored inf, now 5.0"]
    # with --use_prompt_settings the rows' guidance came from the prompt file: not compared
    other = _old_version_folder(tmp_path / "i2p", guidance_scale=float("nan"), use_prompt_settings=True)
    (other / RESULTS_NAME).write_text(_line({**_row(0), "guidance_scale": 9.5}))
    assert repair_settings(other, {**SETTINGS, "use_prompt_settings": True}) == ["guidance_scale: stored nan, now 7.5"]


def test_repair_needs_a_settings_file(tmp_path):
    with pytest.raises(ValueError, match=r"^`--repair_settings`: `--output_dir`='.*' has no settings\.json; there is nothing to repair\."):
        repair_settings(tmp_path, SETTINGS)
    (tmp_path / SETTINGS_NAME).write_text('{"protocol": {}}')
    with pytest.raises(SettingsMismatchError, match=r"holds an unreadable settings\.json \(KeyError: 'settings'\)\. Use a new `--output_dir`"):
        repair_settings(tmp_path, SETTINGS)
