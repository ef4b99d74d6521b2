#!/usr/bin/env bash
# `make fresh-check`: the first run on a new machine, reproduced here. A clean clone of HEAD in a temporary folder,
# nothing cached (pip's cache off, a new venv), then the README's two commands, `make demo` and `make test`, each
# timed. Writes fresh-check.json (or $FRESH_OUT) and exits non-zero when a step fails. Uncommitted changes are not
# in the clone: commit first. ../shared (real images, when present) is linked beside the clone as in a checkout.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${FRESH_OUT:-$repo/fresh-check.json}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone --quiet "$repo" "$tmp/cytosae" || exit 1
[ -d "$repo/../shared" ] && ln -s "$(cd "$repo/../shared" && pwd)" "$tmp/shared"
export PIP_NO_CACHE_DIR=1 CI=true
cd "$tmp/cytosae"
results=()
status=0
step() {  # step NAME COMMAND...: runs, times, records; later steps still run so one report shows every failure
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$tmp/$name.log" 2>&1
  local rc=$?
  local secs=$((SECONDS - t0))
  echo "$name: rc=$rc in ${secs} s ($(tail -n 1 "$tmp/$name.log"))"
  [ $rc -ne 0 ] && { status=1; tail -n 30 "$tmp/$name.log"; }
  results+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $secs}")
}
step venv make .venv/.installed
step demo make demo
step test make test
summary=$(grep -aoE '[0-9]+ (passed|failed)[^=]* in [0-9.]+s' "$tmp/test.log" | tail -n 1)
# a suite that ends without pytest's summary line did not run to the end, whatever its exit code
[ -n "$summary" ] || { status=1; echo "fresh-check: make test printed no pytest summary"; tail -n 20 "$tmp/test.log"; }
mkdir -p "$out.logs" && cp "$tmp"/*.log "$out.logs/"
{
  echo "{\"commit\": \"$(git rev-parse HEAD)\", \"date\": \"$(date -u +%FT%TZ)\", \"cpus\": $(nproc),"
  echo " \"pytest\": \"${summary//\"/}\","
  echo " \"steps\": [$(IFS=,; echo "${results[*]}")]}"
} > "$out"
echo "fresh-check: $(cat "$out")"
exit $status
