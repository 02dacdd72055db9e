# Copyright (c) kd_detr contributors.
"""KD bench runs (tools/bench/runs.py, run_lock.py): an interrupted run resumes, and bench
processes sharing an output folder claim runs so that none is trained twice."""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

from .common import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import kd_bench  # noqa: E402
from bench import load_arms  # noqa: E402
from bench.run_lock import RunLock  # noqa: E402

STUDENT = "configs/demo/dab_detr_efflite0_demo.yaml"
KD = "configs/kd_detr/kd_dab_detr_efflite0_from_efflite2_demo.yaml"
TEACHER = "configs/demo/dab_detr_efflite2_demo.yaml"


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def _finish(out_dir, run_hash, ap):
    """The files a finished bench run leaves (what train_run writes)."""
    metrics = {"results": {"kd_demo_val": {"bbox": {"AP": ap, "AP50": ap + 1, "AP75": ap - 1}}}}
    _write(os.path.join(out_dir, "metrics_final.json"), json.dumps(metrics))
    record = {"hash": run_hash, "bbox": metrics["results"]["kd_demo_val"]["bbox"], "seconds": 1.0}
    _write(os.path.join(out_dir, "bench_run.json"), json.dumps(record))
    return record


class _Holder:
    """Another process holding the claim on a run folder until stopped."""

    def __init__(self, out_dir):
        code = textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {os.path.join(REPO_ROOT, "tools")!r})
            from bench.run_lock import RunLock
            assert RunLock({out_dir!r}).acquire() is None
            print("claimed", flush=True)
            time.sleep(600)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "claimed"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()


class TestRunClaims(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="kd_bench_claims_")
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name

    def test_claim_held_by_a_live_process_then_free_when_it_dies(self):
        run = os.path.join(self.tmp, "out", "kd_seed0")
        self.assertIsNone(RunLock(run).held_by())  # never claimed: nothing written
        self.assertFalse(os.path.exists(run + ".lock"))
        holder = _Holder(run)
        try:
            lock = RunLock(run)
            found = lock.acquire()
            self.assertEqual(found["pid"], holder.proc.pid)
            self.assertFalse(lock.owned)
            self.assertEqual(RunLock(run).held_by()["pid"], holder.proc.pid)
            with self.assertRaisesRegex(RuntimeError, f"claimed by process {holder.proc.pid}"):
                with RunLock(run):
                    pass
        finally:
            holder.stop()
        # Killed (no release): the operating system dropped the claim, no stale lock.
        lock = RunLock(run)
        self.assertIsNone(lock.held_by())
        self.assertIsNone(lock.acquire())
        self.assertTrue(lock.owned)
        self.assertEqual(lock.holder()["pid"], os.getpid())
        lock.release()
        self.assertEqual(lock.holder(), {})  # released: emptied
        with RunLock(run) as again:
            self.assertTrue(again.owned)

    def test_bench_skips_a_run_another_process_trains_and_reports_it_once_finished(self):
        arms = _write(os.path.join(self.tmp, "arms.yaml"),
                      f"iters: 2\nseeds: [0, 1]\narms:\n  - {{name: no_kd, config: {STUDENT}}}\n")
        out = os.path.join(self.tmp, "out")
        bench = kd_bench.Bench(load_arms(arms), kd_bench.parse_args([arms, "--output", out]), arms)
        seed0, seed1 = bench.runs
        trained = []

        def fake_train_run(python, config, out_dir, opts, *, run_hash, **kwargs):
            trained.append(out_dir)
            # Meanwhile the other process finishes seed 0 and releases it.
            _finish(seed0["out_dir"], seed0["hash"], 40.0)
            holder.stop()
            return _finish(out_dir, run_hash, 50.0)

        holder = _Holder(seed0["out_dir"])
        original = kd_bench.train_run
        kd_bench.train_run = fake_train_run
        try:
            with contextlib.redirect_stdout(io.StringIO()) as stdout:
                plan = io.StringIO()
                with contextlib.redirect_stdout(plan):
                    bench.print_plan()
                result = bench.run_all()
        finally:
            kd_bench.train_run = original
            holder.stop()
        self.assertIn("no_kd seed 1 (", plan.getvalue())
        self.assertIn(f"being trained by process {holder.proc.pid}", plan.getvalue())
        self.assertEqual(trained, [seed1["out_dir"]])  # seed 0 was not trained here
        self.assertIn(f"no_kd seed 0: being trained by process {holder.proc.pid}",
                      stdout.getvalue())  # fmt: skip
        states = {r["seed"]: (r["state"], r["bbox"]["AP"]) for r in result["runs"]}
        self.assertEqual(states, {0: ("finished", 40.0), 1: ("trained", 50.0)})
        self.assertIsNone(RunLock(seed1["out_dir"]).held_by())  # released after training
        # A second process now finds both finished, trains nothing.
        trained.clear()
        again = kd_bench.Bench(load_arms(arms), kd_bench.parse_args([arms, "--output", out]), arms)
        kd_bench.train_run = fake_train_run
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                result = again.run_all()
        finally:
            kd_bench.train_run = original
        self.assertEqual(trained, [])
        self.assertEqual([r["state"] for r in result["runs"]], ["finished", "finished"])

    def test_a_process_waits_for_the_teacher_another_trains(self):
        import threading

        arms = _write(os.path.join(self.tmp, "arms.yaml"), "iters: 2\narms:\n"
                      f"  - {{name: no_kd, config: {STUDENT}}}\n")  # fmt: skip
        args = kd_bench.parse_args([arms, "--output", os.path.join(self.tmp, "out")])
        bench = kd_bench.Bench(load_arms(arms), args, arms)
        teacher = {"out_dir": os.path.join(self.tmp, "cache", "teacher-0123")}
        holder = _Holder(teacher["out_dir"])
        timer = threading.Timer(1.0, holder.stop)
        timer.start()
        try:
            with contextlib.redirect_stdout(io.StringIO()) as stdout:
                lock = bench._claim_teacher(teacher, poll_seconds=0.05)
        finally:
            timer.cancel()
            holder.stop()
        self.assertIn(f"being trained by process {holder.proc.pid}", stdout.getvalue())
        self.assertIn("waiting for it", stdout.getvalue())
        self.assertTrue(lock.owned)  # after the other process ended
        lock.release()

    def test_runs_without_kd_first_while_another_process_trains_the_teacher(self):
        arms = _write(os.path.join(self.tmp, "arms.yaml"),
                      f"teacher: {{config: {TEACHER}, iters: 2}}\niters: 2\narms:\n"
                      f"  - {{name: kd, config: {KD}}}\n"
                      f"  - {{name: no_kd, config: {STUDENT}}}\n")  # fmt: skip
        args = kd_bench.parse_args([arms, "--output", os.path.join(self.tmp, "out"),
                                    "--teacher-cache", os.path.join(self.tmp, "cache")])
        bench = kd_bench.Bench(load_arms(arms), args, arms)
        teacher = bench.teacher
        trained = []

        def fake_train_run(python, config, out_dir, opts, *, run_hash, **kwargs):
            trained.append(os.path.basename(out_dir))
            if not trained[1:]:  # meanwhile the other process finishes the teacher
                _finish(teacher["out_dir"], teacher["key"], 70.0)
                _write(teacher["weights"], "weights")
                holder.stop()
            return _finish(out_dir, run_hash, 50.0)

        import threading

        holder = _Holder(teacher["out_dir"])
        safety = threading.Timer(20.0, holder.stop)  # a bench that waited first ends too
        safety.start()
        original = kd_bench.train_run
        kd_bench.train_run = fake_train_run
        try:
            with contextlib.redirect_stdout(io.StringIO()) as stdout:
                result = bench.run_all()
        finally:
            kd_bench.train_run = original
            safety.cancel()
            holder.stop()
        # The no-KD run first (the teacher was not ready), then the KD run; no teacher trained.
        self.assertEqual(trained, ["no_kd_seed0", "kd_seed0"])
        self.assertIn("the runs without KD first", stdout.getvalue())
        self.assertEqual(result["teacher"]["state"], "cached")
        self.assertEqual({r["arm"]: r["state"] for r in result["runs"]},
                         {"kd": "trained", "no_kd": "trained"})  # fmt: skip


class TestInterruptedRunResumes(unittest.TestCase):
    def test_same_command_with_a_checkpoint_resumes(self):
        from bench.runs import _resumable, schedule_opts

        self.assertIn("SOLVER.CHECKPOINT_PERIOD", schedule_opts(3000))
        self.assertEqual(schedule_opts(3000)[-1], "300")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["python", "train_net.py", "--config-file", "c.yaml", "OUTPUT_DIR", tmp]
            self.assertFalse(_resumable(tmp, cmd))  # nothing there
            _write(os.path.join(tmp, "command.txt"), " ".join(cmd) + "\n")
            self.assertFalse(_resumable(tmp, cmd))  # no checkpoint yet
            _write(os.path.join(tmp, "last_checkpoint"), "model_0000299.pth")
            self.assertTrue(_resumable(tmp, cmd))
            self.assertFalse(_resumable(tmp, cmd + ["SEED", "1"]))  # another run: start over

    def test_train_run_resumes_and_records_where(self):
        """train_run on a folder an interrupted run of the same command left: the command gets
        --resume, the console says at which iteration and that the weights differ from an
        uninterrupted run's, the record keeps the iteration; a fresh run records none."""
        from bench.runs import train_run

        with tempfile.TemporaryDirectory() as tmp:
            # A stand-in for the interpreter: records its arguments, writes the final metrics.
            fake = _write(os.path.join(tmp, "fake_python"), textwrap.dedent(f"""\
                #!{sys.executable}
                import json, os, sys, time
                end = time.process_time() + 0.3  # CPU the bench must count
                while time.process_time() < end:
                    pass
                out = sys.argv[sys.argv.index("OUTPUT_DIR") + 1]
                with open(os.path.join(out, "argv.json"), "w") as f:
                    json.dump(sys.argv[1:], f)
                with open(os.path.join(out, "metrics_final.json"), "w") as f:
                    json.dump({{"results": {{"val": {{"bbox": {{"AP": 1.0, "AP50": 2.0,
                              "AP75": 0.5}}}}}}}}, f)
                """))  # fmt: skip
            os.chmod(fake, 0o755)
            out = os.path.join(tmp, "run")
            cmd = [fake, "train_net.py", "--config-file", "c.yaml", "OUTPUT_DIR", out, "SEED", "0"]
            _write(os.path.join(out, "command.txt"), " ".join(cmd) + "\n")
            _write(os.path.join(out, "last_checkpoint"), "model_0000299.pth")
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                record = train_run(fake, "c.yaml", out, ["SEED", "0"], label="run",
                                   run_hash="h", max_iter=1200)  # fmt: skip
            with open(os.path.join(out, "argv.json")) as f:
                self.assertEqual(json.load(f)[:2], ["train_net.py", "--resume"])
            self.assertIn("resuming at iteration 300 of 1200", stdout.getvalue())
            self.assertIn("differ from an uninterrupted run", stdout.getvalue())
            self.assertEqual(record["resumed_at_iteration"], 300)
            self.assertEqual(record["bbox"]["AP"], 1.0)
            # The stand-in's CPU time (0.3 s busy + start-up), not the bench's.
            self.assertGreaterEqual(record["cpu_seconds"], 0.3)
            self.assertLess(record["cpu_seconds"], 5.0)
            record = train_run(fake, "c.yaml", out, ["SEED", "1"], label="run",
                               run_hash="h1", max_iter=1200)  # another command: from scratch
            with open(os.path.join(out, "argv.json")) as f:
                self.assertNotIn("--resume", json.load(f))
            self.assertNotIn("resumed_at_iteration", record)


class TestBenchEta(unittest.TestCase):
    def test_eta_over_the_processes_training_now(self):
        from bench.progress import bench_eta

        with tempfile.TemporaryDirectory() as tmp:
            runs = [{"arm": "a", "hash": f"h{i}", "out_dir": os.path.join(tmp, f"r{i}"),
                     "state": state, "seconds": seconds}
                    for i, (state, seconds) in enumerate(
                        [("finished", 100.0), ("trained", 200.0), (None, None)])]  # fmt: skip
            # A resumed run's seconds cover a part of it: not an estimate.
            runs.append({"arm": "a", "hash": "hr", "out_dir": os.path.join(tmp, "resumed"),
                         "state": "finished", "seconds": 5.0, "resumed_at_iteration": 960})
            current = {"arm": "b", "hash": "hb", "out_dir": os.path.join(tmp, "b"), "state": None}
            runs.append(current)
            # Arm b has no finished run: the mean of all (150 s); 2 runs left, one process.
            self.assertEqual(bench_eta(runs, current), "~2m30s, bench ETA 5m00s")
            holder = _Holder(runs[2]["out_dir"])  # another process trains run 2
            try:
                self.assertEqual(bench_eta(runs, current),
                                 "~2m30s, bench ETA 2m30s with 2 processes training")
            finally:
                holder.stop()
            _finish(runs[2]["out_dir"], "h2", 1.0)  # finished by the other process meanwhile
            self.assertEqual(bench_eta(runs, current), "~2m30s, bench ETA 2m30s")
            self.assertEqual(bench_eta([dict(current)], current),
                             "run time and bench ETA known after the first run")


class TestTimeTotals(unittest.TestCase):
    def test_wall_clock_and_measured_cpu_time_of_finished_runs(self):
        from bench.report import time_totals

        runs = [
            {"bbox": {"AP": 1.0}, "seconds": 3600.0, "cpu_seconds": 3000.0},
            {"bbox": {"AP": 1.0}, "seconds": 1800.0, "cpu_seconds": None},  # before CPU time
            {"bbox": {"AP": 1.0}, "seconds": 600.0, "cpu_seconds": 540.0,
             "resumed_at_iteration": 960},
            {"bbox": None, "seconds": None},  # not run yet
        ]  # fmt: skip
        teacher = {"seconds": 7200.0, "cpu_seconds": 7000.0}
        self.assertEqual(
            time_totals({"runs": runs, "teacher": teacher}),
            "Time: 3 finished run(s), 1h40m wall-clock in all; CPU time measured for 2 of them: "
            "59m00s; teacher 2h00m wall-clock, 1h56m CPU (1 resumed run(s): their times cover "
            "the part after the checkpoint).",
        )


if __name__ == "__main__":
    unittest.main()
