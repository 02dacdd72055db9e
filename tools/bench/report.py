# Copyright (c) kd_detr contributors.
"""Reports of a bench: the console tables, ``bench_results.md`` and ``bench_ap.png``."""
import math

from .arms import claim_side_label
from .run_lock import RunLock
from .runs import finished_run

__all__ = [
    "METRICS", "claim_label", "claim_rows", "duration", "fmt", "metrics_of", "print_plan",
    "print_tables", "run_rows", "summary_rows", "time_totals", "write_chart", "write_markdown",
]  # fmt: skip

METRICS = ("AP", "AP50", "AP75")  # the default metrics of a bench (arms file ``metrics:``)


def metrics_of(result):
    """The metrics a bench reports (``result["metrics"]``; results written before it: METRICS)."""
    return tuple(result.get("metrics") or METRICS)


def summary_headers(result):
    return ["arm", "seeds", *[f"{k} (mean ± std)" for k in metrics_of(result)]]


def fmt(value, digits=1, sign=False):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _mean_std(stat):
    return fmt(stat["mean"]) + ("" if math.isnan(stat["std"]) else f" ± {fmt(stat['std'])}")


def _diff(d):
    if d["n"] == 0:
        return "-"
    text = fmt(d["mean"], sign=True)
    return text + ("" if math.isnan(d["low"]) else f" [{fmt(d['low'], sign=True)}, "
                   f"{fmt(d['high'], sign=True)}]")  # fmt: skip


def run_rows(result):
    """Rows of the per-run table: the teacher first, then every run."""
    rows = []
    metrics = metrics_of(result)
    teacher = result.get("teacher")
    if teacher and teacher.get("bbox"):
        seconds = "cached" if teacher["state"] == "cached" else teacher.get("seconds", "-")
        title = "teacher" + (f" ({teacher['state']})" if teacher["state"] != "trained" else "")
        rows.append([title, "-", teacher["iters"], *[fmt(teacher["bbox"].get(k)) for k in metrics],
                     seconds])  # fmt: skip
    for run in result["runs"]:
        bbox = run.get("bbox") or {}
        rows.append([run["title"], run["seed"], result["iters"],
                     *[fmt(bbox.get(k)) for k in metrics], run.get("seconds", "-")])  # fmt: skip
    return rows


def summary_rows(result):
    """Rows of the per-arm table: mean ± std over seeds and the paired difference to the
    baseline with its 95% t-interval, per metric."""
    rows = []
    metrics = metrics_of(result)
    for arm in result["summary"]["arms"]:
        row = [arm["title"], arm["n"]] + [_mean_std(arm["stats"][k]) for k in metrics]
        row += [_diff(arm["diff"][k]) if arm.get("diff") else "(baseline)" for k in metrics]
        rows.append(row)
    return rows


def _seconds(run):
    """A run's seconds; a resumed run's cover the iterations from its checkpoint on."""
    at = run.get("resumed_at_iteration")
    return fmt(run.get("seconds")) + (f" (resumed at iteration {at})" if at else "")


CLAIM_HEADERS = ["claim", "metric", "seeds", "Δ (better - than) [95% CI]", "verdict", "source"]


def claim_label(claim):
    """``better > than`` of a claim's result entry (a group side: ``mean(a, b, ...)``)."""
    return f"{claim_side_label(claim['better'])} > {claim_side_label(claim['than'])}"


def claim_rows(result):
    """Rows of the claims table: each ordering of the arms file, its paired difference and
    verdict (results written before claims existed: none)."""
    return [[claim_label(c), c["metric"], c["diff"]["n"], _diff(c["diff"]),
             c["verdict"], c["source"] or "-"]
            for c in result["summary"].get("claims", [])]  # fmt: skip


def _claims_markdown(result):
    rows = claim_rows(result)
    if not rows:
        return []
    lines = ["", "Claims of the arms file (`claims:`), each a paired difference better - than "
             "over the seeds both arms have: *agrees* / *contradicted* when its 95% interval "
             "excludes 0, else *unresolved* with the sign seen (one seed: no interval).", "",
             "| " + " | ".join(CLAIM_HEADERS) + " |", "|" + " --- |" * len(CLAIM_HEADERS)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines  # fmt: skip


def time_totals(result):
    """One sentence: the wall-clock and CPU time of the finished runs and of the teacher (CPU
    time where measured; a resumed run's times cover the iterations after its checkpoint)."""
    runs = [r for r in result["runs"] if r.get("bbox")]
    wall = sum(r.get("seconds") or 0.0 for r in runs)
    measured = [r["cpu_seconds"] for r in runs if r.get("cpu_seconds") is not None]
    text = (f"Time: {len(runs)} finished run(s), {duration(wall)} wall-clock in all; CPU time "
            f"measured for {len(measured)} of them: {duration(sum(measured))}")  # fmt: skip
    teacher = result.get("teacher") or {}
    if teacher.get("seconds"):
        cpu = teacher.get("cpu_seconds")
        text += (f"; teacher {duration(teacher['seconds'])} wall-clock"
                 + (f", {duration(cpu)} CPU" if cpu is not None else ""))  # fmt: skip
    resumed = sum(1 for r in runs if r.get("resumed_at_iteration"))
    if resumed:
        text += f" ({resumed} resumed run(s): their times cover the part after the checkpoint)"
    return text + "."


def write_markdown(result, path):
    baseline = result["summary"]["baseline"]
    metrics = metrics_of(result)
    headers = summary_headers(result) + [f"Δ{k} vs {baseline} [95% CI]" for k in metrics]
    lines = [
        f"# KD bench: {result['arms_file']}",
        "",
        f"Train: {result['data']['train']}; test: {result['data']['test']}; classes: "
        f"{', '.join(result['data']['classes'])}. {result['iters']} iterations per run, seeds "
        f"{result['seeds']}.",
        "",
    ]
    teacher = result.get("teacher")
    if teacher and teacher.get("bbox"):
        lines += [
            f"Teacher: `{teacher['config']}`, {teacher['iters']} iterations ({teacher['state']}, "
            f"`{teacher['weights']}`): " + ", ".join(
                f"{k} {fmt(teacher['bbox'].get(k))}" for k in metrics)
            + (f"; weights sha256 `{teacher['weights_sha256']}`"
               if teacher.get("weights_sha256") else ""),
            "",
        ]  # fmt: skip
    lines += ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for row in summary_rows(result):
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    lines += [
        "",
        "Mean ± sample standard deviation over seeds. Δ: mean of the per-seed differences to the "
        f"baseline arm `{baseline}` (same seed), with the two-sided 95% Student-t interval over "
        "the paired seeds (none for fewer than 2 seeds); an interval that excludes 0 is a "
        "difference beyond seed noise.",
        *_claims_markdown(result),
        "",
        "| arm | config | overrides |",
        "| --- | --- | --- |",
    ]
    for arm in result["arms"]:
        lines.append(f"| {arm['name']} | `{arm['config']}` | `{' '.join(arm['opts']) or '-'}` |")
    run_headers = ["run", "seed", *metrics, "seconds", "CPU seconds", "state", "config hash"]
    lines += ["", "| " + " | ".join(run_headers) + " |", "|" + " --- |" * len(run_headers)]
    for run in result["runs"]:
        bbox = run.get("bbox") or {}
        lines.append(f"| {run['arm']} | {run['seed']} | " + " | ".join(
            fmt(bbox.get(k)) for k in metrics) + f" | {_seconds(run)} | "
            f"{fmt(run.get('cpu_seconds'))} | {run.get('state') or 'to train'} | "
            f"{run['hash']} |")  # fmt: skip
    lines += ["", time_totals(result)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(result, path):
    """Bar chart of AP per arm (mean over seeds, error bars: std), teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["summary"]["arms"]
    means = [a["stats"]["AP"]["mean"] for a in arms]
    stds = [0.0 if math.isnan(a["stats"]["AP"]["std"]) else a["stats"]["AP"]["std"] for a in arms]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(arms) + 1.5), 4.0))
    ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([a["name"] for a in arms], rotation=30, ha="right")
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"box AP (mean ± std over {len(result['seeds'])} seed(s))")
    teacher = result.get("teacher")
    if teacher and teacher.get("bbox"):
        ax.axhline(teacher["bbox"]["AP"], color="gray", linestyle="--", label="teacher")
        ax.legend(loc="lower right")
    ax.set_title(f"KD bench: {result['arms_file']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def duration(seconds):
    """"1h05m" or "4m07s"."""
    seconds = int(round(seconds))
    h, m = seconds // 3600, seconds % 3600 // 60
    return f"{h}h{m:02d}m" if h else f"{m}m{seconds % 60:02d}s"


def print_tables(result):
    """The per-run table (teacher first) and the per-arm table, on the console."""
    from tabulate import tabulate

    metrics = metrics_of(result)
    headers = ["model", "seed", "iters", *(f"{k} (%)" for k in metrics), "train + eval s"]
    print()
    print(tabulate(run_rows(result), headers=headers))
    baseline = result["summary"]["baseline"]
    print(f"\nper arm, paired difference to {baseline!r} with 95% t-interval over seeds:")
    print(tabulate(summary_rows(result),
                   headers=summary_headers(result) + [f"Δ{k}" for k in metrics]))  # fmt: skip
    rows = claim_rows(result)
    if rows:
        print("\nclaims (paired difference better - than, 95% t-interval):")
        print(tabulate(rows, headers=CLAIM_HEADERS))
    print(time_totals(result))
    print(f"whole job: {result['job_seconds']:.0f} s")


def print_plan(bench):
    """The plan of a ``Bench`` on the console: arms, seeds, data, teacher and the state of every
    run (finished, being trained by another process, to train)."""
    print(f"[kd_bench] {len(bench.arms)} arm(s) x seeds {bench.seeds} = {len(bench.runs)} runs "
          f"of {bench.iters} iterations; output {bench.output}")  # fmt: skip
    if bench.data:
        print(f"[kd_bench] data: train {bench.data.train.source}, test "
              f"{bench.data.test.source}, classes {bench.data.classes}")  # fmt: skip
    if bench.teacher:
        print(f"[kd_bench] teacher: {bench.teacher['config']}, {bench.teacher_iters} "
              f"iterations, {bench.teacher['weights']}")  # fmt: skip
    for run in bench.runs:
        state = "finished" if finished_run(run["out_dir"], run["hash"]) else "to train"
        holder = RunLock(run["out_dir"]).held_by() if state == "to train" else None
        if holder is not None:
            state = f"being trained by process {holder.get('pid')}"
        print(f"  {run['arm']} seed {run['seed']} ({run['config']}, hash {run['hash']}): "
              f"{state}")  # fmt: skip
