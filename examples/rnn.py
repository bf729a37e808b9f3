"""A recurrent network with one loss per sequence element (autojac without vmap)."""

import torch
from torch.nn import RNN
from torch.optim import SGD

from torchjd.aggregation import UPGrad
from torchjd.autojac import backward

torch.manual_seed(0)
rnn = RNN(input_size=10, hidden_size=20, num_layers=2)
optimizer = SGD(rnn.parameters(), lr=0.1)
aggregator = UPGrad()

inputs = torch.randn(8, 5, 3, 10)
targets = torch.randn(8, 5, 3, 20)

for x, y in zip(inputs, targets):
    output, _ = rnn(x)  # [5, 3, 20]
    losses = ((output - y) ** 2).mean(dim=[1, 2])  # one loss per sequence element

    optimizer.zero_grad()
    # vmap does not support RNNs on CUDA: chunks of one row never use it.
    backward(losses, aggregator, parallel_chunk_size=1)
    optimizer.step()

print(f"final losses: {losses.tolist()}")
