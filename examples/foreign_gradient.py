"""GG106 foreign-gradient: a GAN clears each model after its own step, not before its backward.

The generator's backward runs through the discriminator and leaves the
generator's loss gradient in the discriminator's parameters. Nothing clears
it before the discriminator's own backward adds to it, so the discriminator's
step applies the generator's objective too: it learns to be fooled.
"""

import torch
from torch import nn

import gradguard

torch.manual_seed(0)
generator = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
discriminator = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
opt_g = gradguard.guard(torch.optim.Adam(generator.parameters(), lr=1e-3), model=generator)
opt_d = gradguard.guard(torch.optim.Adam(discriminator.parameters(), lr=1e-3), model=discriminator)
bce = nn.BCEWithLogitsLoss()

for _ in range(3):
    real, z = torch.randn(16, 2) + 2.0, torch.randn(16, 2)
    # The generator's update: its backward also writes into the discriminator.
    g_loss = bce(discriminator(generator(z)), torch.ones(16, 1))
    g_loss.backward()
    opt_g.step()
    opt_g.zero_grad()
    # The discriminator's update. Bug: its gradients still hold the generator's.
    fake = generator(z).detach()
    d_loss = bce(discriminator(real), torch.ones(16, 1)) + bce(
        discriminator(fake), torch.zeros(16, 1)
    )
    d_loss.backward()
    opt_d.step()
    opt_d.zero_grad()
