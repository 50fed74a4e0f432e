#!/bin/sh
# Headless Chromium for the test that opens an HTML report (tests/core/report/test_share.py). Best effort: as root
# with apt-get it installs Debian's chromium-headless-shell; otherwise it says so and the test is skipped.
# Never fails the build.
command -v chromium-headless-shell >/dev/null 2>&1 && exit 0
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell) \
        >/dev/null 2>&1 && exit 0
fi
echo "headless Chromium not installed: the HTML report test will be skipped (apt-get install chromium-headless-shell)"
exit 0
