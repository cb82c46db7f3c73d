#!/usr/bin/env bash
# Install the system browser used by the real-browser MLflow UI test
# (tests/browser/ui.py): Debian's chromium + chromium-driver.
# Idempotent and non-interactive; safe to re-run. Needs root (or sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "browser-deps: need root or sudo to install packages" >&2; exit 1
    fi
fi

PKGS=(chromium chromium-driver)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "browser-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Other jobs may hold the dpkg lock: wait for it instead of failing.
    APT_OPTS=(-o DPkg::Lock::Timeout=600)
    $SUDO apt-get "${APT_OPTS[@]}" update -qq
    $SUDO apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends \
        "${missing[@]}" fonts-liberation >/dev/null
else
    echo "browser-deps: chromium and chromium-driver already installed"
fi

for p in "${PKGS[@]}"; do
    printf '%-16s %s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p")"
done
/usr/bin/chromium --version 2>/dev/null  # its /etc/chromium.d/dev-shm snippet may print a harmless "[: unexpected operator"
/usr/bin/chromedriver --version
