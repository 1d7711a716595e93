"""SavePromptCallback: each transformers Trainer checkpoint of a SoftPromptModel also holds its prompt
as a folder every command reads (prompt.safetensors, prompt_config.json, and PEFT's adapter files).

The Trainer saves a model that is not a PreTrainedModel (or PEFT's PeftModel) as its state dict alone
(checkpoint-N/model.safetensors): enough for resume_from_checkpoint, but no prompt folder, so `eval`,
`generate`, `serve` and PEFT read nothing there. Passed to the Trainer, this callback writes the active
prompt beside the Trainer's files at every save:

    Trainer(model=model, args=args, train_dataset=..., callbacks=[softprompt.SavePromptCallback()])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class SavePromptCallback(TrainerCallback):
    """At each Trainer save, model.save_pretrained(checkpoint-N) by the main process."""

    def on_save(self, args, state, control, model=None, **kwargs: Any):
        if model is None or not state.is_world_process_zero:
            return control
        model = getattr(model, "module", model)  # a data-parallel wrapper's model
        if not hasattr(model, "save_pretrained") or getattr(model, "prompt", None) is None:
            return control
        model.save_pretrained(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control
