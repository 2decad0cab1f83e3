"""Bad image files, hidden and stray entries: found before training, skipped (or refused), said once."""
import io
import json
import time

import numpy as np
from PIL import Image

from conftest import msrun, ok, tiny_config, vit_dist, write_image_folder
from vit_dist.host import datascan as data


def _encoded(image_format: str, size=(24, 24), **options) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (*size, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, image_format, **options)
    return out.getvalue()


BAD = {  # name: (content, the reason check-data gives)
    "empty.jpg": (b"", "empty file"),
    "notes.jpg": (b"shopping list: eggs", "not an image"),
    "cut.jpg": (_encoded("JPEG")[:-200], "truncated JPEG"),
    "header.jpg": (_encoded("JPEG")[:300], "corrupt or truncated header"),
    "cut.png": (_encoded("PNG")[:900], "truncated PNG"),
    "anim.png": (_encoded("GIF"), "GIF image, which MindSpore's decoder does not read"),
}


def _good_but_unusual(folder):
    """Files the decoder converts rather than rejects."""
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 20, 3), np.uint8))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("P").save(folder / "palette.png")
    rgb.save(folder / "progressive.jpg", progressive=True)
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(folder / "deep.png")
    Image.fromarray(np.zeros((4000, 6000, 3), np.uint8)).save(folder / "big.jpg")


def _messy_data(root):
    """digits data with 6 bad files in train/digit1 and val/digit7, hidden and unusual files besides."""
    write_image_folder(root, {"train": {"digit1": 16, "digit7": 16}, "val": {"digit1": 3, "digit7": 3}})
    for split, folder in (("train", "digit1"), ("val", "digit7")):
        for name, (content, _) in BAD.items():
            (root / split / folder / name).write_bytes(content)
    (root / "train" / "digit1" / "._train_000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _good_but_unusual(root / "train" / "digit7")
    return root


def test_check_data_lists_each_bad_file_with_its_reason(tmp_path):
    root = _messy_data(tmp_path / "messy")
    result = vit_dist("check-data", str(root))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    for split, folder in (("train", "digit1"), ("val", "digit7")):
        for name, (_, reason) in BAD.items():
            assert any(line.startswith(f"{root / split / folder / name}: {reason}") for line in lines), (name, lines)
    assert "skipping 1 hidden file(s) (digit1/._train_000.png)" in result.stdout
    assert lines[-1] == f"12 bad of 55 image files under {root}"
    for unusual in ("cmyk", "palette", "progressive", "deep", "big"):
        assert unusual not in result.stdout
    clean = write_image_folder(tmp_path / "clean", {"train": {"digit1": 2}, "val": {"digit1": 1}})
    assert ok(vit_dist("check-data", str(clean))).stdout.strip() == f"0 bad of 3 image files under {clean}"


def test_the_scan_lists_files_in_the_order_imagefolderdataset_reads_them(tmp_path):
    import mindspore.dataset as ds

    folder = tmp_path / "train" / "cats"
    folder.mkdir(parents=True)
    names = ["b.png", "B.PNG", "10.png", "2.png", ".hidden.png", "Z.jpeg", "a.Png", "notes.txt"]
    for i, name in enumerate(names):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(folder / name, "PNG")
    (folder / "nested").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "nested" / "deep.png")
    (tmp_path / "train" / "dogs").mkdir()
    (tmp_path / "train" / ".cache").mkdir()

    split = data.scan_split(tmp_path, "train")
    reader = ds.ImageFolderDataset(str(split.path), shuffle=False, class_indexing={"cats": 0, "dogs": 1},
                                   extensions=list(data.READ_EXTENSIONS), decode=False)
    by_content = {(split.path / f).read_bytes(): f for f in split.files}
    read = [by_content[bytes(row[0])] for row in reader.create_tuple_iterator(output_numpy=True, num_epochs=1)]
    assert read == list(split.files) == ["cats/.hidden.png", "cats/10.png", "cats/2.png", "cats/B.PNG",
                                         "cats/Z.jpeg", "cats/b.png"]
    assert split.classes == ("cats", "dogs") and split.hidden == (0,) and split.num_images == 5
    notes = " | ".join(split.notes)
    for said in ("1 hidden file(s) (cats/.hidden.png)", "cats/a.Png", "cats/notes.txt", ".cache",
                 "folder(s) inside class folders", "cats/nested", "with no images: dogs"):
        assert said in notes, said


def test_training_on_two_ranks_skips_bad_images_and_says_so_once(tmp_path):
    root = _messy_data(tmp_path / "messy")
    config = tiny_config(tmp_path / "c.yaml", root, train={"epochs": 1, "batch_size": 8, "eval_batch_size": 4})
    run = tmp_path / "run"
    result = ok(msrun("--ranks-per-node", "2", str(config), "--set", f"train.output_dir={run}"))
    said = result.stdout + result.stderr
    assert said.count("skipping 12 image file(s) the decoder would fail on") == 1, said
    assert "12 bad image file(s) left out" in said
    # 37 train images are kept (the hidden one and 6 bad ones are not): 19 per rank, 2 steps of 8.
    assert "step 2/2" in said
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["images"] == 6  # every good val image, none of the 6 bad ones
    assert len(json.loads((run / "data_check.json").read_text())["bad"]["train"]) == 6


def test_on_bad_image_error_stops_the_job_before_it_starts(tmp_path):
    root = _messy_data(tmp_path / "messy")
    config = tiny_config(tmp_path / "c.yaml", root)
    started = time.monotonic()
    result = msrun("--ranks-per-node", "2", str(config), "--set", "data.on_bad_image=error",
                   f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: 12 image file(s) the decoder would fail on, the first ")
    assert "or set data.on_bad_image=skip" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30 and not (tmp_path / "run" / "logs").exists()
