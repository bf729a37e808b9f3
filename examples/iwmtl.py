"""Instance-wise multi-task learning: one loss per sample and per task, a generalized Gramian."""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import Flattening, UPGradWeighting
from torchjd.autogram import Engine

torch.manual_seed(0)
shared_module = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
task1_module = Linear(3, 1)
task2_module = Linear(3, 1)
params = [*shared_module.parameters(), *task1_module.parameters(), *task2_module.parameters()]
optimizer = SGD(params, lr=0.1)
loss_fn = MSELoss(reduction="none")
weighting = Flattening(UPGradWeighting())
engine = Engine(shared_module, batch_dim=0)

inputs = torch.randn(8, 16, 10)
task1_targets = torch.randn(8, 16)
task2_targets = torch.randn(8, 16)

for x, y1, y2 in zip(inputs, task1_targets, task2_targets):
    features = shared_module(x)
    out1 = task1_module(features).squeeze(1)
    out2 = task2_module(features).squeeze(1)
    losses = torch.stack([loss_fn(out1, y1), loss_fn(out2, y2)], dim=1)  # [16, 2]

    optimizer.zero_grad()
    gramian = engine.compute_gramian(losses)  # [16, 2, 2, 16]
    weights = weighting(gramian)  # [16, 2]
    losses.backward(weights)
    optimizer.step()

print(f"final mean losses: {losses.mean(dim=0).tolist()}")
