#!/bin/sh
# Renders tonight's labelling RayJob: the TEMPLATE files joined in order (the RayJob's head, then its Ray
# cluster), with every ${NAME} replaced by the environment variable NAME. Runs in the CronJob's init container
# (busybox sh + awk) and, unchanged, in the tests.
#
#   render-label-rayjob.sh OUTPUT TEMPLATE...
#
# RUN_DATE defaults to today's date in UTC; set it (YYYY-MM-DD) to render a backfill by hand.
set -eu

output=${1:?usage: render-label-rayjob.sh OUTPUT TEMPLATE...}
shift
[ $# -gt 0 ] || { echo "usage: render-label-rayjob.sh OUTPUT TEMPLATE..." >&2; exit 2; }

RUN_DATE=${RUN_DATE:-$(date -u +%F)}
case "$RUN_DATE" in
  [0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]) ;;
  *) echo "render: RUN_DATE must be YYYY-MM-DD, got '$RUN_DATE'" >&2; exit 2 ;;
esac
export RUN_DATE

# envsubst without gettext: awk reads the values from ENVIRON, and an unset name is an error, never an
# empty string that would yield a RayJob with holes in it. Comment lines are dropped, not rendered.
awk '
  /^[[:space:]]*#/ { next }
  {
    line = $0; out = ""
    while (match(line, /\$\{[A-Za-z_][A-Za-z0-9_]*\}/)) {
      name = substr(line, RSTART + 2, RLENGTH - 3)
      if (!(name in ENVIRON)) { printf "render: %s is not set\n", name > "/dev/stderr"; exit 3 }
      out = out substr(line, 1, RSTART - 1) ENVIRON[name]
      line = substr(line, RSTART + RLENGTH)
    }
    print out line
  }
' "$@" > "$output"

echo "render: genre-label-$RUN_DATE -> $output"
