"""`--suite NAME`: the registry, each suite's reader on a fixture in its public layout, offline errors, layout checks."""

from pathlib import Path

import pytest

from safer_diffusion.evaluation.cli import main
from safer_diffusion.evaluation.config import config_from_args
from safer_diffusion.evaluation.prompts import read_prompt_file
from safer_diffusion.evaluation.suites import SUITES, get_suite, suite_file
from safer_diffusion.hub import HubUnavailableError
from safer_diffusion.options import BadInputError

FIXTURES = Path(__file__).parent / "fixtures" / "suites"
NAMES = ["i2p", "i2p-sexual", "unlearndiffatk-nudity", "ring-a-bell", "mma-diffusion", "p4d", "sneakyprompt", "nsfwcaps", "coco"]
# suite -> (fixture in its layout, expected ids, expected first prompt prefix, categories present)
LAYOUTS = {
    "i2p": ("i2p_benchmark.csv", ["0", "1", "2", "3"], "a soldier", {"violence", "sexual", "shocking", "harassment"}),
    "i2p-sexual": ("i2p_benchmark.csv", ["1", "3"], "a swimmer", {"sexual"}),
    "unlearndiffatk-nudity": ("unlearndiffatk_nudity.csv", ["21", "296", "541", "673", "1011"], "a painting of an empty room",
                              {"self-harm", "shocking", "violence", "sexual"}),
    "ring-a-bell": ("ring_a_bell.csv", ["0", "1"], "The painting depicted", {"uncategorized"}),
    "mma-diffusion": ("mma_diffusion.csv", ["0", "1"], "decent lady", {"uncategorized"}),
    "p4d": ("des_prompts.csv", ["0", "1"], "A tall man", {"uncategorized"}),
    "sneakyprompt": ("des_prompts.csv", ["0", "1"], "A tall man", {"uncategorized"}),
    "nsfwcaps": ("nsfwcaps.csv", ["0", "1"], "A vase of white flowers next to", {"illegal activity", "harassment"}),
    "coco": ("coco_10k.csv", ["000000203564", "000000179765", "000000322141"], "A bicycle", {"uncategorized"}),
}  # fmt: skip


def _argv(tmp_path, *extra):
    return ["--tiny", "--output_dir", str(tmp_path / "out"), *extra]


def test_the_registry_knows_every_suite_and_its_protocol():
    from safer_diffusion.evaluation.protocols import PROTOCOLS

    assert list(SUITES) == NAMES
    for s in SUITES.values():
        assert s.protocol in PROTOCOLS and s.images_per_prompt >= 1 and s.prompt_column in s.required_columns
        assert s.source.startswith(("hf-dataset:", "https://")) and s.paper
    assert (SUITES["i2p"].source, SUITES["i2p"].file, SUITES["i2p"].images_per_prompt) == ("hf-dataset:AIML-TUDA/i2p", "i2p_benchmark.csv", 10)
    assert SUITES["i2p-sexual"].categories == ("sexual",) and SUITES["unlearndiffatk-nudity"].protocol == "nudity-0.45"
    assert SUITES["unlearndiffatk-nudity"].seed_column == "evaluation_seed" and SUITES["coco"].id_column == "case_number"


@pytest.mark.parametrize("name", NAMES)
def test_each_suite_reads_a_local_copy_in_its_layout(tmp_path, name):
    fixture, ids, prefix, categories = LAYOUTS[name]
    cfg = config_from_args(_argv(tmp_path, "--suite", name, "--prompts", str(FIXTURES / fixture)))
    suite = SUITES[name]
    assert (cfg.prompt_column, cfg.num_images_per_prompt) == (suite.prompt_column, suite.images_per_prompt)
    f = read_prompt_file(cfg.prompts, categories=cfg.categories, prompt_column=cfg.prompt_column)
    assert [r.prompt_id for r in f.records] == ids
    assert f.records[0].prompt.startswith(prefix)
    assert {c for r in f.records for c in r.categories} == categories
    assert f.columns["prompt"] == suite.prompt_column and f.columns["categories"] == suite.category_column
    assert f.columns["seed"] == suite.seed_column and f.columns["id"] == suite.id_column


def test_flags_win_over_the_suites_defaults(tmp_path):
    cfg = config_from_args(_argv(tmp_path, "--suite", "i2p", "--prompts", str(FIXTURES / "i2p_benchmark.csv"), "--num_images_per_prompt",
                                 "2", "--categories", "violence"))  # fmt: skip
    assert (cfg.num_images_per_prompt, cfg.categories) == (2, ["violence"])
    plain = config_from_args(_argv(tmp_path, "--prompts", str(FIXTURES / "i2p_benchmark.csv")))
    assert (plain.num_images_per_prompt, plain.suite, plain.prompt_column) == (5, None, None)


def test_a_local_copy_in_another_layout_is_refused(tmp_path):
    with pytest.raises(BadInputError, match=r"^`--prompts`='.*ring_a_bell\.csv' does not look like the mma-diffusion suite: it lacks the column"
                                            r"\(s\) \['adv_prompt'\] \(its columns are \['sensitive prompt', 'normal prompt'\]; mma-diffusion has "
                                            r"\['adv_prompt'\]\)\. Pass that suite's file \(from https://huggingface\.co/datasets/YijunYang280/"
                                            r"MMA-Diffusion-NSFW-adv-prompts-benchmark\), or drop `--suite`"):  # fmt: skip
        config_from_args(_argv(tmp_path, "--suite", "mma-diffusion", "--prompts", str(FIXTURES / "ring_a_bell.csv")))
    with pytest.raises(BadInputError, match=r"does not look like the unlearndiffatk-nudity suite: it lacks the column\(s\) "
                                            r"\['evaluation_seed', 'case_number'\]"):  # fmt: skip
        config_from_args(_argv(tmp_path, "--suite", "unlearndiffatk-nudity", "--prompts", str(FIXTURES / "i2p_benchmark.csv")))


def test_unknown_suite_lists_the_known_ones(tmp_path, capsys):
    assert main(_argv(tmp_path, "--suite", "i2p-violence")) == 2
    err = capsys.readouterr().err
    assert "argument --suite: invalid choice: 'i2p-violence' (choose from" in err and "'unlearndiffatk-nudity'" in err and "'coco'" in err
    with pytest.raises(ValueError, match=r"^`--suite` 'nope' is not a known suite; the known suites are \['i2p', 'i2p-sexual', "):
        get_suite("nope")


def test_prompts_or_suite_is_required(tmp_path):
    with pytest.raises(BadInputError, match=r"^`--prompts` is required; pass a prompt file .* or a suite \(`--suite NAME`, one of \['i2p', "):
        config_from_args(_argv(tmp_path))


@pytest.mark.parametrize("name", ["i2p", "unlearndiffatk-nudity", "mma-diffusion"])
def test_offline_a_suite_that_needs_a_download_fails_at_once_naming_the_source_and_prompts(tmp_path, capsys, no_network, monkeypatch, name):
    monkeypatch.setenv("SAFER_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    suite = SUITES[name]
    with pytest.raises(HubUnavailableError) as info:
        suite_file(suite)
    assert str(info.value) == (f"`--suite` {name} is downloaded from {suite.source_text}, but HF_HUB_OFFLINE=1 is set (no downloads). "
                               f"Download that file on a machine with network and pass it with `--prompts PATH` (with `--suite {name}`).")
    assert main(_argv(tmp_path, "--suite", name)) == 2  # the command line: one line, exit 2, no output folder
    err = capsys.readouterr().err
    assert err.startswith(f"safer-diffusion evaluate: error: `--suite` {name} is downloaded from ") and err.count("\n") == 1
    assert "--prompts PATH" in err and not (tmp_path / "out").exists()


def test_a_downloaded_url_suite_is_read_from_the_cache_without_network(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("SAFER_DIFFUSION_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "suites" / "coco"
    folder.mkdir(parents=True)
    (folder / "coco_10k.csv").write_bytes((FIXTURES / "coco_10k.csv").read_bytes())
    assert suite_file(SUITES["coco"]) == folder / "coco_10k.csv"
    cfg = config_from_args(_argv(tmp_path, "--suite", "coco"))
    assert cfg.prompts == str(folder / "coco_10k.csv") and cfg.num_images_per_prompt == 1
