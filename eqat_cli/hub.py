"""The Hub policy: when eqat may reach the Hugging Face Hub, and what it accepts from it.

* :func:`hub_offline_reason`, :func:`hub_access`: offline mode and an unreachable network fail at
  once (one short TCP probe per process) instead of after ~30 s of retries; while the Hub cannot
  be reached, huggingface_hub and datasets run in offline mode (cached copies only).
* :func:`check_repo_files`, :func:`verify_download`: pull integrity (``eqat pull``, the model
  resolver's downloads): a repo whose file list holds absolute paths, ``..`` or a symlink out of
  the download is refused, a pickle-only repo is refused with a hint to its safetensors revision,
  and every downloaded file is checked against the Hub's recorded sha256 (LFS files) or git blob
  id (other files).

Imports nothing of eqat but ``errors``; huggingface_hub is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

HUB_PROBE_TIMEOUT = 3.0  # seconds to wait for a TCP connection to the Hub
_hub_probe: dict[str, str | None] = {}


def hub_offline_reason(datasets: bool = False) -> str | None:
    """Why the Hub cannot be used right now (``HF_HUB_OFFLINE``, for data sets also
    ``HF_DATASETS_OFFLINE``; no route), or None.

    The network is probed once per process with one short TCP connection to ``HF_ENDPOINT``, so
    a machine without network fails at once instead of after ~30 s of retries.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    if datasets and os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "offline mode is on (HF_DATASETS_OFFLINE)"
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if endpoint not in _hub_probe:
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(endpoint)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            with socket.create_connection((u.hostname or "", port), timeout=HUB_PROBE_TIMEOUT):
                _hub_probe[endpoint] = None
        except OSError as e:
            _hub_probe[endpoint] = f"the Hub ({u.hostname}) is unreachable: {e.strerror or e}"
    return _hub_probe[endpoint]


@contextlib.contextmanager
def hub_access(datasets: bool = False) -> Iterator[str | None]:
    """Yield :func:`hub_offline_reason`; while the Hub is unreachable, huggingface_hub and datasets
    run in offline mode (cached copies only), so a missing copy fails at once."""
    reason = hub_offline_reason(datasets)
    if reason is None:
        yield None
        return
    import sys

    from huggingface_hub import constants

    saved = [(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)]
    dconfig = sys.modules.get("datasets.config")
    if dconfig is None:
        try:
            import datasets.config as dconfig
        except ImportError:  # pragma: no cover - datasets is a dependency
            dconfig = None
    if dconfig is not None:
        saved += [(dconfig, k, getattr(dconfig, k)) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(dconfig, k)]
    try:
        for mod, k, _ in saved:
            setattr(mod, k, True)
        yield reason
    finally:
        for mod, k, v in saved:
            setattr(mod, k, v)
