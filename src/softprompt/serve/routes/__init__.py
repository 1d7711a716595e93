"""The server's routes, one module per concern; each holds an APIRouter that app.py includes.

- openai: /v1/completions, /v1/chat/completions
- classify: /v1/classify
- admin: /v1/admin/prompts (load, unload)
- ops: /v1/models, /health, /metrics
An endpoint is added in its concern's module alone: the metrics count it by its route.
"""
