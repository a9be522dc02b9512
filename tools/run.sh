#!/usr/bin/env bash
# Set-up and entry points.  `bash tools/run.sh demo` creates .venv (when missing),
# installs fxoto into it and runs the demo; `bash tools/run.sh test` does the
# same set-up and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import fxoto, pytest, hypothesis, sklearn" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.fxoto-installed ]; then
    .venv/bin/pip install --quiet -e '.[test]'
    touch .venv/.fxoto-installed
fi
case "${1:-}" in
    demo) shift; exec .venv/bin/fxoto demo "$@" ;;
    test) shift; exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: bash tools/run.sh demo|test [args...]" >&2; exit 2 ;;
esac
