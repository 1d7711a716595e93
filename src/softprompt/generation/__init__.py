"""Text from a prompted model: the next token, greedy or sampled (sampling.py), continuous batching
on a growing cache (decode.py) or over fixed, CUDA-graphed KV slots (static_decode.py), and the
`generate` command with its batch function (generate.py). The server's scheduler runs the same
engines.
"""
