#!/usr/bin/env bash
# Open a run's HTML report in headless Chromium (Debian's `chromium` package), as a person would:
#   benchmarks/report_screenshot.sh PAGE [OUT.png] [WIDTH] [HEIGHT]   a screenshot (default report.png, 1280 x 2400)
#   benchmarks/report_screenshot.sh --dom PAGE [OUT.html]             the page's DOM once it has loaded (after its
#                                                                    load event's handlers: every image loaded or
#                                                                    failed; not after later asynchronous work),
#                                                                    to OUT.html or standard output
# e.g. benchmarks/report_screenshot.sh data/08_reporting/patchcore/report.html/<version>/report.html docs/figures/report.png
# The page must render with no network (every picture is embedded). CHROMIUM=/path/to/browser picks the browser.
set -euo pipefail
mode=screenshot
if [ "${1:-}" = "--dom" ]; then mode=dom; shift; fi
[ $# -ge 1 ] || { echo "usage: $0 [--dom] PAGE [OUT] [WIDTH] [HEIGHT]" >&2; exit 2; }
page="$(realpath "$1")"
width="${3:-1280}"; height="${4:-2400}"
browser="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
[ -n "$browser" ] || {
  echo "Error: no Chromium found: install Debian's chromium package (apt-get install chromium)" >&2; exit 1; }
profile="$(mktemp -d)"; trap 'rm -rf "$profile"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --user-data-dir="$profile/user" --hide-scrollbars
       --window-size="$width,$height")
log="$profile/chromium.log"
fail() { echo "Error: $browser $mode of $page failed (exit $1); its last messages:" >&2; tail -n 20 "$log" >&2; exit 1; }
if [ "$mode" = dom ]; then
  out="${2:--}"
  "$browser" "${flags[@]}" --dump-dom "file://$page" >"$profile/dom.html" 2>"$log" || fail $?
  [ -s "$profile/dom.html" ] || fail "0, but no DOM"
  if [ "$out" = - ]; then cat "$profile/dom.html"; else cp "$profile/dom.html" "$out"; echo "DOM of $page: $out"; fi
else
  out="$(realpath -m "${2:-report.png}")"; rm -f "$out"
  "$browser" "${flags[@]}" --screenshot="$out" "file://$page" 2>"$log" || fail $?
  [ -s "$out" ] || fail "0, but no screenshot"
  echo "screenshot of $page: $out"
fi
