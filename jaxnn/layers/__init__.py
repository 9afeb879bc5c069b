"""Layers: each a :class:`Layer`, a named pair of pure functions."""

from jaxnn.layers._attention import MultiHeadAttention
from jaxnn.layers._base import Layer, as_layer, stateless
from jaxnn.layers._bidirectional import Bidirectional
from jaxnn.layers._container import Scope, Sequential, model
from jaxnn.layers._conv import Conv1D, Conv2D
from jaxnn.layers._conv_transpose import Conv1DTranspose, Conv2DTranspose
from jaxnn.layers._dense import Dense
from jaxnn.layers._dropout import Dropout
from jaxnn.layers._embedding import Embedding
from jaxnn.layers._norm import BatchNorm, GroupNorm, LayerNorm, RMSNorm
from jaxnn.layers._pool import (
    AvgPool,
    AvgPool1D,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool,
    MaxPool1D,
)
from jaxnn.layers._position import PositionEmbedding, SinusoidalPositionEmbedding
from jaxnn.layers._recurrent import (
    GRU,
    LSTM,
    SimpleRNN,
    gru_step,
    lstm_step,
    simple_rnn_step,
)
from jaxnn.layers._reshape import Flatten, Reshape
from jaxnn.layers._transformer import TransformerEncoderBlock

__all__ = [
    "GRU",
    "LSTM",
    "AvgPool",
    "AvgPool1D",
    "BatchNorm",
    "Bidirectional",
    "Conv1D",
    "Conv1DTranspose",
    "Conv2D",
    "Conv2DTranspose",
    "Dense",
    "Dropout",
    "Embedding",
    "Flatten",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "GroupNorm",
    "Layer",
    "LayerNorm",
    "MaxPool",
    "MaxPool1D",
    "MultiHeadAttention",
    "PositionEmbedding",
    "RMSNorm",
    "Reshape",
    "Scope",
    "Sequential",
    "SimpleRNN",
    "SinusoidalPositionEmbedding",
    "TransformerEncoderBlock",
    "as_layer",
    "gru_step",
    "lstm_step",
    "model",
    "simple_rnn_step",
    "stateless",
]
