"""Monitoring: aggregators and weightings are modules, so forward hooks see what they compute."""

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.nn.functional import cosine_similarity
from torch.optim import SGD

from torchjd.aggregation import UPGrad
from torchjd.autojac import mtl_backward

seen_weights: list[torch.Tensor] = []
similarities: list[float] = []


def record_weights(_module, _inputs, weights: torch.Tensor) -> None:
    seen_weights.append(weights.detach().clone())


def record_similarity_to_mean_gradient(_module, inputs, aggregation: torch.Tensor) -> None:
    matrix = inputs[0]
    similarities.append(cosine_similarity(aggregation, matrix.mean(dim=0), dim=0).item())


torch.manual_seed(0)
shared_module = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
task1_module = Linear(3, 1)
task2_module = Linear(3, 1)
params = [*shared_module.parameters(), *task1_module.parameters(), *task2_module.parameters()]
optimizer = SGD(params, lr=0.1)
loss_fn = MSELoss()
aggregator = UPGrad()
aggregator.weighting.register_forward_hook(record_weights)
aggregator.register_forward_hook(record_similarity_to_mean_gradient)

inputs = torch.randn(8, 16, 10)
task1_targets = torch.randn(8, 16, 1)
task2_targets = torch.randn(8, 16, 1)

for x, y1, y2 in zip(inputs, task1_targets, task2_targets):
    features = shared_module(x)
    loss1 = loss_fn(task1_module(features), y1)
    loss2 = loss_fn(task2_module(features), y2)
    optimizer.zero_grad()
    mtl_backward(losses=[loss1, loss2], features=features, aggregator=aggregator)
    optimizer.step()

assert len(seen_weights) == len(similarities) == 8
print(f"last weights: {seen_weights[-1].tolist()}, cosine to mean gradient: {similarities[-1]:.3f}")
