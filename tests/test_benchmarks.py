"""The throughput benchmark (benchmarks/throughput.py) keeps running, and its FLOP counts hold.

The end-to-end test runs ``--quick`` (tiny epochs; it checks that every figure is
produced, not how fast) on one model of each kind, for jaxnn (device-resident and
streamed) and the hand-fused JAX scan; the plain-JAX column's loop runs in this
process. The FLOP counts are checked against XLA's own cost analysis of
independently written models.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_common  # noqa: E402
import throughput  # noqa: E402

BATCH = 32


def _xla_flops_per_sample(fn, *args) -> float:
    # XLA's cost analysis of the program as written (before its optimizations: nothing
    # to compile); the optimized program's counts are within 1.5% of these.
    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0]
    return cost["flops"] / BATCH


def _ones(*shape):
    return jnp.ones(shape, jnp.float32)


def _mlp(p, x):
    h = jax.nn.relu(x @ p[0])
    return jax.nn.relu(h @ p[1]) @ p[2]


def _cnn(p, x):
    def block(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.lax.reduce_window(jax.nn.relu(y), -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                     (1, 2, 2, 1), "VALID")

    x = block(block(x, p[0]), p[1])
    return x.reshape(x.shape[0], -1) @ p[2]


def _lstm(p, x, gates=True):
    """LSTM(128) over the rows, unrolled (XLA's cost analysis does not multiply loops).

    With ``gates=False`` the gate nonlinearities are replaced by taking a slice,
    leaving exactly the matmuls of the LSTM (the part the analytic count covers).
    """
    h = c = jnp.zeros((x.shape[0], 128), x.dtype)
    for t in range(x.shape[1]):
        z = x[:, t] @ p[0] + h @ p[1]
        if gates:
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
        else:
            h = z[:, :128]
    return h @ p[2]


def _transformer(p, x, plain=False):
    """The row Transformer (2 pre-norm blocks, 4 heads) with ones for weights.

    With ``plain=True`` the layer norms, the softmax and the ReLU are left out,
    leaving exactly the matmuls (the part the analytic count covers).
    """
    n, length, d, heads = x.shape[0], x.shape[1], 64, 4

    def norm(h):
        if plain:
            return h
        centred = h - h.mean(-1, keepdims=True)
        return centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + 1e-5)

    h = x @ p[0] + p[1]
    for q_w, k_w, v_w, o_w, up, down in p[2]:
        y = norm(h)
        q, k, v = ((y @ w).reshape(n, length, heads, d // heads) for w in (q_w, k_w, v_w))
        scores = jnp.einsum("nqhc,nkhc->nhqk", q, k) / 4.0
        weights = scores if plain else jax.nn.softmax(scores, axis=-1)
        h = h + jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, length, d) @ o_w
        hidden = norm(h) @ up
        h = h + (hidden if plain else jax.nn.relu(hidden)) @ down
    return norm(h).mean(axis=1) @ p[3]


def _loss(model):
    def loss(p, x, y):
        logp = jax.nn.log_softmax(model(p, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return loss


CASES = {
    "mlp": (_mlp, [_ones(784, 64), _ones(64, 64), _ones(64, 10)], (BATCH, 784)),
    "cnn": (_cnn, [_ones(3, 3, 1, 32), _ones(3, 3, 32, 64), _ones(1600, 10)],
            (BATCH, 28, 28, 1)),
    "lstm": (_lstm, [_ones(28, 512), _ones(128, 512), _ones(128, 10)], (BATCH, 28, 28)),
    "transformer": (_transformer,
                    [_ones(28, 64), _ones(28, 64),
                     [[_ones(64, 64)] * 4 + [_ones(64, 128), _ones(128, 64)]] * 2,
                     _ones(64, 10)], (BATCH, 28, 28)),
}


def test_mlp_flops_are_the_documented_figures():
    # shared/PERF-LEADS.md: forward 2*(784*64 + 64*64 + 64*10), training 3*forward - 2*784*64
    assert bench_common.mlp_flops() == (109_824, 229_120)
    assert bench_common.MODELS["mlp32"].flops == bench_common.MODELS["mlp128"].flops


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lstm", "transformer"])
def test_flops_match_xla_cost_analysis(kind):
    model, params, shape = CASES[kind]
    x, y = _ones(*shape), jnp.zeros((BATCH,), jnp.int32)
    forward, train = {"mlp": bench_common.mlp_flops, "cnn": bench_common.cnn_flops,
                      "lstm": bench_common.lstm_flops,
                      "transformer": bench_common.transformer_flops}[kind]()
    # XLA also counts bias-free elementwise work (relu, pooling, gates, layer norms and
    # softmax): a few percent (the Transformer's forward: 2.3%).
    assert forward <= _xla_flops_per_sample(model, params, x) <= 1.03 * forward
    if kind == "lstm":  # the matmuls alone; the gates' backward adds ~10% of elementwise work
        model = lambda p, x: _lstm(p, x, gates=False)  # noqa: E731
    if kind == "transformer":  # the matmuls alone; the norms' backward adds ~5%
        model = lambda p, x: _transformer(p, x, plain=True)  # noqa: E731
    assert train <= _xla_flops_per_sample(jax.grad(_loss(model)), params, x, y) <= 1.03 * train


def test_samples_entries_resolve_most_specific_first():
    table = throughput.parse_samples("60000,cnn=12800,keras-tf:cnn=6400")
    assert throughput.samples_for(table, "jaxnn", "mlp32") == 60000
    assert throughput.samples_for(table, "jaxnn", "cnn") == 12800
    assert throughput.samples_for(table, "keras-tf", "cnn") == 6400
    assert throughput.samples_for(throughput.parse_samples("cnn=100"), "jax", "lstm") == 60000
    for bad in ("cnn=0", "cnn=70000", "gru=10", "mxnet:cnn=10", "cnn=ten"):
        with pytest.raises(Exception, match="--samples"):
            throughput.parse_samples(bad)


def test_summary_divides_samples_by_the_median_timed_epoch():
    spec = bench_common.MODELS["mlp32"]
    measured = {"epoch_seconds": [9.0, 2.0, 1.0, 4.0], "samples_per_epoch": 1000,
                "wall_seconds": 20.0, "infer_seconds": [0.5, 0.25, 1.0], "infer_samples": 100}
    got = bench_common.summarize(spec, measured, warmup=1)
    epoch = statistics.median([2.0, 1.0, 4.0])
    assert got["train_samples_per_s"] == pytest.approx(1000 / epoch)
    assert got["train_gflop_per_s"] == pytest.approx(1000 / epoch * 229_120 / 1e9)
    assert got["startup_seconds"] == pytest.approx(20.0 - 4 * epoch)
    assert got["infer_samples_per_s"] == pytest.approx(100 / 0.5)


def test_best_of_rounds_keeps_the_faster_round_per_model():
    first = {"results": {"mlp32": {"train_samples_per_s": 100.0, "round": 1},
                         "cnn": {"train_samples_per_s": 9.0, "round": 1}}}
    second = {"results": {"mlp32": {"train_samples_per_s": 150.0, "round": 2},
                          "cnn": {"train_samples_per_s": 5.0, "round": 2}}}
    best = throughput.best_of_rounds(throughput.best_of_rounds(None, first), second)
    assert best["results"]["mlp32"]["round"] == 2 and best["results"]["cnn"]["round"] == 1
    assert best["results"]["mlp32"]["rounds_train_samples_per_s"] == [100.0, 150.0]
    assert best["results"]["cnn"]["rounds_train_samples_per_s"] == [9.0, 5.0]


# The Transformer has a quick run of its own (below): its compiles would double this one's.
# One model of each kind (mlp128 is mlp32's model and code at another batch size).
QUICK_MODELS = ["mlp32", "cnn", "lstm", "transformer"]
# Each framework is a process of its own (JAX imported, every model compiled): jaxnn, the
# same streaming its data, and the hand-fused scan (jaxnn's overhead is measured against
# it). The plain "jax" column shares the scan's models, loss and Adam (peers/jax_optax.py);
# its own step loop runs in test_plain_jax_loop_runs_in_process below. The other
# frameworks run in the full benchmark (benchmarks/RESULTS.md).
QUICK_FRAMEWORKS = ("jaxnn", "jaxnn-source", "jax-scan")


@pytest.mark.slow
def test_quick_run_produces_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "throughput.py"), "--quick", "--json", str(out),
         "--frameworks", ",".join(QUICK_FRAMEWORKS), "--models", ",".join(QUICK_MODELS)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["frameworks"]) == set(QUICK_FRAMEWORKS)
    assert {spec.kind for spec in bench_common.MODELS.values()} == {
        bench_common.MODELS[name].kind for name in QUICK_MODELS}
    # the streamed column (a source over a memmap) as a ratio of the device-resident one
    streamed = report["streamed_ratio_percent"]["jaxnn-source"]
    assert set(streamed) == set(QUICK_MODELS)
    assert all(v["best"] > -100 for v in streamed.values()), streamed
    assert "streamed from the host (jaxnn-source / jaxnn)" in proc.stdout
    overhead = report["jaxnn_overhead_percent"]
    assert set(overhead) == set(QUICK_MODELS)
    assert all(isinstance(v, float) and v > -100 for v in overhead.values()), overhead
    assert report["machine"]["cores"] >= 1 and report["date"]
    assert all(rate > 0 for rate in report["matmul"]["gflop_per_s"].values())
    for framework, result in report["frameworks"].items():
        assert not result.get("errors") and "failed" not in result, result
        assert set(result["results"]) == set(QUICK_MODELS), framework
        for model, row in result["results"].items():
            for figure in ("train_samples_per_s", "infer_samples_per_s", "train_gflop_per_s",
                           "fraction_of_peak"):
                assert row[figure] > 0, (framework, model, figure)
            assert row["samples_per_epoch"] > 0
            assert row["timed_epochs"] == 1
    assert report["models"]["cnn"]["train_flops"] == bench_common.cnn_flops()[1]
    assert report["models"]["transformer"]["train_flops"] == bench_common.transformer_flops()[1]
    assert "jaxnn fit" in proc.stdout and "jaxnn/x" in proc.stdout


@pytest.mark.slow
def test_plain_jax_loop_runs_in_process():
    # The "jax" column's run(): a jitted step called batch by batch (peers/_jax_loop.py),
    # then inference, on the MLP; two epochs of 2 steps, the first one the warm-up.
    from peers import jax_optax

    spec = bench_common.MODELS["mlp32"]
    plan = bench_common.Plan(samples=64, epochs=2, warmup=1, infer_samples=48, infer_batch=32,
                             infer_repeats=1)
    measured = jax_optax.run(spec, bench_common.random_data(64, 48), plan).to_json()
    assert len(measured["epoch_seconds"]) == 2 and measured["samples_per_epoch"] == 64
    assert measured["infer_samples"] == 48 and len(measured["infer_seconds"]) == 1
    figures = bench_common.summarize(spec, measured, plan.warmup)
    for figure in ("train_samples_per_s", "infer_samples_per_s", "train_gflop_per_s"):
        assert figures[figure] > 0, figure
