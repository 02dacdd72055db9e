# Copyright (c) kd_detr contributors.
"""Learning curves of a bench (``kd_bench.py --curves``): the periodic checkpoints of every
finished run evaluated (``tools/eval_checkpoints.py``, cached in each run folder), a metric per arm
against iteration, the paired difference to the baseline at each checkpoint, the claims on a
*late-training* value, the run's mean over the checkpoints of the last third of its schedule
(less sensitive to where a run happened to stop while its AP still moves), and the KD share of
the training loss per arm (``loss_share.py``)."""
import json
import math
import os
import subprocess

from .loss_share import kd_loss_share
from .report import claim_label, fmt
from .runs import ROOT
from .stats import arm_stats, claim_difference, claim_verdict, paired_difference

__all__ = ["LATE_FRACTION", "curve_summary", "evaluate_run_checkpoints", "write_curves"]

CURVE_FILE = "checkpoint_metrics.json"  # kd_detr.engine.checkpoint_curve.CURVE_FILE
LATE_FRACTION = 1 / 3  # the late-training value: checkpoints after 2/3 of the schedule


def _checkpoint_files(out_dir):
    return [n for n in os.listdir(out_dir) if n.startswith("model_") and n.endswith(".pth")]


def evaluate_run_checkpoints(run, python, log_name="eval_checkpoints.log"):
    """Evaluate ``run``'s checkpoints unless its cache is newer than all of them; returns
    "cached", "evaluated" or why not ("no folder", "no checkpoint").

    Raises:
        RuntimeError: the evaluation failed (its log named).
    """
    out_dir = run.get("out_dir")
    if not out_dir or not os.path.isfile(os.path.join(out_dir, "config.yaml")):
        return "no folder"
    files = _checkpoint_files(out_dir)
    if not files:
        return "no checkpoint"
    cache = os.path.join(out_dir, CURVE_FILE)
    newest = max(os.path.getmtime(os.path.join(out_dir, n)) for n in files)
    if os.path.isfile(cache) and os.path.getmtime(cache) >= newest:
        return "cached"
    log = os.path.join(out_dir, log_name)
    with open(log, "w") as f:
        proc = subprocess.run([python, os.path.join(ROOT, "tools", "eval_checkpoints.py"),
                               out_dir], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"evaluating the checkpoints of {out_dir} failed; see {log}")
    return "evaluated"


def _read_run_curve(run):
    """``[{"iteration", metric: value, ...}]`` of a run folder's checkpoint cache (first test
    set, box task), or None."""
    path = os.path.join(run.get("out_dir") or "", CURVE_FILE)
    try:
        with open(path) as f:
            entries = json.load(f)["checkpoints"]
    except (OSError, ValueError, KeyError):
        return None
    points = []
    for entry in entries:
        tasks = next(iter(entry["results"].values()), {})
        bbox = tasks.get("bbox") or {}
        points.append({"iteration": entry["iteration"], **bbox})
    return points or None


def _earlier_curves(results_from):
    """Run records (curve, loss share) in the ``bench_curves.json`` beside each
    ``--results-from`` file, by (arm, seed, hash): a run taken over from a committed record keeps
    its committed curve and loss share."""
    found = {}
    for path in results_from or []:
        try:
            with open(os.path.join(os.path.dirname(path), "bench_curves.json")) as f:
                content = json.load(f)
        except (OSError, ValueError):
            continue
        for run in content.get("runs", []):
            found[(run["arm"], run["seed"], run["hash"])] = run
    return found


def _late_value(curve, iters, metric):
    """Mean of ``metric`` over the checkpoints after ``(1 - LATE_FRACTION) * iters``."""
    start = (1 - LATE_FRACTION) * iters
    values = [p[metric] for p in curve if p["iteration"] > start and p.get(metric) is not None]
    return sum(values) / len(values) if values else None


def curve_summary(result, run_curves, metric="AP"):
    """Per arm and checkpoint, the metric's mean over seeds and the paired difference to the
    baseline; per arm the late-training value; the claims on the late-training value.

    Args:
        result (dict): the bench's result (``bench_results.json``).
        run_curves (dict): (arm, seed) -> curve (list of ``{"iteration", metric: value}``).
    """
    baseline = result["summary"]["baseline"]
    arms = [a["name"] for a in result["arms"]]
    by_arm = {}  # arm -> iteration -> seed -> value
    for (arm, seed), curve in run_curves.items():
        for point in curve:
            if point.get(metric) is not None:
                by_arm.setdefault(arm, {}).setdefault(point["iteration"], {})[seed] = point[metric]
    iterations = sorted({it for per_it in by_arm.values() for it in per_it})
    table = []
    for it in iterations:
        row = {"iteration": it, "arms": {}}
        base = by_arm.get(baseline, {}).get(it, {})
        for arm in arms:
            values = by_arm.get(arm, {}).get(it, {})
            entry = {"values": values, **arm_stats(list(values.values()))}
            if arm != baseline:
                entry["diff"] = paired_difference(values, base)
            row["arms"][arm] = entry
        table.append(row)
    late = {arm: {} for arm in arms}
    for (arm, seed), curve in run_curves.items():
        value = _late_value(curve, result["iters"], metric)
        if value is not None and arm in late:
            late[arm][seed] = value
    late_arms = []
    for arm in arms:
        entry = {"name": arm, "values": late[arm], **arm_stats(list(late[arm].values()))}
        if arm != baseline:
            entry["diff"] = paired_difference(late[arm], late.get(baseline, {}))
        late_arms.append(entry)
    claims = []
    for claim in result["summary"].get("claims", []):
        diff = claim_difference(late, claim["better"], claim["than"])
        claims.append({"better": claim["better"], "than": claim["than"], "diff": diff,
                       "verdict": claim_verdict(diff)})  # fmt: skip
    return {"metric": metric, "baseline": baseline, "late_after": (1 - LATE_FRACTION)
            * result["iters"], "per_checkpoint": table, "late": late_arms, "claims": claims}


def _diff_text(d):
    if d["n"] == 0:
        return "-"
    if math.isnan(d["low"]):
        return fmt(d["mean"], sign=True)
    return f"{fmt(d['mean'], sign=True)} [{fmt(d['low'], sign=True)}, {fmt(d['high'], sign=True)}]"


def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def curves_markdown(result, summary):
    metric, baseline = summary["metric"], summary["baseline"]
    arms = [a["name"] for a in result["arms"]]
    others = [a for a in arms if a != baseline]
    lines = [f"# KD bench learning curves: {result['arms_file']}", "",
             f"{metric} on the test set at every checkpoint of the finished runs "
             "(`tools/eval_checkpoints.py`), mean over the seeds evaluated (their count in "
             "brackets).", "", _row(["iteration", *arms]), "|" + " --- |" * (len(arms) + 1)]
    for row in summary["per_checkpoint"]:
        cells = [fmt(row["arms"][a]["mean"]) + f" ({row['arms'][a]['n']})"
                 if row["arms"][a]["n"] else "-" for a in arms]  # fmt: skip
        lines.append(_row([row["iteration"], *cells]))
    lines += ["", f"Paired difference to `{baseline}` at each checkpoint (same seed), 95% "
              "t-interval over the seeds both have:", "",
              _row(["iteration", *[f"{a} - {baseline}" for a in others]]),
              "|" + " --- |" * (len(others) + 1)]  # fmt: skip
    for row in summary["per_checkpoint"]:
        diffs = [_diff_text(row["arms"][a]["diff"]) for a in others]
        lines.append(_row([row["iteration"], *diffs]))
    after = summary["late_after"]
    lines += ["", f"Late-training {metric}: each run's mean over its checkpoints after iteration "
              f"{after:.0f} (the last third), then mean ± std over seeds and the paired "
              f"difference to `{baseline}`:", "",
              _row(["arm", "seeds", f"late {metric}", f"Δ vs {baseline} [95% CI]"]),
              "| --- | --- | --- | --- |"]  # fmt: skip
    for arm in summary["late"]:
        spread = "" if math.isnan(arm["std"]) else f" ± {fmt(arm['std'])}"
        diff = _diff_text(arm["diff"]) if "diff" in arm else "(baseline)"
        lines.append(_row([arm["name"], arm["n"], fmt(arm["mean"]) + spread, diff]))
    if summary.get("loss_share"):
        lines += ["", "Training loss over the last fifth of each run (Detectron2's `metrics.json`):"
                  " detection and KD terms as they enter the step, mean over seeds; KD share = "
                  "KD / (detection + KD).", "",
                  _row(["arm", "seeds", "detection loss", "KD loss", "KD share"]),
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for arm in summary["loss_share"]:
            lines.append(_row([arm["name"], arm["n"], fmt(arm["detection"], 3),
                               fmt(arm["kd"], 3), f"{100 * arm['share']:.0f}%"]))  # fmt: skip
    if summary["claims"]:
        lines += ["", f"The arms file's claims on the late-training {metric} (verdicts as in "
                  "`bench_results.md`):", "",
                  _row(["claim", "seeds", "Δ (better - than) [95% CI]", "verdict"]),
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for c in summary["claims"]:
            lines.append(_row([claim_label(c), c["diff"]["n"],
                               _diff_text(c["diff"]), c["verdict"]]))  # fmt: skip
    return "\n".join(lines) + "\n"


def write_curves_chart(result, summary, path):
    """Left: the metric per arm against iteration (mean over seeds, band: min to max over
    seeds), the teacher dashed; right: the paired difference to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, baseline = summary["metric"], summary["baseline"]
    arms = [a["name"] for a in result["arms"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10")
    for i, arm in enumerate(arms):
        rows = [r for r in summary["per_checkpoint"] if r["arms"][arm]["n"]]
        if not rows:
            continue
        its = [r["iteration"] for r in rows]
        values = [list(r["arms"][arm]["values"].values()) for r in rows]
        width = 2.5 if arm == baseline else 1.5
        left.plot(its, [r["arms"][arm]["mean"] for r in rows], color=colors(i % 10),
                  linewidth=width, label=f"{arm} ({max(len(v) for v in values)})")  # fmt: skip
        left.fill_between(its, [min(v) for v in values], [max(v) for v in values],
                          color=colors(i % 10), alpha=0.12)  # fmt: skip
        diffs = [(r["iteration"], r["arms"][arm]["diff"]["mean"]) for r in rows
                 if arm != baseline and r["arms"][arm]["diff"]["n"]]  # fmt: skip
        if diffs:
            right.plot(*zip(*diffs), color=colors(i % 10), linewidth=width, label=arm)
    teacher = result.get("teacher")
    if teacher and teacher.get("bbox") and teacher["bbox"].get(metric) is not None:
        left.axhline(teacher["bbox"][metric], color="gray", linestyle="--", label="teacher")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.axvline(summary["late_after"], color="gray", linestyle=":", linewidth=0.8)
    left.set_xlabel("iteration")
    left.set_ylabel(f"box {metric} (mean over seeds; band: min-max)")
    right.set_xlabel("iteration")
    right.set_ylabel(f"paired Δ{metric} vs {baseline} (mean over seeds)")
    left.legend(fontsize=7, loc="upper left")
    right.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"KD bench learning curves: {result['arms_file']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _loss_shares(result, shares):
    """Per arm with runs in ``shares`` ((arm, seed) -> :func:`~bench.loss_share.kd_loss_share`):
    the means over its seeds."""
    per_arm = {}
    for (arm, _), share in shares.items():
        per_arm.setdefault(arm, []).append(share)
    out = []
    for arm in result["arms"]:
        found = per_arm.get(arm["name"])
        if found:
            out.append({"name": arm["name"], "n": len(found), **{
                k: sum(s[k] for s in found) / len(found) for k in ("detection", "kd", "share")}})
    return out


def write_curves(result, output, python, results_from=(), metric="AP"):
    """Evaluate the checkpoints of every finished run of ``result`` (cached), then write
    ``bench_curves.json``, ``bench_curves.md`` and ``bench_curves.png`` into ``output``.
    Runs without a folder or checkpoints keep a committed curve and loss share
    (``bench_curves.json`` beside a ``--results-from`` file) or are left out, with a warning
    naming them. Returns the summary."""
    earlier = _earlier_curves(results_from)
    finished = [r for r in result["runs"] if r.get("bbox")]
    run_curves, shares, records, missing = {}, {}, [], []
    for i, run in enumerate(finished):
        state = evaluate_run_checkpoints(run, python)
        before = earlier.get((run["arm"], run["seed"], run["hash"])) or {}
        curve = _read_run_curve(run) or before.get("curve")
        share = kd_loss_share(run.get("out_dir"), result["iters"]) or before.get("loss_share")
        if share is not None:
            shares[(run["arm"], run["seed"])] = share
        print(f"[kd_bench] curves {i + 1}/{len(finished)} {run['arm']} seed {run['seed']}: "
              f"{state}" + ("" if curve else ", no curve"), flush=True)  # fmt: skip
        if curve is None:
            missing.append(f"{run['arm']} seed {run['seed']} ({state})")
            continue
        run_curves[(run["arm"], run["seed"])] = curve
        records.append({"arm": run["arm"], "seed": run["seed"], "hash": run["hash"],
                        "curve": curve, "loss_share": share})  # fmt: skip
    if missing:
        print(f"[kd_bench] warning: {len(missing)} finished run(s) without a curve, left out: "
              + ", ".join(missing), flush=True)  # fmt: skip
    summary = curve_summary(result, run_curves, metric)
    summary["loss_share"] = _loss_shares(result, shares)
    with open(os.path.join(output, "bench_curves.json.tmp"), "w") as f:
        json.dump({"arms_file": result["arms_file"], "iters": result["iters"], "runs": records,
                   "summary": summary}, f, indent=1)  # fmt: skip
    os.replace(os.path.join(output, "bench_curves.json.tmp"),
               os.path.join(output, "bench_curves.json"))  # fmt: skip
    with open(os.path.join(output, "bench_curves.md"), "w") as f:
        f.write(curves_markdown(result, summary))
    write_curves_chart(result, summary, os.path.join(output, "bench_curves.png"))
    return summary
