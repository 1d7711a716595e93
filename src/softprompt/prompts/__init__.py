"""The prompts and their files: the soft prompt (prompt.py) and the deep prompt (prefix.py), a
prompt's recorded reading of its data (recorded.py), hf:// prompt folders (hub.py) and pushing
one (hub_push.py), and PEFT's adapter layouts both ways (peft_io.py, peft_prefix.py). A prompt's
keys and values come from running the base model, so this layer sits above forward/.
"""
