"""The Hugging Face libraries' offline mode, taken when the Hub's host does not resolve.

Without network and without HF_HUB_OFFLINE set, huggingface_hub retries each request five times
with backoff: `train --data ORG/NAME` printed ten "Retrying in 8s" lines and failed after 25 s, and a
Hub `--model` after 50 s, with what is in the cache (read offline at once) never tried first. A host
that does not resolve will not resolve on the next try, so the command runs offline, as
`HF_HUB_OFFLINE=1` would: cached models and datasets load, and anything else is one error line.

Only a failed lookup decides: a slow resolver, a proxy (which resolves for the client) or an
offline variable already set (either way) leaves the libraries as they are. The variables must be
set before huggingface_hub, datasets or transformers is imported, which read them once at import.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import MutableMapping
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
DEFAULT_ENDPOINT = "https://huggingface.co"


def offline_where_unresolvable(env: MutableMapping[str, str] = os.environ, wait: float = 2.0) -> bool:
    """Set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 in `env` when the Hub's host (HF_ENDPOINT's)
    does not resolve within `wait` seconds because the lookup failed; True when it set them."""
    if any(v in env for v in OFFLINE_VARS + PROXY_VARS):
        return False
    host = urlparse(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).hostname
    if not host or resolves(host, wait) is not False:
        return False
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    return True


def resolves(host: str, wait: float) -> bool | None:
    """Whether `host` resolves; None when the lookup takes longer than `wait` (getaddrinfo has no
    timeout of its own, so it runs in a daemon thread left behind if it hangs)."""
    answer: list[bool] = []

    def look() -> None:
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
            answer.append(True)
        except socket.gaierror:
            answer.append(False)
        except (OSError, UnicodeError):  # not a lookup's answer: leave the libraries to try
            answer.append(True)

    t = threading.Thread(target=look, daemon=True, name="softprompt-hub-lookup")
    t.start()
    t.join(wait)
    return answer[0] if answer else None
