#!/usr/bin/env bash
# One entry point for a fresh machine: creates ./.venv, installs ClusterSTM with everything it
# needs, then runs the chosen job.
#   bash quickstart.sh test            # the full test suite (what CI runs)
#   bash quickstart.sh demo [ARGS...]  # the main job: `clusterstm demo` on the embedded benchmark
set -euo pipefail
cd "$(dirname "$0")"

job="${1:-test}"; shift || true
venv=".venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Re-install only when the project metadata changed since the last install.
stamp="$venv/.clusterstm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[all]"
  touch "$stamp"
fi

case "$job" in
  test) exec "$venv/bin/python" -m pytest tests -q -n 2 --durations 15 -rs "$@" ;;
  demo) exec "$venv/bin/clusterstm" demo "$@" ;;
  *) echo "usage: bash quickstart.sh [test|demo] [ARGS...]" >&2; exit 2 ;;
esac
