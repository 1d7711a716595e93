"""Scoring prompts: held-out loss, perplexity and rank-classification accuracy, the `eval` command
(evaluate.py); K prompts scored together (ensemble.py); a prompt's nearest vocabulary tokens
(interpret.py), a prefix's per-layer key/value norms (prefix_norms.py); lm-evaluation-harness
with the softprompt model (lmeval.py, lmeval_model.py).
"""
