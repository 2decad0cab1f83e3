"""train.profile_steps [a, b]: MindSpore's profiler over steps a..b (numbered as the log numbers them,
from 1), every rank into RUN_DIR/profile/rank_N, analysed once step b is done."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from vit_dist.host.placement import Placement

PROFILE_DIR = "profile"
# What each device's profile collects: the framework's host side (ProfilerActivity.CPU: every CPU kernel
# on the CPU backend), and the device's kernels on Ascend (NPU) and GPU.
ACTIVITIES = {"CPU": ("CPU",), "GPU": ("CPU", "GPU"), "Ascend": ("CPU", "NPU")}


def trace_files(run_dir: Path, rank: int) -> list[Path]:
    """The Chrome-trace files the profile of that rank holds (MindSpore's trace_view.json)."""
    return sorted((run_dir / PROFILE_DIR / f"rank_{rank}").rglob("trace_view.json"))


class StepProfiler:
    """Starts MindSpore's profiler before step a and stops and analyses it after step b. Every rank
    calls after_step at every step (each profiles itself); without train.profile_steps it does nothing.
    A run resumed inside the window profiles the rest of it."""

    def __init__(self, window: Optional[tuple[int, int]], run_dir: Path, placement: Placement, device_target: str,
                 start_step: int, say):
        self.window, self.run_dir, self.placement, self.device_target = window, run_dir, placement, device_target
        self.say = say
        self.profiler = None
        if window is not None and window[0] - 1 <= start_step < window[1]:
            self._start()

    def after_step(self, step: int) -> None:
        if self.window is None:
            return
        if self.profiler is not None and step == self.window[1]:
            self._finish()
        elif step == self.window[0] - 1:
            self._start()

    def _start(self) -> None:
        import mindspore as ms
        from mindspore.profiler import ProfilerActivity

        activities = [getattr(ProfilerActivity, name) for name in ACTIVITIES[self.device_target]]
        self.profiler = ms.Profiler(start_profile=False, activities=activities,
                                    output_path=str(self.run_dir / PROFILE_DIR / f"rank_{self.placement.rank}"))
        self.profiler.start()

    def _finish(self) -> None:
        self.profiler.stop()
        self.profiler.analyse()
        self.profiler = None
        traces = trace_files(self.run_dir, self.placement.rank)
        first, last = self.window
        where = traces[-1] if traces else self.run_dir / PROFILE_DIR / f"rank_{self.placement.rank}"
        self.say(f"profile of steps {first}-{last}: {where} (rank_N beside it for the other ranks); open the "
                 "trace_view.json in https://ui.perfetto.dev or chrome://tracing")
