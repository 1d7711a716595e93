"""Soft prompt initialisation strategies, file format and its error cases."""
import pytest
import torch

from softprompt.core.config import PromptConfig
from softprompt.core.utils import SoftpromptError
from softprompt.prompts.prompt import SoftPrompt, init_prompt, load_prompt, save_prompt


def test_every_init_strategy(tiny, tmp_path):
    model, tok = tiny
    emb = model.get_input_embeddings().weight.detach()
    P = 7
    rnd = init_prompt(model, tok, PromptConfig(P, "random"), seed=1)
    assert rnd.embeds.shape == (P, emb.shape[1])
    assert abs(float(rnd.embeds.detach().std()) - float(emb.std())) < 0.5 * float(emb.std())
    assert not torch.equal(rnd.embeds, init_prompt(model, tok, PromptConfig(P, "random"), seed=2).embeds)

    voc = init_prompt(model, tok, PromptConfig(P, "vocab"), seed=1)
    for row in voc.embeds:  # every row is some real token's embedding
        assert (emb == row).all(1).any()

    txt = init_prompt(model, tok, PromptConfig(P, "text", init_text="Country facts"))
    ids = tok("Country facts", add_special_tokens=False).input_ids
    want = (ids * P)[:P]
    assert torch.equal(txt.embeds, emb[want])

    lab = init_prompt(model, tok, PromptConfig(P, "labels"), label_words=["negative", "positive"])
    lids = [i for w in ["negative", "positive"] for i in tok(" " + w, add_special_tokens=False).input_ids]
    n = min(len(lids), P)
    assert torch.equal(lab.embeds[:n], emb[lids[:n]])

    save_prompt(txt, tmp_path / "p", {"model": "tiny"})
    f = init_prompt(model, tok, PromptConfig(P, "file", init_file=str(tmp_path / "p")))
    assert torch.equal(f.embeds, txt.embeds)
    with pytest.raises(SoftpromptError, match="has 7 virtual tokens but --virtual-tokens is 3"):
        init_prompt(model, tok, PromptConfig(3, "file", init_file=str(tmp_path / "p")))


def test_save_load_round_trip_records_metadata(tiny, tmp_path):
    model, tok = tiny
    p = init_prompt(model, tok, PromptConfig(4, "vocab"))
    save_prompt(p, tmp_path / "p", {"model": "m", "template": "{x}"})
    q = load_prompt(tmp_path / "p", model)
    assert torch.equal(p.embeds, q.embeds)
    assert q.meta["model"] == "m" and q.meta["hidden_size"] == model.config.hidden_size
    assert q.meta["num_virtual_tokens"] == 4 and q.meta["init"] == "vocab"
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == ["prompt.safetensors", "prompt_config.json"]


def test_wrong_hidden_size_is_refused(tiny, tmp_path):
    model, _ = tiny
    save_prompt(SoftPrompt(torch.zeros(3, 48)), tmp_path / "p", {"model": "other-model"})
    with pytest.raises(SoftpromptError, match=r"hidden size 48 but the model's is 32 \(it was trained for other-model\)"):
        load_prompt(tmp_path / "p", model)


def test_corrupt_and_missing_prompt_files(tmp_path):
    d = tmp_path / "p"
    save_prompt(SoftPrompt(torch.zeros(3, 8)), d, {"model": "m"})
    (d / "prompt.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SoftpromptError, match="corrupt prompt file .*prompt.safetensors"):
        load_prompt(d)
    # A mistyped folder is said to be missing, not only its file
    with pytest.raises(SoftpromptError, match=r"missing prompt file: .*nowhere/prompt.safetensors \(no folder "):
        load_prompt(tmp_path / "nowhere")
    (d / "prompt.safetensors").unlink()
    with pytest.raises(SoftpromptError, match=r"missing prompt file: .*p/prompt.safetensors$"):
        load_prompt(d)


def test_init_flag_choices_and_error_come_from_the_table(tiny):
    """--init's choices, its unknown-name error and the strategies init_prompt runs are one table."""
    from softprompt.cli import build_parser
    from softprompt.core.inits import CHOICES, INITS

    model, tok = tiny
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flag = next(a for a in train._actions if "--init" in a.option_strings)
    assert tuple(flag.choices) == CHOICES == ("auto", *INITS)
    msg = "unknown --init 'nope': use auto, random, vocab, text, labels or file"
    with pytest.raises(SoftpromptError, match=msg):
        PromptConfig(3, "nope")
    cfg = PromptConfig(3, "random")
    cfg.init = "nope"  # changed after the config's own check: init_prompt still refuses it
    with pytest.raises(SoftpromptError, match=msg):
        init_prompt(model, tok, cfg)


def test_labels_init_follows_the_label_spacing_rule(tiny):
    """The labels init takes the label words' tokens as rank classification does: after an input
    ending in a non-space with a leading space, after a newline without."""
    from softprompt.forward.classify import label_token_ids

    model, tok = tiny
    emb = model.get_input_embeddings().weight.detach()
    words = ["negative", "positive"]
    for rendered in ("Sentiment:", "Sentiment:\n"):
        ids = [i for w in label_token_ids(tok, words, rendered) for i in w][:7]
        p = init_prompt(model, tok, PromptConfig(7, "labels"), label_words=words, label_input=rendered)
        assert torch.equal(p.embeds[:len(ids)], emb[ids])
    assert label_token_ids(tok, words, ":") != label_token_ids(tok, words, "\n"), "premise: the two differ"


# A prompt folder exactly as softprompt wrote it before prompts had kinds (written by the code of
# commit 6a68683, bytes copied here): no "kind" in prompt_config.json.
OLD_WEIGHTS = (b'P\x00\x00\x00\x00\x00\x00\x00{"prompt_embeddings":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]}}'
               b'       \x00\x00\x00?\x00\x00\x80\xbf\x00\x00\x00@\x00\x00\x80>\x00\x00\xc0?\x00\x00\x00\x00\x00\x00@\xbf'
               b'\x00\x00@@')
OLD_CONFIG = """{
  "format": "softprompt/1",
  "num_virtual_tokens": 2,
  "hidden_size": 4,
  "init": "text",
  "init_text": "Country facts",
  "model": "tiny-llama",
  "template": "Country: {country}",
  "labels": [],
  "chat": false,
  "task": "generate",
  "step": 3
}
"""


def test_a_folder_written_before_kinds_loads_as_a_soft_prompt_and_saves_its_kind(tmp_path):
    from softprompt.core.prompt_protocol import Prompt

    old = tmp_path / "old"
    old.mkdir()
    (old / "prompt.safetensors").write_bytes(OLD_WEIGHTS)
    (old / "prompt_config.json").write_text(OLD_CONFIG)
    p = load_prompt(old)
    assert isinstance(p, SoftPrompt) and isinstance(p, Prompt) and p.kind == "prompt"
    assert torch.equal(p.input_embeds(), torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.75, 3.0]]))
    assert p.length == 2 and p.hidden_size == 4 and p.meta["template"] == "Country: {country}"
    save_prompt(p, tmp_path / "new", {})
    import json

    cfg = json.loads((tmp_path / "new" / "prompt_config.json").read_text())
    assert cfg["kind"] == "prompt"
    assert {k: v for k, v in cfg.items() if k != "kind"} == json.loads(OLD_CONFIG)
    assert torch.equal(load_prompt(tmp_path / "new").input_embeds(), p.input_embeds())


def test_an_unknown_prompt_kind_is_one_clear_error(tmp_path):
    import json

    d = tmp_path / "p"
    save_prompt(SoftPrompt(torch.zeros(3, 8)), d, {"model": "m"})
    cfg = json.loads((d / "prompt_config.json").read_text())
    (d / "prompt_config.json").write_text(json.dumps({**cfg, "kind": "ptuning"}))
    with pytest.raises(SoftpromptError, match="unknown prompt kind 'ptuning'"):
        load_prompt(d)


def test_the_soft_prompt_implements_the_prompt_protocol(tiny):
    """Its keys/values are the kv path's, its saved tensors the file's, its parameters what trains."""
    from softprompt.forward.hidden import prefix_kv
    from softprompt.core.prompt_protocol import embeds_of

    model, tok = tiny
    p = init_prompt(model, tok, PromptConfig(3, "vocab"))
    assert embeds_of(p) is p.embeds and embeds_of(p.embeds) is p.embeds and embeds_of(None) is None
    assert [t is p.embeds for t in p.parameters()] == [True]
    assert list(p.state_tensors()) == ["prompt_embeddings"] and torch.equal(p.state_tensors()["prompt_embeddings"],
                                                                            p.embeds.detach())
    with torch.no_grad():
        mine, ref = p.past_key_values(model), prefix_kv(model, p.embeds)[0]
    assert len(mine) == model.config.num_hidden_layers
    for (k, v), (k2, v2) in zip(mine, ref):
        assert k.shape[0] == 1 and k.shape[-2] == 3 and torch.equal(k, k2) and torch.equal(v, v2)
