"""Imported only by the runner's fork server: pay torch's one-time lazy set-up once.

FakeTensorMode, FlopCounterMode and the dispatcher's Python paths initialise lazily
(about a second on first use); doing it here, before the server forks, means every
case's child starts warm (a predicted_oom case then takes a fraction of a second).
"""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from effbench.measure.flops import count_flops
from effbench.measure.memory import tracked_peak


def _warm() -> None:
    with FakeTensorMode():
        q = torch.randn(1, 1, 8, 8)
        tracked_peak(lambda: torch.softmax(q @ q.transpose(-1, -2), -1) @ q)
        count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))


_warm()
