"""Automatic mixed precision: autocast forward, GradScaler, and mtl_backward on scaled losses."""

import torch
from torch.amp import GradScaler
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGrad
from torchjd.autojac import mtl_backward

torch.manual_seed(0)
shared_module = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
task1_module = Linear(3, 1)
task2_module = Linear(3, 1)
params = [*shared_module.parameters(), *task1_module.parameters(), *task2_module.parameters()]
optimizer = SGD(params, lr=0.1)
loss_fn = MSELoss()
aggregator = UPGrad()
scaler = GradScaler(device="cpu")

inputs = torch.randn(8, 16, 10)
task1_targets = torch.randn(8, 16, 1)
task2_targets = torch.randn(8, 16, 1)

for x, y1, y2 in zip(inputs, task1_targets, task2_targets):
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        features = shared_module(x)
        loss1 = loss_fn(task1_module(features), y1)
        loss2 = loss_fn(task2_module(features), y2)

    scaled_losses = scaler.scale([loss1, loss2])
    optimizer.zero_grad()
    mtl_backward(losses=scaled_losses, features=features, aggregator=aggregator)
    scaler.step(optimizer)
    scaler.update()

# Like plain PyTorch under autocast, the parameters and their gradients stay in float32.
assert all(p.grad is None or p.grad.dtype == torch.float32 for p in params)
print(f"final losses: {loss1.item():.4f}, {loss2.item():.4f}")
