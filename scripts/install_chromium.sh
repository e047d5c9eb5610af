#!/usr/bin/env bash
# Headless Chromium (Debian's `chromium` package) for the browser test of the Gradio demo
# (tests/test_demo.py). Idempotent: does nothing when /usr/bin/chromium is already there.
# Uses sudo when not root. Playwright never downloads a browser: the test points it here.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# apt's chatter goes to a log that is shown only when something fails
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_chromium.sh: apt-get could not install chromium" >&2
    exit 1
fi
echo "installed $(/usr/bin/chromium --version 2>/dev/null)"
