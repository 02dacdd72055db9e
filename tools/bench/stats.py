# Copyright (c) kd_detr contributors.
"""Statistics of a bench: mean and spread over seeds, paired differences with t-intervals."""
import math

from .arms import claim_side_arms

__all__ = [
    "arm_stats", "claim_difference", "claim_verdict", "group_by_seed", "paired_difference",
]  # fmt: skip


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # sample variance (ddof 1)
    return mean, math.sqrt(var)


def arm_stats(values):
    """``{"n", "mean", "std"}`` of one arm's metric over seeds (std: ddof 1, NaN for n < 2)."""
    mean, std = _mean_std(list(values))
    return {"n": len(values), "mean": mean, "std": std}


def group_by_seed(arms):
    """Each seed's mean over a group of arms, for the seeds every arm of the group has.

    Args:
        arms (list[dict]): per arm, seed -> metric value.

    Returns:
        dict: seed -> mean over the arms (a single arm: its values unchanged).
    """
    if not arms:
        return {}
    seeds = set(arms[0]).intersection(*arms[1:])
    return {s: sum(arm[s] for arm in arms) / len(arms) for s in sorted(seeds)}


def paired_difference(arm, baseline, confidence=0.95):
    """Paired difference ``arm - baseline`` over the seeds both have.

    Args:
        arm, baseline (dict): seed -> metric value.
        confidence (float): level of the two-sided Student-t interval.

    Returns:
        dict: ``n`` (paired seeds), ``mean``, ``std`` of the differences, ``low`` / ``high``
        (the interval; NaN for n < 2) and ``seeds``.
    """
    from scipy import stats

    seeds = sorted(set(arm) & set(baseline))
    diffs = [arm[s] - baseline[s] for s in seeds]
    mean, std = _mean_std(diffs)
    n = len(diffs)
    if n < 2:
        low = high = float("nan")
    else:
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"n": n, "mean": mean, "std": std, "low": low, "high": high, "seeds": seeds}


def claim_difference(values, better, than):
    """The paired difference ``better - than`` of a claim whose sides are arms or groups of arms
    (a group: each seed's mean over its arms, :func:`group_by_seed`).

    Args:
        values (dict): arm -> {seed: metric value}.
        better, than: a claim's sides (an arm name or a list of them).

    Returns:
        dict: as :func:`paired_difference`.
    """
    better, than = (group_by_seed([values.get(a, {}) for a in claim_side_arms(side)])
                    for side in (better, than))  # fmt: skip
    return paired_difference(better, than)


def claim_verdict(diff):
    """What a paired difference ``better - than`` (:func:`paired_difference`) says of the claim
    "better is above than":

    * "not run yet": no seed has both arms;
    * "agrees" / "contradicted": the interval excludes 0 (a difference beyond seed noise), with
      the claimed / the opposite sign;
    * "unresolved, same sign" / "unresolved, opposite sign": the interval holds 0, or a single
      seed (no interval) with that sign ("unresolved, tie" for a zero difference).
    """
    if diff["n"] == 0:
        return "not run yet"
    mean, low, high = diff["mean"], diff["low"], diff["high"]
    if not (math.isnan(low) or math.isnan(high)):
        if low > 0:
            return "agrees"
        if high < 0:
            return "contradicted"
    if mean == 0:
        return "unresolved, tie"
    return "unresolved, same sign" if mean > 0 else "unresolved, opposite sign"
