"""Interoperability with the real `peft` package on tiny Llama (RoPE) and BLOOM (ALiBi) models:
a softprompt prompt exported to PEFT, and a PEFT-trained prompt imported into softprompt, give the
same logits as each other's forward pass; conversions are bit-exact; bad adapters fail cleanly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from softprompt.cli import main as cli_main  # noqa: E402
from softprompt.core.utils import SoftpromptError  # noqa: E402
from softprompt.forward.hidden import text_hidden  # noqa: E402
from softprompt.prompts.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft, import_peft  # noqa: E402
from softprompt.prompts.prompt import TENSOR_NAME, SoftPrompt, load_prompt, save_prompt  # noqa: E402

TEXTS = ["Country: France\nFacts: capital=Paris", "Review: a dull film", "Act as a teacher."]
TOL = 1e-5


def _base(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def _batch(model_dir: Path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert tok.padding_side == "right"
    mask = enc.attention_mask
    assert (mask.sum(1) < mask.shape[1]).any(), "the batch should hold padded rows"
    return enc.input_ids, mask


def _ours_logits(model, embeds: torch.Tensor, ids, mask) -> dict[bool, torch.Tensor]:
    """softprompt's logits on the text positions, for both forward paths."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        return {shared: head(text_hidden(model, embeds, ids, mask, path="auto" if shared else "concat")[0]).float()
                for shared in (True, False)}


def _peft_logits(peft_model, P: int, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits.float()
    assert logits.shape[1] == P + ids.shape[1]  # PEFT returns logits for the virtual tokens too
    return logits[:, P:]


def _assert_same(ours: dict[bool, torch.Tensor], ref: torch.Tensor, mask) -> None:
    m = mask.bool()
    for shared, logits in ours.items():
        diff = (logits[m] - ref[m]).abs().max().item()
        assert diff <= TOL, f"shared_prefix={shared}: max abs diff {diff:.3g}"


def test_exported_prompt_loads_in_peft_with_same_logits(model_dir, tmp_path):
    from peft import PeftModel

    model = _base(model_dir)
    H = model.get_input_embeddings().weight.shape[1]
    torch.manual_seed(0)
    P = 5
    prompt = SoftPrompt(torch.randn(P, H) * 0.05, {"init": "random"})
    ours_dir = save_prompt(prompt, tmp_path / "ours", {"model": str(model_dir)})
    out = export_peft(ours_dir, tmp_path / "peft")

    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == P and cfg["token_dim"] == H
    assert cfg["base_model_name_or_path"] == str(model_dir)
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == 4

    peft_model = PeftModel.from_pretrained(_base(model_dir), out)
    peft_model.eval()
    assert peft_model.peft_config["default"].peft_type.value == "PROMPT_TUNING"
    loaded = peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(loaded.detach(), prompt.embeds.detach())

    ids, mask = _batch(model_dir)
    _assert_same(_ours_logits(model, prompt.embeds.detach(), ids, mask), _peft_logits(peft_model, P, ids, mask),
                 mask)


def _peft_train(model_dir: Path, P: int = 4):
    """A PEFT prompt-tuning model trained for 3 AdamW steps, and its initial prompt."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_base(model_dir), PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                     num_virtual_tokens=P))
    enc_weight = peft_model.prompt_encoder["default"].embedding.weight
    init = enc_weight.detach().clone()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is enc_weight
    ids, mask = _batch(model_dir)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    peft_model.train()
    for _ in range(3):
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    assert not torch.equal(enc_weight.detach(), init)
    return peft_model, init


def test_peft_trained_prompt_imports_with_same_logits(model_dir, tmp_path):
    P = 4
    peft_model, init = _peft_train(model_dir, P)
    peft_dir = tmp_path / "peft"
    peft_model.save_pretrained(peft_dir)
    saved = load_file(str(peft_dir / ADAPTER_WEIGHTS))
    assert list(saved) == [TENSOR_NAME]
    trained = peft_model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(saved[TENSOR_NAME], trained)

    ours = import_peft(peft_dir, tmp_path / "ours", model_name=str(model_dir))
    model = _base(model_dir)
    prompt = load_prompt(ours, model)
    assert prompt.meta["model"] == str(model_dir) and prompt.meta["imported_from"] == str(peft_dir)
    assert torch.equal(prompt.embeds.detach(), trained)
    assert not torch.equal(prompt.embeds.detach(), init)

    ids, mask = _batch(model_dir)
    _assert_same(_ours_logits(model, prompt.embeds.detach(), ids, mask), _peft_logits(peft_model, P, ids, mask),
                 mask)

    # Round trips are bit-exact: softprompt -> PEFT -> softprompt, and PEFT's tensor survives both ways.
    back = export_peft(ours, tmp_path / "peft2")
    assert torch.equal(load_file(str(back / ADAPTER_WEIGHTS))[TENSOR_NAME], saved[TENSOR_NAME])
    again = load_prompt(import_peft(back, tmp_path / "ours2"))
    assert torch.equal(again.embeds.detach(), prompt.embeds.detach())
    assert again.meta["model"] == str(model_dir)
    assert again.meta["init"] == prompt.meta["init"] == "peft"


def test_a_peft_adapter_s_init_survives_import_and_export(llama_dir, tmp_path):
    """Hunt 16: a PEFT TEXT-initialised adapter, imported and exported again, said RANDOM and no text."""
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text="Country facts", tokenizer_name_or_path=str(llama_dir))
    get_peft_model(_base(llama_dir), cfg).save_pretrained(tmp_path / "peft")
    back = export_peft(import_peft(tmp_path / "peft", tmp_path / "ours", model_name=str(llama_dir)), tmp_path / "again")
    said = json.loads((back / "adapter_config.json").read_text())
    assert (said["prompt_tuning_init"], said["prompt_tuning_init_text"]) == ("TEXT", "Country facts")
    again = PeftModel.from_pretrained(_base(llama_dir), str(back))  # PEFT reads what it said
    assert torch.equal(again.prompt_encoder["default"].embedding.weight,
                       load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS))[TENSOR_NAME])


def test_roundtrip_of_a_softprompt_prompt_is_bit_exact(tmp_path, llama_dir):
    torch.manual_seed(4)
    prompt = SoftPrompt(torch.randn(7, 32) * 0.05, {"init": "text", "init_text": "Country facts"})
    src = save_prompt(prompt, tmp_path / "ours", {"model": str(llama_dir), "template": "Country: {country}"})
    back = load_prompt(import_peft(export_peft(src, tmp_path / "peft"), tmp_path / "back"))
    assert torch.equal(back.embeds.detach(), prompt.embeds.detach())
    for k in ("init", "init_text", "model", "template"):
        assert back.meta[k] == load_prompt(src).meta[k]
    cfg = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert cfg["prompt_tuning_init"] == "TEXT" and cfg["prompt_tuning_init_text"] == "Country facts"


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp leftovers


def test_import_rejects_non_prompt_tuning_adapter(tmp_path, capsys):
    src = tmp_path / "lora"
    src.mkdir()
    (src / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8}))
    from safetensors.torch import save_file

    save_file({TENSOR_NAME: torch.zeros(4, 32)}, str(src / ADAPTER_WEIGHTS))
    out = tmp_path / "out"
    with pytest.raises(SoftpromptError, match="LORA"):
        import_peft(src, out)
    _no_output(out)
    assert cli_main(["import-peft", str(src), str(out)]) == 2
    assert "PROMPT_TUNING" in capsys.readouterr().err
    _no_output(out)


def test_import_of_a_softprompt_folder_says_what_it_is(tmp_path, capsys):
    src = save_prompt(SoftPrompt(torch.zeros(3, 32)), tmp_path / "ours", {})
    out = tmp_path / "out"
    assert cli_main(["import-peft", str(src), str(out)]) == 2
    assert f"{src} is a softprompt folder already" in capsys.readouterr().err
    _no_output(out)


def test_import_rejects_corrupt_adapter_weights(tmp_path, capsys):
    src = tmp_path / "peft"
    src.mkdir()
    (src / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                                                  "num_virtual_tokens": 4, "token_dim": 32}))
    weights = src / ADAPTER_WEIGHTS
    weights.write_bytes(os.urandom(512))
    out = tmp_path / "out"
    with pytest.raises(SoftpromptError) as ei:
        import_peft(src, out)
    assert str(weights) in str(ei.value)
    _no_output(out)
    assert cli_main(["import-peft", str(src), str(out)]) == 2
    assert str(weights) in capsys.readouterr().err
    _no_output(out)


@pytest.mark.parametrize("init", ["vocab", "text", "random", "labels"])
def test_each_init_exports_as_its_peft_init_and_round_trips(init, llama_dir, tmp_path):
    """The init table's PEFT name reaches adapter_config.json, PEFT loads the adapter with it, and the
    tensor PEFT holds comes back into softprompt bit-identical (vocab was once exported as RANDOM)."""
    from peft import PeftModel, PromptTuningInit

    from softprompt.core.config import PromptConfig
    from softprompt.core.inits import INITS
    from softprompt.base.models import load_model
    from softprompt.prompts.prompt import init_prompt

    model, tok = load_model(str(llama_dir))
    prompt = init_prompt(model, tok, PromptConfig(6, init, init_text="Country facts"), ["no", "yes"], seed=3)
    src = save_prompt(prompt, tmp_path / "ours", {"model": str(llama_dir)})
    out = export_peft(src, tmp_path / "peft")
    want = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM", "labels": "RANDOM"}[init]
    assert INITS[init].peft == want and json.loads((out / ADAPTER_CONFIG).read_text())["prompt_tuning_init"] == want

    peft_model = PeftModel.from_pretrained(_base(llama_dir), out)
    assert peft_model.peft_config["default"].prompt_tuning_init == PromptTuningInit(want)
    held = peft_model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(held, prompt.embeds.detach())
    peft_model.save_pretrained(tmp_path / "peft_saved")  # PEFT's own writing of what it loaded
    for adapter in (out, tmp_path / "peft_saved"):
        back = load_prompt(import_peft(adapter, tmp_path / f"back_{adapter.name}"))
        assert torch.equal(back.embeds.detach(), prompt.embeds.detach())
    assert load_prompt(tmp_path / "back_peft").meta["init"] == init


def test_init_table_names_only_peft_inits():
    from peft import PromptTuningInit

    from softprompt.core.inits import INITS

    assert {i.peft for i in INITS.values()} <= {m.value for m in PromptTuningInit}
