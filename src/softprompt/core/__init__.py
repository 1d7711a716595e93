"""The bottom layer, which every other imports: the user-facing error type and file helpers
(utils.py), the settings every command and the Python API take (config.py), the init strategies
whose names config's `--init` offers (inits.py), and the `Prompt` protocol that the forward pass,
decoding and serving read every kind of prompt through (prompt_protocol.py). Nothing here imports
torch at import time, so `softprompt --help` can read it.
"""
