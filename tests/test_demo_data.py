"""`vit-dist demo-data` writes the same real-image ImageFolder every time, digits or photos."""
import hashlib

from PIL import Image

from conftest import ok, vit_dist


def _digest(root, pattern="*.png"):
    files = sorted(p for p in root.rglob(pattern))
    return len(files), hashlib.sha256(b"".join(p.relative_to(root).as_posix().encode() + p.read_bytes()
                                               for p in files)).hexdigest()


def test_demo_data_is_a_deterministic_image_folder(tmp_path):
    for name in ("a", "b"):
        assert "wrote 1442 train and 355 val images" in ok(vit_dist("demo-data", str(tmp_path / name))).stdout
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")[0] == 1797
    for split in ("train", "val"):
        assert sorted(p.name for p in (tmp_path / "a" / split).iterdir()) == [str(d) for d in range(10)]
    image = Image.open(next((tmp_path / "a" / "val" / "3").iterdir()))
    assert image.size == (32, 32) and image.mode == "L"


def test_photos_are_imagenet_size_jpegs_of_every_class_in_both_splits(tmp_path):
    for name in ("a", "b"):
        result = ok(vit_dist("demo-data", str(tmp_path / name), "--photos", "80"))
        assert result.stdout.strip() == f"wrote 72 train and 8 val photos (500x375 JPEG) to {tmp_path / name}"
    assert _digest(tmp_path / "a", "*.jpg") == _digest(tmp_path / "b", "*.jpg")
    classes = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert len(classes) == 8 and sorted(p.name for p in (tmp_path / "a" / "val").iterdir()) == classes
    sizes = set()
    for path in (tmp_path / "a").rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
    assert sizes == {(500, 375), (375, 500)}


def test_too_few_photos_and_a_size_for_photos_are_one_line(tmp_path):
    for args, message in [(["--photos", "79"], "error: --photos 79: write at least 80"),
                          (["--photos", "80", "--image-size", "64"], "error: --image-size sizes the digits")]:
        result = vit_dist("demo-data", str(tmp_path / "x"), *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(message)
    assert not (tmp_path / "x").exists()
