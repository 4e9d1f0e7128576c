#!/bin/sh
# Set up everything on a fresh machine (only Python 3.10+ and a shell), then run a job:
#
#   sh dev.sh demo    # hamilton-attn demo: 8 CPU ranks, every schedule vs the reference
#   sh dev.sh test    # the test suite (what CI runs)
#   sh dev.sh NAME... # any command inside the environment, e.g. sh dev.sh hamilton-attn verify
#
# Idempotent: the virtual environment (.venv, or $HAMILTON_ATTN_VENV) is made once, and
# the packages are installed again only when pyproject.toml changes.
#   TORCH_SPEC       which torch to install (default torch==2.13.0; the suite runs on
#                    torch 2.11 to 2.13)
#   TORCH_INDEX_URL  a wheel index for torch, e.g. PyTorch's CPU-only index for the small
#                    CPU build (plain pip picks the default build of the platform)
set -eu
cd "$(dirname "$0")"
job="${1:-demo}"
[ "$#" -gt 0 ] && shift
venv="${HAMILTON_ATTN_VENV:-.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
        echo "dev.sh: Python 3.10 or newer is needed ($py is $("$py" -V 2>&1))" >&2
        exit 2
    }
    "$py" -m venv "$venv"
fi
. "$venv/bin/activate"

stamp="$venv/.hamilton-attn-installed"
want="$(cat pyproject.toml) ${TORCH_SPEC:-torch==2.13.0}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    python -m pip install -q --upgrade pip
    # torch first and pinned, so that the package's 'torch>=2.11' pulls nothing else.
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" --index-url "$TORCH_INDEX_URL"
    else
        python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    fi
    python -m pip install -q -e '.[test]'
    printf '%s' "$want" > "$stamp"
fi

case "$job" in
    demo) exec hamilton-attn demo "$@" ;;
    test) exec python -m pytest -q "$@" ;;
    *) exec "$job" "$@" ;;
esac
