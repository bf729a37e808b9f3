"""Basic usage: two losses, one update that conflicts with neither (autojac + UPGrad)."""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd import autojac
from torchjd.aggregation import UPGrad

torch.manual_seed(0)
model = Sequential(Linear(10, 5), ReLU(), Linear(5, 2))
optimizer = SGD(model.parameters(), lr=0.1)
aggregator = UPGrad()
loss_fn = MSELoss()

inputs = torch.randn(8, 16, 10)
targets = torch.randn(8, 16, 2)

for x, y in zip(inputs, targets):
    output = model(x)
    loss1 = loss_fn(output[:, 0], y[:, 0])
    loss2 = loss_fn(output[:, 1], y[:, 1])

    optimizer.zero_grad()
    autojac.backward([loss1, loss2], aggregator)
    optimizer.step()

print(f"final losses: {loss1.item():.4f}, {loss2.item():.4f}")
