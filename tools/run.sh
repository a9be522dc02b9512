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
# The tests also check the Graphviz pictures: install it where we may.
if [ "${1:-}" = test ] && ! command -v dot >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq graphviz) >/dev/null 2>&1 || echo "could not install graphviz" >&2
    else
        echo "note: Graphviz's dot is missing (apt-get install graphviz); its two tests will fail" >&2
    fi
fi
case "${1:-}" in
    demo) shift; exec .venv/bin/fxoto demo "$@" ;;
    test) shift; exec .venv/bin/python -m pytest "$@" ;;
    *) echo "usage: bash tools/run.sh demo|test [args...]" >&2; exit 2 ;;
esac
