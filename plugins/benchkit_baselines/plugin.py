"""Registers the baseline defenses."""
from __future__ import annotations

from benchkit.defended import Identity
from benchkit.hookspecs import hookimpl


@hookimpl
def register_defenses(register):
    register("identity", lambda params: Identity(),
             description="No defense: the undefended ('static') classifier of the paper's tables")
