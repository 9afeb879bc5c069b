"""One module per framework in the throughput benchmark.

Each module offers ``versions() -> dict`` (raises ImportError when the framework
is missing, so the worker skips that column), ``setup(cores) -> dict`` (thread
settings, recorded in the JSON) and ``run(spec, data, plan) -> Measurement``
(build the model, train ``plan.epochs`` epochs timing each, then time
inference), following the models and rules in ``bench_common``.
"""
