"""Tiny random configs of the model families softprompt supports: hidden 32, 2 layers, 4 heads.

A new family is one entry here (its config class and the names it gives the common sizes) plus,
if it needs one, its quirk in src/softprompt/base/families.py. Sliding-window families appear twice:
with a window shorter than the test prompt and with one longer than it.
"""
from __future__ import annotations

import transformers as tr

H, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
LLAMA_LIKE = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  intermediate_size=FFN, max_position_embeddings=256)
GPT2_LIKE = dict(n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=256)

# name -> (config class, its keyword arguments); vocab and special ids are added by tiny_config.
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama": (tr.LlamaConfig, LLAMA_LIKE),
    "qwen2": (tr.Qwen2Config, LLAMA_LIKE),
    "qwen3": (tr.Qwen3Config, dict(LLAMA_LIKE, head_dim=8)),
    "gemma": (tr.GemmaConfig, dict(LLAMA_LIKE, head_dim=8)),
    "gemma2-window3": (tr.Gemma2Config, dict(LLAMA_LIKE, head_dim=8, sliding_window=3)),
    "gemma2-window12": (tr.Gemma2Config, dict(LLAMA_LIKE, head_dim=8, sliding_window=12)),
    "gemma3-window3": (tr.Gemma3TextConfig, dict(LLAMA_LIKE, head_dim=8, sliding_window=3)),
    "phi": (tr.PhiConfig, dict(LLAMA_LIKE, partial_rotary_factor=0.5)),
    "phi3": (tr.Phi3Config, dict(LLAMA_LIKE, sliding_window=None)),
    "phi3-window3": (tr.Phi3Config, dict(LLAMA_LIKE, sliding_window=3)),
    "mistral-window3": (tr.MistralConfig, dict(LLAMA_LIKE, sliding_window=3)),
    "mistral-window12": (tr.MistralConfig, dict(LLAMA_LIKE, sliding_window=12)),
    "starcoder2-window3": (tr.Starcoder2Config, dict(LLAMA_LIKE, sliding_window=3)),
    "gpt-oss-window3": (tr.GptOssConfig, dict(LLAMA_LIKE, head_dim=8, sliding_window=3, num_local_experts=4,
                                              num_experts_per_tok=2)),
    "mixtral": (tr.MixtralConfig, dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": (tr.Qwen2MoeConfig, dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=16)),
    "qwen3-moe": (tr.Qwen3MoeConfig, dict(LLAMA_LIKE, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16)),
    "stablelm": (tr.StableLmConfig, LLAMA_LIKE),
    "olmo2": (tr.Olmo2Config, LLAMA_LIKE),
    "smollm3": (tr.SmolLM3Config, LLAMA_LIKE),
    "glm4": (tr.Glm4Config, dict(LLAMA_LIKE, head_dim=8)),
    "cohere": (tr.CohereConfig, dict(LLAMA_LIKE, logit_scale=0.5)),
    "granite": (tr.GraniteConfig, dict(LLAMA_LIKE, logits_scaling=4.0)),
    "gpt-neox": (tr.GPTNeoXConfig, dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        intermediate_size=FFN, max_position_embeddings=256)),
    "gpt2": (tr.GPT2Config, GPT2_LIKE),
    "gpt-bigcode": (tr.GPTBigCodeConfig, GPT2_LIKE),
    "gptj": (tr.GPTJConfig, dict(GPT2_LIKE, rotary_dim=4)),
    "codegen": (tr.CodeGenConfig, dict(GPT2_LIKE, n_ctx=256, rotary_dim=4)),
    "opt": (tr.OPTConfig, dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                               word_embed_proj_dim=H, max_position_embeddings=256)),
    "falcon-rotary": (tr.FalconConfig, dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            alibi=False)),
    "falcon-alibi": (tr.FalconConfig, dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                           alibi=True)),
    "mpt": (tr.MptConfig, dict(d_model=H, n_layers=LAYERS, n_heads=HEADS, max_seq_len=256)),
    "bloom": (tr.BloomConfig, dict(hidden_size=H, n_layer=LAYERS, n_head=HEADS, initializer_range=0.2)),
}


def tiny_config(name: str, vocab_size: int, pad_id: int, eos_id: int, **overrides):
    cls, kw = FAMILIES[name]
    # Wider initial weights than the default 0.02, so that outputs depend clearly on the prompt.
    kw = {"initializer_range": 0.2, **kw, **overrides}
    return cls(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
               tie_word_embeddings=False, **kw)
