#!/usr/bin/env bash
# Make sure Debian's Chromium (and its driver) is installed for the browser tests; install it with
# apt if missing. Never fails the caller: where it cannot be installed the browser tests skip and
# say why.
set -uo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
fi
if [ "$SUDO" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: WARNING: Chromium is not installed and cannot be installed here (needs apt-get as root);" \
    "the browser tests will be SKIPPED" >&2
  exit 0
fi
echo "ensure-chromium: installing Debian's chromium and chromium-driver with apt" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    chromium chromium-driver >/tmp/glmv-chromium-apt.log 2>&1; }; then
  echo "ensure-chromium: WARNING: apt could not install chromium (log: /tmp/glmv-chromium-apt.log);" \
    "the browser tests will be SKIPPED" >&2
fi
exit 0
