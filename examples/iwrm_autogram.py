"""Instance-wise risk minimisation (one objective per sample) with the autogram engine.

This is the main example (`make demo`): the engine computes the Gramian of the per-sample losses'
Jacobian without holding the Jacobian, UPGrad's weighting turns it into one weight per sample, and
an ordinary weighted backward fills `.grad`.
"""

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
engine = Engine(model, batch_dim=0)

inputs = torch.randn(8, 16, 10)
targets = torch.randn(8, 16)

for step, (x, y) in enumerate(zip(inputs, targets)):
    output = model(x).squeeze(dim=1)
    losses = loss_fn(output, y)  # shape [16]: one loss per sample

    optimizer.zero_grad()
    gramian = engine.compute_gramian(losses)  # [16, 16]
    weights = weighting(gramian)  # [16]
    losses.backward(weights)
    optimizer.step()

    # No sample's loss increases to first order: J @ (J^T w) = G @ w >= 0, up to the regularisation
    # UPGrad adds to the trace-normalised Gramian (reg_eps = 1e-4).
    tolerance = 2e-4 * gramian.trace() * weights.max()
    assert bool((gramian @ weights >= -tolerance).all())
    print(f"step {step}: mean loss {losses.mean().item():.4f}")
