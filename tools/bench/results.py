# Copyright (c) kd_detr contributors.
"""What a bench has measured: runs finished in its output folder or taken over from earlier
benches' ``bench_results.json`` (``--results-from``), the per-arm summary and the result files.
A mixin of ``Bench`` in ``tools/kd_bench.py`` (which owns ``runs``, ``arms``, ``teacher``, ...)."""
import json
import os

from .arms import BenchError, claim_side_arms
from .report import write_chart, write_markdown
from .runs import finished_run, record_fields
from .stats import arm_stats, claim_difference, claim_verdict, paired_difference


def _by_seed(values, metric):
    """{seed: value} of one metric over an arm's {seed: box metrics} (runs recorded without the
    metric, e.g. before an arms file asked for it, are left out)."""
    return {seed: v[metric] for seed, v in values.items() if metric in v}


class BenchResultsMixin:
    """Result bookkeeping of a bench: ``self.runs`` are dicts with ``arm``, ``seed``, ``hash``,
    ``kd``, ``out_dir`` and, once known, ``state``, ``bbox`` and ``seconds``."""

    def take_over_results(self, plain_only=False):
        """Mark runs finished in the ``--results-from`` files as "imported": the same seed and
        resolved-config hash (whatever the arm is named there: one plain student run serves
        every bench it is the baseline of); KD runs also the same teacher weights sha256
        (``plain_only``: only the runs without the bench's teacher, before it is known)."""
        earlier = {}
        for path in getattr(self.args, "results_from", None) or []:
            try:
                with open(path) as f:
                    content = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise BenchError(f"--results-from {path!r}: cannot read it ({e})") from e
            sha = (content.get("teacher") or {}).get("weights_sha256")
            for run in content.get("runs", []):
                if run.get("bbox") and run.get("state") in ("trained", "finished", "imported"):
                    earlier[(run["seed"], run["hash"])] = (run, sha)
        ours = (self.teacher or {}).get("weights_sha256")
        taken = skipped = 0
        for run in self.runs:
            found = earlier.get((run["seed"], run["hash"]))
            if run.get("state") in ("finished", "imported") or found is None:
                continue
            if plain_only and run["kd"]:
                continue
            if run["kd"] and found[1] != ours:
                skipped += 1
                continue
            run.update(state="imported", **record_fields(found[0]))
            taken += 1
        if earlier:
            print(f"[kd_bench] --results-from: {taken} finished run(s) taken over"
                  + (f", {skipped} KD run(s) not (another teacher: weights sha256 differs)"
                     if skipped else ""), flush=True)  # fmt: skip

    def collect_finished(self):
        """Mark the runs finished in OUTPUT (their ``bench_run.json`` matches their hash), of
        those with no state yet (trained here, finished or taken over before keep theirs)."""
        for run in self.runs:
            if run.get("state"):
                continue
            record = finished_run(run["out_dir"], run["hash"])
            if record:
                run.update(state="finished", **record_fields(record))

    def check_metrics(self, run):
        """A finished run reports every metric of the bench (arms file ``metrics:``), else stop
        naming the run and the metrics its evaluator does report (its record stays)."""
        missing = [k for k in self.metrics if k not in run["bbox"]]
        if missing:
            raise BenchError(
                f"arm {run['arm']!r} seed {run['seed']}: its evaluation reports no {missing} "
                f"(it reports {sorted(run['bbox'])}); choose the metrics of the arms file "
                "('metrics:') among these, or set the evaluator that computes them "
                "(TEST.EVALUATOR, e.g. coco_incremental for AP-base / AP-novel)"
            )

    def summary(self):
        per_arm = {}
        for run in self.runs:
            if run.get("bbox"):
                per_arm.setdefault(run["arm"], {})[run["seed"]] = run["bbox"]
        base = per_arm.get(self.baseline, {})
        arms = []
        for arm in self.arms:
            values = per_arm.get(arm.name, {})
            entry = {"name": arm.name, "title": arm.title, "n": len(values),
                     "stats": {k: arm_stats(list(_by_seed(values, k).values()))
                               for k in self.metrics}}  # fmt: skip
            if arm.name != self.baseline:
                entry["diff"] = {k: paired_difference(_by_seed(values, k), _by_seed(base, k))
                                 for k in self.metrics}  # fmt: skip
            arms.append(entry)
        return {"baseline": self.baseline, "arms": arms, "claims": self._claims(per_arm)}

    def _claims(self, per_arm):
        """The arms file's claims among this bench's arms: the paired difference better - than
        in the claim's metric and its verdict (:func:`~bench.stats.claim_verdict`)."""
        names = {arm.name for arm in self.arms}
        out = []
        for claim in self.spec.claims:
            if not names.issuperset(claim_side_arms(claim.better) + claim_side_arms(claim.than)):
                continue  # a part of the bench (--arms) without one of them
            metric = claim.metric or self.metrics[0]
            values = {arm: _by_seed(by_seed, metric) for arm, by_seed in per_arm.items()}
            diff = claim_difference(values, claim.better, claim.than)
            out.append({"better": claim.better, "than": claim.than, "source": claim.source,
                        "metric": metric, "diff": diff, "verdict": claim_verdict(diff)})
        return out

    def result(self, seconds):
        data = self.data
        runs = [{k: r.get(k) for k in ("arm", "title", "seed", "config", "opts", "kd", "hash",
                                       "out_dir", "state", "bbox", "seconds", "cpu_seconds",
                                       "resumed_at_iteration")}
                for r in self.runs]  # fmt: skip
        classes = data.classes if data else (self.runs[0]["classes"] or [])
        return {
            "arms_file": self.arms_file, "iters": self.iters, "seeds": self.seeds,
            "metrics": list(self.metrics),
            "arms": [{"name": a.name, "config": a.config, "opts": a.opts} for a in self.arms],
            "overrides": list(self.args.opts or []),
            "data": {"train": data.train.source if data else self.runs[0]["datasets"][0],
                     "test": data.test.source if data else self.runs[0]["datasets"][1],
                     "classes": list(classes)},
            "teacher": self.teacher, "runs": runs, "summary": self.summary(),
            "job_seconds": round(seconds, 1),
        }  # fmt: skip

    def write_results(self, seconds, charts=True):
        result = self.result(seconds)
        # Atomic: a --report-only process may write the same file while a bench still runs.
        path = os.path.join(self.output, "bench_results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)
        if charts:
            write_markdown(result, os.path.join(self.output, "bench_results.md"))
            write_chart(result, os.path.join(self.output, "bench_ap.png"))
        return result
