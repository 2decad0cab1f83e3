"""Progress of long work (vit_dist/host/progress.py): one line rewritten in place on a terminal (a
real pty), a bounded number of plain lines in a log, nothing from short work in a log or from a
process that does not show it; and the data check showing it on a real terminal."""
from __future__ import annotations

import io
import os
import pty
import re
import subprocess

from conftest import PYTHON, ROOT, run, tiny_config, tool_env, vit_model, write_image_folder
from vit_dist.host.progress import LOG_STEPS, Progress


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_log_gets_a_line_per_tenth_of_long_work_and_a_last_one():
    out, clock = io.StringIO(), Clock()
    with Progress(1000, "checking images in d", "files", stream=out, clock=clock) as progress:
        for _ in range(1000):
            clock.now += 1.0
            progress.advance()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 2 <= len(lines) <= LOG_STEPS + 1
    counts = [int(re.match(r"checking images in d: (\d+)/1000 files", line).group(1)) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 1000 and len(set(counts)) == len(counts)
    assert lines[0].startswith("checking images in d: 100/1000 files (10%), 1.0 files/s, ETA 15m00s")
    assert lines[-1] == "checking images in d: 1000/1000 files in 16m40s"


def test_a_log_gets_nothing_from_short_work_or_from_a_process_that_does_not_show_it():
    for show, step in [(True, 0.001), (False, 1.0)]:
        out, clock = io.StringIO(), Clock()
        with Progress(1000, "evaluating", "batches", show=show, stream=out, clock=clock) as progress:
            for _ in progress.iterate(range(1000)):
                clock.now += step
        assert out.getvalue() == "", show


def test_a_terminal_gets_one_line_rewritten_in_place():
    master, slave = pty.openpty()
    clock = Clock()
    with open(slave, "w") as terminal:
        with Progress(50, "merging", "steps", stream=terminal, clock=clock) as progress:
            for _ in range(50):
                clock.now += 0.5
                progress.advance()
    text = _read_all(master)
    assert "\n" not in text.rstrip("\r\n")  # one line, redrawn: no line per update
    draws = text.rstrip("\r\n").split("\r")[1:]
    assert len(draws) == 51 and draws[0].startswith("merging: 1/50 steps (2%), 2.0 steps/s")
    assert draws[-1].rstrip() == "merging: 50/50 steps in 25s"


def _read_all(master: int) -> str:
    """What was written to a pty until its other end closed."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode()


def _on_a_pty(cache, *args: str) -> str:
    """`vit-dist ARGS` with stdout and stderr on a real pseudo-terminal; all it wrote."""
    master, slave = pty.openpty()
    process = subprocess.Popen([PYTHON, "-m", "vit_dist", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                               stdout=slave, stderr=slave, env=tool_env(XDG_CACHE_HOME=str(cache)))
    os.close(slave)
    text = _read_all(master)
    assert process.wait(timeout=300) == 0, text[-3000:]
    return text


def test_the_data_check_shows_progress_on_a_terminal_and_none_in_a_pipe(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": {"digit1": 20, "digit7": 20}, "val": {"digit1": 5, "digit7": 5}})
    shown = _on_a_pty(tmp_path / "cache", "check-data", str(root))
    train = re.escape(f"checking images in {root / 'train'}")
    assert re.search(rf"\r{train}: 40/40 files in \d+s\s*\r?\n", shown), shown
    val = re.escape(f"checking images in {root / 'val'}")
    assert re.search(rf"\r{val}: 10/10 files in", shown), shown
    assert shown.rstrip().endswith(f"0 bad of 50 image files under {root}")
    again = _on_a_pty(tmp_path / "cache", "check-data", str(root))  # every answer cached: nothing decoded, nothing shown
    assert "checking images" not in again
    piped = run([PYTHON, "-m", "vit_dist", "check-data", str(root)], env=tool_env(XDG_CACHE_HOME=str(tmp_path / "c2")))
    assert piped.returncode == 0 and piped.stderr == "" and "\r" not in piped.stdout
    assert piped.stdout == f"0 bad of 50 image files under {root}\n"


def test_vit_dist_eval_shows_its_batches_on_a_terminal(tmp_path, tiny_data):
    from safetensors.numpy import save_file

    from vit_dist.host.config import load_config

    config = tiny_config(tmp_path / "c.yaml", tiny_data, model={"num_classes": 3})
    net = vit_model(load_config(config), 3)  # its random initial weights: what is measured is the progress
    save_file({p.name: p.asnumpy() for p in net.get_parameters()}, str(tmp_path / "w.safetensors"))
    shown = _on_a_pty(tmp_path / "cache", "eval", str(config), "--ckpt", str(tmp_path / "w.safetensors"), "--set",
                      "train.eval_batch_size=2", f"train.output_dir={tmp_path / 'run'}")
    assert re.search(r"\revaluating: 5/5 batches in \d+s", shown), shown[-3000:]  # 9 val images, 2 a batch
    assert '"images": 9' in shown
