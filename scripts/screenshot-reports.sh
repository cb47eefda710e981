#!/usr/bin/env bash
# Renders report pages to PNG in headless Chromium (Debian's `chromium` package), to look at
# what a reader sees. The charts are SVG rendered in Node, so the pages need no JavaScript.
#
#   scripts/screenshot-reports.sh [-o DIR] [-w WIDTH] [-h HEIGHT] [FILE.html[#section] ...]
#
# Default pages: report/index.html and runs/start/report.html (those that exist). A
# "#section" suffix (a heading's id, e.g. report/index.html#accuracy-per-dataset-and-method)
# shoots the page from that section on (a copy of the page without what comes before it:
# headless screenshots do not scroll). PNGs go to DIR (default /tmp/obfuscatune-screenshots),
# named after the page and section.
set -euo pipefail
out=/tmp/obfuscatune-screenshots width=1200 height=1600
while getopts "o:w:h:" opt; do
  case $opt in
    o) out=$OPTARG ;;
    w) width=$OPTARG ;;
    h) height=$OPTARG ;;
    *) echo "usage: $0 [-o DIR] [-w WIDTH] [-h HEIGHT] [FILE.html[#section] ...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
root=$(cd "$(dirname "$0")/.." && pwd)
pages=("$@")
if [ ${#pages[@]} -eq 0 ]; then
  for p in "$root/report/index.html" "$root/runs/start/report.html"; do [ -f "$p" ] && pages+=("$p"); done
fi
[ ${#pages[@]} -gt 0 ] || { echo "$0: no report found (run npm start or experiment paper first, or name the pages)" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "$0: chromium not found (apt-get install -y chromium)" >&2; exit 1; }
mkdir -p "$out"
for page in "${pages[@]}"; do
  file=${page%%#*} frag=
  [ "$file" != "$page" ] && frag=${page#*#}
  [ -f "$file" ] || { echo "$0: $file not found" >&2; exit 1; }
  abs=$(cd "$(dirname "$file")" && pwd)/$(basename "$file")
  name=$(echo "${abs#"$root"/}" | tr '/' '_' | sed 's/\.html$//')${frag:+_$frag}
  png="$out/$name.png" url="file://$abs"
  if [ -n "$frag" ]; then
    grep -q "id=\"$frag\"" "$file" || { echo "$0: $file has no section #$frag" >&2; exit 1; }
    tmp=$(mktemp --suffix=.html)
    sed "s#</body>#<script>{const t=document.getElementById('$frag');while(t.previousElementSibling)t.previousElementSibling.remove();}</script></body>#" "$file" > "$tmp"
    url="file://$tmp"
  fi
  # --no-sandbox: Chromium refuses to sandbox itself as root (containers, CI)
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --window-size="$width,$height" --screenshot="$png" "$url" >/dev/null 2>&1 \
    || { echo "$0: chromium failed on $page" >&2; exit 1; }
  [ -n "$frag" ] && rm -f "$tmp"
  echo "$png"
done
