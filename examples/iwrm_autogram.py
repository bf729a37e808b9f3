"""Instance-wise risk minimisation (one objective per sample) with the autogram engine.

This is the main example (`make demo`). Each step, `engine.backward(losses, weighting)` computes
the Gramian of the per-sample losses' Jacobian in one backward pass (never holding the Jacobian),
lets UPGrad's weighting turn it into one weight per sample, and fills `.grad` with the weighted
sum of the per-sample gradients: the update conflicts with no sample's gradient. The model learns
a noisy synthetic regression task; the mean loss goes down.
"""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd.aggregation import UPGradWeighting
from torchjd.autogram import Engine

torch.manual_seed(0)
model = Sequential(Linear(10, 32), ReLU(), Linear(32, 32), ReLU(), Linear(32, 1))
optimizer = SGD(model.parameters(), lr=0.05)
loss_fn = MSELoss(reduction="none")
weighting = UPGradWeighting()
engine = Engine(model, batch_dim=0)

# The task: y = sin(x · d) + noise, for a fixed direction d.
direction = torch.randn(10) / 10**0.5
test_inputs = torch.randn(512, 10)
test_targets = torch.sin(test_inputs @ direction)


def test_loss() -> float:
    with torch.no_grad():  # no records for the engine outside training steps
        return loss_fn(model(test_inputs).squeeze(dim=1), test_targets).mean().item()


initial = test_loss()
print(f"step   0: test loss {initial:.4f}")
for step in range(1, 301):
    x = torch.randn(32, 10)
    y = torch.sin(x @ direction) + 0.1 * torch.randn(32)
    losses = loss_fn(model(x).squeeze(dim=1), y)  # shape [32]: one loss per sample

    optimizer.zero_grad()
    weights = engine.backward(losses, weighting)  # Gramian, weights and .grad in one pass
    optimizer.step()

    if step % 100 == 0:
        print(
            f"step {step:3d}: test loss {test_loss():.4f}, weights in [{weights.min():.3f}, "
            f"{weights.max():.3f}]"
        )

assert test_loss() < 0.5 * initial
