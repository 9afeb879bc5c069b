"""PyTorch eager: ``nn.Sequential`` models, ``torch.optim.Adam``, ``nn.CrossEntropyLoss``.

``torch.set_num_threads`` is set to the core count (``--torch-threads`` overrides:
on a busy machine OpenMP's threads wait on each other, and one thread was 30x
faster than two on the MLP while other jobs ran). Each epoch shuffles with
``torch.randperm`` and gathers each batch by indexing the in-memory tensors
(what a user who cares about speed writes; a ``DataLoader`` over a
``TensorDataset`` collates sample by sample and is much slower for small
batches). The ragged last batch is kept, as ``DataLoader`` does by default.
Inference runs under ``torch.inference_mode()`` with the model in eval mode.
Images are NCHW for the CNN. The Transformer's blocks are
``nn.TransformerEncoderLayer(norm_first=True, batch_first=True)``, which in eval mode
under ``inference_mode`` take PyTorch's fused fast path.
"""

from __future__ import annotations

import time

from bench_common import (
    LEARNING_RATE,
    Data,
    Measurement,
    ModelSpec,
    Plan,
    model_inputs,
    time_passes,
)


def versions() -> dict[str, str]:
    import torch

    return {"torch": torch.__version__}


def setup(cores: int) -> dict:
    import torch

    torch.set_num_threads(cores)
    return {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads()}


def build(kind: str):
    import torch
    from torch import nn

    class LastState(nn.Module):
        """The LSTM's hidden state after the last row."""

        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(28, 128, batch_first=True)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return h[-1]

    if kind == "mlp":
        return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 10))
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(1600, 10),
        )
    class RowTransformer(nn.Module):
        """Rows as tokens: Linear(28, 64), a learned position table, 2 pre-norm
        ``nn.TransformerEncoderLayer``, LayerNorm, the mean over tokens, Linear(64, 10)."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(28, 64)
            self.position = nn.Parameter(0.02 * torch.randn(28, 64))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0,
                                           batch_first=True, norm_first=True)
                for _ in range(2))
            self.norm = nn.LayerNorm(64)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            h = self.embed(x) + self.position
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h).mean(dim=1))

    if kind == "lstm":
        return nn.Sequential(LastState(), nn.Linear(128, 10))
    if kind == "transformer":
        return RowTransformer()
    raise ValueError(kind)


def run(spec: ModelSpec, data: Data, plan: Plan) -> Measurement:
    import torch
    from torch import nn

    torch.manual_seed(plan.seed)
    x = torch.from_numpy(model_inputs(spec.kind, data.x_train[:plan.samples],
                                      channels_first=True).copy())
    y = torch.from_numpy(data.y_train[:plan.samples].astype("int64"))
    model = build(spec.kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    n, batch = len(x), spec.batch

    start_all = time.perf_counter()
    seconds = []
    model.train()
    for _ in range(plan.epochs):
        start = time.perf_counter()
        order = torch.randperm(n)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    wall = time.perf_counter() - start_all

    model.eval()
    x_test = torch.from_numpy(model_inputs(spec.kind, data.x_test[:plan.infer_samples],
                                           channels_first=True).copy())

    def infer():
        with torch.inference_mode():
            for s in range(0, len(x_test), plan.infer_batch):
                model(x_test[s:s + plan.infer_batch])

    first, infer_seconds = time_passes(infer, plan.infer_repeats)
    return Measurement(epoch_seconds=seconds, samples_per_epoch=n, wall_seconds=wall,
                       infer_seconds=infer_seconds, infer_first_seconds=first,
                       infer_samples=len(x_test))
