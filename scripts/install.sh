#!/usr/bin/env bash
# Install everything ltssl needs into .venv, system packages included. Idempotent: when nothing
# changed since the last successful run (same requirements, same script), it returns in seconds.
# Every failure names the missing piece.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed
APT_PACKAGES=(
  # FFCV's C extension links against OpenCV and libjpeg-turbo, found through pkg-config.
  libopencv-dev libturbojpeg0-dev pkg-config
  # The local Slurm cluster used by the tests: controller, node daemon, clients, accounting.
  slurmctld slurmd slurm-client slurmdbd munge mariadb-server
  # Network namespaces and veths for the two-node test cluster.
  iproute2 util-linux procps
)

die() { echo "install: $*" >&2; exit 1; }

want=$(cat requirements.txt pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  echo "install: up to date ($VENV)"
  exit 0
fi

# ---- system packages
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "install: apt packages: ${missing[*]}"
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
  [[ $(id -u) == 0 ]] || SUDO=sudo
  ${SUDO:-} apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install failed for: ${missing[*]}"
fi
for bin in sinfo sbatch sacct slurmctld slurmd slurmdbd munged mungekey mariadbd mariadb-install-db pkg-config ip nsenter unshare; do
  command -v "$bin" >/dev/null || [[ -x /usr/sbin/$bin ]] || die "missing program '$bin' after the apt install"
done

# ---- Python packages, exact pins from requirements.txt
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' || die "Python >= 3.11 required ($PYTHON)"
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV" || die "could not create $VENV (python3-venv missing?)"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# FFCV builds its extension against numpy and the apt libraries: everything else first, FFCV last.
grep -v '^ffcv' requirements.txt >"$VENV/.req-base.txt"
"${PIP[@]}" install -r "$VENV/.req-base.txt" 2>&1 | grep -v '^WARNING: Location' || true
"${PIP[@]}" install "$(grep '^ffcv' requirements.txt)" 2>&1 | grep -v '^WARNING: Location' || true
"${PIP[@]}" install --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true

for mod in torch torchvision ffcv numba numpy ray ray.tune submitit pandas pyarrow yaml sklearn matplotlib kornia optuna rich pytest pytest_timeout \
    tensorboard torch.utils.tensorboard wandb mlflow ltssl; do
  "$VENV/bin/python" -c "import $mod" 2>/dev/null || die "Python package '$mod' does not import in $VENV (see pip output above)"
done
echo "$want" >"$STAMP"
echo "install: done ($VENV)"
