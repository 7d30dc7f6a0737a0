#!/usr/bin/env bash
# Set up the Python environment: use the active virtualenv, else create/use .venv at the repository root.
# Idempotent: a second run only checks that the pinned packages are importable.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
fi
STAMP=".venv/.setup-stamp"
[ -n "${VIRTUAL_ENV:-}" ] && STAMP="$VIRTUAL_ENV/.qwen-edit-setup-stamp"
NEED_MB="${SETUP_NEED_MB:-9000}"  # free disk space an install needs (MB)
WANT="$(sha256sum pyproject.toml | cut -c1-16)-${1:-base}"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
# The test set-up holds the base one: a quickstart after the tests does not reinstall.
if { [ "$HAVE" = "$WANT" ] || [ "$HAVE" = "${WANT%-base}-test" ]; } && "$PY" -c "import diffsynth_edit, diffsynth, gradio" 2>/dev/null; then
  echo "[setup] environment up to date ($PY)"
else
  PREFIX="$("$PY" -c 'import sys; print(sys.prefix)')"
  # torch's wheel alone unpacks to about 5.5 GB; pip's own error on a full disk scrolls out of short CI logs.
  FREE_MB="$(df -Pm "$PREFIX" | awk 'NR == 2 {print $4}')"
  if [ -n "$FREE_MB" ] && [ "$FREE_MB" -lt "$NEED_MB" ]; then
    echo "[setup] error: ${FREE_MB} MB free on the disk of $PREFIX; installing needs about ${NEED_MB} MB" >&2
    df -h "$PREFIX" >&2
    exit 1
  fi
  echo "[setup] installing dependencies into $PREFIX (first run: a few minutes)"
  "$PY" -m pip install --upgrade --quiet pip 2>&1 | grep -v "^WARNING: Location" || true
  EXTRA=""
  [ "${1:-base}" = "test" ] && EXTRA="[test]"
  if ! "$PY" -m pip install --quiet -e ".$EXTRA" > .pip-install.log 2>&1; then
    grep -v "^WARNING: Location" .pip-install.log | tail -n 40 >&2
    echo "[setup] error: 'pip install -e .$EXTRA' failed (its last lines above; all of it in .pip-install.log)" >&2
    df -h "$PREFIX" >&2
    exit 1
  fi
  "$PY" -c "import diffsynth_edit, diffsynth, gradio, transformers; assert transformers.__version__ == '5.16.1', transformers.__version__"
  echo "$WANT" > "$STAMP"
fi
if [ "${1:-base}" = "test" ]; then
  # Browser for the UI test: Debian's chromium (Playwright drives it; no browser download).
  if ! command -v chromium >/dev/null 2>&1; then
    echo "[setup] installing chromium for the browser test"
    if command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "[setup] warning: could not install chromium; the browser test will be skipped"
    fi
  fi
fi
echo "$PY"
