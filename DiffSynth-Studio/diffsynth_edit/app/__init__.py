"""The mask-editing app: `python app_gradio.py` (see docs/app.md).

- config.py: AppConfig (TOML preset `configs/app.toml` + flags)
- checkpoints.py: listing checkpoints under the roots, the root check
- uploads.py: uploaded image/mask values to PIL, upload limit, mask from the editor's brush layer
- service.py: EditService (gradio-free: checkpoint hot-swap, validation, one edit)
- ui.py: the gradio Blocks and the `/edit` API endpoint
"""
from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the config, build the service and the page, serve until interrupted."""
    from .config import parse_app_config

    cfg = parse_app_config(argv, prog="app_gradio.py")
    from ..config import ConfigError
    from .auth import exposure_warning, load_auth

    try:
        auth = load_auth(cfg.auth_file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = exposure_warning(cfg.bind_host, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    from ..loading import MissingWeightsError
    from .service import EditService

    try:
        service = EditService.from_config(cfg)
    except (MissingWeightsError, RuntimeError) as e:
        print(f"error: {e}")
        return 2
    from .ui import build_ui, launch

    demo = build_ui(service, default_steps=cfg.steps, max_steps=cfg.max_steps, default_cfg=cfg.cfg_scale,
                    lbm_steps=cfg.lbm_steps, initial_checkpoint=cfg.checkpoint)
    print(f"[app] serving on http://{cfg.bind_host}:{cfg.port} (checkpoint roots: "
          f"{', '.join(str(r) for r in service.roots)})", flush=True)
    from ..lifetime import Terminated, sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM (systemd, docker stop) stops the server and lets the exit handlers run
            launch(demo, host=cfg.bind_host, port=cfg.port, share=cfg.share, max_file_mb=cfg.max_file_mb,
                   queue_size=cfg.queue_size, auth=auth)
    except Terminated as stop:
        demo.close()
        print("[app] stopped (SIGTERM)", flush=True)
        return stop.exit_code
    return 0
