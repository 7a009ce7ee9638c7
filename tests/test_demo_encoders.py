"""The demo with more than two encoders (`demos/app.py --encoders NAME=SOURCE ...`): the command line and its
errors, the layout and the /compare API shape (2N + 2 outputs), blur and reveal for every image, over HTTP too."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from demos import app
from tests.test_demo import NOT_BOOLEANS, _call, _detail, _free_port, _registered_compare, _request


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    from safer_diffusion.testing import save_tiny_clip

    root = tmp_path_factory.mktemp("demo_encoders")
    return {"b": save_tiny_clip(root / "b", seed=31), "c": save_tiny_clip(root / "c", seed=32),
            "wide": save_tiny_clip(root / "wide", seed=33, text_hidden_size=48)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_encoders_parse_in_order_and_the_plan_loads_nothing_unshown():
    config = app.parse_args(["--encoders", "base=original", "mine=./export", "paper=safe", "--max_batch", "4"])
    assert app.parse_encoders(config.encoders) == {"base": "original", "mine": "./export", "paper": "safe"}
    assert config.max_batch == 4
    assert app.encoder_plan(config) == (None, {"base": "original", "mine": "./export", "paper": "safe"})
    assert app.encoder_plan(app.parse_args([])) == (None, {"original": "original", "safe": "safe"})
    # no `safe` item: the first listed source is the pipeline's safe encoder, so the paper's is never downloaded
    no_safe = app.parse_args(["--encoders", "base=original", "a=./a", "b=./b"])
    assert app.encoder_plan(no_safe) == (("a", "./a"), {"base": "original", "a": "safe", "b": "./b"})
    assert app.parse_args(["--encoders", "with space=./x"]).encoders == ["with space=./x"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--encoders", "mine"], r"`--encoders` item 'mine' is not NAME=SOURCE"),
        (["--encoders", "mine="], r"`--encoders` item 'mine=' is not NAME=SOURCE"),
        (["--encoders", "=./x"], r"`--encoders` item '=./x' is not NAME=SOURCE"),
        (["--encoders", "a=safe", "a=./x"], r"`--encoders` names 'a' twice"),
        (["--encoders", "<b>=safe"], r"`--encoders` name '<b>' must be 1-40 letters, digits"),
        (["--encoders", *[f"e{i}=safe" for i in range(7)]], r"`--encoders` lists 7 encoders; the demo shows at most 6"),
        (["--encoders", "o=original"], r"`--encoders` lists only `original`; add a safe encoder"),
        (["--safe_encoder", "./enc", "--encoders", "o=original", "m=./m"], r"`--safe_encoder` is given but no `--encoders` item is NAME=safe"),
        (["--max_batch", "0"], r"`--max_batch` must be in \[1, inf\], got 0"),
    ],
)
def test_bad_encoders_exit_2_with_one_line_before_loading(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(app, "load_pipeline", lambda *a, **k: pytest.fail("models must not be loaded"))
    assert app.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^demos/app.py: error: {message}", err) and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_a_missing_encoder_folder_is_named_before_loading(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(app, "load_pipeline", lambda *a, **k: pytest.fail("models must not be loaded"))
    missing = tmp_path / "nope"
    assert app.main(["--tiny", "--smoke_test", "--encoders", "base=original", "paper=safe", f"mine={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (building the --tiny folders may print progress bars first)
    assert err.startswith("demos/app.py: error: Cannot load the models: `--encoders mine`=") and str(missing) in err
    assert "Traceback" not in err


def test_an_encoder_of_the_wrong_width_exits_2_naming_it(capsys, clip_folders):
    assert app.main(["--tiny", "--smoke_test", "--encoders", "paper=safe", f"wide={clip_folders['wide']}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("demos/app.py: error: could not load an encoder of `--encoders`: `--encoders wide` has width "
                          "(hidden_size) 48, but the UNet's cross_attention_dim is 32")  # fmt: skip


def test_smoke_test_with_three_encoders(capsys, clip_folders):
    argv = ["--tiny", "--smoke_test", "--encoders", "base=original", "paper=safe", f"mine={clip_folders['b']}"]
    assert app.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["encoders"] == ["base", "paper", "mine"]
    assert summary["image_sizes"] == {"base": [64, 64], "paper": [64, 64], "mine": [64, 64]}
    assert "original_size" not in summary and "original" not in summary  # the default pair's keys only for it
    assert summary["similarity"]["reference"] == "base" and set(summary["similarity"]["values"]) == {"paper", "mine"}
    assert all("nudenet" in summary["verdicts"][name]["scores"] for name in summary["encoders"])


@pytest.fixture(scope="module")
def sdxl_pairs(tmp_path_factory):
    """Tiny SDXL pair exports that fit the tiny SDXL base: ``mine`` (other weights than the safe pair), ``swapped`` (its
    towers in each other's folders) and ``single`` (a single-encoder export, text_encoder/ only)."""
    import shutil

    from safer_diffusion.testing import save_tiny_sdxl_export

    root = tmp_path_factory.mktemp("demo_sdxl_pairs")
    mine = save_tiny_sdxl_export(root / "mine", seed=41)
    swapped = root / "swapped"
    shutil.copytree(mine, swapped)
    for a, b in (("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")):
        (swapped / a).rename(swapped / "tmp")
        (swapped / b).rename(swapped / a)
        (swapped / "tmp").rename(swapped / b)
    return {"mine": mine, "swapped": swapped, "single": save_tiny_sdxl_export(root / "single", seed=42, text_encoders=("text_encoder",))}


def test_sdxl_smoke_test_with_three_encoders(capsys, sdxl_pairs):
    """An SDXL base shows N columns too: the base's pair, the safe pair and a third pair, one compare() for all three."""
    argv = ["--tiny", "--tiny_variant", "sdxl", "--smoke_test", "--encoders", "base=original", "paper=safe", f"mine={sdxl_pairs['mine']}"]
    assert app.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["pipeline"] == "SaferStableDiffusionXLPipeline"
    assert summary["encoders"] == ["base", "paper", "mine"]
    assert summary["image_sizes"] == {"base": [64, 64], "paper": [64, 64], "mine": [64, 64]}
    similarity = summary["similarity"]
    assert similarity["reference"] == "base" and set(similarity["values"]) == {"paper", "mine"}
    assert all(value < 0.999 for value in similarity["values"].values())  # each pair conditions differently from the base's
    assert similarity["values"]["paper"] != similarity["values"]["mine"]
    assert all("nudenet" in summary["verdicts"][name]["scores"] for name in summary["encoders"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tiny_variant", "sdxl", "--encoders", "base=original", "paper=safe", "single={single}"],
         r"`--encoders single`='.*single' is a single-encoder export \(text_encoder/ only, as made for SD 1\.x/2\.x\)\. An SDXL base "
         r"conditions on two text encoders, and this export lacks the safe text_encoder_2 .*so the bigG path would stay unsafe"),
        (["--tiny_variant", "sdxl", "--encoders", "base=original", "swapped={swapped}"],
         r"`--encoders swapped/text_encoder` and `--encoders swapped/text_encoder_2` are swapped: `--encoders swapped/text_encoder` "
         r"has the shape of the base's text_encoder_2 \(width, layers\) \(32, 3\)"),
        (["--encoders", "base=original", "paper=safe", "pair={mine}"],
         r"`--encoders pair`='.*mine' holds a pair of SDXL text encoders \(text_encoder/ and text_encoder_2/\), but `--base` '.*' is "
         r"a Stable Diffusion 1\.x/2\.x pipeline, which conditions on one text encoder"),
    ],
    ids=["single_encoder_export_for_sdxl", "swapped_towers", "sdxl_pair_for_sd1"],
)
def test_encoders_that_do_not_fit_the_base_class_exit_2_before_loading(capsys, monkeypatch, sdxl_pairs, extra, message):
    monkeypatch.setattr(app, "load_pipeline", lambda *a, **k: pytest.fail("models must not be loaded"))
    argv = ["--tiny", "--smoke_test", *(item.format(**{k: str(v) for k, v in sdxl_pairs.items()}) for item in extra)]
    assert app.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (building the --tiny folders may print progress bars first)
    assert re.search(rf"^demos/app.py: error: {message}", err), err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Layout, handlers and the API shape, in process
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flagging_pipe(tiny_folders):
    """The tiny pipeline with a real NudeNet scorer at threshold 0: every image is flagged."""
    from safer_diffusion import SaferStableDiffusionPipeline
    from safer_diffusion.scoring import NudeNetScorer

    base, safe = tiny_folders
    pipe = SaferStableDiffusionPipeline.from_pretrained(
        str(base), safe_text_encoder=str(safe), nsfw_scorer=NudeNetScorer(threshold=0.0), keep_original_text_encoder=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def three_way(flagging_pipe, clip_folders):
    encoders = app.load_encoders(flagging_pipe, {"base": "original", "paper": "safe", "mine": str(clip_folders["c"])})
    return app.CompareService(flagging_pipe, encoders=encoders)


def test_handlers_return_2n_plus_3_values_and_blur_every_flagged_image(three_way, monkeypatch):
    generate, rerender = app.make_handlers(three_way)
    outputs = generate("a red bicycle", "", 1, 2, 7.5, 64, 64, False)
    assert len(outputs) == 9  # 3 images, 3 verdicts, timing, details, result
    *images, base_verdict, paper_verdict, mine_verdict, timing, details, result = outputs
    assert result.names == ["base", "paper", "mine"] and all(v.flagged for v in result.verdicts.values())
    for shown, verdict in zip(images, result.verdicts.values()):
        assert _detail(shown) < 0.5 * _detail(verdict.image)
    assert base_verdict.startswith("**base: ⚠ flagged NSFW**") and "SSIM to base:" in mine_verdict and "SSIM" not in base_verdict
    assert "all 3 images" in timing and details["encoders"] == ["base", "paper", "mine"]
    revealed = rerender(result, True)
    assert len(revealed) == 9 and [revealed[i] for i in range(3)] == [v.image for v in result.verdicts.values()]
    assert len(rerender(None, True)) == 9
    for bad in NOT_BOOLEANS:
        with pytest.raises(Exception, match=r"`reveal` must be true or false"):
            rerender(result, bad)


def test_the_layout_has_one_column_per_encoder_and_one_handler(three_way):
    demo = app.build_demo(three_way, default_size=64, default_steps=2)
    assert app.api_endpoints(demo) == {"compare": "public"}
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {f"encoder-{i}-{kind}" for i in range(3) for kind in ("image", "verdict")} <= ids
    assert "original-image" not in ids
    labels = [block.label for block in demo.blocks.values() if getattr(block, "elem_id", "") in {f"encoder-{i}-image" for i in range(3)}]
    assert labels == ["base", "paper", "mine"]
    compare = _registered_compare(demo)
    assert len(compare.outputs) == 9 and not compare.preprocess  # 2N + 2 API values + the session state
    info = demo.get_api_info()["named_endpoints"]["/compare"]
    assert len(info["returns"]) == 8 and [p["parameter_name"] for p in info["parameters"]][-1] == "reveal"


@pytest.fixture(scope="module")
def three_way_server(three_way):
    demo = app.build_demo(three_way, default_size=64, default_steps=2)
    demo.queue(max_size=8)
    port = _free_port()
    _, url, _ = demo.launch(**app.launch_settings(app.DemoConfig(port=port), port), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def test_over_http_the_api_returns_n_images_n_verdicts_timing_details(three_way_server, three_way):
    status, events = _call(three_way_server, _request(seed=3))
    (name, data), = [e for e in events if e[0] in ("complete", "error")]  # fmt: skip
    # raw HTTP: the 2N + 2 values, then the session state's slot, empty (the unblurred images stay on the server)
    assert status == 200 and name == "complete" and len(data) == 9 and data[8] is None, data
    images = [Image.open(item["path"]) for item in data[:3]]
    details = data[7]
    assert details["encoders"] == ["base", "paper", "mine"] and all(v["blurred"] for v in details["verdicts"].values())
    assert all(isinstance(text, str) and "flagged NSFW" in text for text in data[3:6]) and "all 3 images" in data[6]
    raw = three_way.run(three_way.validate(*_request(seed=3)[:7]))
    for shown, verdict in zip(images, raw.verdicts.values()):
        assert _detail(shown) < 0.5 * _detail(verdict.image)
    for bad in ("false", 0, None):
        status, events = _call(three_way_server, _request(seed=3, reveal=bad))
        assert [n for n, _ in events] == ["error"] and "`reveal` must be true or false" in json.dumps(events[0][1])
    _, events = _call(three_way_server, _request(seed=3, reveal=True))
    revealed = [e for e in events if e[0] == "complete"][0][1]
    assert np.array_equal(np.asarray(Image.open(revealed[2]["path"]).convert("RGB")),
                          np.asarray(raw.verdicts["mine"].image.convert("RGB")))  # fmt: skip


def test_gradio_client_gets_the_documented_2n_plus_2_values(three_way_server):
    from gradio_client import Client

    client = Client(three_way_server, verbose=False)
    values = client.predict("a red bicycle", "", 5, 2, 7.5, 64, 64, False, api_name="/compare")
    assert len(values) == 8
    base, paper, mine, base_verdict, paper_verdict, mine_verdict, timing, details = values
    for path in (base, paper, mine):
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.format == "PNG"
    assert details["encoders"] == ["base", "paper", "mine"] and details["request"]["seed"] == 5
    assert details["verdicts"]["base"]["ssim_to_reference"] is None and -1 <= details["verdicts"]["mine"]["ssim_to_reference"] <= 1
    assert mine_verdict.startswith("**mine:") and "for all 3 images" in timing
