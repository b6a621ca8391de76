#!/usr/bin/env bash
# Open a run's HTML report in headless Chromium (Debian's `chromium` package) and screenshot it:
#   benchmarks/report_screenshot.sh data/08_reporting/patchcore/report.html/<version>/report.html docs/figures/report.png
# The page must render with no network (every picture is embedded).
set -euo pipefail
page="$(realpath "$1")"; out="${2:-report.png}"; width="${3:-1280}"; height="${4:-2400}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome)" || {
  echo "Error: no Chromium found: install Debian's chromium package (apt-get install chromium)" >&2; exit 1; }
profile="$(mktemp -d)"; trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size="$width,$height" --screenshot="$(realpath -m "$out")" "file://$page" 2>/dev/null
echo "screenshot of $page: $out"
