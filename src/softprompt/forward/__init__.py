"""The prompt-aware forward pass over the frozen base: which path a prompt meets the rows by and
why (paths.py), the text's hidden states and the losses and log-probs computed from them only
where needed (hidden.py), the padding-free packed sequence (packing.py), the CUDA-graphed
training step (cuda_graphs.py), and the one rank-classification scorer (classify.py).
"""
