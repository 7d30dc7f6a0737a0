"""Who may use the app when it serves the network: gradio's login, from a password file or an environment variable.

The file holds one `user:password` per line (blank lines and `#` comments ignored); the variable AUTH_ENV holds
`user:password` pairs separated by commas. Binding beyond loopback without either prints a warning.
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from ..config import ConfigError

AUTH_ENV = "QWEN_EDIT_APP_AUTH"


def _pairs(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for where, text in entries:
        user, sep, password = text.partition(":")
        if not sep or not user.strip() or not password:
            raise ConfigError(f"{where}: expected `user:password`")
        out.append((user.strip(), password))
    return out


def load_auth(auth_file: Path | None, environ: dict[str, str] | None = None) -> list[tuple[str, str]] | None:
    """The (user, password) pairs from `auth_file` and/or AUTH_ENV; None when neither is set."""
    environ = os.environ if environ is None else environ
    entries: list[tuple[str, str]] = []
    if auth_file is not None:
        try:
            lines = Path(auth_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--auth-file {auth_file} cannot be read ({getattr(e, 'strerror', None) or e})") from None
        entries += [(f"--auth-file {auth_file} line {i}", ln.strip()) for i, ln in enumerate(lines, 1)
                    if ln.strip() and not ln.lstrip().startswith("#")]
        if not entries:
            raise ConfigError(f"--auth-file {auth_file} holds no `user:password` line")
    env = environ.get(AUTH_ENV, "").strip()
    if env:
        entries += [(f"${AUTH_ENV} entry {i}", part.strip()) for i, part in enumerate(env.split(","), 1)]
    return _pairs(entries) if entries else None


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, auth: list | None) -> str | None:
    """The warning to print for serving on `host` with `auth`, or None (loopback)."""
    if is_loopback(host):
        return None
    if auth:
        return f"[app] serving on {host} (reachable from the network) with a login for {len(auth)} user(s)"
    return (f"[app] WARNING: serving on {host} makes the app reachable from the network with no login: anyone who "
            f"can reach this machine can run edits and list checkpoints. Give --auth-file FILE (user:password "
            f"lines) or set {AUTH_ENV}=user:password, or bind 127.0.0.1")
