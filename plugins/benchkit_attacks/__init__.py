"""benchkit's own attacks: StAdv, BPDA+EOT, PGD-EOT, diffusion-only MSE, transfer, Square.

One module per family; the gradient attacks share `pgd.pgd`, which maximises any objective
x_adv -> (per-image loss, gradient) and calls a per-step `callback(step, x_adv, loss, grad)`.
Adaptive attacks on purification (DiffAttack, DiffHammer) fit as new plugins by writing such an
objective: the DefendedModel they receive exposes `purify` and `classifier` separately, so an
objective may mix purifier-level terms (see diffusion_mse) with classifier losses, and all of it
draws EOT samples through `DefendedModel.loss_and_grad` / `expectation`.
"""
