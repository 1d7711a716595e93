"""Generate with a softprompt prompt from PEFT (peft 0.21 + transformers 5).

`PeftModel.generate()` with a prompt-tuning adapter gives other tokens than the same model's own
forward pass on transformers 5 (e.g. "\\n\\n\\n\\nAct as a\\nAct asAct as" where a greedy loop over
`peft_model(...)` and `softprompt generate` give "\\nI am a coach who helps people achieve their
goals."). This runs the base model's own generate() on the prompt's embeddings followed by the
text's: the tokens `softprompt generate` gives. Rows of a batch must be left-padded.

    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(base, "runs/acts")      # a softprompt folder or Hub repo
    new_tokens = generate_with_prompt(peft_model, enc.input_ids, enc.attention_mask, max_new_tokens=40)
"""
import torch


@torch.no_grad()
def generate_with_prompt(peft_model, input_ids, attention_mask, **generate_kwargs):
    base = peft_model.get_base_model()
    batch = input_ids.shape[0]
    prompt = peft_model.get_prompt(batch_size=batch).to(base.dtype)               # [B, P, H]
    embeds = torch.cat([prompt, base.get_input_embeddings()(input_ids)], dim=1)   # [B, P+T, H]
    mask = torch.cat([attention_mask.new_ones(batch, prompt.shape[1]), attention_mask], dim=1)
    return base.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)  # new tokens only
