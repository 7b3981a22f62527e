import json
import struct

import numpy as np
import pytest
from PIL import Image

from fbnet.data import convert
from fbnet.data.embeddings import WordVectorError, load_word_vectors
from fbnet.data.manifest import DatasetError, load_dataset
from fbnet.data.synth import BACKGROUNDS, CLASSES, generate
from fbnet.preprocess import ImageError, load_image
from fbnet.vocab import Vocabulary


def test_synth_is_deterministic_and_complete(tiny_synth, tmp_path):
    again = generate(tmp_path / "again", seed=3, sizes=(24, 8, 8))
    a, b = load_dataset(tiny_synth), load_dataset(again)
    assert [i.captions for i in a.items] == [i.captions for i in b.items]
    assert (tiny_synth / "images" / "00000.png").read_bytes() == (again / "images" / "00000.png").read_bytes()
    assert len(CLASSES) >= 10 and len(BACKGROUNDS) >= 6
    assert a.has_labels and a.has_boxes
    assert all(len(i.captions) == 5 for i in a.items)
    assert {i.split for i in a.items} == {"train", "val", "test"}
    coco = json.loads((tiny_synth / "boxes.coco.json").read_text())
    assert len(coco["annotations"]) == sum(len(i.boxes) for i in a.items)


def _write(root, lines, meta=None):
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "red").save(root / "a.png")
    (root / "dataset.json").write_text(json.dumps(meta or {"format": "fbnet-dataset", "classes": ["x"]}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_manifest_errors_name_file_and_line(tmp_path):
    good = json.dumps({"id": "1", "image": "a.png", "split": "train", "captions": ["a red square"], "label": 0})
    root = _write(tmp_path / "d", [good, '{"id": "2", "image": "a.png"'])
    with pytest.raises(DatasetError, match=r"manifest.jsonl line 2: invalid JSON"):
        load_dataset(root)
    bad_label = good.replace('"label": 0', '"label": 5').replace('"1"', '"3"')
    root = _write(tmp_path / "e", [good, bad_label])
    with pytest.raises(DatasetError, match=r"line 2: label 5"):
        load_dataset(root)


def test_short_captions_and_missing_images_are_skipped_with_warnings(tmp_path):
    lines = [json.dumps({"id": "1", "image": "a.png", "split": "train", "captions": ["dog", "", "a red square"]}),
             json.dumps({"id": "2", "image": "missing.png", "split": "train", "captions": ["a red square"]})]
    root = _write(tmp_path / "d", lines, {"format": "fbnet-dataset", "classes": None})
    with pytest.warns(UserWarning) as record:
        ds = load_dataset(root)
    messages = " ".join(str(r.message) for r in record)
    assert "line 1" in messages and "'dog'" in messages and "missing.png" in messages
    assert [i.captions for i in ds.items] == [["a red square"]]
    assert not ds.has_labels


def test_missing_dataset_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json"):
        load_dataset(tmp_path)


def test_corrupt_and_tiny_images_are_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg: cannot decode"):
        load_image(tmp_path / "bad.jpg", 64)
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(ImageError, match="tiny.png: image is 4x4"):
        load_image(tmp_path / "tiny.png", 64)
    with pytest.raises(ImageError, match="nope.png: image not found"):
        load_image(tmp_path / "nope.png", 64)


def test_vocabulary_maps_unknown_words_and_rejects_empty_captions():
    vocab = Vocabulary.build(["a red square", "a blue circle"])
    ids, lengths = vocab.encode_batch(["a red triangle", "blue"], max_words=10)
    assert ids[0, 2] == 1 and lengths.tolist() == [3, 1]
    assert Vocabulary.from_json(vocab.to_json()).words == vocab.words
    with pytest.raises(ValueError, match="no words"):
        vocab.encode_batch(["!!"], 10)


def test_word2vec_binary_and_glove_text(tmp_path):
    vecs = {"dog": np.arange(3, dtype=np.float32), "cat": np.ones(3, dtype=np.float32)}
    with (tmp_path / "w.bin").open("wb") as fh:
        fh.write(b"2 3\n")
        for w, v in vecs.items():
            fh.write(w.encode() + b" " + struct.pack("<3f", *v) + b"\n")
    got, dim = load_word_vectors(tmp_path / "w.bin", {"dog"})
    assert dim == 3 and list(got) == ["dog"] and np.allclose(got["dog"], [0, 1, 2])
    (tmp_path / "g.txt").write_text("dog 0 1 2\ncat 1 1 1\n")
    got, dim = load_word_vectors(tmp_path / "g.txt")
    assert dim == 3 and np.allclose(got["cat"], 1)
    (tmp_path / "bad.txt").write_text("dog 0 1 2\ncat 1 1\n")
    with pytest.raises(WordVectorError, match="bad.txt line 2"):
        load_word_vectors(tmp_path / "bad.txt")


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "blue").save(path)


def test_convert_pascal_sentence(tmp_path):
    src = tmp_path / "pascal"
    for cls in ("cat", "dog"):
        for k in range(5):
            _img(src / "dataset" / cls / f"{cls}{k}.jpg")
            (src / "sentence" / cls).mkdir(parents=True, exist_ok=True)
            (src / "sentence" / cls / f"{cls}{k}.txt").write_text(f"a {cls} sits\nthe {cls} looks up\n")
    ds = convert.pascal_sentence(src, tmp_path / "out")
    assert len(ds.items) == 10 and ds.classes == ["cat", "dog"] and ds.has_labels
    assert ds.items[0].captions == ["a cat sits", "the cat looks up"]


def test_convert_wikipedia(tmp_path):
    src = tmp_path / "wiki"
    (src / "texts").mkdir(parents=True)
    (src / "categories.list").write_text("art\nbiology\n")
    rows = []
    for k in range(4):
        _img(src / "images" / ["art", "biology"][k % 2] / f"img{k}.jpg")
        (src / "texts" / f"t{k}.xml").write_text(f"<document><text>document number {k} about things</text></document>")
        rows.append(f"t{k}\timg{k}\t{k % 2 + 1}")
    (src / "trainset_txt_img_cat.list").write_text("\n".join(rows[:3]) + "\n")
    (src / "testset_txt_img_cat.list").write_text(rows[3] + "\n")
    ds = convert.wikipedia(src, tmp_path / "out")
    assert len(ds.items) == 4 and ds.items[3].split == "test" and ds.items[1].label == 1
    (src / "testset_txt_img_cat.list").write_text("t3 img3 7\n")
    with pytest.raises(DatasetError, match="testset_txt_img_cat.list line 1"):
        convert.wikipedia(src, tmp_path / "out2")


def test_convert_nus_wide(tmp_path):
    src = tmp_path / "nus"
    (src / "ImageList").mkdir(parents=True)
    (src / "NUS_WID_Tags").mkdir()
    names = [f"actor\\{k}.jpg" for k in range(5)]
    for k in range(5):
        _img(tmp_path / "imgs" / "actor" / f"{k}.jpg")
    (src / "ImageList" / "Imagelist.txt").write_text("\n".join(names) + "\n")
    (src / "ImageList" / "TestImagelist.txt").write_text(names[4] + "\n")
    (src / "NUS_WID_Tags" / "All_Tags.txt").write_text("\n".join(f"{k} sky beach sun" for k in range(5)) + "\n")
    (src / "labels.txt").write_text("beach\nbeach\nsky\nsky\nbeach\n")
    ds = convert.nus_wide(src, tmp_path / "out", images=tmp_path / "imgs")
    assert ds.items[4].split == "test" and ds.items[0].captions == ["sky beach sun"]
    assert ds.classes == ["beach", "sky"]


def test_convert_flickr_token_file(tmp_path):
    src = tmp_path / "flickr"
    src.mkdir()
    lines = []
    for k in range(3):
        _img(tmp_path / "imgs" / f"{k}.jpg")
        lines += [f"{k}.jpg#{n}\ta dog runs number {n}" for n in range(5)]
    (src / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (src / "Flickr_8k.trainImages.txt").write_text("0.jpg\n")
    (src / "Flickr_8k.devImages.txt").write_text("1.jpg\n")
    (src / "Flickr_8k.testImages.txt").write_text("2.jpg\n")
    ds = convert.flickr(src / "Flickr8k.token.txt", tmp_path / "out", images=tmp_path / "imgs")
    assert [i.split for i in ds.items] == ["train", "val", "test"] and len(ds.items[0].captions) == 5
    assert not ds.has_labels


def test_convert_karpathy_and_coco(tmp_path):
    _img(tmp_path / "imgs" / "a.jpg")
    _img(tmp_path / "imgs" / "b.jpg")
    karpathy = {"images": [
        {"filename": "a.jpg", "split": "restval", "sentences": [{"raw": "a man rides a bike"}]},
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "two dogs play"}]}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    ds = convert.karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "k", images=tmp_path / "imgs")
    assert [i.split for i in ds.items] == ["train", "test"]
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a man rides a bike"},
                            {"image_id": 2, "caption": "two dogs play"}]}
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    ds = convert.coco(tmp_path / "captions_train2014.json", tmp_path / "c", images=tmp_path / "imgs")
    assert len(ds.items) == 2 and ds.items[1].captions == ["two dogs play"]


def test_first_captions_per_image_for_cheap_validation():
    import numpy as np

    from fbnet.pipeline import Captions

    caps = Captions(np.arange(14).reshape(7, 2), np.full(7, 2), np.array([0, 0, 0, 1, 1, 2, 2]), None, None)
    assert caps.first_per_image(0) is caps
    one = caps.first_per_image(1)
    assert one.image.tolist() == [0, 1, 2] and one.ids[:, 0].tolist() == [0, 6, 10]
    assert caps.first_per_image(2).image.tolist() == [0, 0, 1, 1, 2, 2]
