#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv when missing (reuses it when present),
# installs the project into it, then runs what was asked.
#
#   bash cluster/dev.sh demo [key=value ...]   # the main job on the embedded default (synthetic data)
#   bash cluster/dev.sh test [pytest args]     # the test suite
#   bash cluster/dev.sh install                # only create/refresh .venv
#
# CPU machines get fbgemm-gpu-cpu and torchrec without its CUDA fbgemm-gpu dependency.
# On a CUDA cluster set GENREC_CUDA=1 to install fbgemm-gpu + torchrec instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"

install() {
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  local stamp="$venv/.installed-$(cat pyproject.toml cluster/dev.sh | sha256sum | cut -c1-16)"
  [ -f "$stamp" ] && return 0
  echo "[dev.sh] installing into $venv (first run takes a few minutes)" >&2
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  "${pip[@]}" --upgrade pip
  "${pip[@]}" torch==2.13.0
  if [ "${GENREC_CUDA:-0}" = "1" ]; then
    "${pip[@]}" -e ".[cuda,dev]"
  else
    "${pip[@]}" -e ".[cpu,dev]"
    "${pip[@]}" --no-deps torchrec==1.8.0
  fi
  rm -f "$venv"/.installed-*
  touch "$stamp"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install ;;
  demo) install; exec "$venv/bin/python" -m train.demo "$@" ;;
  test) install; exec "$venv/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash cluster/dev.sh {demo|test|install} [args...]" >&2; exit 2 ;;
esac
