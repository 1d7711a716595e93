"""Generate with a softprompt prompt or prefix from PEFT (peft 0.21 + transformers 5).

`PeftModel.generate()` gives other tokens than the same model's own forward pass on transformers 5,
for prompt-tuning adapters (e.g. "\\n\\n\\n\\nAct as a\\nAct asAct as" where a greedy loop over
`peft_model(...)` and `softprompt generate` give "\\nI am a coach who helps people achieve their
goals.") and for prefix-tuning ones (" 2023-01-01 22:1" for " I want you to act as a travel
guide."). These two functions run the base model's own generate() instead: on the prompt's
embeddings followed by the text's, or on the prefix's keys and values as its cache. Both give the
tokens `softprompt generate` gives. Rows of a batch must be left-padded.

    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(base, "runs/acts")      # a softprompt folder or Hub repo
    new_tokens = generate_with_prompt(peft_model, enc.input_ids, enc.attention_mask, max_new_tokens=40)
    new_tokens = generate_with_prefix(peft_model, enc.input_ids, enc.attention_mask, max_new_tokens=40)
"""
import torch


@torch.no_grad()
def generate_with_prompt(peft_model, input_ids, attention_mask, **generate_kwargs):
    """A prompt-tuning (or P-tuning) adapter: its P embeddings before the text's."""
    base = peft_model.get_base_model()
    batch = input_ids.shape[0]
    prompt = peft_model.get_prompt(batch_size=batch).to(base.dtype)               # [B, P, H]
    embeds = torch.cat([prompt, base.get_input_embeddings()(input_ids)], dim=1)   # [B, P+T, H]
    mask = torch.cat([attention_mask.new_ones(batch, prompt.shape[1]), attention_mask], dim=1)
    return base.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)  # new tokens only


@torch.no_grad()
def generate_with_prefix(peft_model, input_ids, attention_mask, **generate_kwargs):
    """A prefix-tuning adapter: its keys and values as the cache the text continues. generate() takes
    a cache to hold the first positions of input_ids, so P placeholder ids stand for the prefix
    (never embedded: only the ids after the cache are run); greedy and sampling, not beams."""
    base = peft_model.get_base_model()
    batch = input_ids.shape[0]
    cache = peft_model.get_prompt(batch_size=batch)      # a DynamicCache: P positions in every layer
    P = cache.get_seq_length()
    ids = torch.cat([input_ids.new_zeros(batch, P), input_ids], dim=1)               # [B, P+T]
    mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], dim=1)
    out = base.generate(input_ids=ids, attention_mask=mask, cache=cache, **generate_kwargs)
    return out[:, ids.shape[1]:]                                                     # new tokens only
