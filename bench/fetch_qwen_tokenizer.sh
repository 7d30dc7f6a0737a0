#!/usr/bin/env bash
# Put Qwen's BPE ranks at bench/.assets/qwen.tiktoken (from the Apache-2.0 PyPI package dashscope 2.0.2; needs
# PyPI). The GPU benchmarks then use real Qwen token counts (bench/qwen_tokenizer.py); carry bench/.assets there.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="$HERE/.assets/qwen.tiktoken"
SHA=b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186
if [ -f "$DEST" ] && echo "$SHA  $DEST" | sha256sum -c --status; then echo "$DEST ok"; exit 0; fi
mkdir -p "$HERE/.assets"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps --dest "$TMP" dashscope==2.0.2
python3 - "$TMP" "$DEST.tmp" <<'PY'
import glob, sys, zipfile
with zipfile.ZipFile(glob.glob(sys.argv[1] + "/dashscope-*.whl")[0]) as z:
    open(sys.argv[2], "wb").write(z.read("dashscope/resources/qwen.tiktoken"))
PY
echo "$SHA  $DEST.tmp" | sha256sum -c --status || { echo "checksum mismatch for qwen.tiktoken" >&2; exit 1; }
mv "$DEST.tmp" "$DEST"
echo "$DEST ok"
