"""A PNG of a run's curves against step, from its metrics.jsonl: train loss, val top-1 (and its EMA's),
val loss, learning rate, loss scale and images/s. matplotlib is the optional `plot` extra: training nodes need no
plotting stack, and `vit-dist plot RUN_DIR` draws the same figure anywhere later."""
from __future__ import annotations

import json
from pathlib import Path

from vit_dist.host.errors import ConfigError, DependencyError

PLOT_FILE = "curves.png"
# (metrics.jsonl key, panel title); a panel whose key no record has is left out.
PANELS = [("loss", "train loss"), ("top1", "val top-1"), ("ema_top1", "val top-1 of the EMA"), ("val_loss", "val loss"),
          ("lr", "learning rate"), ("loss_scale", "loss scale"), ("images_per_sec", "images/s")]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; pass a run directory (train.output_dir)")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:  # a run killed mid-write leaves a partial last line
            if number != len(lines):
                raise ConfigError(f"{path}:{number} is not JSON") from None
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records carrying key (a null, e.g. a diverged loss, is skipped)."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes RUN_DIR/curves.png (or OUT); returns its path."""
    try:
        # The Agg canvas without pyplot: files only, no display or GUI backend on training nodes.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DependencyError("plotting needs matplotlib: pip install 'vit-dist[plot]' (or pip install matplotlib)") \
            from None

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    panels = [(key, title) for key, title in PANELS if series(records, key)[0]]
    if not panels:
        raise ConfigError(f"{run_dir}/metrics.jsonl has no step records yet; plot after the first log interval")
    fig = Figure(figsize=(7, 2.2 * len(panels)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        steps, values = series(records, key)
        evaluations = key in ("top1", "ema_top1", "val_loss")
        ax.plot(steps, values, marker="o" if evaluations or len(steps) < 30 else None, markersize=3)
        ax.set_ylabel(title)
        if key in ("lr", "loss_scale") and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(run_dir.resolve().name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / PLOT_FILE
    fig.savefig(out, dpi=100)
    return out
