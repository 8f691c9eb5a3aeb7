"""Ray on the login node: its environment and short temp folder, the dashboard's port, token and ssh hint.

The dashboard is bound to 127.0.0.1 with Ray's token authentication on; the driver prints its URL,
the ``ssh -L`` command that forwards it to a laptop, and where Ray keeps the token.
"""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path


def ray_tmpdir() -> str:
    """A short temp folder for Ray (its Unix socket paths have a length limit)."""
    return os.environ.get("RAY_TMPDIR") or f"/tmp/ltssl-ray-{os.getuid()}"


def set_ray_environment() -> str:
    """Set what Ray reads from the environment when it is imported; return Ray's temp folder.

    Call before the first ``import ray``.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ["RAY_TMPDIR"] = ray_tmpdir()
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return os.environ["RAY_TMPDIR"]


def free_port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port for the dashboard")


def login() -> str:
    """``user@host`` of this (login) node, for the ssh port-forward hint."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "you"
    host = socket.gethostname()
    fqdn = socket.getfqdn(host)
    return f"{user}@{fqdn if '.' in fqdn and not fqdn.startswith('localhost') else host}"


def token_location() -> str:
    """Where Ray reads its authentication token from (same order as Ray)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "the RAY_AUTH_TOKEN environment variable"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    return str(Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    """Ray's authentication token (None when there is none yet)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip()
    except OSError:
        return None


def print_dashboard(console, port: int) -> str:
    """Print the dashboard's URL and how to reach it from a laptop; return the URL."""
    url = f"http://127.0.0.1:{port}"
    console.print(f"  dashboard {url}  (bound to 127.0.0.1; token authentication on)")
    console.print(f"    from a laptop: ssh -N -L {port}:127.0.0.1:{port} {login()}")
    console.print(f"    then open {url} and paste the token from {token_location()}")
    return url
