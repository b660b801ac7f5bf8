# Sourced by the GPU scripts (gpu_check.sh, gpu_accuracy.sh) as `. gpu_setup.sh NAME [OUT] [WORK]`: OUT (default NAME)
# made and made absolute, WORK (default /tmp/fpt_NAME) made, the repository root the working directory, PY the
# machine's python3 (or $PYTHON) with the project's src/ on PYTHONPATH, so nothing is installed.
OUT=$(mkdir -p "${2:-$1}" && cd "${2:-$1}" && pwd)
WORK=${3:-/tmp/fpt_$1}
mkdir -p "$WORK"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
