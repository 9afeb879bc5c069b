"""Training and inference throughput of jaxnn next to plain JAX and other frameworks.

    python benchmarks/throughput.py                     # all models, every framework found
    python benchmarks/throughput.py --quick             # smoke run (CI): tiny, asserts no speed
    python benchmarks/throughput.py --models mlp32,cnn --frameworks jaxnn,jax,torch
    python benchmarks/throughput.py --json results.json --samples 60000  # full epochs everywhere

What it measures, for each model (``bench_common`` defines them and their FLOPs:
the MNIST MLP 784-64-64-10 at batch 32 and 128, the two-block CNN, the
row-LSTM(128) and the row Transformer of ``examples/mnist_transformer.py`` (2 pre-norm
blocks, d_model 64) at batch 128; Adam 1e-3, softmax cross-entropy on integer labels):

* training samples/s in the steady state: the median of ``--epochs`` timed epochs
  (default 3) after ``--warmup`` untimed ones (default 1, which holds the
  compile); an epoch is everything the framework does in it (shuffle, batching,
  steps, the final wait);
* inference samples/s over ``--infer-samples`` test images (default 10,000) in
  batches of ``--infer-batch`` (default 10,000: one batch), the median of 3 passes after one
  untimed pass;
* with ``--rounds R``, every framework runs R times, round after round, and
  each keeps its best round per model (the machine's other load only ever
  lowers a figure, and it drifts over minutes; every round's rate is in the JSON);
* start-up seconds: the training call's wall time minus the epochs at the
  steady rate, i.e. compile, tracing and setup (jaxnn's own
  ``FitResult.compile_seconds`` is in the JSON too);
* achieved GFLOP/s (training FLOPs per sample x samples/s) and its fraction of
  the machine's float32 matmul rate, measured with JAX in the same run, at its
  start and its end (a large square matmul, and the MLP's small shapes inside one
  compiled scan; ``matmul_rate.py``).

The frameworks (``--frameworks``, default all), each in its own process
(``worker.py``) and its own module under ``peers/``:

* ``jaxnn``: ``jaxnn.fit`` (``steps_per_call`` per model, see ``peers/jaxnn_fit.py``);
* ``jaxnn-progress`` (``-tty``): the same with ``fit(verbose=1)``, the bar written to
  a pipe (to a pseudo-terminal); under each table, the bar's cost is ``(jaxnn
  samples/s / jaxnn-progress samples/s - 1)``, round by round.
* ``jaxnn-noguard``: the same with ``fit(on_nonfinite="ignore")``; under each
  table, the cost of fit's NaN/inf guard is ``(jaxnn-noguard samples/s / jaxnn
  samples/s - 1) * 100`` percent;
* ``jaxnn-host``, ``jaxnn-memmap``, ``jaxnn-source``: the training data left on the
  host (numpy arrays, an ``np.memmap``, a random-access source of examples) and
  streamed by ``fit`` in prefetched chunks; under each table, each one's rate as
  a ratio of ``jaxnn``'s (the dataset on the device), round by round;
* ``jax``: plain JAX + optax as tutorials write it (a jitted step in a Python loop);
* ``jax-scan``: the same plain JAX models with the whole epoch hand-fused into one
  jitted ``lax.scan`` (the CNN: 4 straight-line steps per jitted call), the
  yardstick for jaxnn's own overhead: under each table, "jaxnn per-epoch
  overhead over the hand-fused scan" is ``(jax-scan samples/s / jaxnn
  samples/s - 1) * 100`` percent (negative: jaxnn faster);
* peers, where importable: ``torch`` (PyTorch eager), ``keras-tf`` and ``keras-jax``
  (Keras 3 ``model.fit`` on TensorFlow and on JAX), ``flax`` (Flax NNX, ``nnx.jit``),
  ``equinox`` (Equinox + optax, ``eqx.filter_jit``). A framework that cannot be
  imported is skipped with the reason. jaxnn and the plain-JAX columns run with this
  interpreter; the peers with ``--peer-python`` (default: ``.venv-bench/bin/python``
  of the repository when it exists, then this interpreter).

The peers' virtual environment (kept apart from the project's ``.venv`` so that
TensorFlow's pins cannot move the project's numpy or ml_dtypes)::

    python3.11 -m venv .venv-bench
    .venv-bench/bin/python -m pip install -r benchmarks/requirements-peers.txt

Epoch length: ``--samples`` trains on the first N samples of MNIST's 60,000 per
epoch. The default is ``60000,cnn=12800,lstm=12800,transformer=12800``: full epochs
for the MLPs and 100-step epochs for the CNN, LSTM and Transformer (a full epoch of
those takes 20-40 s per framework on 2 cores). Per-sample figures divide by the samples actually
trained, so shorter epochs stay comparable; entries ``MODEL=N`` and
``FRAMEWORK:MODEL=N`` override per model and per framework
(e.g. ``--samples 60000,keras-tf:lstm=6400``).

Data: the real MNIST from ``--data-dir`` (default ``../shared/data/mnist`` beside
the repository when present), else random data of the same shapes
(``--random-data`` forces it); throughput does not depend on the values.

``--dtype bfloat16`` trains in mixed precision (the params and Adam's state stay
float32; the forward and backward pass run on params and inputs cast to
bfloat16, the logits cast back to float32 for the loss) and infers wholly in
bfloat16; it is meant for GPUs, whose matrix units run bfloat16 much faster.
jaxnn (``fit(compute_dtype=jnp.bfloat16)``), ``jax`` and ``jax-scan`` honour
it; every other framework is skipped with the reason. The %peak column stays
relative to the float32 matmul rate.

``--devices N`` forces N CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``,
set before JAX is imported, for the JAX-based frameworks) and records the count.
jaxnn then trains data-parallel over all N (``fit(devices=N)``: each batch split
in N equal parts, so N must divide the batch of 32 or 128; inference stays on one
device); the other frameworks still run on one device. The forced devices share
the machine's cores, so this measures the overhead and the gain of splitting a
step, not more hardware.

Output: a table per model with samples/s, GFLOP/s, % of the matmul rate and the
ratio jaxnn/framework (above 1: jaxnn is faster); the load average before and
after, since figures taken while other jobs run are not representative;
``--json FILE`` writes every figure, the versions, the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import (  # noqa: E402
    DTYPES,
    FRAMEWORKS,
    MIXED_PRECISION_FRAMEWORKS,
    MODELS,
    Data,
    Plan,
    cpu_count,
    random_data,
    save_data,
    write_json,
)

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "mnist"
DEFAULT_PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
DEFAULT_SAMPLES = "60000,cnn=12800,lstm=12800,transformer=12800"
QUICK_SAMPLES = "256,cnn=128,lstm=128,transformer=128"
MNIST_TRAIN = 60_000
DEVICES_NOTE = ("jaxnn trains data-parallel over all of them (fit(devices=N)); the other "
                "frameworks run their usual single-device code")


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


def _names(text: str, known, what: str) -> list[str]:
    if text == "all":
        return list(known)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown or text!r}; choose from {', '.join(known)} or 'all'")
    return names


def parse_samples(text: str) -> dict[tuple[str | None, str | None], int]:
    """``N``, ``MODEL=N`` and ``FRAMEWORK:MODEL=N`` entries -> ``{(framework, model): N}``."""
    table: dict[tuple[str | None, str | None], int] = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        target, _, number = entry.rpartition("=")
        try:
            value = int(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--samples entry {entry!r}: {number!r} "
                                             "is not an integer") from None
        if not 1 <= value <= MNIST_TRAIN:
            raise argparse.ArgumentTypeError(
                f"--samples entry {entry!r}: must be between 1 and {MNIST_TRAIN}")
        framework, _, model = target.rpartition(":")
        if model and model not in MODELS:
            raise argparse.ArgumentTypeError(f"--samples entry {entry!r}: unknown model "
                                             f"{model!r} (models: {', '.join(MODELS)})")
        if framework and framework not in FRAMEWORKS:
            raise argparse.ArgumentTypeError(
                f"--samples entry {entry!r}: unknown framework {framework!r} "
                f"(frameworks: {', '.join(FRAMEWORKS)})")
        table[(framework or None, model or None)] = value
    return table


def samples_for(table, framework: str, model: str) -> int:
    for key in ((framework, model), (None, model), (None, None)):
        if key in table:
            return table[key]
    return MNIST_TRAIN


def parse_steps_per_call(text: str) -> dict[str | None, str]:
    """``table``, ``tune``, ``epoch`` or K for every model, or ``MODEL=...`` entries."""
    table: dict[str | None, str] = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        model, _, value = entry.rpartition("=")
        if model and model not in MODELS:
            raise argparse.ArgumentTypeError(f"--jaxnn-steps-per-call: unknown model {model!r}")
        if value not in ("table", "tune", "epoch") and not (value.isdigit() and int(value) > 0):
            raise argparse.ArgumentTypeError(
                f"--jaxnn-steps-per-call {entry!r}: use table, tune, epoch or a positive int")
        table[model or None] = value
    return table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="all", type=lambda t: _names(t, MODELS, "model"),
                   help=f"comma-separated, from {', '.join(MODELS)} (default all)")
    p.add_argument("--frameworks", default="all",
                   type=lambda t: _names(t, FRAMEWORKS, "framework"),
                   help=f"comma-separated, from {', '.join(FRAMEWORKS)} (default all)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed epochs first, holding the compile (default 1)")
    p.add_argument("--samples", type=parse_samples, default=None,
                   help=f"training samples per epoch (default {DEFAULT_SAMPLES}); "
                   "entries N, MODEL=N or FRAMEWORK:MODEL=N")
    p.add_argument("--infer-samples", type=int, default=10_000)
    p.add_argument("--infer-batch", type=int, default=10_000)
    p.add_argument("--infer-repeats", type=int, default=3)
    p.add_argument("--data-dir", help="folder with the four MNIST IDX files "
                   f"(default {DEFAULT_DATA_DIR} when present)")
    p.add_argument("--random-data", action="store_true",
                   help="use random data of MNIST's shapes even when MNIST is there")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="force N CPU devices for the JAX-based frameworks; jaxnn trains "
                   "data-parallel over them (fit(devices=N); N must divide the batch), "
                   "the others stay on one device")
    p.add_argument("--jaxnn-steps-per-call", type=parse_steps_per_call, default={None: "table"},
                   help="table (per-model setting in peers/jaxnn_fit.py, the default), tune "
                   "(time the candidates first), epoch, or K; MODEL=... entries per model")
    p.add_argument("--peer-python", action="append", default=None, metavar="PYTHON",
                   help="interpreter(s) to try for the peers, in order (default "
                   f"{DEFAULT_PEER_PYTHON} when it exists, then this one)")
    p.add_argument("--matmul-size", type=int, default=4096,
                   help="side of the square matmul giving the machine's rate (default 4096)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds allowed to each framework's process (default 1800)")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads (default: the core count). On a busy machine "
                   "OpenMP's threads wait on each other and 1 thread can be far faster")
    p.add_argument("--rounds", type=int, default=1, metavar="R",
                   help="run every framework R times, round after round, and keep each "
                        "one's best round per model (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype (default float32); bfloat16: mixed precision with "
                   f"float32 params, for {', '.join(MIXED_PRECISION_FRAMEWORKS)} only (the "
                   "others are skipped)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny epochs, 1 timed epoch, small matmul; for CI "
                   "(checks that everything runs, not how fast)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.warmup < 0 or args.infer_repeats < 1 or args.rounds < 1:
        p.error("--epochs, --rounds and --infer-repeats must be >= 1, --warmup >= 0")
    if args.quick:
        args.epochs = 1
        args.infer_samples = min(args.infer_samples, 256)
        args.infer_batch = min(args.infer_batch, 128)
        args.infer_repeats = 1
        args.matmul_size = min(args.matmul_size, 256)
    if args.samples is None:
        args.samples = parse_samples(QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES)
    if args.devices is not None and args.devices < 1:
        p.error("--devices must be >= 1")
    if not 1 <= args.infer_samples <= 10_000:
        p.error("--infer-samples must be between 1 and 10000 (the MNIST test set)")
    return args


# --------------------------------------------------------------------------
# Machine, data
# --------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = platform.processor() or ""
    memory = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu, "cores": cpu_count(), "logical_cpus": os.cpu_count(),
            "memory": memory, "platform": platform.platform(),
            "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def load_dataset(args, n_train: int, n_test: int) -> tuple[Data, str]:
    """The first ``n_train`` / ``n_test`` MNIST images, or random ones; and where they came from."""
    folder = Path(args.data_dir) if args.data_dir else DEFAULT_DATA_DIR
    if args.random_data or (args.data_dir is None
                            and not (folder / "train-images-idx3-ubyte.gz").exists()):
        return random_data(n_train, n_test, args.seed), "random (MNIST shapes)"
    sys.path.insert(0, str(ROOT))  # jaxnn from source if this interpreter lacks it
    from jaxnn.datasets import mnist

    ds = mnist(folder, download=False, use_tfds=False)
    data = Data(ds.x_train[:n_train], ds.y_train[:n_train], ds.x_test[:n_test],
                ds.y_test[:n_test])
    return data, f"MNIST from {folder}"


# --------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------


def run_worker(framework: str, python: str, config: dict, workdir: Path, env: dict,
               timeout: float) -> dict:
    """Run ``worker.py`` for one framework; returns its result (or the error)."""
    config_path = workdir / f"{framework}.config.json"
    out_path = workdir / f"{framework}.result.json"
    log_path = workdir / f"{framework}.log"
    out_path.unlink(missing_ok=True)
    write_json(config_path, config)
    command = [python, str(HERE / "worker.py"), "--framework", framework,
               "--config", str(config_path), "--out", str(out_path)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                env=env, cwd=ROOT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                print(f"  [{framework}] {line.rstrip()}", flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
    seconds = time.perf_counter() - start
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.setdefault("framework", framework)
    result["python"] = python
    result["process_seconds"] = seconds
    if rc != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        why = f"timed out after {timeout:.0f} s" if seconds >= timeout else f"exit status {rc}"
        result["failed"] = f"{why}; log tail:\n" + "\n".join(tail)
    return result


def worker_env(framework: str, args) -> dict:
    spec = FRAMEWORKS.get(framework)
    env = dict(os.environ)
    env.update(spec.env if spec else {})
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    if args.devices is not None and (spec is None or spec.uses_jax):
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def best_of_rounds(best: dict | None, result: dict) -> dict:
    """Merge a framework's new round into its best so far: per model, the round with
    the higher training rate is kept; every round's rate is listed in the row."""
    if best is None or "results" not in best:
        merged = result
        for row in result.get("results", {}).values():
            row["rounds_train_samples_per_s"] = [row.get("train_samples_per_s")]
        return merged
    for model, row in result.get("results", {}).items():
        kept = best["results"].get(model)
        rounds = (kept or {}).get("rounds_train_samples_per_s", [])
        rounds = [*rounds, row.get("train_samples_per_s")]
        if kept is None or (row.get("train_samples_per_s") or 0) > (
                kept.get("train_samples_per_s") or 0):
            best["results"][model] = row
        best["results"][model]["rounds_train_samples_per_s"] = rounds
    return best


def peer_pythons(args) -> list[str]:
    candidates = list(args.peer_python or [])
    if not candidates and DEFAULT_PEER_PYTHON.exists():
        candidates.append(str(DEFAULT_PEER_PYTHON))
    candidates.append(sys.executable)
    return list(dict.fromkeys(candidates))


def run_framework(framework: str, args, config: dict, workdir: Path) -> dict:
    if args.dtype != "float32" and framework not in MIXED_PRECISION_FRAMEWORKS:
        reason = (f"--dtype {args.dtype} is implemented for "
                  f"{', '.join(MIXED_PRECISION_FRAMEWORKS)} only")
        print(f"{framework}: skipped: {reason}", flush=True)
        return {"framework": framework, "label": FRAMEWORKS[framework].label,
                "skipped": reason}
    pythons = [sys.executable] if FRAMEWORKS[framework].project else peer_pythons(args)
    reasons = []
    for python in pythons:
        print(f"{framework}: {FRAMEWORKS[framework].label} with {python}", flush=True)
        result = run_worker(framework, python, config, workdir, worker_env(framework, args),
                            args.timeout)
        if "skipped" not in result:
            return result
        reasons.append(f"{python}: {result['skipped']}")
    return {"framework": framework, "label": FRAMEWORKS[framework].label,
            "skipped": "; ".join(reasons)}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def jaxnn_overhead(report: dict) -> dict[str, float | None]:
    """Per model, jaxnn's per-epoch overhead over the hand-fused scan, in percent.

    ``(jax-scan samples/s / jaxnn samples/s - 1) * 100``: the extra time a jaxnn
    epoch takes over the ``jax-scan`` epoch (negative: jaxnn faster); None
    unless both ran the model.
    """
    frameworks = report["frameworks"]
    overhead: dict[str, float | None] = {}
    for name in report["config"]["models"]:
        ours = frameworks.get("jaxnn", {}).get("results", {}).get(name)
        fused = frameworks.get("jax-scan", {}).get("results", {}).get(name)
        overhead[name] = (100 * (fused["train_samples_per_s"] / ours["train_samples_per_s"] - 1)
                          if ours and fused else None)
    return overhead


def guard_cost(report: dict, without: str = "jaxnn-noguard",
               base: str = "jaxnn") -> dict[str, dict | None]:
    """Per model, the cost of fit's non-finite guard: ``(jaxnn-noguard samples/s /
    jaxnn samples/s - 1) * 100`` percent, from the best round (``best``) and round by
    round (``rounds``, with --rounds R); None unless both columns ran the model.
    ``without`` and ``base`` name other columns: ``guard_cost(report, "jaxnn",
    "jaxnn-progress")`` is the cost of the progress bar (jaxnn / jaxnn-progress - 1)."""
    frameworks = report["frameworks"]
    cost: dict[str, dict | None] = {}
    for name in report["config"]["models"]:
        ours = frameworks.get(base, {}).get("results", {}).get(name)
        plain = frameworks.get(without, {}).get("results", {}).get(name)
        if not (ours and plain):
            cost[name] = None
            continue
        pairs = zip(ours.get("rounds_train_samples_per_s", []),
                    plain.get("rounds_train_samples_per_s", []))
        rounds = [100 * (b / a - 1) for a, b in pairs if a and b]
        cost[name] = {
            "best": 100 * (plain["train_samples_per_s"] / ours["train_samples_per_s"] - 1),
            "rounds": rounds,
            "median": statistics.median(rounds) if rounds else None,
        }
    return cost


def format_report(report: dict) -> str:
    lines = []
    machine = report["machine"]
    lines.append(f"Machine: {machine['cpu_model']}, {machine['cores']} cores; "
                 f"load average {report['loadavg_start'][0]:.2f} at the start, "
                 f"{report['loadavg_end'][0]:.2f} at the end (1 min)")
    # The benchmark itself keeps up to about `cores` threads busy: the rows' load
    # counts it; the load at the start does not.
    row_loads = [row["loadavg_before"][0] for result in report["frameworks"].values()
                 for row in result.get("results", {}).values()]
    if (report["loadavg_start"][0] > 0.5 * machine["cores"]
            or max(row_loads, default=0.0) > 1.5 * machine["cores"]):
        lines.append("  WARNING: other jobs were running; these figures are not representative.")
    lines.append(f"Data: {report['data']}; devices: {report['devices']['note']}")
    dtype = report["config"].get("dtype", "float32")
    jax_devices = next((r["setup"]["jax_devices"] for r in report["frameworks"].values()
                        if r.get("setup", {}).get("jax_devices")), None)
    lines.append(f"Compute dtype: {dtype}"
                 + (" (mixed precision: float32 params and optimizer, bfloat16 forward and "
                    "backward, float32 loss)" if dtype != "float32" else "")
                 + (f"; JAX devices: {', '.join(jax_devices)}" if jax_devices else ""))
    matmul = report.get("matmul") or {}
    rates = matmul.get("gflop_per_s", {})
    if rates:
        lines.append("JAX float32 matmul (best of the start and end runs): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " GFLOP/s")
    peak = report.get("peak_gflop_per_s")

    frameworks = report["frameworks"]
    overhead = jaxnn_overhead(report)
    for name in report["config"]["models"]:
        spec = report["models"][name]
        lines.append("")
        lines.append(f"{name}: {spec['description']}; training {spec['train_flops']:,} "
                     f"FLOP/sample, inference {spec['forward_flops']:,}")
        lines.append(f"  {'framework':<15} {'train/s':>9} {'samples':>7} {'GFLOP/s':>8} "
                     f"{'%peak':>6} {'jaxnn/x':>8} {'infer/s':>10} {'jaxnn/x':>8} "
                     f"{'start-up s':>10} {'load':>5}")
        ours = frameworks.get("jaxnn", {}).get("results", {}).get(name)
        for fw, result in frameworks.items():
            row = result.get("results", {}).get(name)
            label = result.get("label", fw)
            if row is None:
                why = ("skipped" if "skipped" in result else
                       "failed" if name in result.get("errors", {}) or "failed" in result
                       else "no result")
                lines.append(f"  {label:<15} {why}")
                continue
            train, infer = row["train_samples_per_s"], row["infer_samples_per_s"]
            share = f"{100 * row['train_gflop_per_s'] / peak:.1f}" if peak else "-"
            ratio = f"{ours['train_samples_per_s'] / train:.2f}" if ours else "-"
            infer_ratio = f"{ours['infer_samples_per_s'] / infer:.2f}" if ours else "-"
            lines.append(f"  {label:<15} {_fmt_rate(train):>9} {row['samples_per_epoch']:>7} "
                         f"{row['train_gflop_per_s']:>8.2f} {share:>6} {ratio:>8} "
                         f"{_fmt_rate(infer):>10} {infer_ratio:>8} "
                         f"{row['startup_seconds']:>10.2f} {row['loadavg_before'][0]:>5.1f}")
        if overhead.get(name) is not None:
            lines.append(f"  jaxnn per-epoch overhead over the hand-fused scan: "
                         f"{overhead[name]:+.1f}%")
        for what, without, base in (("fit's non-finite guard", "jaxnn-noguard", "jaxnn"),
                                    ("fit's progress bar", "jaxnn", "jaxnn-progress"),
                                    ("fit's progress bar", "jaxnn", "jaxnn-progress-tty")):
            cost = guard_cost(report, without, base).get(name)
            if cost is not None:
                rounds = ", ".join(f"{c:+.1f}%" for c in cost["rounds"])
                median = (f"; median of rounds {cost['median']:+.1f}%, by round {rounds}"
                          if rounds else "")
                lines.append(f"  cost of {what} ({without} / {base} - 1): "
                             f"{cost['best']:+.1f}% best rounds{median}")
        for column in ("jaxnn-host", "jaxnn-memmap", "jaxnn-source"):
            cost = guard_cost(report, column, "jaxnn").get(name)
            if cost is not None:
                rounds = ", ".join(f"{1 + c / 100:.2f}" for c in cost["rounds"])
                median = (f"; median of rounds {1 + cost['median'] / 100:.2f}x, by round "
                          f"{rounds}" if rounds else "")
                lines.append(f"  streamed from the host ({column} / jaxnn): "
                             f"{1 + cost['best'] / 100:.2f}x best rounds{median}")
    lines.append("")
    lines.append("train/s: median steady epoch; samples: per epoch; %peak: of the square "
                 "matmul rate; jaxnn/x > 1: jaxnn faster; start-up: compile and setup;\n"
                 "load: the 1-minute load average as the row started (this run counts "
                 f"for up to about {machine['cores']}, the cores).")
    for fw, result in frameworks.items():
        label = result.get("label", fw)
        if "skipped" in result:
            lines.append(f"{label}: skipped ({result['skipped']})")
        if "failed" in result:
            lines.append(f"{label}: FAILED ({result['failed'].splitlines()[0]})")
        for model, err in result.get("errors", {}).items():
            lines.append(f"{label} {model}: FAILED ({err.strip().splitlines()[-1]})")
        if result.get("versions"):
            lines.append(f"{label}: " + ", ".join(f"{k} {v}" for k, v in
                                                   result["versions"].items()))
        threads = {k: v for k, v in result.get("setup", {}).items() if "threads" in k}
        if threads:
            lines.append(f"  {', '.join(f'{k} {v}' for k, v in threads.items())}")
        for model, row in result.get("results", {}).items():
            for note in row.get("notes", []):
                if fw == "jaxnn" or "tutorial" not in note:
                    lines.append(f"  {model}: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.devices is not None:  # for this process too, before anything imports jax
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

    models, frameworks = args.models, args.frameworks
    samples = {fw: {m: samples_for(args.samples, fw, m) for m in models} for fw in frameworks}
    n_train = max(max(s.values()) for s in samples.values())
    data, data_source = load_dataset(args, n_train, args.infer_samples)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "loadavg_start": list(os.getloadavg()),
        "data": data_source,
        "devices": {"requested": args.devices,
                    "note": (f"{args.devices} forced CPU devices; {DEVICES_NOTE}"
                             if args.devices else "default (JAX's devices, unforced)")},
        "config": {"models": models, "frameworks": frameworks, "epochs": args.epochs,
                   "warmup": args.warmup, "samples": samples,
                   "infer_samples": args.infer_samples, "infer_batch": args.infer_batch,
                   "infer_repeats": args.infer_repeats, "quick": args.quick,
                   "seed": args.seed, "dtype": args.dtype, "argv": sys.argv[1:]},
        "dtype": args.dtype,
        "models": {m: {"description": MODELS[m].description, "batch": MODELS[m].batch,
                       "forward_flops": MODELS[m].flops[0], "train_flops": MODELS[m].flops[1]}
                   for m in models},
        "frameworks": {},
    }

    with tempfile.TemporaryDirectory(prefix="jaxnn-bench-") as tmp:
        workdir = Path(tmp)
        paths = save_data(data, workdir)
        del data

        def measure_matmul(when: str) -> dict:
            print(f"matmul ({when}): measuring the float32 matmul rate with JAX", flush=True)
            count = 16 if args.quick else 1000
            return run_worker("matmul", sys.executable,
                              {"matmul": {"square": args.matmul_size, "count": count,
                                          "repeats": 1 if args.quick else 3}},
                              workdir, worker_env("matmul", args), args.timeout)

        matmul_runs = [measure_matmul("start")]

        def measure_framework(fw: str) -> dict:
            spc = args.jaxnn_steps_per_call
            plans = {m: Plan(samples=samples[fw][m], epochs=args.warmup + args.epochs,
                             warmup=args.warmup, infer_samples=args.infer_samples,
                             infer_batch=args.infer_batch, infer_repeats=args.infer_repeats,
                             seed=args.seed,
                             options={"steps_per_call": spc.get(m, spc.get(None, "table")),
                                      "dtype": args.dtype}
                             ).__dict__ for m in models}
            config = {"data": paths, "models": models, "plans": plans,
                      "threads": args.torch_threads if fw == "torch" else None}
            return run_framework(fw, args, config, workdir)

        # Round after round of every framework: each keeps its best round (the
        # machine's other load only ever lowers a figure, and drifts over minutes).
        for round_index in range(args.rounds):
            for fw in frameworks:
                if args.rounds > 1:
                    print(f"round {round_index + 1}/{args.rounds}: ", end="", flush=True)
                report["frameworks"][fw] = best_of_rounds(report["frameworks"].get(fw),
                                                          measure_framework(fw))
        if not args.quick:  # again at the end: other jobs on the machine may have come or gone
            matmul_runs.append(measure_matmul("end"))

    # The machine's rate: the best seen (a busy machine only ever lowers a measurement).
    matmul = dict(matmul_runs[0])
    matmul["gflop_per_s"] = {
        key: max(run.get("gflop_per_s", {}).get(key, 0.0) for run in matmul_runs)
        for key in matmul_runs[0].get("gflop_per_s", {})
    }
    matmul["runs"] = matmul_runs
    report["matmul"] = matmul
    rates = matmul["gflop_per_s"]
    report["peak_gflop_per_s"] = rates.get(matmul.get("peak_key"))

    report["loadavg_end"] = list(os.getloadavg())
    report["total_seconds"] = time.perf_counter() - started
    report["jaxnn_overhead_percent"] = jaxnn_overhead(report)
    report["guard_cost_percent"] = guard_cost(report)
    report["streamed_ratio_percent"] = {column: guard_cost(report, column, "jaxnn")
                                        for column in ("jaxnn-host", "jaxnn-memmap",
                                                       "jaxnn-source")}
    report["progress_cost_percent"] = {column: guard_cost(report, "jaxnn", column)
                                       for column in ("jaxnn-progress", "jaxnn-progress-tty")}
    peak = report["peak_gflop_per_s"]
    for result in report["frameworks"].values():
        for name, row in result.get("results", {}).items():
            row["fraction_of_peak"] = row["train_gflop_per_s"] / peak if peak else None
            if MODELS[name].kind == "mlp":
                key = f"mlp_fwd_{MODELS[name].batch}x784x64"
                small = rates.get(key)
                row["fraction_of_small_matmul_rate"] = (row["train_gflop_per_s"] / small
                                                        if small else None)
    if args.devices:
        for result in report["frameworks"].values():
            result.setdefault("notes", []).append(DEVICES_NOTE)

    print()
    print(format_report(report))
    print(f"\nTotal {report['total_seconds']:.0f} s.")
    if args.json:
        write_json(args.json, report)
        print(f"Wrote {args.json}")
    failed = [fw for fw, r in report["frameworks"].items() if r.get("failed") or r.get("errors")]
    failed += ["matmul"] * any("failed" in run for run in matmul_runs)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
