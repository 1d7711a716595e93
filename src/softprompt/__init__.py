"""softprompt as a library: prompt tuning of frozen Hugging Face causal LMs from Python.

    import softprompt
    softprompt.train(data="rows.jsonl", template="Review: {text}\\nSentiment:", labels="negative,positive",
                     out="runs/sst2", max_steps=100)
    softprompt.evaluate(prompt="runs/sst2", data="test.jsonl", template=..., labels=...)
    softprompt.generate(["Act as a travel guide."], prompt="runs/acts")
    model = softprompt.SoftPromptModel.from_pretrained(base, "runs/acts")  # forward, generate, save_pretrained
    from softprompt import PromptTuningConfig, get_peft_model             # PEFT's recipe, run by softprompt

Every name is imported on first use (a module `__getattr__`), so `import softprompt` and
`softprompt --help` load no torch. `train`, `evaluate` and `generate` are also the names of the
modules behind the CLI commands, and importing a submodule binds it on the package, over any
function of that name; so those three modules are made callable as they are bound (`_Package`),
and `softprompt.train(...)` calls softprompt.api.train whoever imported the module first.
"""
from __future__ import annotations  # annotations stay strings: `Any` is imported for type checkers only

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any


def _version() -> str:
    # importlib.metadata costs ~60 ms to import: looked up on first use of __version__ only.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("softprompt")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH=src) without installing
        return "0.1.0"


# public name -> module that defines it
_LAZY = {
    "train": "softprompt.train", "evaluate": "softprompt.evaluation.evaluate", "generate": "softprompt.generation.generate",
    "load_prompt": "softprompt.api",
    "SoftPromptModel": "softprompt.model", "get_softprompt_model": "softprompt.model",
    "PromptTuningConfig": "softprompt.peft_compat", "PromptTuningInit": "softprompt.peft_compat",
    "TaskType": "softprompt.peft_compat", "get_peft_model": "softprompt.peft_compat",
    "PeftModel": "softprompt.peft_compat",
    "SoftpromptError": "softprompt.core.utils",
}
__all__ = ["__version__", *_LAZY]
_CALLABLE = ("train", "evaluate", "generate")  # also the names of command modules (see above)


class _CallableModule(types.ModuleType):
    """softprompt.train & co.: still the module (its functions, monkeypatching), callable as the API."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        api = importlib.import_module("softprompt.api")
        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds each submodule on its package with setattr, once, as it is loaded.
        if name in _CALLABLE and type(value) is types.ModuleType and value.__name__ == f"softprompt.{name}":
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = _version()
        return globals()[name]
    if name not in _LAZY:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    if name in _CALLABLE:  # the command module itself, callable as the API function of its name
        if type(module) is types.ModuleType:
            module.__class__ = _CallableModule
        value = module
    else:
        value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
