# shellcheck shell=bash
# Sourced by build-deb.sh and build-rpm.sh: the checkout, its version, a clean PATH, apt
# installs of missing build tools, and a scratch copy of the tree to build in (so the
# checkout stays clean: no build/, *.egg-info or debian/ left behind).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIST=${DIST:-$ROOT/dist}
# The distro's python3 (and its lxml), never a pyenv shim or a virtualenv's.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/libvirt_bpfcg/__init__.py")
[ -n "$VERSION" ] || { echo "cannot read __version__ from libvirt_bpfcg/__init__.py" >&2; exit 2; }

for f in hooks/qemu hooks/50-libvirt-bpfcg packaging/libvirt-bpfcg.conf \
         packaging/systemd/libvirt-bpfcg-watch.service packaging/systemd/libvirt-bpfcg-hook.socket \
         packaging/systemd/libvirt-bpfcg-hook.service packaging/systemd/80-libvirt-bpfcg.preset; do
    [ -f "$ROOT/$f" ] || { echo "$f is missing from the checkout" >&2; exit 2; }
done

ensure_apt_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing build tools: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# copy_tree DEST: the checkout without VCS data, venvs, caches and earlier build output.
copy_tree() {
    mkdir -p "$1"
    tar -C "$ROOT" -cf - \
        --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=.ruff_cache --exclude=.hypothesis --exclude=./debian . |
        tar -C "$1" -xf -
}
