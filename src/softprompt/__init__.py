"""softprompt as a library: prompt tuning of frozen Hugging Face causal LMs from Python.

    import softprompt
    softprompt.train(data="rows.jsonl", template="Review: {text}\\nSentiment:", labels="negative,positive",
                     out="runs/sst2", max_steps=100)
    softprompt.evaluate(prompt="runs/sst2", data="test.jsonl", template=..., labels=...)
    softprompt.generate(["travel guide"], prompt="runs/acts")
    model = softprompt.SoftPromptModel.from_pretrained(base, "runs/acts")  # forward, generate, save_pretrained
    from softprompt import PromptTuningConfig, get_peft_model             # PEFT's recipe, run by softprompt

Every name is imported on first use (a module `__getattr__`), so `import softprompt` and
`softprompt --help` load no torch. `train`, `evaluate` and `generate` are the modules behind the
CLI commands (training/train.py, evaluation/evaluate.py, generation/generate.py), made callable:
`softprompt.train(...)` calls softprompt.api.train, and `softprompt.train.setup` is the module's.

The subpackages are layers, each importing only the ones below it (tests/test_import_graph.py):
core, then base and data, forward, prompts, generation, evaluation, then training and serve, and
the modules here at the top (the command line, the Python API, the demo).
"""
from __future__ import annotations  # annotations stay strings: `Any` is imported for type checkers only

import importlib
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
    "train": "softprompt.training.train", "evaluate": "softprompt.evaluation.evaluate",
    "generate": "softprompt.generation.generate",
    "load_prompt": "softprompt.api",
    "SoftPromptModel": "softprompt.model", "get_softprompt_model": "softprompt.model",
    "PromptTuningConfig": "softprompt.peft_compat", "PrefixTuningConfig": "softprompt.peft_compat",
    "PromptTuningInit": "softprompt.peft_compat",
    "TaskType": "softprompt.peft_compat", "get_peft_model": "softprompt.peft_compat",
    "PeftModel": "softprompt.peft_compat", "SavePromptCallback": "softprompt.trainer_callback",
    "SoftpromptError": "softprompt.core.utils", "SoftpromptWarning": "softprompt.core.utils",
}
__all__ = ["__version__", *_LAZY]
_CALLABLE = ("train", "evaluate", "generate")  # command modules, callable as the API (see above)


class _CallableModule(types.ModuleType):
    """softprompt.train & co.: still the command's module (its functions, monkeypatching), callable as
    the API; inspect.signature and help() show the API function's (help printed the module's inner
    train(mcfg, dcfg, pcfg, tcfg), and the signature was (*args, **kwargs))."""

    def api_function(self) -> Any:
        return getattr(importlib.import_module("softprompt.api"), self.__name__.rpartition(".")[2])

    @property
    def __signature__(self) -> Any:
        import inspect

        return inspect.signature(self.api_function())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.api_function()(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = _version()
        return globals()[name]
    if name not in _LAZY:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    if name in _CALLABLE:  # the command module itself, callable as the API function of its name
        import inspect

        if type(module) is types.ModuleType:
            module.__class__ = _CallableModule
            # help(softprompt.train) shows the module: the function's words first
            api = module.api_function()
            module.__doc__ = f"softprompt.{name}{module.__signature__}\n\n{inspect.cleandoc(api.__doc__ or '')}" \
                             f"\n\n{module.__doc__ or ''}"
        value = module
    else:
        value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})
