"""Imported only by the runner's fork server: pay torch's one-time lazy set-up once.

FakeTensorMode, FlopCounterMode and the dispatcher's Python paths initialise lazily
(about a second on first use); doing it here, before the server forks, means every
case's child starts warm (a predicted_oom case then takes a fraction of a second).
"""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from effbench.measure.flops import count_flops
from effbench.measure.memory import tracked_peak

with FakeTensorMode():
    _q = torch.randn(1, 1, 8, 8)
    tracked_peak(lambda: torch.softmax(_q @ _q.transpose(-1, -2), -1) @ _q)
    count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(_q, _q, _q))
del _q
