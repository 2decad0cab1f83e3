"""What train.tensorboard costs per metrics record, in-process and paired: RunRecord.log appending to
metrics.jsonl alone, and with the TensorBoard event writer, alternating which goes first; the medians
of 400 records each. Run from the repository: PYTHONPATH=. python benchmarks/tensorboard_log_cost.py"""
import contextlib
import io
import tempfile
import time
from pathlib import Path

from vit_dist.host.run_record import RunRecord

RECORD = {"step": 0, "epoch": 1, "total_steps": 1000, "loss": 1.5, "lr": 1e-3, "images_per_sec": 80.0,
          "data_wait": 0.01, "eta_s": 100.0, "step_time_fastest_s": 0.8, "step_time_slowest_s": 0.81,
          "slowest_rank": 1}


def main() -> None:
    plain, board = RunRecord(Path(tempfile.mkdtemp()), True), RunRecord(Path(tempfile.mkdtemp()), True)
    board.open_tensorboard(0)
    times = {"plain": [], "board": []}
    with contextlib.redirect_stdout(io.StringIO()):  # the log line itself is the same for both
        for step in range(1, 401):
            pair = (("plain", plain), ("board", board))
            for name, record in pair if step % 2 else pair[::-1]:
                started = time.perf_counter()
                record.log({**RECORD, "step": step}, "line")
                times[name].append(time.perf_counter() - started)
    board.close()
    median = {name: sorted(values)[len(values) // 2] * 1e3 for name, values in times.items()}
    print(f"median ms per record: metrics.jsonl {median['plain']:.3f}, + tensorboard {median['board']:.3f}, "
          f"ratio {median['board'] / median['plain']:.2f}")


if __name__ == "__main__":
    main()
