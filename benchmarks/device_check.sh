#!/usr/bin/env bash
# Every figure a short GPU or MLU rental should produce, from a bare checkout, in under 8 minutes,
# on the host's own packages: no package index is needed.
#
#   bash benchmarks/device_check.sh [OUT] [device_check.py options]     (OUT defaults to device_check)
#
# 1. install, at most INSTALL_LIMIT_S seconds (log OUT/install.log, record OUT/install.json):
#    a. a venv (DEVICE_CHECK_VENV, default .venv) that sees the host interpreter's packages: the
#       host's torch, and torch_mlu on an MLU host, which pip cannot install;
#    b. the project alone (--no-deps --no-build-isolation: nothing is fetched, the host's
#       setuptools builds it);
#    c. what the host lacks of the requirements (benchmarks/host_packages.py), only where an index
#       answers, with torch, torch_mlu and torchvision pinned as installed so pip never replaces
#       the vendor's torch (a missing torchvision would otherwise pull torch from the index).
#    Whatever fails here, step 2 runs: from the checkout if the project could not be installed.
# 2. benchmarks/device_check.py with what is left of DEVICE_CHECK_TOTAL_S: trainer env, data,
#    then each measurement under its own time limit; OUT/device_check.json records which
#    optional pieces are missing ("packages"). Figures: OUT/device_check.json; a table:
#    OUT/table.txt (also printed); each phase's output: OUT/logs/.
# Runs unchanged on CUDA and MLU hosts: the trainer picks the device (MLU first, then CUDA).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-device_check}
shift $(( $# > 0 ? 1 : 0 ))
TOTAL_S=${DEVICE_CHECK_TOTAL_S:-470}
INSTALL_LIMIT_S=${INSTALL_LIMIT_S:-150}
PYTHON=${PYTHON:-python3}
VENV=${DEVICE_CHECK_VENV:-.venv}
mkdir -p "$OUT"
LOG="$OUT/install.log"
: >"$LOG"
start=$(date +%s)
left() { local s=$(( INSTALL_LIMIT_S - ($(date +%s) - start) )); echo $(( s > 1 ? s : 1 )); }

status=ok
mode="no-deps"
fetched=""
index="not needed"
if [ ! -x "$VENV/bin/python" ]; then
  # --without-pip: the host's pip and setuptools build the project (Python 3.11's bundled
  # setuptools 65 would shadow them, and cannot build a wheel without the `wheel` package).
  "$PYTHON" -m venv --system-site-packages --without-pip "$VENV" >>"$LOG" 2>&1 || status="venv failed"
  if [ "$status" = ok ]; then
    # NOTE: --system-site-packages exposes the *base* interpreter's packages. Where $PYTHON is
    # itself a venv (the lent GPU machines run /opt/torch/.venv/bin/python3) torch lives in that
    # venv, which the new one would not see; a .pth file adds the host's own site directories
    # after the new venv's, so what is installed here wins and everything else is the host's.
    site_dir=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' >"$site_dir/_device_check_host.pth" 2>>"$LOG" \
      || status="could not read the host's site directories"
  fi
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || PY=$PYTHON

if [ "$status" = ok ]; then
  if ! timeout "$(left)" "$PY" -m pip install --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
    mode="checkout"  # device_check.py runs from the checkout (it puts the repo on sys.path)
    status="project not installed (see $LOG); running from the checkout"
  fi
  "$PY" benchmarks/host_packages.py --pins >"$OUT/host-pins.txt" 2>>"$LOG"
  mapfile -t missing < <("$PY" benchmarks/host_packages.py --missing 2>>"$LOG")
  if [ "${#missing[@]}" -gt 0 ]; then
    # One quick probe: an unreachable index costs seconds here, not pip's retries per package.
    probe=$(mktemp -d)
    if timeout "$(left)" "$PY" -m pip download --no-deps --retries 0 --timeout 10 -d "$probe" "${missing[0]}" \
        >>"$LOG" 2>&1; then
      index="reachable"
      if timeout "$(left)" "$PY" -m pip install -c "$OUT/host-pins.txt" "${missing[@]}" >>"$LOG" 2>&1; then
        fetched="${missing[*]}"
      else
        echo "could not install ${missing[*]}; the phases run without them" >>"$LOG"
      fi
    else
      index="unreachable"
      echo "no package index answers; the phases run without: ${missing[*]}" >>"$LOG"
    fi
    rm -rf "$probe"
  fi
fi
install_s=$(( $(date +%s) - start ))
"$PY" - "$status" "$mode" "$install_s" "$index" "$fetched" "$OUT/host-pins.txt" >"$OUT/install.json" <<'EOF'
import json, os, sys
status, mode, seconds, index, fetched, pins = sys.argv[1:]
pinned = open(pins).read().split() if os.path.exists(pins) else []
record = {"status": status, "mode": mode, "seconds": int(seconds), "index": index}
print(json.dumps({**record, "fetched": fetched.split(), "pinned": pinned}))
EOF
echo "install: $status ($mode) in ${install_s} s"

exec "$PY" benchmarks/device_check.py --out "$OUT" --budget-s "$(( TOTAL_S - install_s ))" --install "$OUT/install.json" "$@"
