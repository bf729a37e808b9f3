"""Partial Jacobian descent for IWRM: the Gramian covers only the last layers of the model."""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

torch.manual_seed(0)
model = Sequential(Linear(10, 8), ReLU(), Linear(8, 5), ReLU(), Linear(5, 1))
optimizer = SGD(model.parameters(), lr=0.1)
loss_fn = MSELoss(reduction="none")
weighting = UPGradWeighting()
engine = Engine(model[2:], batch_dim=0)  # only the last two Linear layers

inputs = torch.randn(8, 16, 10)
targets = torch.randn(8, 16)

for x, y in zip(inputs, targets):
    losses = loss_fn(model(x).squeeze(dim=1), y)
    optimizer.zero_grad()
    weights = weighting(engine.compute_gramian(losses))
    losses.backward(weights)  # still fills the .grad of every parameter
    optimizer.step()

print(f"final mean loss: {losses.mean().item():.4f}")
