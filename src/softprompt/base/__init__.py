"""The frozen base model: loading it from a Hub id, a local folder, a `.gguf` file or the built-in
model (models.py), quantized (quantize.py) or sharded (shard.py), and what differs between model
families (families.py), which every layer above asks instead of testing the model type itself.
attention.py routes a model's attention through a wrapper (the packed layout, forward/packing.py;
half_attention.py's fp32 backward for a half-precision base on a CPU).
"""
