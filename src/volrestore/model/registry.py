"""Which restorer a model name means: a plain registry of resolvers (name -> ModelRef -> RestorerSpec); checkpoints
('default' or a .pt file) go to the diffusion restorer."""

from __future__ import annotations

from typing import Callable

from volrestore.config import ModelRef
from volrestore.errors import UserError
from volrestore.model import diffusion_restorer, simple
from volrestore.model.restorer import RestorerSpec

Resolver = Callable[[ModelRef], RestorerSpec]

REGISTRY: dict[str, Resolver] = {name: simple.resolve for name in simple.CLASSES}


def register(name: str, resolver: Resolver) -> None:
    """Make `--model NAME[:options]` mean `resolver(ModelRef)` in this process (e.g. a site's own restorer; the
    tests register theirs). The spec it returns carries the restorer class, so workers need its module importable."""
    REGISTRY[name] = resolver


def resolve(ref: ModelRef) -> RestorerSpec:
    """The validated RestorerSpec for a model reference; UserError for an unknown name or a bad option."""
    if ref.name in ("default", *diffusion_restorer.SHIPPED) or ref.name.endswith(".pt"):
        return diffusion_restorer.resolve(ref)
    if ref.name not in REGISTRY:
        names = ", ".join([*REGISTRY, "default", *diffusion_restorer.SHIPPED])
        raise UserError(f"unknown model {ref.name!r}; use {names} or a checkpoint .pt file")
    return REGISTRY[ref.name](ref)
