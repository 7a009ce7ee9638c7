"""finetune.metrics on hand-made tensors; finetune.evaluate: zero-shot on an image folder, CLI errors."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import torch.nn.functional as F

from finetune.evaluate import evaluate, main, parse_evaluate_config
from finetune.metrics import knn_overlap, recall_at_1, text_metrics, weight_drift
from safer_diffusion.options import BadInputError


def test_recall_at_1_hand_computed():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    queries = torch.tensor([[0.9, 0.1], [0.5, 0.9], [0.0, 1.0]])  # nearest: 0, 2, 1
    assert recall_at_1(queries, gallery, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    # duplicate gallery strings are the same item
    assert recall_at_1(queries, gallery, torch.tensor([0, 1, 1]), ["a", "b", "b"]) == 1.0
    with pytest.raises(ValueError, match="`queries` is empty"):
        recall_at_1(torch.empty(0, 2), gallery, torch.empty(0, dtype=torch.long))


def test_knn_overlap_and_weight_drift():
    x = F.normalize(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert knn_overlap(x, x, k=3) == 1.0
    # 4 points on a line: neighbours of each point by distance; swapping the embedding of two far points changes them
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]]), dim=-1)
    b = a[[3, 1, 2, 0]]
    # k=1 neighbours under a: 0->1, 1->0, 2->3, 3->2 ; under b: 0->2, 1->3, 2->0, 3->1  => no overlap
    assert knn_overlap(a, b, k=1) == 0.0
    with pytest.raises(ValueError, match="at least 2 rows"):
        knn_overlap(x[:1], x[:1])
    base = {"text_model.w": torch.tensor([3.0, 4.0]), "vision_model.w": torch.ones(2)}
    moved = {"text_model.w": torch.tensor([3.0, 4.0]) + torch.tensor([0.3, 0.4]), "vision_model.w": torch.zeros(2)}
    drift = weight_drift(moved, base)
    assert drift["l2"] == pytest.approx(0.5) and drift["relative"] == pytest.approx(0.1) and drift["tensors"] == 1
    with pytest.raises(ValueError, match="No common"):
        weight_drift(moved, base, prefix="nothing.")


def test_text_metrics_frozen_model_is_the_start_point():
    gen = torch.Generator().manual_seed(0)
    safe_e = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    unsafe_e = F.normalize(safe_e + 0.3 * torch.randn(6, 8, generator=gen), dim=-1)
    safe = [f"safe {i}" for i in range(6)]
    unsafe = [f"unsafe {i}" for i in range(6)]
    table = dict(zip(safe + unsafe, torch.cat([safe_e, unsafe_e])))

    def frozen(caps):
        return torch.stack([table[c] for c in caps])

    def redirected(caps):  # a perfectly redirected encoder: unsafe i -> safe i
        return torch.stack([table[c.replace("unsafe", "safe")] for c in caps])

    same = text_metrics(frozen, frozen, safe, unsafe, k=3)
    assert same["redirect_rate"] == 0.0 and same["redirect_to_pair_r1"] == 0.0 and same["safe_cos"] == pytest.approx(1.0)
    assert same["frozen"]["t_star_to_t_r1"] == same["t_star_to_t_r1"]
    good = text_metrics(redirected, frozen, safe, unsafe, k=3)
    assert good["redirect_rate"] == 1.0 and good["redirect_to_pair_r1"] == 1.0 and good["t_star_to_t_r1"] == 1.0
    assert good["knn_overlap@3"] == 1.0 and good["unsafe_cos"] < 1.0
    with pytest.raises(ValueError, match="aligned pairs"):
        text_metrics(frozen, frozen, safe, unsafe[:3])


@pytest.fixture()
def image_folder(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls in ("red_car", "blue_sky"):
        (tmp_path / "zs" / cls).mkdir(parents=True)
        for i in range(2):
            arr = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "zs" / cls / f"{i}.png")
    return tmp_path / "zs"


def test_zero_shot_and_cli(image_folder, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na picture of the {}.\n")
    code = main(["--model", "tiny", "--model_name_or_path", "tiny", "--zero_shot_root", str(image_folder), "--templates",
                 str(templates), "--device", "cpu", "--class_names", "red car", "blue sky"])  # fmt: skip
    assert code == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    zs = results["zero_shot"]
    assert zs["model"]["n_images"] == 4 and zs["model"]["n_classes"] == 2 and zs["model"]["templates"] == 2
    assert 0.0 <= zs["model"]["accuracy"] <= 1.0 and zs["model"]["accuracy"] == zs["base"]["accuracy"]  # same model
    assert results["weights"]["l2"] == 0.0


def test_old_base_spelling_still_works_with_a_deprecation_warning(image_folder, caplog):
    with caplog.at_level(logging.WARNING):
        config = parse_evaluate_config(["--model", "tiny", "--base", "tiny", "--zero_shot_root", str(image_folder),
                                        "--class_names", "red car,blue sky"])  # fmt: skip
    assert config.model_name_or_path == "tiny" and config.class_names == ["red car", "blue sky"]
    assert "`--base` is deprecated" in caplog.text and "--model_name_or_path" in caplog.text
    assert evaluate(config)["zero_shot"]["model"]["n_classes"] == 2


def test_cli_errors(image_folder, tmp_path, capsys, monkeypatch, no_network):
    from finetune import evaluate as evaluate_mod
    from finetune.metrics import zero_shot_accuracy

    with pytest.raises(BadInputError, match="Nothing to evaluate"):
        parse_evaluate_config(["--model", "tiny", "--model_name_or_path", "tiny"])
    with pytest.raises(SystemExit):
        parse_evaluate_config(["--model", "tiny", "--data_format", "excel"])

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(evaluate_mod, "load_clip", no_work)
    capsys.readouterr()
    zs = ["--zero_shot_root", str(image_folder)]
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    cases = [
        (["--model", "tiny", *zs], r"`--model_name_or_path` is required: `--model` 'tiny' records no base model"),
        (["--model", "tiny", "--model_name_or_path", "no/such-model", *zs], r"`--model_name_or_path`='no/such-model'"),
        (["--model", str(tmp_path / "missing"), "--model_name_or_path", "tiny", *zs], r"`--model`="),
        (["--model", "tiny", "--model_name_or_path", "tiny", "--data", "nope.csv"], r"`--data` 'nope.csv' does not exist"),
        (["--model", "tiny", "--model_name_or_path", "tiny", *zs, "--templates", str(tmp_path / "bad.txt")], r"`--templates`"),
        (["--model", "tiny", "--model_name_or_path", "tiny", *zs, "--class_names", "one"], r"`--class_names` has 1 names"),
        (["--model", "tiny", "--model_name_or_path", "tiny", *zs, "--output", str(tmp_path)], r"`--output` .* is a directory; pass a file path"),
        (["--model", "tiny", "--model_name_or_path", "tiny", "--zero_shot_root", str(tmp_path / "nope")], r"`--zero_shot_root`"),
        (["--model", "tiny", "--model_name_or_path", "tiny", *zs, "--batch_size", "0"], r"`--batch_size` must be in \[1, inf\]"),
    ]
    for argv, pattern in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("python -m finetune.evaluate: error: ") and "Traceback" not in err, err
        assert re.search(pattern, err), (pattern, err)

    def enc(x):
        return torch.zeros(len(x), 4)

    with pytest.raises(ValueError, match="`--templates`"):
        zero_shot_accuracy(enc, enc, image_folder, templates=["no placeholder"])
    with pytest.raises(ValueError, match="`--class_names`"):
        zero_shot_accuracy(enc, enc, image_folder, class_names=["only one"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        zero_shot_accuracy(enc, enc, tmp_path / "empty")
