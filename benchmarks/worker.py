"""One framework's side of the throughput benchmark, run in its own process.

    python benchmarks/worker.py --framework torch --config plan.json --out result.json

``throughput.py`` starts one of these per framework (so each framework has the
machine to itself, Keras can be given its backend before it is imported, and a
framework living in another virtual environment runs under that interpreter).
The config names the data files (``.npy``), the models and a :class:`Plan` for
each. The result file is rewritten after every model, so a worker stopped by
its time-out still leaves what it measured. Progress lines go to stdout.

A framework whose packages cannot be imported writes ``{"skipped": reason}``
and exits with status 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # jaxnn from source where the interpreter lacks it

from bench_common import (  # noqa: E402
    FRAMEWORKS,
    MODELS,
    Plan,
    cpu_count,
    load_data,
    summarize,
    write_json,
)


def _say(text: str) -> None:
    print(text, flush=True)


def run_matmul(config: dict, out: Path) -> int:
    import matmul_rate

    result = {"python": sys.executable, "started": time.time()}
    result.update(matmul_rate.measure(**config["matmul"]))
    write_json(out, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", required=True, choices=[*FRAMEWORKS, "matmul"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = json.loads(Path(args.config).read_text())
    out = Path(args.out)
    if args.framework == "matmul":
        return run_matmul(config, out)

    framework = FRAMEWORKS[args.framework]
    result: dict = {"framework": args.framework, "label": framework.label,
                    "python": sys.executable, "results": {}, "errors": {}}
    try:
        module = importlib.import_module(framework.module)
        result["versions"] = module.versions()
    except ImportError as err:
        result["skipped"] = f"{type(err).__name__}: {err}"
        write_json(out, result)
        _say(f"skipped: {result['skipped']}")
        return 0
    result["setup"] = module.setup(config.get("threads") or cpu_count())
    write_json(out, result)

    data = load_data(config["data"])
    for name in config["models"]:
        spec = MODELS[name]
        plan = Plan(**config["plans"][name])
        load_before = os.getloadavg()
        try:
            measurement = module.run(spec, data, plan).to_json()
        except Exception as err:  # one model failing should not lose the others
            result["errors"][name] = "".join(traceback.format_exception(err))
            _say(f"{name}: FAILED: {type(err).__name__}: {err}")
            write_json(out, result)
            continue
        figures = summarize(spec, measurement, plan.warmup)
        result["results"][name] = {
            **measurement, **figures, "plan": plan.__dict__,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        }
        write_json(out, result)
        _say(f"{name}: train {figures['train_samples_per_s']:,.0f} samples/s "
             f"(median of {figures['timed_epochs']} epochs of "
             f"{measurement['samples_per_epoch']:,}), infer "
             f"{figures['infer_samples_per_s']:,.0f} samples/s, start-up "
             f"{figures['startup_seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
