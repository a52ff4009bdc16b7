"""The hook the DiffPure plugin owns: score models, the one kind of component only it uses.

The plugin declares the kind "score-models" with the host's ``register_component_kinds`` hook; the
host adds this module to its plugin manager. Another plugin providing a score model implements the
hook with ``@benchkit.hookspecs.hookimpl(optionalhook=True)``, so that it still loads (its score
models unlisted) when this plugin is disabled.
"""
from __future__ import annotations

from benchkit.hookspecs import hookspec


@hookspec
def register_score_models(register):
    """Register diffusion score models: ``register(id, factory, params=Model, description=...)``.

    ``factory(params)`` returns a ``benchkit_diffpure.score.ScoreModel``, or, so that a plugin need
    not import this one, a continuous-time VP-SDE noise predictor: an ``nn.Module`` called as
    ``net(x, t_label)`` on [-1, 1] images with a float attribute ``TIME_SCALE`` (``t_label =
    TIME_SCALE * t``, beta from 0.1 to 20), which DiffPure wraps in ``ContinuousTimeScore``, applying
    the ``precision`` and ``compile`` fields of the params model where it declares them.
    Defenses such as DiffPure look score models up by id.
    """
