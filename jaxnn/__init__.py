"""jaxnn: a functional neural-network toolkit for JAX.

A model is a pure function over a parameter pytree::

    import jax, jaxnn
    model = jaxnn.Sequential([jaxnn.Dense(64), jaxnn.relu, jaxnn.Dense(10)])
    params = model.init(jax.random.key(0), x_sample)
    logits = model.apply(params, x)
"""

from jaxnn import (
    activations,
    callbacks,
    checkpoint,
    compilation_cache,
    datasets,
    host_memory,
    initializers,
    layers,
    losses,
    manual,
    metrics,
    optimizers,
    plotting,
    regularizers,
)
from jaxnn.activations import (
    elu,
    gelu,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    silu,
    softmax,
    softplus,
    swish,
    tanh,
)
from jaxnn.checkpoint import resume
from jaxnn.compilation_cache import enable_compilation_cache
from jaxnn.evaluation import evaluate, predict
from jaxnn.gradcheck import check_grads
from jaxnn.layers import (
    GRU,
    LSTM,
    AvgPool,
    AvgPool1D,
    BatchNorm,
    Conv1D,
    Conv2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    Layer,
    LayerNorm,
    MaxPool,
    MaxPool1D,
    Reshape,
    Scope,
    Sequential,
    SimpleRNN,
    as_layer,
    model,
    stateless,
)
from jaxnn.plotting import plot_history
from jaxnn.population import fit_many, init_many
from jaxnn.results import FitResult, NonFiniteError, TrainingInterrupted
from jaxnn.saving import load, save
from jaxnn.summary import count_params, summarize
from jaxnn.training import fit

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "LSTM",
    "AvgPool",
    "AvgPool1D",
    "BatchNorm",
    "Conv1D",
    "Conv2D",
    "Dense",
    "Dropout",
    "Embedding",
    "FitResult",
    "Flatten",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "Layer",
    "LayerNorm",
    "MaxPool",
    "MaxPool1D",
    "NonFiniteError",
    "Reshape",
    "Scope",
    "Sequential",
    "SimpleRNN",
    "TrainingInterrupted",
    "activations",
    "as_layer",
    "callbacks",
    "check_grads",
    "checkpoint",
    "compilation_cache",
    "count_params",
    "datasets",
    "elu",
    "enable_compilation_cache",
    "evaluate",
    "fit",
    "fit_many",
    "gelu",
    "host_memory",
    "init_many",
    "initializers",
    "layers",
    "leaky_relu",
    "load",
    "log_softmax",
    "losses",
    "manual",
    "metrics",
    "model",
    "optimizers",
    "plot_history",
    "plotting",
    "predict",
    "regularizers",
    "relu",
    "resume",
    "save",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "stateless",
    "summarize",
    "swish",
    "tanh",
]
