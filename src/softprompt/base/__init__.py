"""The frozen base model: loading it from a Hub id, a local folder, a `.gguf` file or the built-in
model (models.py), quantized (quantize.py) or sharded (shard.py), and what differs between model
families (families.py), which every layer above asks instead of testing the model type itself.
"""
