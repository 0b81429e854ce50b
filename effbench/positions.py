"""Numbers for position encodings (mechanisms that declare ``comparable = "position"``): parameters and
peak memory per N, their log-log fits, and how they compare with the full table they replace.

A position encoding is never compared with attention. It is compared with the *reference*: among the
representative position configurations of a setting, the one whose parameter count grows fastest with
N (ties: the most parameters at its largest N) — found from the data, not from a name. With the
built-in encodings that is the learned N×D table (parameters ∝ N); the axial encoding's grow as √N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from .fits import Fit, fit_configs, ratio
from .status import Status

QUANTITIES = {"params": "param_bytes", "memory": "memory_bytes"}  # quantity -> column of the points frame
RATIO_COLUMNS = ["config", "label", "reference", "n", "params_ratio", "memory_ratio"]


@dataclass
class Positions:
    """The position encodings of a results file, in numbers."""

    configs: pd.DataFrame  # every position configuration (rows of Analysis.configs)
    representatives: pd.DataFrame  # one configuration per mechanism: the columns of the table
    points: pd.DataFrame  # their points (config, n, status, param_bytes, memory_bytes, ...)
    fits: dict[tuple[str, str], Fit]  # (config, "params" | "memory") -> Fit over the ok points
    reference: str | None  # the configuration the others are compared with; None with fewer than 2 representatives
    ratios: pd.DataFrame  # per other representative and N both ran: reference ÷ it, in params and in memory


def _fit_quantities(ok: pd.DataFrame) -> dict[tuple[str, str], Fit]:
    """Log-log fit of parameters and of memory vs N per configuration (ok points only)."""
    return fit_configs(ok, QUANTITIES)


def reference_config(reps: pd.DataFrame, ok: pd.DataFrame, fitted: dict[tuple[str, str], Fit]) -> str | None:
    """The representative whose parameters grow fastest with N (then: whose memory does; then: the most
    parameters at its largest N); None with fewer than 2 representatives."""
    if len(reps) < 2:
        return None

    def key(config: str) -> tuple[float, float, float]:
        params, memory = fitted.get((config, "params")), fitted.get((config, "memory"))
        mine = ok[ok["config"].eq(config)].sort_values("n")
        last = float(mine["param_bytes"].iloc[-1]) if len(mine) else math.nan
        return (params.slope if params else -math.inf, memory.slope if memory else -math.inf,
                last if math.isfinite(last) else -math.inf)

    return max(reps["config"], key=key)


def reference_ratios(ok: pd.DataFrame, reps: pd.DataFrame, reference: str | None) -> pd.DataFrame:
    """For every representative other than the reference, in the reference's setting, at every N both ran:
    ``params_ratio`` = reference parameters ÷ its parameters, ``memory_ratio`` = the same for peak memory."""
    if reference is None:
        return pd.DataFrame(columns=RATIO_COLUMNS)
    by_config = reps.set_index("config")
    ref = ok[ok["config"].eq(reference)].set_index("n")
    records = []
    for config in reps["config"]:
        if config == reference or by_config.at[config, "setting"] != by_config.at[reference, "setting"]:
            continue
        mine = ok[ok["config"].eq(config)].set_index("n")
        for n in sorted(set(mine.index) & set(ref.index)):
            records.append({"config": config, "label": by_config.at[config, "label"],
                            "reference": by_config.at[reference, "label"], "n": int(n),
                            "params_ratio": ratio(ref.at[n, "param_bytes"], mine.at[n, "param_bytes"]),
                            "memory_ratio": ratio(ref.at[n, "memory_bytes"], mine.at[n, "memory_bytes"])})
    return pd.DataFrame.from_records(records, columns=RATIO_COLUMNS)


def analyse_positions(cfg: pd.DataFrame, pts: pd.DataFrame,
                      pick_representatives: Callable[[pd.DataFrame], pd.DataFrame]) -> Positions | None:
    """The position configurations ``cfg`` (rows of the configurations frame) and their points, fits and
    ratios against the reference; ``pick_representatives`` chooses one configuration per mechanism.
    None when ``cfg`` is empty."""
    if cfg.empty:
        return None
    mine = pts[pts["config"].isin(cfg["config"])]
    ok = mine[mine["status"].eq(Status.OK)]
    fitted = _fit_quantities(ok)
    reps = pick_representatives(cfg)
    reference = reference_config(reps, ok, fitted)
    return Positions(configs=cfg, representatives=reps, points=mine, fits=fitted, reference=reference,
                     ratios=reference_ratios(ok, reps, reference))
