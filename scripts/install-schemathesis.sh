#!/usr/bin/env bash
# Provide Schemathesis (from PyPI) for the API contract test (crates/warmvm/tests/schemathesis.rs)
# in a virtualenv under target/, so nothing is installed system-wide: target/schemathesis/bin/st.
# Needs python3 with its venv module (Debian: python3-venv) and access to PyPI the first time.
# Idempotent: does nothing when the pinned version is already there.
set -euo pipefail

version="4.32.5"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/schemathesis"

die() { echo "install-schemathesis: $*" >&2; exit 1; }

if [ -x "$venv/bin/st" ] && [ "$("$venv/bin/st" --version 2>/dev/null)" = "st, version $version" ]; then
    exit 0
fi
command -v python3 >/dev/null || die "python3 not found (Debian: apt-get install python3 python3-venv)"
echo "install-schemathesis: installing schemathesis $version into $venv" >&2
python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
"$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version" >&2 \
    || die "pip install schemathesis==$version failed"
