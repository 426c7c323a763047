"""Helpers over a model's submodules: selecting them by name or ``re:`` pattern, running
one forward pass with hooks on them, and compiling one. Knows nothing of stages."""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable

import torch
from torch import nn

from compress.core.errors import RecipeError


def matching_modules(model: nn.Module, patterns: list[str], key: str = "skip") -> list[str]:
    """Names of the modules that ``patterns`` select (dotted names or ``re:`` regexes).

    A pattern that selects nothing is a :class:`RecipeError` naming ``key``, the recipe
    key the patterns came from, and the closest module names.

    Example:
        >>> matching_modules(resnet, ["fc", "re:layer1\\..*conv1"], key="quantize.skip")
        ['fc', 'layer1.0.conv1', 'layer1.1.conv1']
    """
    names = [name for name, _ in model.named_modules() if name]
    selected: list[str] = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
            found = [n for n in names if regex.fullmatch(n)]
        else:
            found = [pattern] if pattern in names else []
        if not found:
            close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RecipeError(
                f"{key}: {pattern!r} matches no module of {type(model).__name__}{hint}"
            )
        selected += [n for n in found if n not in selected]
    return selected


def forward_with_hooks(
    model: nn.Module, example: torch.Tensor, hook_for: Callable[[str, nn.Module], Callable | None]
):
    """One no-grad forward of ``example`` with a temporary forward hook on every module for
    which ``hook_for(name, module)`` returns one (``hook(module, inputs, output)``); returns
    the model's output.

    Example:
        >>> order = []
        >>> forward_with_hooks(model, x, lambda n, m: (lambda *_: order.append(n)))
    """
    hooks = []
    for name, module in model.named_modules():
        hook = hook_for(name, module)
        if hook is not None:
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(example)
    finally:
        for hook in hooks:
            hook.remove()


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module, dynamic=False)``, through a call of the module's own.

    Dynamo keeps its graphs on the code object it compiles (a model class's ``forward``,
    or torch's ``Module._call_impl``), and past ``recompile_limit`` (8) graphs on one it
    runs that code eagerly without a word: a run compiles a new model per evaluation, and
    from the ninth on its "compiled" figures were eager's (a GPT's decoding 1,000 tokens/s
    instead of 4,900). A call whose code is a copy of its own per module keeps each one's
    graphs apart.

    Example:
        >>> compiled = compile_module(copy.deepcopy(model).eval())
        >>> compiled(x)  # compiles at its first call, as torch.compile does
    """
    return _CompiledModule(module)


class _CompiledModule(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self._call: Callable | None = None  # made at the first call; never copied

    def forward(self, *inputs):
        if self._call is None:
            self._call = _own_compiled_call(self.module)
        return self._call(*inputs)

    def __getstate__(self):
        return {**super().__getstate__(), "_call": None}  # a copy compiles its own module


def _own_compiled_call(module: nn.Module) -> Callable:
    def call(*inputs):
        return module(*inputs)

    own = types.FunctionType(
        call.__code__.replace(), call.__globals__, call.__name__, None, call.__closure__
    )
    return torch.compile(own, dynamic=False)
