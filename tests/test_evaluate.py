"""`safer-diffusion evaluate`: argument validation, sharding, seeds and batching (no model is loaded here)."""

import subprocess
import sys
from pathlib import Path

import pytest

from safer_diffusion import evaluate as ev
from safer_diffusion.evaluation.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "evaluation"
MILD = ROOT / "assets" / "prompts" / "mild_unsafe.csv"


def _argv(tmp_path, *extra, prompts=MILD):
    return ["--tiny", "--prompts", str(prompts), "--out", str(tmp_path / "out"), *extra]


def test_valid_arguments_build_a_config(tmp_path):
    cfg = ev.config_from_args(_argv(tmp_path, "--compare-original", "--scorers", "nudenet", "--thresholds", "nudenet=0.45",
                                    "--categories", "violence,shocking", "--limit", "3", "--images-per-prompt", "2"))
    assert cfg.variants == ("original", "safe")
    assert cfg.thresholds == {"nudenet": 0.45} and cfg.categories == ["violence", "shocking"] and cfg.limit == 3
    assert (tmp_path / "out").is_dir()
    assert ev.config_from_args(_argv(tmp_path)).variants == ("safe",)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--images-per-prompt", "0"], r"`--images-per-prompt` must be a positive integer, got 0"),
        (["--images-per-prompt", "-2"], r"`--images-per-prompt` must be a positive integer, got -2"),
        (["--batch-size", "0"], r"`--batch-size` must be a positive integer"),
        (["--num-inference-steps", "0"], r"`--num-inference-steps` must be a positive integer"),
        (["--limit", "0"], r"`--limit` must be a positive number"),
        (["--height", "100"], r"`--height` must be a positive multiple of 8, got 100"),
        (["--bootstrap", "-1"], r"`--bootstrap` must be >= 0"),
        (["--scorers", "nudenet,nsfw_detector"], r"`--scorers`: unknown scorer\(s\) \['nsfw_detector'\]; valid names are \['nudenet', 'q16', 'safety_checker'\]"),
        (["--scorers", " , "], r"`--scorers` is empty"),
        (["--scorers", "q16"], r"q16, which needs `--q16-prompts PATH`"),
        (["--thresholds", "nudenet"], r"`--thresholds`: 'nudenet' is not NAME=VALUE"),
        (["--thresholds", "q16=0.5"], r"`--thresholds`: 'q16' is not one of the `--scorers` \['nudenet'\]"),
        (["--thresholds", "nudenet=high"], r"`--thresholds`: nudenet='high' is not a number"),
        (["--thresholds", "nudenet=1.5"], r"`--thresholds`: nudenet=1.5 must be in \[0, 1\]"),
        (["--base", "some/model"], r"`--tiny` builds its own tiny models"),
        (["--categories", "violence,sexual"], r"`--categories`: \['sexual'\] not found.*present are \['illegal activity', 'self-harm', 'shocking', 'violence'\]"),
    ],
)
def test_bad_arguments(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        ev.config_from_args(_argv(tmp_path, *extra))


def test_threshold_for_scorer_without_threshold(tmp_path):
    with pytest.raises(ValueError, match=r"the 'safety_checker' scorer has no threshold"):
        ev.config_from_args(_argv(tmp_path, "--scorers", "nudenet,safety_checker", "--thresholds", "safety_checker=0.5"))


def test_bad_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`--prompts`=.*missing.csv' does not exist"):
        ev.config_from_args(_argv(tmp_path, prompts=tmp_path / "missing.csv"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"`--prompts`=.*empty.csv' is empty"):
        ev.config_from_args(_argv(tmp_path, prompts=empty))
    with pytest.raises(ValueError, match=r"no recognised prompt column: its columns are \['description', 'label'\]"):
        ev.config_from_args(_argv(tmp_path, prompts=FIXTURES / "no_prompt_column.csv"))


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"`--out`=.*a_file/out' is not a writable folder.*Choose a folder you can write to"):
        ev.config_from_args(["--tiny", "--prompts", str(MILD), "--out", str(blocker / "out")])


def test_main_reports_bad_input_on_stderr_with_status_2(tmp_path, capsys):
    assert ev.main(_argv(tmp_path, "--images-per-prompt", "0")) == 2
    err = capsys.readouterr().err
    assert "safer-diffusion evaluate: error: `--images-per-prompt` must be a positive integer, got 0." in err


def test_module_help_runs():
    proc = subprocess.run([sys.executable, "-m", "safer_diffusion.evaluate", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--prompts", "--compare-original", "--images-per-prompt", "--use-prompt-settings", "--scorers", "--thresholds",
                 "--save-images", "--tiny", "--batch-size", "--negative-prompt"):
        assert flag in proc.stdout


# ---- sharding, seeds, batching ------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shards_partition_the_prompts(world_size):
    records = load_prompts(MILD)
    shards = [ev.shard(records, r, world_size) for r in range(world_size)]
    ids = [p.prompt_id for s in shards for p in s]
    assert sorted(ids, key=int) == [r.prompt_id for r in records]  # every prompt exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    with pytest.raises(ValueError, match="`rank` must be in"):
        ev.shard(records, world_size, world_size)


def test_work_items_seeds_and_resume_skips(tmp_path):
    cfg = ev.config_from_args(_argv(tmp_path, "--compare-original", "--images-per-prompt", "3", "--seed", "10", "--limit", "2"))
    records = load_prompts(MILD, limit=2)
    items, skipped = ev.make_work_items(records, cfg, 64, 64, done=set())
    assert skipped == 0 and len(items) == 6
    assert [(it.record.prompt_id, it.seed) for it in items] == [("0", 10), ("0", 11), ("0", 12), ("1", 10), ("1", 11), ("1", 12)]
    assert all(it.variants == ("original", "safe") and (it.height, it.width, it.guidance_scale) == (64, 64, 7.5) for it in items)
    done = {("0", 10, "original"), ("0", 10, "safe"), ("0", 11, "safe")}
    items, skipped = ev.make_work_items(records, cfg, 64, 64, done=done)
    assert skipped == 1
    assert [(it.record.prompt_id, it.seed, it.variants) for it in items][:2] == [("0", 11, ("original",)), ("0", 12, ("original", "safe"))]


def test_work_items_use_prompt_settings(tmp_path):
    records = load_prompts(FIXTURES / "i2p_sample.csv", limit=2)
    cfg = ev.config_from_args(_argv(tmp_path, "--use-prompt-settings", "--images-per-prompt", "2", prompts=FIXTURES / "i2p_sample.csv"))
    items, _ = ev.make_work_items(records, cfg, 64, 64, done=set())
    assert [(it.seed, it.guidance_scale, it.width, it.height) for it in items] == [
        (1234, 7.0, 32, 32), (1235, 7.0, 32, 32), (42, 9.5, 40, 32), (43, 9.5, 40, 32)]
    batches = ev.make_batches(items, batch_size=4)  # different guidance/size never share a batch
    assert [[it.seed for it in b] for b in batches] == [[1234, 1235], [42, 43]]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,sd_image_width,sd_image_height\na cat,100,64\n")
    cfg_bad = ev.config_from_args(_argv(tmp_path, "--use-prompt-settings", prompts=bad))
    with pytest.raises(ValueError, match=r"prompt '0': image size 100x64 .* not a positive multiple of 8"):
        ev.make_work_items(load_prompts(bad), cfg_bad, 64, 64, done=set())


def test_batches_respect_batch_size_and_order(tmp_path):
    cfg = ev.config_from_args(_argv(tmp_path, "--images-per-prompt", "5", "--limit", "1"))
    items, _ = ev.make_work_items(load_prompts(MILD, limit=1), cfg, 64, 64, done=set())
    assert [[it.seed for it in b] for b in ev.make_batches(items, 2)] == [[0, 1], [2, 3], [4]]


def test_initial_latents_do_not_depend_on_the_batch():
    import torch

    class _Pipe:  # the two attributes initial_latents reads
        class unet:
            class config:
                in_channels = 4

        vae_scale_factor = 8

    from safer_diffusion.evaluation.worker import WorkItem

    rec = load_prompts(MILD, limit=1)[0]
    items = [WorkItem(rec, i, 100 + i, 7.5, 64, 64, ("safe",)) for i in range(3)]
    together = ev.initial_latents(_Pipe, items, torch.float32, "cpu")
    alone = torch.cat([ev.initial_latents(_Pipe, [it], torch.float32, "cpu") for it in items])
    assert together.shape == (3, 4, 8, 8)
    assert torch.equal(together, alone)
    assert not torch.equal(together[0], together[1])
    assert torch.equal(together[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(100)))
