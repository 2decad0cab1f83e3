"""Bad image files, hidden and stray entries: found before training (every image decoded, in child
processes, remembered in a per-user cache), skipped (or refused), said once; every problem at once."""
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, last_checkpoint, msrun, ok, run, tiny_config, tool_env, write_image_folder
from vit_dist.host import datascan as data
from vit_dist.host import image_check


def _encoded(image_format: str, size=(24, 24), **options) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (*size, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, image_format, **options)
    return out.getvalue()


def _damaged_huffman_jpeg() -> bytes:
    """A JPEG whose first Huffman table (DHT) has its code counts overwritten: markers, header and end
    marker intact, so a header check passes it; MindSpore's Decode crashes the process (SIGSEGV) on it."""
    data = bytearray(_encoded("JPEG", (64, 64)))
    dht = data.index(b"\xff\xc4")
    data[dht + 5:dht + 21] = b"\xff" * 16
    return bytes(data)


def _damaged_idat_png() -> bytes:
    """A PNG whose compressed pixel data is overwritten inside its IDAT chunk; header and IEND intact."""
    data = bytearray(_encoded("PNG", (64, 64)))
    idat = data.index(b"IDAT")
    data[idat + 20:idat + 60] = bytes(40)
    return bytes(data)


BAD = {  # name: (content, the reason check-data gives)
    "empty.jpg": (b"", "empty file"),
    "notes.jpg": (b"shopping list: eggs", "not an image"),
    "cut.jpg": (_encoded("JPEG")[:-200], "truncated JPEG"),
    "header.jpg": (_encoded("JPEG")[:300], "corrupt or truncated"),
    "cut.png": (_encoded("PNG")[:900], "truncated PNG"),
    "anim.png": (_encoded("GIF"), "GIF image, which MindSpore's decoder does not read"),
    "huffman.jpg": (_damaged_huffman_jpeg(), "corrupt or truncated (broken data stream"),
    "idat.png": (_damaged_idat_png(), "corrupt or truncated (broken data stream"),
    "cut.bmp": (_encoded("BMP", (64, 64))[:-500], "corrupt or truncated (image file is truncated"),
    "cut.tif": (_encoded("TIFF", (64, 64))[:-500], "corrupt or truncated (image file is truncated"),
}
# Passed by the header-and-end-marker check this one replaced; only a full decode finds them.
DAMAGED_INSIDE = ("huffman.jpg", "idat.png", "cut.bmp", "cut.tif")


def check_data(root: Path, cache: Path):
    return run([PYTHON, "-m", "vit_dist", "check-data", str(root)], env=tool_env(XDG_CACHE_HOME=str(cache)))


def vit_dist(cache: Path, *args: str):
    return run([PYTHON, "-m", "vit_dist", *args], env=tool_env(XDG_CACHE_HOME=str(cache)))


def test_the_damaged_files_pass_a_header_check_and_fail_a_full_decode(tmp_path):
    for name in DAMAGED_INSIDE:
        path = tmp_path / name
        path.write_bytes(BAD[name][0])
        with Image.open(path) as image:
            assert image.format in image_check.DECODABLE_FORMATS and image.size == (64, 64)
            marker = image_check.END_MARKERS.get(image.format)
            assert marker is None or marker in path.read_bytes()[-image_check.END_MARKER_WINDOW:]
            with pytest.raises(OSError):
                image.load()
        assert image_check.problem(path).startswith(BAD[name][1])


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
    result = check_data(root, tmp_path / "cache")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    for split, folder in (("train", "digit1"), ("val", "digit7")):
        for name, (_, reason) in BAD.items():
            assert any(line.startswith(f"{root / split / folder / name}: {reason}") for line in lines), (name, lines)
    assert "skipping 1 hidden file(s) (digit1/._train_000.png)" in result.stdout
    assert lines[-1] == f"20 bad of 63 image files under {root}"
    for unusual in ("cmyk", "palette", "progressive", "deep", "big"):
        assert unusual not in result.stdout
    clean = write_image_folder(tmp_path / "clean", {"train": {"digit1": 2}, "val": {"digit1": 1}})
    assert ok(check_data(clean, tmp_path / "cache")).stdout.strip() == f"0 bad of 3 image files under {clean}"


def test_check_data_says_every_problem_at_once_and_any_name(tmp_path):
    """Bad files, a class folder in one split only, an empty class, stray entries and names that are
    not UTF-8, in one run; before, the class mismatch ended it and such a name raised UnicodeEncodeError."""
    root = write_image_folder(tmp_path / "data", {"train": {"digit1": 2, "digit7": 2}, "val": {"digit1": 1, "digit9": 1}})
    digit1 = root / "train" / "digit1"
    (digit1 / "caf\udce9.png").write_bytes((digit1 / "train_000.png").read_bytes())  # fine, and listed nowhere
    (digit1 / "b\udcffd.jpg").write_bytes(BAD["huffman.jpg"][0])
    (root / "train" / "empty").mkdir()
    (root / "train" / "readme.txt").write_text("stray")
    (root / "val" / "digit7").mkdir()
    (root / "val" / "digit7" / "x.jpg").write_bytes(b"")
    result = check_data(root, tmp_path / "cache")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert f"{root}/train/digit1/b\\xffd.jpg: corrupt or truncated (broken data stream" in result.stdout
    assert f"{root}/val/digit7/x.jpg: empty file" in lines
    assert f"class folders differ between {root}/train and {root}/val: only in train ['empty'], " \
           "only in val ['digit9']; give both splits the same classes" in lines
    assert f"{root}/train: class folder(s) with no images: empty; they stay classes (so class indices match " \
           "the folder list) with no samples" in lines
    assert f"{root}/train: ignoring 1 non-image or hidden entries (readme.txt)" in lines
    assert "caf" not in result.stdout
    assert lines[-1] == f"2 bad of 9 image files under {root}; 1 other problem(s) above"
    cached = {name for cache in (tmp_path / "cache" / "vit-dist").glob("*.json")
              for name in json.loads(cache.read_text())["files"]}
    assert {"digit1/caf\udce9.png", "digit1/b\udcffd.jpg"} <= cached  # JSON gives the names back as found
    # A class folder whose name is not UTF-8 cannot be given to MindSpore: a problem, named.
    (root / "train" / "na\udcefve").mkdir()
    assert f"{root}/train/na\\xefve: the class folder's name is not UTF-8" in check_data(root, tmp_path / "cache").stdout


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
    notes = " | ".join(split.notes())
    for said in ("1 hidden file(s) (cats/.hidden.png)", "cats/a.Png", "cats/notes.txt", ".cache",
                 "folder(s) inside class folders", "cats/nested", "with no images: dogs"):
        assert said in notes, said


def test_training_on_two_ranks_skips_bad_images_and_says_so_once(tmp_path):
    root = _messy_data(tmp_path / "messy")
    config = tiny_config(tmp_path / "c.yaml", root, train={"epochs": 1, "batch_size": 8, "eval_batch_size": 4})
    run_dir = tmp_path / "run"
    result = ok(msrun("--ranks-per-node", "2", str(config), "--set", f"train.output_dir={run_dir}"))
    said = result.stdout + result.stderr
    assert said.count("skipping 20 image file(s) the decoder would fail on") == 1, said
    assert "20 bad image file(s) left out" in said
    # 37 train images are kept (the hidden one and 10 bad ones are not): 19 per rank, 2 steps of 8.
    assert "step 2/2" in said
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["images"] == 6  # every good val image, none of the 10 bad ones
    assert len(json.loads((run_dir / "data_check.json").read_text())["bad"]["train"]) == 10


def test_on_bad_image_error_stops_the_job_before_it_starts(tmp_path):
    root = _messy_data(tmp_path / "messy")
    config = tiny_config(tmp_path / "c.yaml", root)
    started = time.monotonic()
    result = msrun("--ranks-per-node", "2", str(config), "--set", "data.on_bad_image=error",
                   f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: 20 image file(s) the decoder would fail on, the first ")
    assert "or set data.on_bad_image=skip" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30 and not (tmp_path / "run" / "logs").exists()


def test_a_second_check_answers_unchanged_files_from_the_cache_without_opening_them(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"digit1": 3}, "val": {"digit1": 1}})
    target = root / "train" / "digit1" / "train_001.png"
    good = target.read_bytes()
    damaged = bytearray(good)
    damaged[good.index(b"IDAT") + 10:good.index(b"IDAT") + 30] = bytes(20)
    target.write_bytes(bytes(damaged))  # same size, same inode
    said = f"{target}: corrupt"
    assert said in check_data(root, tmp_path / "cache").stdout
    caches = (tmp_path / "cache" / "vit-dist").glob("image-check-*.json")  # one per split
    assert sorted(len(json.loads(cache.read_text())["files"]) for cache in caches) == [1, 3]
    # Repaired in place with size, inode and mtime kept: a check that opened the file would pass it.
    mtime = target.stat().st_mtime_ns
    with open(target, "r+b") as f:
        f.write(good)
    os.utime(target, ns=(mtime, mtime))
    assert said in check_data(root, tmp_path / "cache").stdout
    os.utime(target, ns=(mtime + 1, mtime + 1))  # now changed as far as the cache can tell: decoded again
    assert ok(check_data(root, tmp_path / "cache")).stdout.strip() == f"0 bad of 4 image files under {root}"


def test_a_cache_folder_others_could_write_is_refused_in_one_line(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"digit1": 1}, "val": {"digit1": 1}})
    folder = tmp_path / "cache" / "vit-dist"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    result = check_data(root, tmp_path / "cache")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: the image-check cache folder {folder} is not yours alone (a symlink, another owner, or writable by others: "
        f"uid {os.getuid()}, mode drwxrwxrwx); remove it (it is rebuilt, mode 700) or set XDG_CACHE_HOME to a "
        "folder of your own")
    folder.chmod(0o700)
    if os.getuid() == 0:  # only root can give a folder away
        os.chown(folder, 4242, 4242)
        assert "is not yours alone (a symlink, another owner, or writable by others: uid 4242, mode drwx------)" \
            in check_data(root, tmp_path / "cache").stderr
    folder.rmdir()
    folder.symlink_to(tmp_path)
    assert "mode lrwxrwxrwx)" in check_data(root, tmp_path / "cache").stderr
    folder.unlink()
    ok(check_data(root, tmp_path / "cache"))
    assert (folder.stat().st_mode & 0o777) == 0o700


def test_a_worker_that_dies_costs_one_file_and_the_check_goes_on(tmp_path):
    """A worker killed while decoding (as a decoder crash kills it): the file it was on is reported,
    the rest of its chunk is checked by a new worker."""
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), np.uint8)).save(big)
    (tmp_path / "bad.png").write_bytes(BAD["idat.png"][0])
    (tmp_path / "good.png").write_bytes(_encoded("PNG"))
    paths = [big, tmp_path / "bad.png", tmp_path / "good.png"]
    answers = []
    checking = threading.Thread(target=lambda: answers.extend(image_check.check_in_children(paths, workers=1)))
    checking.start()
    worker = None
    while worker is None and checking.is_alive():
        worker = next(iter(_children_running("vit_dist.host.image_check")), None) or time.sleep(0.005)
    os.kill(worker, signal.SIGSEGV)
    checking.join(60)
    assert answers[0] == image_check.CRASHED == "the decoder crashed"
    assert answers[1].startswith("corrupt or truncated (broken data stream") and answers[2] is None


def _children_running(module: str) -> list[int]:
    pids = []
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                if module.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(int(pid))
            except OSError:  # gone already
                pass
    return pids


def test_a_val_split_of_bad_images_is_refused_before_anything_starts(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"digit1": 8}})
    (root / "val" / "digit1").mkdir(parents=True)
    for name in ("huffman.jpg", "idat.png", "cut.bmp"):
        (root / "val" / "digit1" / name).write_bytes(BAD[name][0])
    config = tiny_config(tmp_path / "c.yaml", root)
    result = vit_dist(tmp_path / "cache", "train", str(config), "--set", f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {root}/val: all 3 image files are ones the decoder would fail on, the first digit1/cut.bmp "
        f"({BAD['cut.bmp'][1]} (76 bytes not processed))); replace them (vit-dist check-data {root} lists all)"]
    assert not (tmp_path / "run").exists()


def test_a_file_damaged_after_the_check_is_replaced_and_training_finishes(tmp_path):
    """The launchers' order: preflight checks and records; the image is then overwritten (the file
    listing, hence the record, unchanged); the worker trusts the record, and the pipeline replaces the
    sample its decoder fails on instead of ending the job. Names that are not UTF-8 train too; infer
    refuses the damaged JPEG MindSpore's decoder would crash on, in one line."""
    root = write_image_folder(tmp_path / "data", {"train": {"digit1": 8, "digit7": 8}, "val": {"digit1": 2, "digit7": 2}})
    digit1 = root / "train" / "digit1"
    (digit1 / "caf\udce9.png").write_bytes((digit1 / "train_000.png").read_bytes())
    (digit1 / "b\udcffd.jpg").write_bytes(BAD["huffman.jpg"][0])
    config = tiny_config(tmp_path / "c.yaml", root, train={"epochs": 1, "batch_size": 4, "eval_batch_size": 4})
    run_dir = tmp_path / "run"
    checked = ok(vit_dist(tmp_path / "cache", "preflight", str(config), "--world", "1",
                          "--set", f"train.output_dir={run_dir}"))
    assert f"({root}/train/digit1/b\\xffd.jpg: corrupt or truncated (broken data stream" in checked.stderr
    (digit1 / "train_003.png").write_bytes(b"overwritten after the check")
    trained = ok(vit_dist(tmp_path / "cache", "train", str(config), "--set", f"train.output_dir={run_dir}"))
    said = trained.stdout + trained.stderr
    assert "step 4/4" in said  # 17 good train images, 16 in 4 batches of 4
    assert f"{digit1}/train_003.png" in said  # MindSpore's log names the replaced sample
    infer = vit_dist(tmp_path / "cache", "infer", str(config), "--ckpt", str(last_checkpoint(run_dir)),
                     "--images", str(digit1 / "b\udcffd.jpg"))
    assert infer.returncode == 2 and infer.stderr.strip().splitlines()[-1] == (
        f"error: cannot decode image {digit1}/b\\xffd.jpg: corrupt or truncated (broken data stream when reading "
        "image file); remove it or pass other --images")
