"""Baselines: no defense, adversarially trained classifiers, VAE / GAN purifiers."""
