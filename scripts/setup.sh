#!/usr/bin/env bash
# Idempotent set-up for a fresh machine of this kind (Debian, Python 3.11, no GPU, PyPI only).
# Installs the system tools, creates .venv at the repository root from requirements.lock and
# installs echat-forge into it (editable). A second run only checks and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
# torchcodec (datasets' Audio decoding) needs FFmpeg's shared libraries; ffmpeg brings them.
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
# The quality report's test opens the page in a real headless browser (tests/browser.py).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! command -v uv >/dev/null 2>&1 && [ ! -x .venv-tools/bin/uv ]; then
  echo "setup: installing uv"
  "$PYTHON" -m venv .venv-tools && .venv-tools/bin/pip install -q "uv==0.13.9"
fi
UV=$(command -v uv 2>/dev/null || echo .venv-tools/bin/uv)

[ -x .venv/bin/python ] || "$UV" venv -q .venv --python "$PYTHON"

# The lock pins torch to the CPU wheel shipped in /opt/wheels (PyPI's newer torch is CUDA-only).
stamp=.venv/.echat-setup-stamp
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing locked packages into .venv"
  "$UV" pip sync -q --python .venv/bin/python --find-links /opt/wheels --compile-bytecode requirements.lock
  "$UV" pip install -q --python .venv/bin/python --no-deps --no-build-isolation -e .
  # torchaudio on PyPI is a CUDA build whose native library cannot load against CPU torch.
  # Without it torchaudio falls back to pure-Python paths (resample, fbank, load via torchcodec),
  # which is all funasr and pyannote need here.
  rm -f .venv/lib/python3*/site-packages/torchaudio/lib/*.so
  echo "$want" > "$stamp"
fi
