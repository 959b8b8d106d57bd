#!/usr/bin/env bash
# Installs moto's standalone S3 server (PyPI, Apache 2.0) into target/s3-python, for the
# remote-cache tests (tests/remote.rs start and stop it themselves). Prints the server's path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/s3-python
if [ ! -x "$venv/bin/moto_server" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet 'moto[server]==5.2.5'
fi
echo "$PWD/$venv/bin/moto_server"
