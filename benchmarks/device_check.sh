#!/usr/bin/env bash
# Every figure a short GPU or MLU rental should produce, from a bare checkout, in under 8 minutes.
#
#   bash benchmarks/device_check.sh [OUT] [device_check.py options]     (OUT defaults to device_check)
#
# 1. install: the README's command (python3 -m venv .venv && .venv/bin/pip install -e .), with
#    --system-site-packages so the host's own torch (and torch_mlu on an MLU host, which pip
#    cannot install) is used, plus the `fast` extra (simplejpeg); at most INSTALL_LIMIT_S seconds;
# 2. benchmarks/device_check.py with what is left of DEVICE_CHECK_TOTAL_S: trainer env, data,
#    then each measurement under its own time limit. Figures: OUT/device_check.json; a
#    table: OUT/table.txt (also printed); each phase's output: OUT/logs/.
# Runs unchanged on CUDA and MLU hosts: the trainer picks the device (MLU first, then CUDA).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-device_check}
shift $(( $# > 0 ? 1 : 0 ))
TOTAL_S=${DEVICE_CHECK_TOTAL_S:-470}
INSTALL_LIMIT_S=${INSTALL_LIMIT_S:-150}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
start=$(date +%s)

status=ok
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv --system-site-packages .venv >"$OUT/install.log" 2>&1 || status="venv failed"
fi
if [ "$status" = ok ]; then
  left=$(( INSTALL_LIMIT_S - ($(date +%s) - start) ))
  if ! timeout "$left" .venv/bin/pip install -e '.[fast]' >>"$OUT/install.log" 2>&1; then
    # simplejpeg is optional: without a wheel for this host, install the package alone.
    left=$(( INSTALL_LIMIT_S - ($(date +%s) - start) ))
    timeout "$(( left > 1 ? left : 1 ))" .venv/bin/pip install -e . >>"$OUT/install.log" 2>&1 \
      || status="pip install failed or timed out (exit $?), see $OUT/install.log"
  fi
fi
install_s=$(( $(date +%s) - start ))
printf '{"status": "%s", "seconds": %d, "command": "python3 -m venv --system-site-packages .venv && .venv/bin/pip install -e .[fast]"}\n' \
  "$status" "$install_s" >"$OUT/install.json"
echo "install: $status in ${install_s} s"

PY=.venv/bin/python
[ -x "$PY" ] || PY=$PYTHON
exec "$PY" benchmarks/device_check.py --out "$OUT" --budget-s "$(( TOTAL_S - install_s ))" --install "$OUT/install.json" "$@"
