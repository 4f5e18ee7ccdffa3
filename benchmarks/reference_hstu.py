"""Meta's HSTU reference beside our trainer, in one run: tokens/s, seconds per step and peak memory.

    python benchmarks/train_throughput.py --reference /tmp/gr_ref            # the usual entry point
    python benchmarks/reference_hstu.py --reference /tmp/gr_ref --pairs hstu  # this side by side only

``DIR`` is a checkout of facebookresearch/generative-recommenders (written against commit 2e81fab),
for example ``git clone https://github.com/facebookresearch/generative-recommenders /tmp/gr_ref``.
It is never modified: the checkout is copied to a temporary folder, the copy is patched to run on
CPU (the five changes of ``CPU_EDITS``) and to log one timing line per step (``TIMING_EDITS``:
instrumentation only), and its ML-1M data is built there from ``../shared/data/ml-1m`` (the original
``ratings.dat``, ``users.dat`` and ``movies.dat``) by the reference's own ``preprocess_rating()``.
The research path then runs as its README says (``main.py --gin_config_file=configs/ml-1m/...gin``,
the frozen paper config: batch 128, length 200, 128 negatives per position, 8 DataLoader workers,
anomaly detection on as shipped) and is stopped once enough steps are logged.

Measured the same way on both sides:
- tokens: non-padding items of each training row (history and the target, at most 201 per row);
  the reference pads every row to 211 positions (200 + 11 output slots), ours is jagged;
- a step's time is the wall time between the ends of two consecutive optimizer steps (data loading
  included); the first ``warmup`` steps are dropped, and so are steps whose interval holds an
  epoch boundary (DataLoader restart, checkpoint, epoch-end eval) or the reference's in-loop eval
  (every 100 batches);
- tokens/s and s/step are medians over the measured steps; tokens/s is the global figure (ours
  sums both ranks);
- memory: the peak, over samples every 0.5 s, of the RSS summed over the whole process tree
  (launcher, ranks / trainer, forkserver, DataLoader workers) and of the PSS summed the same way
  (shared pages counted once, so forked workers are not counted several times).
Threads: ours runs ``nproc`` ranks with one thread each; the reference is one process (it uses one
per GPU) with ``nproc`` threads, so both use the same number of cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ML1M = ROOT.parent / "shared" / "data" / "ml-1m"
REFERENCE_COMMIT = "2e81fab"
PER_POSITION_128 = ["loss.negatives=per_position", "loss.num_negatives=128"]
# name -> (the reference's gin config, our config, our overrides): the same model and loss.
PAIRS = {
    "hstu": ("configs/ml-1m/hstu-sampled-softmax-n128-final.gin", "configs/hstu_ml1m.yaml", PER_POSITION_128),
    "hstu_large": (
        "configs/ml-1m/hstu-sampled-softmax-n128-large-final.gin",
        "configs/hstu_large_ml1m.yaml",
        PER_POSITION_128,
    ),
}
STEP_LINE = re.compile(r"refbench step (\d+) epoch (\d+) tokens (\d+) eval (\d) t ([0-9.]+)")


@dataclasses.dataclass(frozen=True)
class Edit:
    """Replace ``old`` (which must occur exactly once) by ``new`` in ``path`` of the reference copy."""

    name: str
    path: str
    old: str
    new: str


TRAIN_PY = "generative_recommenders/research/trainer/train.py"
# The five changes that make the research path run without a GPU (../shared/reference/gr_on_cpu.md).
CPU_EDITS = (
    Edit(  # mp.spawn(nprocs=0) silently does nothing
        "1 main.py: world size at least 1 without a GPU",
        "main.py",
        "    world_size = torch.cuda.device_count()\n",
        "    world_size = max(1, torch.cuda.device_count())\n",
    ),
    Edit(  # importing fbgemm_gpu installs a WARNING root handler first, which hides every INFO line
        "2 main.py: logging.basicConfig(force=True)",
        "main.py",
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO)\n",
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO, force=True)\n",
    ),
    Edit(
        "3 train.py: gloo instead of nccl without a GPU",
        TRAIN_PY,
        '    dist.init_process_group("nccl", rank=rank, world_size=world_size)\n',
        '    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, '
        "world_size=world_size)\n",
    ),
    Edit(
        "4 train.py: the device is cpu, not the rank number",
        TRAIN_PY,
        "    device = rank\n",
        '    device = rank if torch.cuda.is_available() else torch.device("cpu")\n',
    ),
    Edit(
        "5 train.py: DDP(device_ids=None) on CPU",
        TRAIN_PY,
        "    model = DDP(model, device_ids=[rank], broadcast_buffers=False)\n",
        "    model = DDP(model, device_ids=[rank] if torch.cuda.is_available() else None, "
        "broadcast_buffers=False)\n",
    ),
)
# Instrumentation only: one log line per optimizer step with its non-padding tokens and end time.
TIMING_EDITS = (
    Edit(
        "timing: count the non-padding items of the step (history and target)",
        TRAIN_PY,
        "            opt.zero_grad()\n",
        "            refbench_tokens = int((seq_features.past_ids != 0).sum())\n            opt.zero_grad()\n",
    ),
    Edit(
        "timing: log the step's end time",
        TRAIN_PY,
        "            opt.step()\n\n            batch_id += 1\n",
        "            opt.step()\n\n            batch_id += 1\n"
        '            logging.info(f"refbench step {batch_id - 1} epoch {epoch} tokens {refbench_tokens} "\n'
        '                         f"eval {int((batch_id - 1) % eval_interval == 0)} t {time.perf_counter():.6f}")\n',
    ),
)
NO_ANOMALY_EDIT = Edit(  # a debugging switch left on in the reference (12-15% of its step time)
    "anomaly detection off",
    TRAIN_PY,
    "    torch.autograd.set_detect_anomaly(True)\n",
    "    torch.autograd.set_detect_anomaly(False)\n",
)


def apply_edits(root: Path, edits: tuple[Edit, ...] | list[Edit]) -> None:
    """Apply ``edits`` to the files under ``root``; a clear error if a file no longer matches."""
    for edit in edits:
        path = root / edit.path
        if not path.is_file():
            raise ValueError(f"{path}: missing; --reference must point to a generative-recommenders checkout")
        text = path.read_text()
        count = text.count(edit.old)
        if count != 1:
            raise ValueError(
                f"{path}: change '{edit.name}' expects its original line once, found it {count} times; "
                f"the patch was written for commit {REFERENCE_COMMIT}: check that checkout out"
            )
        path.write_text(text.replace(edit.old, edit.new))


def copy_and_patch(reference_dir: Path, dest: Path, detect_anomaly: bool = True) -> Path:
    """Copy the checkout (without .git and run outputs) to ``dest`` and patch the copy; return ``dest``."""
    if not (reference_dir / "main.py").is_file():
        raise ValueError(
            f"--reference {reference_dir}: no main.py; expected a generative-recommenders checkout"
        )
    shutil.copytree(
        reference_dir, dest, ignore=shutil.ignore_patterns(".git", "tmp", "exps", "ckpts", "logs")
    )
    apply_edits(dest, [*CPU_EDITS, *TIMING_EDITS, *([] if detect_anomaly else [NO_ANOMALY_EDIT])])
    return dest


def prepare_data(copy_dir: Path, ml1m_dir: Path) -> None:
    """Build ``tmp/movielens1m.zip`` in the copy from ``ml1m_dir`` and run the reference's preprocess_rating()."""
    names = ["ratings.dat", "users.dat", "movies.dat"]
    missing = [n for n in names if not (ml1m_dir / n).is_file()]
    if missing:
        raise ValueError(
            f"{ml1m_dir}: missing {', '.join(missing)}; pass --reference-data with the ML-1M files"
        )
    (copy_dir / "tmp").mkdir(exist_ok=True)
    # The reference downloads this zip unless it exists; the files go under ml-1m/ as in GroupLens's zip.
    with zipfile.ZipFile(copy_dir / "tmp" / "movielens1m.zip", "w") as zf:
        for name in names:
            zf.write(ml1m_dir / name, f"ml-1m/{name}")
    code = (
        "from generative_recommenders.research.data.preprocessor import get_common_preprocessors\n"
        "get_common_preprocessors()['ml-1m'].preprocess_rating()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy_dir, env=_env(copy_dir, 1),
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(
            f"the reference's preprocess_rating() failed in {copy_dir}:\n{proc.stderr[-3000:]}"
        )


def _env(pythonpath: Path, threads: int) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(pythonpath),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


class TreeMonitor:
    """Samples a process and all its descendants: peak RSS and PSS summed over the tree (MiB), and
    the tree's CPU seconds (user + system) over time, to give CPU time per step between two instants."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        import psutil

        self._root = psutil.Process(pid)
        self._psutil = psutil
        self.interval_s = interval_s
        self.peak_rss_mib = 0.0
        self.peak_pss_mib = 0.0
        self.cpu_samples: list[tuple[float, float]] = []  # (time.perf_counter(), CPU seconds of the tree)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """One sample of the tree; processes that exit mid-sample are skipped."""
        rss = pss = 0
        cpu = 0.0
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            return
        for p in procs:
            try:
                info = p.memory_full_info()
                times = p.cpu_times()
            except self._psutil.Error:
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            cpu += times.user + times.system
        self.peak_rss_mib = max(self.peak_rss_mib, rss / 2**20)
        self.peak_pss_mib = max(self.peak_pss_mib, pss / 2**20)
        self.cpu_samples.append((time.perf_counter(), cpu))

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds the tree used between two ``time.perf_counter()`` instants (linear between samples)."""
        return self._cpu_at(t1) - self._cpu_at(t0)

    def _cpu_at(self, t: float) -> float:
        samples = sorted(self.cpu_samples)  # the caller's thread may add one beside the sampling thread
        for (ta, ca), (tb, cb) in zip(samples, samples[1:]):
            if ta <= t <= tb:
                return ca + (cb - ca) * (t - ta) / max(tb - ta, 1e-9)
        return samples[0][1] if t < samples[0][0] else samples[-1][1]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)


@dataclasses.dataclass
class StepTime:
    """One optimizer step: its epoch, non-padding tokens, wall time since the previous step's end, and
    when it ended (``time.perf_counter()``, a clock shared by all processes on Linux)."""

    step: int
    epoch: int
    tokens: float
    seconds: float
    end_t: float
    excluded: str = ""  # why it is not measured ("" if it is)


def summarize(steps: list[StepTime], monitor: TreeMonitor | None = None) -> dict:
    """Medians of tokens/s and s/step over the measured steps (those not excluded); with ``monitor``,
    the process tree's CPU seconds per step from the end of the warm-up to the last measured step."""
    kept = [s for s in steps if not s.excluded]
    if not kept:
        raise RuntimeError("no measured step: raise the number of steps or lower --warmup")
    result = {
        "tokens_per_s": statistics.median(s.tokens / s.seconds for s in kept),
        "s_per_step": statistics.median(s.seconds for s in kept),
        "tokens_per_step": statistics.median(s.tokens for s in kept),
        "measured_steps": len(kept),
        "excluded_steps": {s.step: s.excluded for s in steps if s.excluded},
    }
    if monitor is not None:
        span = [s for s in steps if kept[0].step <= s.step <= kept[-1].step]
        cpu = monitor.cpu_between(kept[0].end_t - kept[0].seconds, kept[-1].end_t)
        result["cpu_s_per_step"] = cpu / len(span)
    return result


def reference_steps(lines: list[str], warmup: int) -> list[StepTime]:
    """Steps from the reference's ``refbench step`` log lines (the first has no interval: skipped)."""
    events = [tuple(float(g) for g in m.groups()) for m in map(STEP_LINE.search, lines) if m]
    steps = []
    for prev, cur in zip(events, events[1:]):
        step, epoch, tokens, in_loop_eval, t = cur
        reason = ("warm-up" if step < warmup else "epoch boundary" if epoch != prev[1]
                  else "in-loop eval" if in_loop_eval else "")  # fmt: skip
        steps.append(StepTime(int(step), int(epoch), tokens, t - prev[4], t, reason))
    return steps


def our_steps(records: list[dict], warmup: int, seen_at: dict[int, float]) -> list[StepTime]:
    """Steps from our metrics.jsonl written with run.log_every_steps=1 (one train record per step);
    ``seen_at``: when each step's record appeared (``time.perf_counter()``)."""
    train = [r for r in records if "train/tokens_per_s" in r]
    steps = []
    for prev, cur in zip(train, train[1:]):
        seconds = cur["elapsed_s"] - prev["elapsed_s"]
        # train/epoch is epoch + batches_done / steps_per_epoch: step k of epoch e reads e + k/n (k >= 1).
        epoch, prev_epoch = _epoch_of(cur["train/epoch"]), _epoch_of(prev["train/epoch"])
        reason = "warm-up" if cur["step"] <= warmup else "epoch boundary" if epoch != prev_epoch else ""
        # The trainer's own per-step rate times the interval: the tokens of that step.
        tokens = cur["train/tokens_per_s"] * seconds
        steps.append(StepTime(cur["step"], epoch, tokens, seconds, seen_at.get(cur["step"], 0.0), reason))
    return steps


def _epoch_of(fraction: float) -> int:
    return max(0, int(-(-round(fraction, 6) // 1)) - 1)


def _note_new_records(metrics: Path, seen_at: dict[int, float]) -> None:
    """Record when each step's train record first appears in ``metrics`` (complete lines only)."""
    if not metrics.is_file():
        return
    now = time.perf_counter()
    for line in metrics.read_text().splitlines(keepends=True):
        if line.endswith("\n") and '"train/tokens_per_s"' in line:
            seen_at.setdefault(json.loads(line)["step"], now)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the process group this script started (its own session), then reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_reference(copy_dir: Path, gin_config: str, warmup: int, steps: int, threads: int,
                  timeout_s: float = 3600.0) -> dict:  # fmt: skip
    """Run the patched reference until ``steps`` steps are measured after ``warmup``; stop it; its figures."""
    log_path = copy_dir / f"refbench_{Path(gin_config).stem}.log"
    cmd = [sys.executable, "main.py", f"--gin_config_file={gin_config}", f"--master_port={_free_port()}"]
    lines: list[str] = []
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=copy_dir, env=_env(copy_dir, threads), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        try:
            with TreeMonitor(proc.pid) as monitor:
                load = os.getloadavg()[0]
                for line in proc.stdout:
                    log.write(line)
                    log.flush()  # the log is readable while the run goes on
                    lines.append(line)
                    if "refbench step" in line:
                        measured = [s for s in reference_steps(lines, warmup) if not s.excluded]
                        if len(measured) >= steps:
                            monitor.sample()  # a CPU sample after the last measured step's end
                            break
                    if time.perf_counter() - t0 > timeout_s:
                        print(f"reference: stopped by the {timeout_s:.0f} s timeout, fewer steps measured than "
                              f"asked (see the steps column)", flush=True)  # fmt: skip
                        break
        finally:
            _kill_group(proc)
    parsed = reference_steps(lines, warmup)
    if not parsed:
        raise RuntimeError(f"the reference logged no step; see {log_path}:\n{''.join(lines[-30:])}")
    return {**summarize(parsed, monitor), "peak_rss_mib": monitor.peak_rss_mib,
            "peak_pss_mib": monitor.peak_pss_mib, "wall_s": time.perf_counter() - t0,
            "load_avg_1m_at_start": load, "log": str(log_path)}  # fmt: skip


def run_ours(config: str, overrides: list[str], warmup: int, steps: int, nproc: int, data_dir: str | None,
             out: Path) -> dict:  # fmt: skip
    """Run our trainer (torchrun, ``nproc`` ranks) for ``warmup + steps`` steps, one record per step."""
    if out.exists():
        shutil.rmtree(out)
    data = [f"data.dir={data_dir}"] if data_dir else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "train",
           "--config", config, f"run.output_dir={out}", f"run.max_steps={warmup + steps}",
           "run.log_every_steps=1", "tracking.enabled=false", "run.progress_bar=off", *data, *overrides]  # fmt: skip
    t0 = time.perf_counter()
    log_path = out.parent / f"{out.name}.log"
    seen_at: dict[int, float] = {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            with TreeMonitor(proc.pid) as monitor:
                load = os.getloadavg()[0]
                sampled_end = False
                while proc.poll() is None:
                    _note_new_records(out / "metrics.jsonl", seen_at)
                    if not sampled_end and seen_at and max(seen_at) >= warmup + steps:
                        monitor.sample()  # a CPU sample after the last step's end, before the checkpoint
                        sampled_end = True
                    time.sleep(0.1)
        finally:
            _kill_group(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"our trainer failed (exit {proc.returncode}); see {log_path}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**summarize(our_steps(records, warmup, seen_at), monitor), "peak_rss_mib": monitor.peak_rss_mib,
            "peak_pss_mib": monitor.peak_pss_mib, "wall_s": time.perf_counter() - t0,
            "load_avg_1m_at_start": load, "log": str(log_path)}  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def side_by_side(reference_dir: Path, pairs: list[str], warmup: int, steps: int, nproc: int,
                 data_dir: str | None, ml1m_dir: Path = DEFAULT_ML1M, detect_anomaly: bool = True,
                 keep: bool = False) -> list[dict]:  # fmt: skip
    """For each pair: the reference, then ours, one after the other; one row per side and pair."""
    work = Path(tempfile.mkdtemp(prefix="gr_ref_bench_"))
    rows = []
    try:
        copy_dir = copy_and_patch(reference_dir.resolve(), work / "generative-recommenders", detect_anomaly)
        print(f"reference: patched copy in {copy_dir}; preparing its ML-1M data from {ml1m_dir}", flush=True)
        prepare_data(copy_dir, ml1m_dir)
        for name in pairs:
            gin_config, config, overrides = PAIRS[name]
            print(f"reference: {name} ({gin_config}), {warmup} warm-up + {steps} steps", flush=True)
            ref = run_reference(copy_dir, gin_config, warmup, steps, threads=nproc)
            rows.append({"pair": name, "side": "meta reference", "config": gin_config, **ref})
            print(
                f"ours: {name} ({config} {' '.join(overrides)}), {warmup} warm-up + {steps} steps", flush=True
            )
            ours = run_ours(config, overrides, warmup, steps, nproc, data_dir, work / f"ours_{name}")
            rows.append({"pair": name, "side": "ours", "config": config, "overrides": overrides, **ours})
            for r in rows[-2:]:  # as each pair completes, in case a long run is stopped later
                print(f"  {r['side']}: {r['tokens_per_s']:.0f} tokens/s, {r['s_per_step']:.3f} s/step, "
                      f"{r['cpu_s_per_step']:.3f} CPU s/step, peak PSS {r['peak_pss_mib']:.0f} MiB", flush=True)  # fmt: skip
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def format_table(rows: list[dict]) -> str:
    """The side-by-side table, with each pair's ratio (ours / reference) and how the figures were taken."""
    head = (f"{'pair':11s} {'side':15s} {'tokens/s':>9s} {'s/step':>7s} {'CPU s/step':>10s} {'tokens/step':>11s} "
            f"{'steps':>5s} {'peak RSS MiB':>12s} {'peak PSS MiB':>12s} {'load':>5s}")  # fmt: skip
    lines = [head]
    by_pair: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], {})[r["side"]] = r
        lines.append(
            f"{r['pair']:11s} {r['side']:15s} {r['tokens_per_s']:9.0f} {r['s_per_step']:7.3f} "
            f"{r['cpu_s_per_step']:10.3f} {r['tokens_per_step']:11.0f} {r['measured_steps']:5d} "
            f"{r['peak_rss_mib']:12.0f} {r['peak_pss_mib']:12.0f} {r['load_avg_1m_at_start']:5.1f}"
        )
    for name, sides in by_pair.items():
        if "ours" in sides and "meta reference" in sides:
            ours, ref = sides["ours"], sides["meta reference"]
            lines.append(
                f"{name}: ours / reference = {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x tokens/s, "
                f"{ref['s_per_step'] / ours['s_per_step']:.2f}x less wall time and "
                f"{ref['cpu_s_per_step'] / ours['cpu_s_per_step']:.2f}x less CPU time per step, "
                f"{ref['peak_pss_mib'] / ours['peak_pss_mib']:.2f}x less peak PSS "
                f"({ref['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x RSS)"
            )
    lines.append(NOTE)
    return "\n".join(lines)


NOTE = (
    "Both sides in this run, one after the other. tokens: non-padding items per row (history + target, <= 201;\n"
    "the reference pads rows to 211). tokens/s, s/step: medians over the measured steps (after the warm-up;\n"
    "epoch boundaries and in-loop evals excluded). CPU s/step: CPU seconds of the whole process tree from the end\n"
    "of the warm-up to the last measured step, per step (less sensitive to other jobs than wall time). Memory:\n"
    "peak over the process tree, RSS summed and PSS (shared pages counted once). load: 1-minute load average at\n"
    "the start. On a shared machine absolute figures are noisy: quote the ratio."
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="a generative-recommenders checkout")
    parser.add_argument(
        "--reference-data", type=Path, default=DEFAULT_ML1M, help="folder with ML-1M's .dat files"
    )
    parser.add_argument("--pairs", nargs="*", default=["hstu"], choices=list(PAIRS))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--data-dir", default=None, help="our prepared ML-1M (data.dir); default: the config's"
    )
    parser.add_argument(
        "--no-detect-anomaly", action="store_true", help="turn the reference's anomaly mode off"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and logs")
    args = parser.parse_args()
    rows = side_by_side(args.reference, args.pairs, args.warmup, args.steps, args.nproc, args.data_dir,
                        args.reference_data, not args.no_detect_anomaly, args.keep)  # fmt: skip
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
