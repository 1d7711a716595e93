"""`python -m softprompt` is the `softprompt` command."""
from .cli import entry

entry()
