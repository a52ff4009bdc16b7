"""benchkit: a declarative adversarial-robustness benchmark built around diffusion purification."""
__version__ = "0.1.0"
