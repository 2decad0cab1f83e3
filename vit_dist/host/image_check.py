"""Finds the image files MindSpore's decoder would fail on, by decoding each one fully with PIL in
child processes, and remembers the answers in a per-user cache.

MindSpore's JPEG decoder can crash the whole process (SIGSEGV) on a file whose markers are intact
but whose Huffman tables or entropy-coded data are damaged, and a PNG with damaged compressed data
or a truncated BMP/TIFF fails mid-epoch; only a full decode finds these. PIL's full decode is the
reference: it rejects what MindSpore's decoder crashes or fails on. The decode runs in child
processes so that a decoder crash ends a worker, not the caller; the file a worker died on is
reported as bad. A file whose (size, mtime_ns, inode) and the checker's version match the cache is
not opened again, so a second check of unchanged data takes a stat per file.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import stat
import subprocess
import sys
from pathlib import Path

import PIL
from PIL import Image

from vit_dist.host.atomic import write_atomic
from vit_dist.host.errors import OutputError
from vit_dist.host.private import private_folder
from vit_dist.host.progress import Progress

# PIL's names for what MindSpore's Decode reads (MPO: a camera JPEG with extra pictures appended).
DECODABLE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF"}
# How far from the end the end-of-image marker may sit: some cameras append a few bytes after it.
END_MARKER_WINDOW = 4096
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
CRASHED = "the decoder crashed"
# Bumped whenever problem() changes what it accepts; with PIL's version, it keys the cache.
CHECK_VERSION = f"2/Pillow {PIL.__version__}"
# Files per message to a worker: large enough to amortise the pipe, small enough to share the work out.
CHUNK = 16
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def printable(name: str | Path) -> str:
    """A file name as text that prints anywhere: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def problem(path: Path) -> str | None:
    """Why the decoder would fail on this file, or None if PIL decodes it whole."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            image_format, (width, height) = image.format, image.size
            reason = _header_problem(image_format, width, height) or _end_problem(path, image_format, info.st_size)
            if reason:
                return reason
            image.load()
    except Image.DecompressionBombError as err:
        return f"too large to decode safely ({err})"
    except Image.UnidentifiedImageError:
        return "not an image"
    except OSError as err:  # cut short or damaged, or the file could not be read at all
        return f"corrupt or truncated ({err.strerror or err})"
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise SyntaxError, ValueError, struct.error...
        return f"corrupt ({type(err).__name__}: {err})"
    return None


def _header_problem(image_format: str, width: int, height: int) -> str | None:
    if image_format not in DECODABLE_FORMATS:
        return f"{image_format} image, which MindSpore's decoder does not read; convert it to JPEG or PNG"
    if width == 0 or height == 0:
        return f"zero-size image ({width}x{height})"
    return None


def _end_problem(path: Path, image_format: str, size: int) -> str | None:
    # PIL decodes a JPEG cut just before its end marker; MindSpore's decoder may not.
    marker = END_MARKERS.get(image_format)
    if marker:
        with open(path, "rb") as f:
            f.seek(max(0, size - END_MARKER_WINDOW))
            if marker not in f.read():
                return f"truncated {image_format} (no end-of-image marker)"
    return None


class _Worker:
    """A child process running this module: a JSON line of paths in, one JSON line per file out (its
    reason, or null), so that when it dies the first file it did not answer is the one that killed it.
    A plain subprocess rather than multiprocessing, whose spawn would re-run the caller's main script."""

    def __init__(self):
        # The child imports this package from where the caller did, installed or not.
        path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)
        self.process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        self.chunk: list[int] = []  # positions of the files sent and not yet answered
        self.pending = b""

    def give(self, chunk: list[int], paths: list[Path]) -> None:
        self.chunk = chunk
        try:
            # ensure_ascii: a name that is not UTF-8 travels as \udcNN escapes and arrives the same.
            self.process.stdin.write(json.dumps([str(paths[i]) for i in chunk]).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: read() says so

    def read(self) -> list[str | None] | None:
        """The answers that arrived (for the first files of the chunk), or None once the child has died."""
        data = os.read(self.process.stdout.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self.pending = (self.pending + data).split(b"\n")
        return [json.loads(line) for line in lines]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        try:
            self.process.stdin.close()
        except BrokenPipeError:  # it died before reading its chunk, which stays unflushed: nothing to send to
            pass
        self.process.stdout.close()


def _serve() -> None:
    """The child's loop (python -m vit_dist.host.image_check): answers chunks until its input ends."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a decoder prints goes to stderr, not into the answers
    for line in sys.stdin.buffer:
        for path in json.loads(line):
            answers.write(json.dumps(problem(Path(path))) + "\n")
            answers.flush()


def check_in_children(paths: list[Path], workers: int | None = None,
                      progress: Progress | None = None) -> list[str | None]:
    """problem() of every path, decoded in up to `workers` child processes (default: this process's
    cores), advancing `progress` per file. A worker that dies is replaced; the file it was decoding is
    reported as CRASHED."""
    answers: list[str | None] = [None] * len(paths)
    pending = [list(range(start, min(start + CHUNK, len(paths)))) for start in range(0, len(paths), CHUNK)]
    pending.reverse()  # popped from the end: files are checked in order
    workers = min(workers or len(os.sched_getaffinity(0)), len(pending))
    running: dict[int, _Worker] = {}  # by the fd of its output
    try:
        while pending or running:
            while pending and len(running) < workers:
                worker = _Worker()
                worker.give(pending.pop(), paths)
                running[worker.process.stdout.fileno()] = worker
            ready, _, _ = select.select(list(running), [], [])
            for fd in ready:
                answered = _collect(running, fd, pending, paths, answers)
                if progress is not None:
                    progress.advance(answered)
    finally:
        for worker in running.values():
            worker.close()
    return answers


def _collect(running: dict[int, _Worker], fd: int, pending: list[list[int]], paths: list[Path],
             answers: list[str | None]) -> int:
    """Takes a worker's answers; gives it the next chunk when it has answered all of its own; on its
    death marks the file it was on CRASHED and puts the rest of its chunk back. Returns how many files
    it answered for."""
    worker = running[fd]
    received = worker.read()
    if received is None:
        del running[fd]
        worker.close()
        if worker.process.returncode > 0:  # Python itself failed (not a signal): no file is to blame
            raise RuntimeError(f"the image check's worker exited with status {worker.process.returncode}; "
                               "its error is above")
        if not worker.chunk:
            return 0
        answers[worker.chunk[0]] = CRASHED
        if worker.chunk[1:]:
            pending.append(worker.chunk[1:])
        return 1
    for answer in received:
        answers[worker.chunk.pop(0)] = answer
    if not worker.chunk:
        if pending:
            worker.give(pending.pop(), paths)
        else:
            del running[fd]
            worker.close()
    return len(received)


def _cache_file(folder: Path, cache: Path) -> Path:
    """The cache of one split folder, in the user's cache folder `cache` (bootstrap.user_cache_dir): made
    0700 and refused unless it is theirs alone, since its answers decide which files training reads."""
    key = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:24]
    folder = private_folder(cache, "the image-check cache",
                            "remove it (it is rebuilt, mode 700) or set XDG_CACHE_HOME to a folder of your own")
    return folder / f"image-check-{key}.json"


def _read_cache(path: Path) -> dict:
    """{name: [size, mtime_ns, inode, reason]} of this checker's version, or {} if absent or unreadable."""
    try:
        cache = json.loads(path.read_bytes())
        return cache["files"] if cache.get("version") == CHECK_VERSION and isinstance(cache["files"], dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _identity(path: Path) -> list[int] | None:
    try:
        info = path.stat()
    except OSError:
        return None  # checked (and reported) like any other unreadable file
    return [info.st_size, info.st_mtime_ns, info.st_ino]


def _write_cache(path: Path, entries: dict[str, list]) -> None:
    try:
        # ensure_ascii: names that are not UTF-8 are written as \udcNN escapes and read back the same.
        write_atomic(path, json.dumps({"version": CHECK_VERSION, "files": entries}, ensure_ascii=True))
    except OSError as err:
        raise OutputError(f"cannot write the image-check cache {printable(path)} ({err.strerror}); free disk "
                          "space or set XDG_CACHE_HOME to another folder of your own") from None


def find_problems(folder: Path, names: list[str], cache: Path, workers: int | None = None,
                  show: bool = False) -> dict[int, str]:
    """{index in names: reason} for every file folder/name the decoder would fail on. Files unchanged
    since a previous check (same size, mtime_ns and inode, same checker) are answered from the cache;
    the others are decoded in child processes (with progress on stderr if `show`), and the cache is
    rewritten with the answers."""
    cache_path = _cache_file(folder, cache)
    cached = _read_cache(cache_path)
    identities = [_identity(folder / name) for name in names]
    reasons: dict[int, str | None] = {}
    for index, (name, identity) in enumerate(zip(names, identities)):
        entry = cached.get(name)
        if identity is not None and isinstance(entry, list) and len(entry) == 4 and entry[:3] == identity:
            reasons[index] = entry[3]
    unknown = [i for i in range(len(names)) if i not in reasons]
    with Progress(len(unknown), f"checking images in {printable(folder)}", "files", show) as progress:
        checked = check_in_children([folder / names[i] for i in unknown], workers, progress) if unknown else []
    decoded = dict(zip(unknown, checked))
    reasons.update(decoded)
    # A crash is not cached: it may have been the machine's (memory, a signal), not the file's.
    entries = {names[i]: identities[i] + [reason] for i, reason in reasons.items()
               if identities[i] is not None and reason != CRASHED}
    if decoded or len(entries) != len(cached):
        _write_cache(cache_path, entries)
    return {i: reasons[i] for i in range(len(names)) if reasons[i]}


if __name__ == "__main__":
    _serve()
