"""The MNIST MLP of mnist_mlp.py, trained data-parallel over several devices and processes.

784 -> Dense(64, ReLU) -> Dense(64, ReLU) -> Dense(10), Adam, sparse categorical
cross-entropy, accuracy: the model, data and flags of ``mnist_mlp.py``, trained by
``jaxnn.fit(..., devices="all")``. Each global batch of ``--batch-size`` examples is
split evenly over the devices; each device computes the gradient of its part, the
parts are averaged, and every device applies the same update to its copy of the
params. After ``jax.distributed.initialize`` the devices are those of every process:
each process loads the same data and reads only its own part of each batch, the
history holds the global means, and only process 0 prints. Every process scores the
test set with its copy of the final params (the same in all); process 0 prints the
result.

Three ways to run it:

1. Several devices of one host (GPUs, or CPU devices forced by XLA)::

     export XLA_FLAGS=--xla_force_host_platform_device_count=8
     python examples/mnist_distributed.py --devices 8

2. Several processes of one machine, 2 CPU devices each. ``--local 2`` starts both,
   forwards process 0's output and fails if either fails::

     python examples/mnist_distributed.py --local 2 --epochs 2

   or by hand, the two commands of ``--local 2`` (fetch MNIST first, or pass
   ``--data-dir``, so that the two do not download it at once)::

     python -c "import jaxnn; jaxnn.datasets.mnist()"
     export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2
     RUN="python examples/mnist_distributed.py --processes 2 --coordinator localhost:12355"
     $RUN --process-id 0 & $RUN --process-id 1; wait

   On several machines: the same command once on each, with the first machine's
   address in ``--coordinator`` (its port reachable from the others), ``--processes``
   the number of machines and ``--process-id`` 0, 1, ...

3. A SLURM cluster of GPUs, or a Cloud TPU pod slice: ``--auto-initialize`` calls
   ``jax.distributed.initialize()`` with no arguments, which reads the coordinator,
   the process count and the index from the cluster. On SLURM, one task per GPU,
   each task seeing all of its node's GPUs (e.g. ``#SBATCH --nodes=2
   --ntasks-per-node=8 --gres=gpu:8``)::

     srun python examples/mnist_distributed.py --auto-initialize

   On a TPU pod slice, the same command on every host::

     gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \\
       --command="python examples/mnist_distributed.py --auto-initialize"

   (docs/training.md, "Several processes (hosts)", says more.)

``--batch-size`` is the global batch: it must be divisible by the number of devices
(the default, 128, divides among 1, 2, 4, ..., 128 devices). ``--checkpoint-dir``
must name a folder every process can read (process 0 writes it; every process resumes
from it).

Measured on 2 CPU cores shared with other work (2026-11-29), the default 5 epochs
of 54,000 training images: a plain run (one device) took 23 s, 5 s of it training,
and reached 96.9% test accuracy; ``--local 2`` (2 processes of 2 CPU devices) took
95 s, 65 s of it training, and reached 96.85% (the same global batches, summed in
another order). Several CPU devices of one machine do not train faster than one:
they share its cores, and every step exchanges the gradients between the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import numpy as np

import jaxnn
from jaxnn import datasets

# examples/ is not a package: import the shared command-line helpers from this folder.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cli  # noqa: E402
import mnist_mlp  # noqa: E402  (the model, the data and the optimizers)

DEFAULT_BATCH = 128  # the global batch: divisible by 1, 2, 4, ..., 128 devices
DEFAULT_CPU_DEVICES = 2  # --local: CPU devices per process
FAILED_PEER_GRACE = 10.0  # --local: seconds the others get to exit after one fails


def devices_flag(text: str) -> int | str:
    """``--devices``: ``all`` or a positive integer."""
    if text == "all":
        return text
    try:
        return _cli.positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'all', got {text!r}") from None


def coordinator_flag(text: str) -> str:
    """``--coordinator``: ``HOST:PORT``, the port from 1 to 65535."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (e.g. localhost:12355), got {text!r}")
    return text


def parse_args(argv=None):
    """The flags, every one checked, and checked together: a bad one exits (see
    ``_cli``) before any work, and before ``jax.distributed.initialize``."""
    parser = _cli.ArgumentParser(description=__doc__.splitlines()[0])
    _cli.add_data_flags(parser, epochs=5, batch_size=DEFAULT_BATCH,
                        optimizers=mnist_mlp.OPTIMIZERS, default_lr=mnist_mlp.DEFAULT_LR)
    _cli.add_output_flags(parser)
    group = parser.add_argument_group("devices and processes")
    group.add_argument("--devices", type=devices_flag, default="all", metavar="N|all",
                       help="train on the first N devices, or all of them (of every "
                       "process); a run of several processes takes all")
    group.add_argument("--processes", type=_cli.positive_int, default=1, metavar="P",
                       help="the number of processes of the run; when P > 1, this one "
                       "calls jax.distributed.initialize with --process-id and "
                       "--coordinator before anything else")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="this process's index, 0 to P-1 (with --processes P)")
    group.add_argument("--coordinator", type=coordinator_flag, default=None,
                       metavar="HOST:PORT",
                       help="process 0's address, the same in every process (with "
                       "--processes P)")
    group.add_argument("--auto-initialize", action="store_true",
                       help="call jax.distributed.initialize() with no arguments: on SLURM, "
                       "Open MPI or a Cloud TPU pod slice it finds the processes itself")
    group.add_argument("--local", type=_cli.positive_int, default=None, metavar="P",
                       help="start P processes of this example on this machine, on CPU "
                       "(--cpu-devices each), forward process 0's output, and fail if "
                       "any fails")
    group.add_argument("--cpu-devices", type=_cli.positive_int, default=None, metavar="K",
                       help=f"with --local: CPU devices per process "
                       f"(default: {DEFAULT_CPU_DEVICES})")
    args = parser.parse_args(argv)
    check_processes(parser, args)
    _cli.check_paths(parser, args)
    return args


def check_processes(parser, args):
    """The device and process flags together (the counts known before any process starts)."""
    explicit = [flag for flag, given in (("--processes", args.processes > 1),
                                         ("--process-id", args.process_id is not None),
                                         ("--coordinator", args.coordinator is not None))
                if given]
    if args.local is not None:
        for flag, given in (*((f, True) for f in explicit),
                            ("--auto-initialize", args.auto_initialize)):
            if given:
                parser.error(f"--local: not with {flag} (--local starts the processes "
                             "and gives each its own)")
        args.cpu_devices = args.cpu_devices or DEFAULT_CPU_DEVICES
        total = args.local * args.cpu_devices
        if args.devices not in ("all", total):
            parser.error(f"--devices {args.devices}: --local {args.local} with "
                         f"--cpu-devices {args.cpu_devices} trains on all {total} devices; "
                         "pass --devices all")
        check_batch(parser, args.batch_size, total)
        return
    if args.cpu_devices is not None:
        parser.error("--cpu-devices: only with --local (otherwise set XLA_FLAGS="
                     "--xla_force_host_platform_device_count=K before starting)")
    if args.auto_initialize and explicit:
        parser.error(f"--auto-initialize: not with {explicit[0]} (it finds the processes "
                     "itself; for your own, pass --processes, --process-id and --coordinator)")
    if args.processes > 1:
        missing = [flag for flag, value in (("--process-id", args.process_id),
                                            ("--coordinator", args.coordinator))
                   if value is None]
        if missing:
            parser.error(f"--processes {args.processes} needs {' and '.join(missing)} "
                         "(this process's index and process 0's HOST:PORT), or use "
                         "--local or --auto-initialize")
        if not 0 <= args.process_id < args.processes:
            parser.error(f"--process-id {args.process_id}: expected 0 to "
                         f"{args.processes - 1} (with --processes {args.processes})")
    elif explicit:
        parser.error(f"{explicit[0]}: only with --processes P, P > 1")
    if isinstance(args.devices, int):
        check_batch(parser, args.batch_size, args.devices)


def check_batch(parser, batch_size, devices):
    if batch_size % devices:
        parser.error(f"--batch-size {batch_size}: the global batch must be divisible by "
                     f"the {devices} devices (each takes an equal part of it); e.g. "
                     f"{max(1, batch_size // devices) * devices}")


# -- --local: P processes of this example on this machine -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _without_local_flags(argv):
    """``argv`` less ``--local`` and ``--cpu-devices`` (the launcher's own flags)."""
    launcher = argparse.ArgumentParser(add_help=False)
    launcher.add_argument("--local")
    launcher.add_argument("--cpu-devices")
    return launcher.parse_known_args(argv)[1]


def _process_env(cpu_devices: int) -> dict:
    """This environment for a process of ``--local``: CPU only, ``cpu_devices`` devices,
    and no proxies (the coordinator is on localhost; a proxy would not reach it)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags,
                                 f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _wait(started):
    """Wait for every process; once one fails, give the others ``FAILED_PEER_GRACE``
    seconds (they may be waiting for it in a collective), then kill them. Returns each
    one's exit status, None for those killed."""
    deadline = None
    while any(p.poll() is None for p in started):
        if deadline is None and any(p.poll() not in (None, 0) for p in started):
            deadline = time.monotonic() + FAILED_PEER_GRACE
        if deadline is not None and time.monotonic() > deadline:
            break
        time.sleep(0.2)
    codes = []
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
            codes.append(None)
        else:
            codes.append(process.returncode)
    return codes


def launch(args, argv):
    """``--local P``: run this example as P processes of this machine, each with
    ``--cpu-devices`` CPU devices; process 0's output is this one's. Exits with the
    status of the first process that failed, after showing its output."""
    processes = args.local
    if args.data_dir is None and not os.environ.get(_cli.DATA_DIR_ENV):
        # Fetch MNIST into jaxnn's cache here, once, not in every process at once.
        with _cli.data_errors():
            try:
                datasets.mnist()
            except datasets.DatasetUnavailableError:
                pass  # every process falls back alike, and process 0 says why
    port = _free_port()
    command = [sys.executable, str(Path(__file__).resolve()), *_without_local_flags(argv)]
    if not args.quiet:
        print(f"starting {processes} processes of {args.cpu_devices} CPU devices each "
              f"(coordinator localhost:{port})", flush=True)
    env = _process_env(args.cpu_devices)
    with tempfile.TemporaryDirectory(prefix="mnist-distributed-") as folder:
        # Process 0 writes to this process's stdout and stderr; the others each to a
        # file, shown only if that process fails.
        outputs = [None, *(Path(folder) / f"process_{i}.out" for i in range(1, processes))]
        started, logs = [], []
        try:
            for i, output in enumerate(outputs):
                flags = ([] if processes == 1 else
                         ["--processes", str(processes), "--process-id", str(i),
                          "--coordinator", f"localhost:{port}"])
                log = None if output is None else open(output, "w")  # noqa: SIM115
                logs.append(log)
                started.append(subprocess.Popen([*command, *flags], env=env, stdout=log,
                                                stderr=subprocess.STDOUT if log else None))
            codes = _wait(started)
        except KeyboardInterrupt:
            _cli.fail("interrupted", 130)
        finally:
            for process in started:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            for log in logs:
                if log is not None:
                    log.close()
        failed = [(i, code) for i, code in enumerate(codes) if code]
        if not failed:
            return
        first, code = failed[0]
        if first > 0:  # process 0's output is already shown; this one's is not
            sys.stderr.write(outputs[first].read_text())
            print(f"error: process {first} of {processes} exited with status {code}",
                  file=sys.stderr)
    raise SystemExit(code if code > 0 else 1)


# -- one process of the run ------------------------------------------------------------


def initialize(args):
    """``jax.distributed.initialize``, when this process is one of several; before any
    other use of JAX."""
    if args.processes > 1:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.processes, process_id=args.process_id)
    elif args.auto_initialize:
        try:
            jax.distributed.initialize()
        except ValueError as error:  # no cluster found
            _cli.fail(f"--auto-initialize: jax.distributed.initialize() found no cluster "
                      f"(SLURM, Open MPI, Cloud TPU): {error} Pass --processes, "
                      "--process-id and --coordinator, or use --local.", _cli.USAGE_ERROR)


def check_devices(args) -> int | str:
    """``fit``'s ``devices=`` for ``--devices``, checked against the devices there are
    (known only now, after ``initialize``)."""
    total, processes = jax.device_count(), jax.process_count()
    if args.devices == "all":
        count = total
    else:
        count = args.devices
        if count > total:
            _cli.fail(f"--devices {count}: only {total} device(s) here "
                      f"({jax.devices()[0].platform}); for N CPU devices set XLA_FLAGS="
                      "--xla_force_host_platform_device_count=N before starting",
                      _cli.USAGE_ERROR)
        if processes > 1 and count != total:
            _cli.fail(f"--devices {count}: a run of {processes} processes trains on all "
                      f"{total} devices of all of them; pass --devices all",
                      _cli.USAGE_ERROR)
    if args.batch_size % count:
        _cli.fail(f"--batch-size {args.batch_size}: the global batch must be divisible by "
                  f"the {count} devices (each takes an equal part of it); e.g. "
                  f"{max(1, args.batch_size // count) * count}", _cli.USAGE_ERROR)
    return args.devices


def train(args):
    """Train, test, and (process 0) report; every process returns the summary."""
    devices = check_devices(args)
    first = jax.process_index() == 0
    verbose = 1 if first and not args.quiet else 0
    cache = _cli.enable_compile_cache(args)
    with _cli.data_errors():
        data = mnist_mlp.load_data(args.data_dir)  # the same data in every process
    x_train, y_train = data.x_train[:args.train_limit], data.y_train[:args.train_limit]
    x_test, y_test = data.x_test[:args.test_limit], data.y_test[:args.test_limit]
    x_train, y_train, x_val, y_val = _cli.hold_out(x_train, y_train, args.validation_split)
    if verbose:
        held = f"{len(x_val):,} validation, " if x_val is not None else ""
        print(f"dataset: {data.name} from {data.source} "
              f"({len(x_train):,} train, {held}{len(x_test):,} test)")
        print(f"{jax.process_count()} process(es), {jax.device_count()} "
              f"{jax.devices()[0].platform} device(s) in all, "
              f"{jax.local_device_count()} in this one; training on "
              f"{jax.device_count() if devices == 'all' else devices}, "
              f"global batch {args.batch_size}")

    model = mnist_mlp.build_model()
    init_key, train_key = jax.random.split(jax.random.key(args.seed))
    params = model.init(init_key, x_train[:1])  # the same in every process: the same key
    if verbose:
        print(model.summary(x_train[:args.batch_size]))
    lr = args.lr if args.lr is not None else mnist_mlp.DEFAULT_LR[args.optimizer]
    ours, theirs = mnist_mlp.OPTIMIZERS[args.optimizer]
    optimizer = (theirs if args.optax else ours)(lr)
    # ModelCheckpoint writes on process 0 only; every process resumes from the folder.
    params, opt_state, initial_epoch, train_key, callbacks = mnist_mlp.checkpointing(
        args.checkpoint_dir, params, optimizer, train_key, verbose)

    start = time.perf_counter()
    result = jaxnn.fit(
        model, params, x_train, y_train,
        loss=jaxnn.losses.sparse_softmax_cross_entropy,
        optimizer=optimizer, key=train_key, epochs=args.epochs, batch_size=args.batch_size,
        opt_state=opt_state, initial_epoch=initial_epoch,
        penalty=jaxnn.regularizers.l2(args.l2) if args.l2 else None,
        metrics=["accuracy"], validation_data=None if x_val is None else (x_val, y_val),
        callbacks=callbacks, verbose=verbose, devices=devices,
    )
    wall = time.perf_counter() - start

    # The params are replicated on every device of every process: each process scores
    # the test set with its own copy, on one of its devices.
    local_params = jax.tree.map(np.asarray, result.params)
    test = jaxnn.evaluate(model, local_params, x_test, y_test,
                          loss=jaxnn.losses.sparse_softmax_cross_entropy)
    if verbose:
        print(f"test accuracy {test['accuracy']:.4f}, test loss {test['loss']:.4f} "
              f"({result.compile_seconds:.1f} s compiling the training programs)")
    if args.plot and first:
        probabilities = jaxnn.predict(model, local_params, x_test, output="probabilities")
        predicted = np.asarray(probabilities.argmax(-1))
        saved = _cli.save_plots(args.plot, result.history, x_test, predicted, y_test)
        if verbose:
            print("saved", ", ".join(map(str, saved)))

    summary = {
        "dataset": data.name,
        "source": data.source,
        "processes": jax.process_count(),
        "devices": jax.device_count() if devices == "all" else devices,
        "platform": jax.devices()[0].platform,
        "train_examples": len(x_train),
        "validation_examples": 0 if x_val is None else len(x_val),
        "test_examples": len(x_test),
        "epochs": result.epoch,
        "batch_size": args.batch_size,
        "optimizer": f"{'optax' if args.optax else 'jaxnn'}.{args.optimizer}",
        "learning_rate": lr,
        "l2": args.l2,
        "seed": args.seed,
        "val_accuracy": result.history.get("val_accuracy", [None])[-1],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_seconds": float(sum(result.history.get("seconds", []))),
        "compile_seconds": result.compile_seconds,
        "compile_cache": _cli.cache_summary(cache),
        "wall_seconds": wall,
        "history": result.history,
    }
    if verbose:
        print(_cli.cache_line(summary["compile_cache"]))
    if args.json and first:
        print(json.dumps(summary), flush=True)
    return summary


def main(argv=None):
    """Parse the flags; then launch the processes (``--local``) or be one of them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.local is not None:
        return launch(args, argv)
    initialize(args)
    summary = train(args)
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    return summary


if __name__ == "__main__":
    try:
        main()
    except BaseException as error:
        if not jax.distributed.is_initialized():
            raise
        # One of several processes: end now. Exiting the usual way would wait for the
        # others at shutdown, and they may be waiting for this one in a collective.
        if isinstance(error, SystemExit):  # an error line is printed already
            code = error.code if isinstance(error.code, int) else 1
        else:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
