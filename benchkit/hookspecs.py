"""Every hook benchkit calls. Plugins implement them with `@benchkit.hookimpl`.

Registration hooks receive a `register` callback (the llm / tox style): the host builds the
registries, plugins never touch global state. ``register(id, factory, params=Model,
description=..., assets=fn)``: ``params`` is a pydantic model validating the suite's params,
``assets(params)`` optionally lists the ``benchkit.assets.Asset`` files the component needs, so a
run can check them all before it starts. Every hook here must be documented and tested
(tests/test_hooks.py enforces both).

A kind of component that only one plugin uses (DiffPure's score models) is not a host hook: the
plugin declares it with ``register_component_kinds`` and ships its hookspec in its own module.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("benchkit")
hookimpl = pluggy.HookimplMarker("benchkit")


@hookspec
def register_datasets(register):
    """Register datasets: ``register(id, factory, params=Model, description=...)``.

    ``factory(params)`` returns a ``benchkit.registry.Dataset`` (images in [0, 1], NCHW, labels).
    """


@hookspec
def register_classifiers(register):
    """Register classifiers: ``register(id, factory, params=Model, description=...)``.

    ``factory(params)`` returns an ``nn.Module`` from [0, 1] images to logits (it normalises
    its own inputs). Loading must be offline and safe (see ``benchkit.assets``).
    """


@hookspec
def register_defenses(register):
    """Register defenses (purifiers): ``register(id, factory, params=Model, description=...,
    gradient_modes=...)``.

    ``factory(params)`` returns a ``benchkit.defended.Purifier``: ``_purify(x, *, gradient, noise)``
    maps [0, 1] images to [0, 1] images, drawing all randomness through ``noise``. Its
    ``gradient_modes`` lists the modes ``_purify`` implements with a gradient (``exact``: autograd
    through it; ``adjoint``); ``bpda`` and ``none`` are derived by the host for every purifier.
    ``gradient_modes=`` at registration declares the same thing, as a tuple or ``params -> tuple``,
    so ``benchkit validate`` checks every cell's gradient mode before any model is built; without it
    the check runs when the purifier is built, and a built purifier lacking a declared mode fails.
    """


@hookspec
def register_attacks(register):
    """Register attacks: ``register(id, factory, params=Model, description=...)``.

    ``factory(params)`` returns a ``benchkit.attack.Attack``.
    """


@hookspec
def register_component_kinds(register):
    """Declare a component kind owned by this plugin: ``register(kind, hookspecs=module,
    hook="register_<kind>", description=...)``.

    ``hookspecs`` is the plugin's own module of ``@benchkit.hookspecs.hookspec`` functions; the host
    adds it to the plugin manager, and ``hook`` (one of its specs, receiving a ``register`` callback
    like ``register_datasets``) fills ``benchkit.registry.get(kind)``. Other plugins implement that
    hook with ``@hookimpl(optionalhook=True)``, so they still load when the owner is not installed.
    """


@hookspec
def register_commands(cli):
    """Add CLI verbs: ``cli`` is the ``argparse`` sub-parsers object of the ``benchkit`` command.

    Add a parser with ``cli.add_parser(name, help=...)`` and set ``func`` with
    ``parser.set_defaults(func=callable)``; the callable receives the parsed namespace and
    returns an exit status.
    """


@hookspec
def prepare_jinja2_environment(env):
    """Customise the Jinja2 environment of the HTML reports (add filters or globals) before any
    template is rendered."""
