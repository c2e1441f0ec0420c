#!/usr/bin/env bash
# Installs Debian's chromium, which the WebLog's browser test renders the WebLog in,
# when it is not on PATH. Needs root (or password-less sudo) and apt-get; where it
# cannot install, it says why and exits 0: the browser test then skips, naming this,
# except under ALMAPIPE_REQUIRE_BROWSER=1 (.ci/run sets it), where it fails.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no apt-get here; install chromium yourself to run the WebLog browser test" >&2
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "ensure_chromium: not root and no password-less sudo; install chromium to run the WebLog browser test" >&2
    exit 0
fi
echo "ensure_chromium: installing chromium (apt-get) for the WebLog browser test" >&2
"${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null \
    || echo "ensure_chromium: apt-get install chromium failed; the WebLog browser test will skip" >&2
exit 0
