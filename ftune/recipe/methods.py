"""Recipe schema of the ``method`` section: one model per fine-tuning method, discriminated on ``name``.

Each method states its capabilities beside its knobs (tasks, quantized bases, merge, gradient
checkpointing, model needs). That set of class variables *is* the capability matrix: the recipe
validator enforces it and ``ftune methods`` prints it, so the two can never disagree. Rules that
depend on a method's own settings (DoRA on 8 bits, PiSSA on any quantized base) live in the
method's ``recipe_problems``; rules that need the loaded model are checked when the method is applied.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from ftune.recipe.method_base import MethodBase, Strict
from ftune.recipe.methods_modular import (
    AdapterMethod, MamMethod, PrefixMethod, PromptMethod, PtuningMethod, PtuningV2Method, UnipeltMethod,
)
from ftune.recipe.methods_weights import (
    CONVERTED_INITS, AdaloraMethod, BitfitMethod, BoftMethod, FreezeMethod, FullMethod, Ia3Method, LohaMethod, LokrMethod,
    LoraMethod, OftMethod, VeraMethod,
)

__all__ = ["CONVERTED_INITS", "METHOD_CLASSES", "MethodBase", "MethodConfig", "Strict", "method_class", "method_names", "with_reference"]

METHOD_CLASSES: tuple[type[MethodBase], ...] = (
    FullMethod, FreezeMethod, BitfitMethod, LoraMethod, AdaloraMethod, Ia3Method, LohaMethod, LokrMethod,
    OftMethod, BoftMethod, VeraMethod, PrefixMethod, PromptMethod, PtuningMethod, PtuningV2Method, AdapterMethod,
    MamMethod, UnipeltMethod,
)

MethodConfig = Annotated[Union[METHOD_CLASSES], Field(discriminator="name")]


def method_names() -> list[str]:
    return [cls.model_fields["name"].annotation.__args__[0] for cls in METHOD_CLASSES]


def method_class(name: str) -> type[MethodBase]:
    return dict(zip(method_names(), METHOD_CLASSES))[name]


def with_reference() -> list[str]:
    """The methods stage: dpo can train: those whose reference model can be recovered (``MethodBase.reference``)."""
    return sorted(name for name, cls in zip(method_names(), METHOD_CLASSES) if cls.reference is not None)
