"""Throughput of ``jaxnn.fit_many``: K MNIST MLPs trained at once, batch 32.

    python benchmarks/population.py                       # K = 1, 4, 16, 64
    python benchmarks/population.py --k 1,16,64,256 --json population.json
    python benchmarks/population.py --quick               # smoke run (CI): tiny, asserts no speed

For each K: ``jaxnn.init_many`` of the 784-64-64-10 MLP (``bench_common``),
then ``jaxnn.fit_many`` (Adam 1e-3, softmax cross-entropy on integer labels,
no metrics, as the throughput benchmark's jaxnn column) for ``--warmup``
untimed epochs (default 1) and ``--epochs`` timed ones (default 1) of
``--samples`` samples (default 60,000) per member. ``--order shared`` (default)
passes fit_many one key, so all members see the same batches (they differ in
their initial parameters), the fast path; ``--order own`` gives each member its
own key, hence its own shuffle. fit_many
compiles ahead and reports that time apart (``compile s``); an epoch's seconds
are fit_many's own (``history["seconds"]``), waiting for the epoch's losses.

* aggregate samples/s = K x samples per epoch / median timed epoch;
* per member = aggregate / K;
* speed-up = aggregate / the samples/s of one ``jaxnn.fit`` of the same model,
  measured the same way in the same run (``--no-fit-baseline`` skips it): the
  gain from training K models together rather than one after another.

Data: the real MNIST from ``--data-dir`` (default ``../shared/data/mnist`` beside
the repository when present), else random data of the same shapes
(``--random-data`` forces it). ``--json FILE`` writes every figure with the
machine, the JAX devices and the versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # jaxnn from source where the interpreter lacks it

from bench_common import LEARNING_RATE, MODELS, model_inputs, write_json  # noqa: E402
from throughput import git_commit, load_dataset, machine_info  # noqa: E402

SPEC = MODELS["mlp32"]
DEFAULT_K = "1,4,16,64"
QUICK_K = "1,2"
QUICK_SAMPLES = 256


def _k_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k {text!r}: give positive integers, e.g. 1,4,16"
                                         ) from None
    if not values or any(k < 1 for k in values):
        raise argparse.ArgumentTypeError(f"--k {text!r}: give positive integers, e.g. 1,4,16")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=_k_list, default=None,
                   help=f"population sizes, comma-separated (default {DEFAULT_K})")
    p.add_argument("--samples", type=int, default=None,
                   help="training samples per epoch and member (default 60000)")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first (default 1)")
    p.add_argument("--no-fit-baseline", action="store_true",
                   help="skip the single jaxnn.fit run the speed-up is measured against")
    p.add_argument("--data-dir", help="folder with the four MNIST IDX files")
    p.add_argument("--random-data", action="store_true",
                   help="use random data of MNIST's shapes even when MNIST is there")
    p.add_argument("--order", choices=("shared", "own"), default="shared",
                   help="shared: one key, every member sees the same batches (default); "
                        "own: one key per member")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_SAMPLES} samples, K = {QUICK_K} unless --k is "
                   "given; checks that everything runs, not how fast")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    args = p.parse_args(argv)
    if args.k is None:
        args.k = _k_list(QUICK_K if args.quick else DEFAULT_K)
    if args.samples is None:
        args.samples = QUICK_SAMPLES if args.quick else 60_000
    if not 1 <= args.samples <= 60_000:
        p.error("--samples must be between 1 and 60000")
    if args.epochs < 1 or args.warmup < 0:
        p.error("--epochs must be >= 1, --warmup >= 0")
    return args


def _rate(seconds: list[float], warmup: int, samples: int) -> tuple[float, float]:
    """``(median timed epoch seconds, samples / that)``."""
    epoch = statistics.median(seconds[warmup:] or seconds)
    return epoch, samples / epoch


def measure_fit(model, x, y, args) -> dict:
    """One ``jaxnn.fit`` of the same model and recipe: the baseline of the speed-up."""
    import jax

    import jaxnn

    params = model.init(jax.random.key(args.seed), x[:1])
    result = jaxnn.fit(model, params, x, y, loss=jaxnn.losses.sparse_softmax_cross_entropy,
                       optimizer=jaxnn.optimizers.adam(LEARNING_RATE),
                       key=jax.random.key(args.seed + 1), epochs=args.warmup + args.epochs,
                       batch_size=SPEC.batch, metrics=(), verbose=0)
    epoch, rate = _rate(result.history["seconds"], args.warmup, len(x))
    return {"epoch_seconds": result.history["seconds"], "epoch_seconds_median": epoch,
            "samples_per_s": rate, "compile_seconds": float(result.compile_seconds)}


def measure_population(model, x, y, k: int, args) -> dict:
    import jax

    import jaxnn

    keys = jax.random.split(jax.random.key(args.seed), k)
    params = jaxnn.init_many(model, keys, x[:1])
    start = time.perf_counter()
    result = jaxnn.fit_many(model, params, x, y,
                            loss=jaxnn.losses.sparse_softmax_cross_entropy,
                            optimizer=jaxnn.optimizers.adam(LEARNING_RATE),
                            key=(jax.random.key(args.seed + 1) if args.order == "shared"
                                 else jax.random.split(jax.random.key(args.seed + 1), k)),
                            epochs=args.warmup + args.epochs, batch_size=SPEC.batch,
                            metrics=(), verbose=0)
    wall = time.perf_counter() - start
    epoch, rate = _rate(result.history["seconds"], args.warmup, k * len(x))
    losses = result.history["loss"][-1]
    return {"k": k, "epoch_seconds": result.history["seconds"], "epoch_seconds_median": epoch,
            "aggregate_samples_per_s": rate, "member_samples_per_s": rate / k,
            "compile_seconds": float(result.compile_seconds), "wall_seconds": wall,
            "last_epoch_loss_mean": float(sum(losses) / len(losses)),
            "loadavg_after": list(os.getloadavg())}


def format_table(report: dict) -> str:
    lines = [f"fit_many, {SPEC.description}; {report['config']['samples']:,} samples per epoch "
             f"and member; data: {report['data']}; JAX devices: "
             f"{', '.join(report['jax_devices'])}"]
    baseline = report.get("fit")
    if baseline:
        lines.append(f"one jaxnn.fit: {baseline['samples_per_s']:,.0f} samples/s "
                     f"(epoch {baseline['epoch_seconds_median']:.3f} s)")
    lines.append(f"  {'K':>5} {'epoch s':>9} {'aggregate/s':>12} {'member/s':>10} "
                 f"{'speed-up':>8} {'compile s':>9}")
    for row in report["rows"]:
        speedup = (f"{row['aggregate_samples_per_s'] / baseline['samples_per_s']:.2f}"
                   if baseline else "-")
        lines.append(f"  {row['k']:>5} {row['epoch_seconds_median']:>9.3f} "
                     f"{row['aggregate_samples_per_s']:>12,.0f} "
                     f"{row['member_samples_per_s']:>10,.0f} {speedup:>8} "
                     f"{row['compile_seconds']:>9.2f}")
    lines.append(f"load average {report['loadavg_start'][0]:.2f} at the start, "
                 f"{report['loadavg_end'][0]:.2f} at the end (1 min); "
                 f"{report['machine']['cores']} cores")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jaxlib
    from peers.jaxnn_fit import build

    import jaxnn

    started = time.perf_counter()
    data, source = load_dataset(args, args.samples, 1)
    x = model_inputs(SPEC.kind, data.x_train[:args.samples])
    y = data.y_train[:args.samples]
    model = build(SPEC.kind)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {"jaxnn": jaxnn.__version__, "jax": jax.__version__,
                     "jaxlib": jaxlib.__version__},
        "loadavg_start": list(os.getloadavg()),
        "data": source,
        "model": SPEC.description,
        "config": {"k": args.k, "samples": len(x), "batch": SPEC.batch, "order": args.order,
                   "epochs": args.epochs, "warmup": args.warmup, "quick": args.quick,
                   "seed": args.seed, "argv": sys.argv[1:] if argv is None else list(argv)},
        "rows": [],
    }
    if not args.no_fit_baseline:
        print("jaxnn.fit (baseline) ...", flush=True)
        report["fit"] = measure_fit(model, x, y, args)
        print(f"  {report['fit']['samples_per_s']:,.0f} samples/s", flush=True)
    for k in args.k:
        print(f"fit_many K={k} ...", flush=True)
        row = measure_population(model, x, y, k, args)
        report["rows"].append(row)
        print(f"  {row['aggregate_samples_per_s']:,.0f} samples/s aggregate "
              f"(epoch {row['epoch_seconds_median']:.3f} s)", flush=True)
        if args.json:  # after every K, so a run stopped by a time limit keeps what it measured
            write_json(args.json, report)
    if report.get("fit"):
        for row in report["rows"]:
            row["speedup_over_fit"] = (row["aggregate_samples_per_s"]
                                       / report["fit"]["samples_per_s"])
    report["loadavg_end"] = list(os.getloadavg())
    report["total_seconds"] = time.perf_counter() - started
    print()
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
