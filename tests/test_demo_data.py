"""`vit-dist demo-data` writes the same real-image ImageFolder every time."""
import hashlib

from PIL import Image

from conftest import ok, vit_dist


def _digest(root):
    files = sorted(p for p in root.rglob("*.png"))
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
