#!/usr/bin/env bash
# `make system-deps`: the system packages that `make install` and `make test` need, in one place.
#
#     bash tools/system_deps.sh [--dry-run]
#
# Checks for each *tool* (not a package name, so a non-Debian machine with the tools passes):
#
#   tool                          Debian package   needed by
#   gcc                           gcc              building the Cython extension
#   make                          make             every developer command
#   $PYTHON with venv + ensurepip python3-venv     `make install` (.venv)
#   Python.h of $PYTHON           python3-dev      building the Cython extension
#   zlib.h                        zlib1g-dev       building the Cython extension (permessage-deflate)
#   redis-server                  redis-server     the Redis integration tests
#   promtool                      prometheus       tests/unit/test_deploy.py (deploy/ rules)
#   node, npm                     nodejs, npm      the JS client's tests
#   $CHROMIUM (/usr/bin/chromium) chromium         the browser tests (playwright)
#   curl                          curl             the README's Try it (tests/integration/test_readme.py)
#
# When some are missing: with apt-get on PATH and root (or sudo) it installs the packages;
# otherwise it prints exactly what to install and exits 1. `--dry-run` only reports: what is
# missing and the command it would run; exit 0 when nothing is missing, 1 otherwise.
# .ci/run runs this script directly (make itself may be missing on a fresh machine).
set -uo pipefail

PYTHON=${PYTHON:-python3}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
mode=install
case "${1:-}" in
  "") ;;
  --dry-run) mode=dry-run ;;
  --verify) mode=verify ;;  # after installing: check again, never install twice
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

need=()
why=()
missing() { need+=("$1"); why+=("$2"); }

command -v gcc >/dev/null 2>&1 || missing gcc "gcc (C compiler for the extension)"
command -v make >/dev/null 2>&1 || missing make "make"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  missing python3 "$PYTHON (Python 3.11+)"
  missing python3-venv "the venv module of $PYTHON"
  missing python3-dev "Python.h of $PYTHON (to build the extension)"
else
  "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
    || missing python3-venv "the venv and ensurepip modules of $PYTHON"
  "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    >/dev/null 2>&1 || missing python3-dev "Python.h of $PYTHON (to build the extension)"
fi
gcc -E -include zlib.h -x c /dev/null >/dev/null 2>&1 \
  || missing zlib1g-dev "zlib.h (to build the extension: permessage-deflate)"
command -v redis-server >/dev/null 2>&1 || missing redis-server "redis-server (Redis tests)"
command -v promtool >/dev/null 2>&1 || missing prometheus "promtool (checks deploy/ in the tests)"
command -v curl >/dev/null 2>&1 || missing curl "curl (the README's Try it and its test)"
command -v node >/dev/null 2>&1 || missing nodejs "node (the JS client's tests)"
command -v npm >/dev/null 2>&1 || missing npm "npm (the JS client's tests)"
[ -x "$CHROMIUM" ] || command -v "$CHROMIUM" >/dev/null 2>&1 \
  || missing chromium "$CHROMIUM (the browser tests; set CHROMIUM=path for another one)"

if [ ${#need[@]} -eq 0 ]; then
  echo "system-deps: every system package is there"
  exit 0
fi

echo "system-deps: missing:"
for w in "${why[@]}"; do echo "  - $w"; done

# who can install: root, or sudo (non-interactive, or with a terminal to ask the password on)
sudo_cmd=none
if command -v apt-get >/dev/null 2>&1; then
  if [ "${EUID:-$(id -u)}" -eq 0 ]; then
    sudo_cmd=""
  elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
    sudo_cmd="sudo "
  fi
fi
update="${sudo_cmd}apt-get update -q"
install="${sudo_cmd}env DEBIAN_FRONTEND=noninteractive apt-get install -y -q ${need[*]}"

if [ "$mode" = verify ]; then
  echo "system-deps: apt-get installed ${need[*]} but the tools above are still missing" >&2
  exit 1
fi
if [ "$sudo_cmd" = none ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: cannot install them here (not root, and no usable sudo). As root, run:"
  else
    echo "system-deps: no apt-get here. Install the tools above; on Debian/Ubuntu, as root:"
  fi
  echo "  apt-get update && apt-get install -y ${need[*]}"
  echo "then run the command again."
  exit 1
fi

if [ "$mode" = dry-run ]; then
  echo "system-deps: would run: $update && $install"
  exit 1
fi
echo "system-deps: installing: ${need[*]}"
$update && $install || { echo "system-deps: apt-get failed (see above)" >&2; exit 1; }
exec bash "$0" --verify
