"""Find the rank that holds everyone back.

Every `every` steps all ranks exchange their mean step time and mean data-wait time over the
window (one tiny all_gather). In synchronous training the collectives even out step times,
so the time a rank spent waiting for its batches is the sharper signal: a rank whose data
wait exceeds the median by more than `margin` of a step, or whose step time exceeds the
median by `margin`, is named.
"""
from __future__ import annotations

import logging
import statistics

import torch
import torch.distributed as dist

log = logging.getLogger("scaletrain.tracking")


class StragglerMonitor:
    """Call `update` on every rank at every step (it is collective every `every` steps)."""

    def __init__(self, every: int, margin: float) -> None:
        self.every, self.margin = every, margin
        self._sum_step = self._sum_wait = 0.0
        self._n = 0
        self.last: dict[str, float] = {}
        """Figures of the latest exchange, as `straggler/*` metric keys."""
        self._fresh = False
        self._warm = False

    @staticmethod
    def _active() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def update(self, step: int, step_time_s: float, data_wait_s: float) -> str | None:
        """Accumulate this step; on exchange steps return a message naming a straggler (or None).

        The first step of a session (lazy init, first batch) is left out of the averages."""
        if self._warm:
            self._sum_step += step_time_s
            self._sum_wait += data_wait_s
            self._n += 1
        self._warm = True
        if self.every <= 0 or step % self.every or not self._active():
            return None
        mine = [self._sum_step / max(1, self._n), self._sum_wait / max(1, self._n)]
        self._sum_step = self._sum_wait = 0.0
        self._n = 0
        times = _all_gather(mine)
        message = self.judge(step, times)
        self._fresh = True
        if message and dist.get_rank() == 0:
            log.warning("%s", message)
        return message

    def metrics(self) -> dict[str, float]:
        """The latest exchange's figures once (for the next logged record), else {}."""
        if not self._fresh:
            return {}
        self._fresh = False
        return dict(self.last)

    def judge(self, step: int, times: list[list[float]]) -> str | None:
        """The straggler message for per-rank [step_time, data_wait] means (pure; testable)."""
        steps = [t[0] for t in times]
        waits = [t[1] for t in times]
        med_step, med_wait = statistics.median(steps), statistics.median(waits)
        slow = max(range(len(steps)), key=lambda r: steps[r])
        waiting = max(range(len(waits)), key=lambda r: waits[r])
        self.last = {"straggler/step_time_max_s": steps[slow], "straggler/step_time_median_s": med_step,
                     "straggler/data_wait_max_s": waits[waiting], "straggler/data_wait_median_s": med_wait,
                     "straggler/slowest_rank": float(slow), "straggler/most_waiting_rank": float(waiting)}
        if med_step > 0 and waits[waiting] - med_wait > self.margin * med_step:
            return (f"straggler at step {step}: rank {waiting} waited {waits[waiting]:.3f} s per step for "
                    f"data (median rank {med_wait:.3f} s, step {med_step:.3f} s): its loader is the "
                    "bottleneck (raise data.num_workers, check its node's disk/network)")
        if med_step > 0 and steps[slow] > (1 + self.margin) * med_step:
            return (f"straggler at step {step}: rank {slow} takes {steps[slow]:.3f} s per step, "
                    f"{steps[slow] / med_step - 1:.0%} over the median {med_step:.3f} s "
                    f"(data wait {waits[slow]:.3f} s): check that rank's node (GPU clocks, thermals, "
                    "other jobs)")
        return None


def _all_gather(values: list[float]) -> list[list[float]]:
    """All ranks' `values`; on the CUDA device for NCCL groups, on CPU for gloo."""
    backend = str(dist.get_backend())
    device = (torch.device("cuda", torch.cuda.current_device())
              if "nccl" in backend and torch.cuda.is_available() else torch.device("cpu"))
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]
