"""Scoring prompts: held-out loss, perplexity and rank-classification accuracy, the `eval` command
(evaluate.py); K prompts scored together (ensemble.py); a prompt's nearest vocabulary tokens
(interpret.py); lm-evaluation-harness with the softprompt model (lmeval.py, lmeval_model.py).
"""
