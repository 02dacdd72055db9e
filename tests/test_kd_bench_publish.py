# Copyright (c) kd_detr contributors.
"""kd_bench.py --publish DIR (tools/bench/publish.py): copies of the result files refreshed after
every run, a record that a later bench takes over when OUTPUT is gone, and never a lost run."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

from .common import REPO_ROOT
from .test_kd_bench_runs import STUDENT, _finish, _write

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import kd_bench  # noqa: E402
from bench import BenchError, load_arms  # noqa: E402
from bench.publish import RESULT_FILES, publish, publish_lock  # noqa: E402


def _runs(path):
    with open(path) as f:
        runs = json.load(f)["runs"]
    return {r["seed"]: (r["state"], r["bbox"] and r["bbox"]["AP"]) for r in runs}


class TestPublish(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="kd_bench_publish_")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        arms = f"iters: 2\nseeds: [0, 1]\narms:\n  - {{name: no_kd, config: {STUDENT}}}\n"
        self.arms = _write(os.path.join(self.tmp, "arms.yaml"), arms)
        self.out = os.path.join(self.tmp, "out")
        self.record = os.path.join(self.tmp, "docs", "ablation")
        self.trained = []
        self.seen_in_record = []

    def _bench(self, *flags):
        """Run the bench with a stand-in train_run; returns (result, console)."""
        def fake_train_run(python, config, out_dir, opts, *, run_hash, **kwargs):
            path = os.path.join(self.record, "bench_results.json")
            self.seen_in_record.append(_runs(path) if os.path.isfile(path) else None)
            self.trained.append(os.path.basename(out_dir))
            return _finish(out_dir, run_hash, 40.0 + 10 * len(self.trained))

        args = kd_bench.parse_args([self.arms, "--output", self.out, *flags])
        original = kd_bench.train_run
        kd_bench.train_run = fake_train_run
        try:
            with contextlib.redirect_stdout(io.StringIO()) as stdout:
                result = kd_bench.run_bench(load_arms(self.arms), args, self.arms)
        finally:
            kd_bench.train_run = original
        return result, stdout.getvalue()

    def test_refreshed_after_every_run_and_taken_over_once_output_is_gone(self):
        _, console = self._bench("--publish", self.record)
        # When seed 1 started, the record already held seed 0 (published after its run).
        self.assertEqual(self.seen_in_record, [None, {0: ("trained", 50.0), 1: (None, None)}])
        self.assertEqual(_runs(os.path.join(self.record, "bench_results.json")),
                         {0: ("trained", 50.0), 1: ("trained", 60.0)})  # fmt: skip
        self.assertEqual(sorted(os.listdir(self.record)), sorted(RESULT_FILES))  # nothing else
        self.assertIn(f"published bench_results.json, bench_results.md, bench_ap.png to "
                      f"{self.record}", console)  # fmt: skip
        # OUTPUT lost: the same command with the record as --results-from trains nothing.
        shutil.rmtree(self.out)
        self.trained.clear()
        committed = os.path.join(self.record, "bench_results.json")
        result, _ = self._bench("--publish", self.record, "--results-from", committed)
        self.assertEqual(self.trained, [])
        self.assertEqual({r["seed"]: (r["state"], r["bbox"]["AP"]) for r in result["runs"]},
                         {0: ("imported", 50.0), 1: ("imported", 60.0)})  # fmt: skip
        self.assertEqual(_runs(committed), {0: ("imported", 50.0), 1: ("imported", 60.0)})

    def test_bad_targets_stop_before_anything_trains(self):
        _write(os.path.join(self.record, "bench_results.json"), json.dumps({"runs": []}))
        with self.assertRaises(BenchError) as e:
            self._bench("--publish", self.record)
        self.assertIn("is not a --results-from file", str(e.exception))
        self.assertIn(f"add --results-from {self.record}/bench_results.json", str(e.exception))
        with self.assertRaisesRegex(BenchError, "is the bench's output folder"):
            self._bench("--publish", self.out)
        with self.assertRaisesRegex(BenchError, "is a file"):
            self._bench("--publish", os.path.join(self.record, "bench_results.json"))
        self.assertEqual(self.trained, [])

    def test_a_refresh_that_would_drop_a_finished_run_is_refused(self):
        def run(seed, run_hash, kd, ap):
            return {"seed": seed, "hash": run_hash, "kd": kd, "bbox": {"AP": ap} if ap else None}

        recorded = {"teacher": {"weights_sha256": "aaa"},
                    "runs": [run(0, "h0", False, 5.0), run(0, "k0", True, 7.0)]}  # fmt: skip
        path = _write(os.path.join(self.record, "bench_results.json"), json.dumps(recorded))
        out = os.path.join(self.tmp, "out")
        _write(os.path.join(out, "bench_results.json"), "new")
        console = io.StringIO()
        # The KD run finished again, but against another teacher: a different record.
        other_teacher = {"teacher": {"weights_sha256": "bbb"},
                         "runs": [run(0, "h0", False, 5.0), run(0, "k0", True, 9.0)]}  # fmt: skip
        with contextlib.redirect_stdout(console):
            self.assertFalse(publish(out, self.record, other_teacher))
        self.assertIn("records 1 finished run(s) this bench does not have", console.getvalue())
        with open(path) as f:
            self.assertEqual(json.load(f), recorded)  # kept as it was
        # The same teacher and every recorded run still finished: refreshed.
        same = {"teacher": {"weights_sha256": "aaa"}, "runs": [
            run(0, "h0", False, 5.0), run(0, "k0", True, 7.0), run(1, "h1", False, 6.0)]}
        with contextlib.redirect_stdout(console):
            self.assertTrue(publish(out, self.record, same))
        with open(path) as f:
            self.assertEqual(f.read(), "new")

    def test_processes_take_turns(self):
        code = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {os.path.join(REPO_ROOT, "tools")!r})
            from bench.publish import publish_lock
            with publish_lock({self.record!r}):
                print("holding", flush=True)
                time.sleep(1.0)
        """)
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(holder.stdout.readline().strip(), "holding")
            start = time.monotonic()
            with publish_lock(self.record):
                waited = time.monotonic() - start  # our turn came once the holder let go
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
        self.assertGreater(waited, 0.3)


if __name__ == "__main__":
    unittest.main()
