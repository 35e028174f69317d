#!/usr/bin/env bash
# What CI needs besides `make test`: headless Chromium, with which tests/test_compare.py checks that
# compare.py's report.html renders. Debian's package, installed only when missing (CI runs as root).
set -euo pipefail
if [[ ! -x /usr/bin/chromium ]]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
/usr/bin/chromium --version
