"""Pair data loaders: ViSU-Text, NSFWCaps, generic tables, the bundled sample, splits, fingerprints, errors."""

import csv
import json
import re

import pytest

from finetune.data import PairDataset, PairRecord, load_pairs, parse_column_map, split_pairs

CATEGORIES = {"weapons", "blood", "violence", "drugs", "vandalism", "self-harm"}


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bundled_sample(sample_pairs_path):
    ds = load_pairs(sample_pairs_path)
    assert len(ds) >= 300
    assert set(ds.categories) == CATEGORIES
    assert not ds.has_images
    words = re.compile(r"\b(nude|naked|sex|sexual|porn|breast|genital)", re.I)
    for r in ds:
        assert r.safe != r.unsafe and r.safe and r.unsafe
        assert not words.search(r.unsafe) and not words.search(r.safe)
        # minimal edit: same opening words (the subject) and most of the safe caption's words kept
        safe_words, unsafe_words = r.safe.rstrip(".").split(), r.unsafe.rstrip(".").split()
        assert unsafe_words[:2] == safe_words[:2]
        assert len(set(safe_words) & set(unsafe_words)) >= 0.5 * len(set(safe_words))
    assert len(set(ds.safe_captions)) == len(ds)


def test_visu_local_csv(tmp_path):
    rows = [{"safe": "A man holds a cup.", "nsfw": "A man holds a gun.", "tag": "weapons"},
            {"safe": "A girl reads.", "nsfw": "A girl bleeds.", "tag": "blood"}]
    path = write_csv(tmp_path / "visu.csv", rows)
    ds = load_pairs(path)
    assert ds.records == (PairRecord("A man holds a cup.", "A man holds a gun.", category="weapons"),
                          PairRecord("A girl reads.", "A girl bleeds.", category="blood"))
    assert load_pairs(path, format="visu").records == ds.records


def test_folder_split_selection(tmp_path):
    write_csv(tmp_path / "train.csv", [{"safe": "a", "nsfw": "b", "tag": "x"}])
    write_csv(tmp_path / "validation.csv", [{"safe": "c", "nsfw": "d", "tag": "y"}, {"safe": "e", "nsfw": "f", "tag": "y"}])
    assert load_pairs(tmp_path).safe_captions == ["a"]
    assert load_pairs(tmp_path, split="validation").safe_captions == ["c", "e"]
    with pytest.raises(FileNotFoundError, match="No data file for split 'test'"):
        load_pairs(tmp_path, split="test")


def test_nsfwcaps_with_local_images(tmp_path):
    from PIL import Image

    img_dir = tmp_path / "nocaps"
    img_dir.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(img_dir / f"{i:04d}.jpg")
        rows.append({"caption": f"a dog {i}", "nsfw_caption": f"a dead dog {i}", "chosen_category": "violence",
                     "image_coco_url": f"https://s3.amazonaws.com/nocaps/val/{i:04d}.jpg"})
    path = write_jsonl(tmp_path / "nsfwcaps.jsonl", rows)
    captions_only = load_pairs(path)
    assert not captions_only.has_images and captions_only[0].unsafe == "a dead dog 0"
    ds = load_pairs(path, image_root=img_dir)
    assert ds.has_images and ds[2].safe_image == str(img_dir / "0002.jpg") and ds[0].unsafe_image is None
    (img_dir / "0001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 image files .* missing on disk \(first: '.*0001\.jpg'\)"):
        load_pairs(path, image_root=img_dir)


def test_generic_column_map_images_and_parquet(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for name in ("s.png", "u.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / name)
    rows = [{"prompt": "a cat", "bad": "a cat with a knife", "img": "imgs/s.png", "bad_img": "imgs/u.png", "kind": "weapons"}]
    path = write_csv(tmp_path / "pairs.csv", rows)
    ds = load_pairs(path, column_map="safe=prompt,unsafe=bad,safe_image=img,unsafe_image=bad_img,category=kind")
    assert ds[0] == PairRecord("a cat", "a cat with a knife", str(tmp_path / "imgs/s.png"), str(tmp_path / "imgs/u.png"), "weapons")
    assert ds.has_images and ds.has_unsafe_images

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    same = load_pairs(tmp_path / "pairs.parquet", column_map={"safe": "prompt", "unsafe": "bad", "safe_image": "img",
                                                               "unsafe_image": "bad_img", "category": "kind"})
    assert same.records == ds.records and same.fingerprint() == ds.fingerprint()
    # image_root overrides the data file's folder
    other = tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="2 of 2 image files"):
        load_pairs(path, column_map="safe=prompt,unsafe=bad,safe_image=img,unsafe_image=bad_img", image_root=other)


def test_json_list_and_dropped_rows(tmp_path, caplog):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"safe": "x", "unsafe": "y"}, {"safe": "  ", "unsafe": "z"}, {"safe": "p", "unsafe": None}]))
    with caplog.at_level("WARNING", logger="finetune.data"):
        ds = load_pairs(path)
    assert ds.safe_captions == ["x"] and "dropped 2 of 3 rows" in caplog.text


def test_split_pairs_deterministic(sample_pairs_path):
    ds = load_pairs(sample_pairs_path)
    train, val = split_pairs(ds, 0.1, seed=0)
    train2, val2 = split_pairs(ds, 0.1, seed=0)
    assert train.records == train2.records and val.records == val2.records
    assert len(val) == round(0.1 * len(ds)) and len(train) + len(val) == len(ds)
    assert set(train.records).isdisjoint(val.records)
    assert split_pairs(ds, 0.1, seed=1)[1].records != val.records
    # a safe caption never straddles the split
    dup = PairDataset([PairRecord("s", f"u{i}") for i in range(4)] + [PairRecord(f"t{i}", "u") for i in range(6)])
    tr, va = split_pairs(dup, 0.4, seed=3)
    assert not set(tr.safe_captions) & set(va.safe_captions)
    assert split_pairs(ds, 0.0)[1].records == ()


def test_fingerprint_content_sensitive():
    a = PairDataset([PairRecord("a", "b"), PairRecord("c", "d", category="x")])
    assert a.fingerprint() == PairDataset(list(a.records)).fingerprint()
    assert a.fingerprint() != PairDataset([PairRecord("a", "b"), PairRecord("c", "d!", category="x")]).fingerprint()
    assert a.fingerprint() != PairDataset(list(reversed(a.records))).fingerprint()
    assert a.fingerprint() != PairDataset([PairRecord("a", "b"), PairRecord("c", "d")]).fingerprint()
    assert a[0:1].records == (PairRecord("a", "b"),)


def test_missing_columns_error(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"prompt": "a", "bad_prompt": "b"}])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) safe='safe', unsafe='unsafe'\. Columns found: bad_prompt, prompt\. "
                                         r"Map them with `--column_map`"):
        load_pairs(path)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) category='kind'"):
        load_pairs(path, column_map={"safe": "prompt", "unsafe": "bad_prompt", "category": "kind"})


def test_empty_and_bad_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_pairs(empty)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"safe": "", "unsafe": "x"}])
    with pytest.raises(ValueError, match="is empty: all 1 rows lack"):
        load_pairs(blank)
    with pytest.raises(ValueError, match="`format` must be one of"):
        load_pairs(blank, format="visu-text")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"safe": "a", "unsafe": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_pairs(bad)
    txt = tmp_path / "pairs.txt"
    txt.write_text("a")
    with pytest.raises(ValueError, match="Unsupported data file"):
        load_pairs(txt)
    with pytest.raises(FileNotFoundError, match="not an existing local path"):
        load_pairs(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unknown field 'prompt'"):
        parse_column_map("prompt=safe")
    with pytest.raises(ValueError, match="must look like field=column"):
        parse_column_map("safe")
    assert parse_column_map("safe=a, unsafe=b") == {"safe": "a", "unsafe": "b"}
    with pytest.raises(ValueError, match="`val_fraction` must be in"):
        split_pairs(PairDataset([PairRecord("a", "b")]), 1.0)
    with pytest.raises(ValueError, match="leaves no training pair"):
        split_pairs(PairDataset([PairRecord("a", "b")]), 0.9)
    with pytest.raises(ValueError, match=r"`records\[0\]` must be a PairRecord"):
        PairDataset([("a", "b")])


def test_hub_id_offline_is_a_clear_error(no_network):
    from safer_diffusion.hub import HubUnavailableError

    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        load_pairs("aimagelab/ViSU-Text")
