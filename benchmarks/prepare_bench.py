"""Benchmark ``data_pipeline.prepare`` (Ray) against a single-process DuckDB reference.

    python benchmarks/prepare_bench.py                                  # 1M and 10M events
    python benchmarks/prepare_bench.py --sizes 1000000 --tools prepare duckdb --num-cpus 2
    python benchmarks/prepare_bench.py --sizes 100000000 --shape wide --num-cpus 2   # issue #22: 10^7 users/items

For each size it generates a synthetic log (cached under ``<work-dir>/logs``), then runs every tool
in its own subprocess on the same CSV and the same machine, one after the other: ``prepare`` (embedded
local Ray, ``ray.num_cpus=--num-cpus``) and ``duckdb`` (benchmarks/prepare_reference.py, the same
transform in DuckDB with ``--num-cpus`` threads). Memory is sampled every ``--sample-interval`` s over
the whole process tree of the subprocess (Ray's GCS, raylet and workers included): the peak of the
summed PSS (shared pages such as Ray's object store counted once) and of the summed RSS. Wall time is
that of the subprocess (interpreter start, Ray start-up and shutdown included); ``job s`` is the time
of the ``prepare(...)`` / reference call alone.

Tool ``attached`` is ``prepare`` as a cluster user runs it: against a Ray head this benchmark starts
once (``ray start --head --block``, ``ray.address`` set), so Ray's start-up (about 10 s on this 2-core
machine) is paid once per cluster, not per job. Its memory includes the head's whole process tree
(GCS, raylet, the job's workers), sampled with the driver's.

It prints a table (size, tool, seconds, events/s, peak memory, ratio to the reference, the 1-minute
load average when the run ended -- other work on the machine skews times) and writes
``<work-dir>/prepare_bench.json``. With ``--repeats N`` the tools alternate N times and the fastest
run of each is reported. It also checks that both tools wrote the same item vocabulary and the same
rows in every split (``match`` column).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ``baseline``: ``prepare`` from another checkout (--baseline-root), e.g. main before a change.
# ``attached``: ``prepare`` on a Ray head started once for the whole benchmark (``ray.address``).
TOOLS = ("prepare", "duckdb", "baseline", "attached")
REFERENCE = "duckdb"
SPLITS = ("train", "valid", "test")


# --- children: one transform per process ----------------------------------------------------------


def _child(args: argparse.Namespace) -> int:
    """Run one tool on one input and write its own timing/statistics to ``args.result``."""
    if args.child in ("prepare", "attached"):
        from cluster.config import load_config
        from cluster.log import setup_logging
        from data_pipeline.config import PrepareConfig
        from data_pipeline.prepare import prepare

        setup_logging("INFO")  # stage lines: the per-stage memory
        overrides = [
            "input.format=csv",
            f"input.paths=[{args.input}]",
            "input.has_header=true",
            "input.columns.user=user",
            "input.columns.item=item",
            "input.columns.timestamp=timestamp",
            "input.columns.rating=rating",
            f"max_seq_len={args.max_seq_len}",
            f"output.dir={args.out}",
            "output.overwrite=true",
            f"ray.num_cpus={args.num_cpus}",
        ]
        if args.ray_address:
            overrides.append(f"ray.address={args.ray_address}")
        cfg = load_config(PrepareConfig, None, overrides)
        began = time.perf_counter()
        manifest = prepare(cfg)
        result = {"job_seconds": time.perf_counter() - began, "manifest_keys": sorted(manifest)}
    else:
        # benchmarks/ is sys.path[0] when this file runs as a script.
        from prepare_reference import run_reference

        stats = run_reference(
            args.input,
            args.out,
            args.max_seq_len,
            threads=args.num_cpus,
            memory_limit=args.duckdb_memory_limit,
        )
        result = {"job_seconds": stats.pop("seconds"), **stats}
    Path(args.result).write_text(json.dumps(result))
    return 0


# --- parent: generate, run, measure, compare ------------------------------------------------------


def _role(proc: psutil.Process, root_pid: int) -> str:
    """Which part of a run a process is: the ``driver`` (the measured subprocess), a Ray
    ``worker`` (``ray::...``) or a Ray ``daemon`` (GCS, raylet, log monitor, ...)."""
    if proc.pid == root_pid:
        return "driver"
    try:
        name = proc.name()
        cmd = proc.cmdline()
    except psutil.Error:
        return "daemon"
    return "worker" if name.startswith("ray::") or (cmd and cmd[0].startswith("ray::")) else "daemon"


def _tree_memory(proc: psutil.Process, also: psutil.Process | None = None) -> dict[str, int]:
    """Summed RSS and PSS over ``proc`` and all its descendants (and ``also``'s: an attached Ray head),
    PSS also per role (``_role``) and the largest single process, in bytes."""
    out = {"rss": 0, "pss": 0, "driver": 0, "worker": 0, "daemon": 0, "max_process": 0}
    procs = []
    for root in (proc, also):
        try:
            procs += [root, *root.children(recursive=True)] if root is not None else []
        except psutil.Error:
            if root is proc:
                return out
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:  # the process ended between listing and reading
            continue
        out["rss"] += info.rss
        out["pss"] += info.pss
        out[_role(p, proc.pid)] += info.pss
        out["max_process"] = max(out["max_process"], info.pss)
    return out


def _stage_of(log_path: Path) -> list[tuple[float, str]]:
    """(end time, stage) of each stage line the prepare job logged (``HH:MM:SS ... prepare: <stage>:``)."""
    import re

    ends = []
    pattern = re.compile(r"^(\d\d):(\d\d):(\d\d) INFO data_pipeline\.prepare: ([a-z -]+?)(?: round \d+)?[:(]")
    for line in log_path.read_text(errors="replace").splitlines():
        m = pattern.match(line)
        if m:
            h, mi, se, stage = int(m[1]), int(m[2]), int(m[3]), m[4].strip()
            ends.append((h * 3600 + mi * 60 + se, stage))
    return ends


def run_measured(
    cmd: list[str],
    sample_interval: float,
    log_path: Path,
    cwd: Path = ROOT,
    also: psutil.Process | None = None,
    env: dict | None = None,
) -> dict:
    """Run ``cmd`` (``env`` added to the environment), sampling its process tree's memory (and
    ``also``'s, an attached Ray head); return wall seconds and peaks (MiB), also per role (driver /
    Ray workers / Ray daemons) and, for ``prepare``, per stage."""
    began = time.perf_counter()
    samples = []  # (seconds since midnight, local time, memory dict)
    with open(log_path, "wb") as log:
        # The checkout is the working directory and PYTHONPATH, so Ray workers import its code too.
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(cwd)}
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        proc = psutil.Process(popen.pid)
        while popen.poll() is None:
            now = time.localtime()
            samples.append((now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec, _tree_memory(proc, also)))
            time.sleep(sample_interval)
    wall = time.perf_counter() - began
    if popen.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with code {popen.returncode}; log {log_path}:\n{tail}")
    mib = 2**20
    peak = {
        k: max((m[k] for _, m in samples), default=0) / mib
        for k in ("rss", "pss", "driver", "worker", "daemon", "max_process")
    }
    # A sample belongs to the first stage whose end line is at or after it ("start" before Ray runs).
    stage_ends = _stage_of(log_path)
    by_stage: dict[str, float] = {}
    for t, m in samples:
        stage = next((name for end, name in stage_ends if end >= t), "end")
        by_stage[stage] = max(by_stage.get(stage, 0.0), m["pss"] / mib)
    return {
        "wall_seconds": wall,
        "peak_pss_mib": peak["pss"],
        "peak_rss_mib": peak["rss"],
        "peak_pss_by_role_mib": {k: peak[k] for k in ("driver", "worker", "daemon", "max_process")},
        "peak_pss_by_stage_mib": by_stage,
    }


def start_ray_head(
    num_cpus: int, log_path: Path, timeout: float = 300.0
) -> tuple[subprocess.Popen, str, dict]:
    """A local Ray head in the foreground (``ray start --head --block``; terminating it stops the
    cluster) on a free port, workers at nice 0 like the embedded one. Returns it, its address and the
    environment a client needs (a cluster started by ``ray start`` wants token authentication, as in
    slurm/data_pipeline.sbatch), once ``ray status`` answers."""
    import secrets
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    ray_cli = str(Path(sys.executable).absolute().with_name("ray"))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **auth, "PYTHONPATH": str(ROOT), "RAY_worker_niceness": "0"}
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
           "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    with open(log_path, "wb") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    address = f"{ray.util.get_node_ip_address()}:{port}"
    status = [ray_cli, "status", f"--address={address}"]
    deadline = time.monotonic() + timeout
    while subprocess.run(status, capture_output=True, env=env).returncode:
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the Ray head ({' '.join(cmd)}) did not come up; log {log_path}:\n{tail}")
        time.sleep(1.0)
    return head, address, auth


# Synthetic log shapes: (events per user, events per item). ``wide`` is the shape of issue #22's
# large-scale target: 10^8 events over 10^7 users and a 10^7-item Zipf catalogue.
SHAPES = {"default": (60, 100), "wide": (10, 10)}


def ensure_log(size: int, logs_dir: Path, shape: str = "default") -> Path:
    """Generate (once) a synthetic log of about ``size`` events; return the CSV path."""
    from cluster.config import to_dict
    from data_pipeline.synthetic import GenerateConfig, generate

    per_user, per_item = SHAPES[shape]
    num_items = max(1000, size // per_item)
    suffix = "" if shape == "default" else f"-{shape}"
    cfg = GenerateConfig(
        output_dir=str(logs_dir / f"synthetic-{size}{suffix}"),
        num_users=max(100, round(size / per_user)),
        mean_seq_len=float(per_user),
        num_items=num_items,
        num_topics=max(50, num_items // 100),
        with_item_text=False,
    )
    out = Path(cfg.output_dir)
    saved = out / "generate_config.yaml"
    csv = out / "interactions.csv"
    if csv.is_file() and saved.is_file():
        import yaml

        # The same log whatever directory it was generated into (work dirs may share logs/).
        saved_cfg, want = yaml.safe_load(saved.read_text()), to_dict(cfg)
        saved_cfg.pop("output_dir", None), want.pop("output_dir", None)
        if saved_cfg == want:
            return csv
    print(f"generating {csv} ...", flush=True)
    return generate(cfg)


def _count_rows(csv: Path) -> int:
    with open(csv, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) - 1


def _split_sums(root: Path, split: str) -> tuple[int, ...]:
    """Rows, interactions and the sums of item ids, timestamps and user ids of a split, streamed."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    totals = [0, 0, 0, 0, 0]
    columns = ["user_id", "item_ids", "timestamps"]
    for batch in ds.dataset(root / split, format="parquet").to_batches(columns=columns):
        items, stamps = batch.column("item_ids"), batch.column("timestamps")
        totals[0] += batch.num_rows
        totals[1] += len(items.flatten())
        totals[2] += pc.sum(items.flatten()).as_py() or 0
        totals[3] += pc.sum(stamps.flatten()).as_py() or 0
        totals[4] += pc.sum(batch.column("user_id")).as_py() or 0
    return tuple(totals)


def compare_sums(prepared: Path, reference: Path) -> str:
    """For outputs too big to hold twice in memory: the item vocabulary in full, and per split the
    row and interaction counts and the sums of ids and timestamps ('sums' when all agree)."""
    import pyarrow.parquet as pq

    columns = ["raw_id", "dense_id", "count"]
    got = pq.read_table(prepared / "vocab" / "items.parquet", columns=columns).sort_by("dense_id")
    want = pq.read_table(reference / "vocab" / "items.parquet", columns=columns).sort_by("dense_id")
    for name in columns:
        if not got.column(name).combine_chunks().equals(want.column(name).combine_chunks()):
            return f"no: vocab.{name} differs"
    for split in SPLITS:
        if _split_sums(prepared, split) != _split_sums(reference, split):
            return f"no: {split} sums differ"
    return "sums"


def compare_outputs(prepared: Path, reference: Path) -> str:
    """'yes' if both wrote the same item vocabulary and the same rows in every split, else what differs."""
    import pyarrow.dataset as ds

    def table(root: Path, sub: str, columns: list[str], key: str):
        return ds.dataset(root / sub, format="parquet").to_table(columns=columns).sort_by(key)

    checks = [("vocab/items.parquet", ["raw_id", "dense_id", "count"], "dense_id")]
    checks += [(split, ["user_id", "item_ids", "timestamps", "ratings"], "user_id") for split in SPLITS]
    for sub, columns, key in checks:
        got, want = table(prepared, sub, columns, key), table(reference, sub, columns, key)
        if got.num_rows != want.num_rows:
            return f"no: {sub} has {got.num_rows} rows vs {want.num_rows}"
        # Column values are compared, not schemas (field nullability differs between writers).
        for name in columns:
            if not got.column(name).combine_chunks().equals(want.column(name).combine_chunks()):
                return f"no: {sub}.{name} differs"
    return "yes"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; run as the benchmark driver or (``--child``) as one measured run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=["prepare", "duckdb"])
    parser.add_argument(
        "--baseline-root",
        type=Path,
        default=None,
        help="a checkout whose prepare runs as tool 'baseline' (interleaved with the others, same load)",
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="default",
        help="synthetic log: default = 60 events per user, 100 per item; wide = 10 and 10 (issue #22)",
    )
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-seq-len", type=int, default=50)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--sample-interval", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool; the fastest is reported")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the prepared directories")
    parser.add_argument(
        "--duckdb-memory-limit",
        default=None,
        help="DuckDB's memory_limit (e.g. 8GB; it spills beyond); default: DuckDB's own (80%% of RAM)",
    )
    parser.add_argument(
        "--full-compare-max-events",
        type=int,
        default=30_000_000,
        help="above this, outputs are compared by counts and sums per split (match 'sums'), not row by row",
    )
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--ray-address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    work = args.work_dir.resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    head = address = auth = None
    if "attached" in args.tools:
        print(f"starting a Ray head ({args.num_cpus} CPUs) for tool 'attached' ...", flush=True)
        head, address, auth = start_ray_head(args.num_cpus, work / "runs" / "ray-head.log")
    try:
        records = _run_tools(args, parser, work, head, address, auth)
    finally:
        if head is not None:
            head.terminate()
            head.wait(timeout=120)
    _report(records, work)
    return 0


def _run_tools(
    args, parser, work: Path, head: subprocess.Popen | None, address: str | None, auth: dict | None
):
    """Every tool on every size (alternating within each repeat); one record per (size, tool)."""
    records = []
    for size in args.sizes:
        csv = ensure_log(size, work / "logs", args.shape)
        num_events = _count_rows(csv)
        outputs = {}
        runs: dict[str, list[dict]] = {tool: [] for tool in args.tools}
        # Tools alternate within each repeat so that a burst of load elsewhere hits both alike.
        for repeat in range(args.repeats):
            for tool in args.tools:
                out = work / "runs" / f"{tool}-{size}"
                shutil.rmtree(out, ignore_errors=True)
                result_path = work / "runs" / f"{tool}-{size}.result.json"
                script, child = __file__, tool
                if tool == "baseline":
                    if args.baseline_root is None:
                        parser.error("--tools baseline needs --baseline-root")
                    script, child = (
                        str(args.baseline_root.resolve() / "benchmarks" / "prepare_bench.py"),
                        "prepare",
                    )
                cmd = [
                    sys.executable, script, "--child", child, "--input", str(csv), "--out", str(out),
                    "--result", str(result_path), "--max-seq-len", str(args.max_seq_len),
                    "--num-cpus", str(args.num_cpus),
                ]  # fmt: skip
                if tool == "duckdb" and args.duckdb_memory_limit:
                    cmd += ["--duckdb-memory-limit", args.duckdb_memory_limit]
                attached = tool == "attached"
                if attached:
                    cmd += ["--ray-address", address]
                print(f"[{size:,} events] {tool}, run {repeat + 1}/{args.repeats} ...", flush=True)
                root = args.baseline_root.resolve() if tool == "baseline" else ROOT
                measured = run_measured(cmd, args.sample_interval, work / "runs" / f"{tool}-{size}.log", root,
                                        also=psutil.Process(head.pid) if attached else None,
                                        env=auth if attached else None)  # fmt: skip
                measured["job_seconds"] = json.loads(result_path.read_text())["job_seconds"]
                measured["load_average_1m"] = os.getloadavg()[0]
                runs[tool].append(measured)
                outputs[tool] = out
        for tool, measured in runs.items():
            best = min(measured, key=lambda m: m["wall_seconds"])
            records.append(
                {
                    "size": size,
                    "num_events": num_events,
                    "tool": tool,
                    "num_cpus": args.num_cpus,
                    # Fastest run; memory is the maximum over all runs.
                    "wall_seconds": best["wall_seconds"],
                    "job_seconds": best["job_seconds"],
                    "events_per_s": num_events / best["wall_seconds"],
                    "peak_pss_mib": max(m["peak_pss_mib"] for m in measured),
                    "peak_rss_mib": max(m["peak_rss_mib"] for m in measured),
                    "peak_pss_by_role_mib": best["peak_pss_by_role_mib"],
                    "peak_pss_by_stage_mib": best["peak_pss_by_stage_mib"],
                    "load_average_1m": best["load_average_1m"],
                    "runs": measured,
                }
            )
        for r in records:
            if r["size"] == size and r["tool"] != REFERENCE and r["tool"] in outputs and REFERENCE in outputs:
                compare = compare_outputs if num_events <= args.full_compare_max_events else compare_sums
                r["outputs_match_reference"] = compare(outputs[r["tool"]], outputs[REFERENCE])
        if not args.keep_outputs:
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
    return records


def _report(records: list[dict], work: Path) -> None:
    """Ratios to the reference, the printed tables, ``<work>/prepare_bench.json``."""
    by_key = {(r["size"], r["tool"]): r for r in records}
    for r in records:
        ref = by_key.get((r["size"], REFERENCE))
        r["ratio_to_reference"] = r["wall_seconds"] / ref["wall_seconds"] if ref else None
        r["job_ratio_to_reference"] = r["job_seconds"] / ref["job_seconds"] if ref else None
    header = (
        f"{'size':>11} {'events':>11} {'tool':>8} {'wall s':>8} {'job s':>8} {'events/s':>10} "
        f"{'peak PSS MiB':>12} {'peak RSS MiB':>12} {'x ref (wall)':>12} {'x ref (job)':>11} {'load':>5} {'match':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in records:
        ratio = f"{r['ratio_to_reference']:.2f}" if r["ratio_to_reference"] else "-"
        job_ratio = f"{r['job_ratio_to_reference']:.2f}" if r["job_ratio_to_reference"] else "-"
        print(
            f"{r['size']:>11,} {r['num_events']:>11,} {r['tool']:>8} {r['wall_seconds']:>8.1f} "
            f"{r['job_seconds']:>8.1f} {r['events_per_s']:>10,.0f} {r['peak_pss_mib']:>12,.0f} "
            f"{r['peak_rss_mib']:>12,.0f} {ratio:>12} {job_ratio:>11} {r['load_average_1m']:>5.1f} "
            f"{r.get('outputs_match_reference', '-'):>6}"
        )
    print("\npeak PSS (MiB) of the fastest run, by role and by stage of the prepare job:")
    for r in records:
        roles = " ".join(f"{k}={v:,.0f}" for k, v in r["peak_pss_by_role_mib"].items())
        stages = " ".join(f"{k}={v:,.0f}" for k, v in r["peak_pss_by_stage_mib"].items())
        print(f"{r['size']:>11,} {r['tool']:>8}  {roles}\n{'':>21}{stages}")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": records,
    }
    out_json = work / "prepare_bench.json"
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_json}")


if __name__ == "__main__":
    raise SystemExit(main())
