#!/bin/bash
# make deb: builds dist/libvirt-bpfcg_VERSION_all.deb from this checkout with
# dpkg-buildpackage, in a scratch copy with packaging/debian as debian/.
set -euo pipefail
# shellcheck source=packaging/build-common.sh
source "$(dirname "$0")/build-common.sh"

changelog_version=$(sed -n '1s/^libvirt-bpfcg (\([^)]*\)).*/\1/p' "$ROOT/packaging/debian/changelog")
if [ "${changelog_version%%-*}" != "$VERSION" ]; then
    echo "packaging/debian/changelog says $changelog_version, the package $VERSION:" \
         "add a changelog entry" >&2
    exit 2
fi

ensure_apt_packages dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all \
    python3-setuptools python3-lxml

work=$(mktemp -d /tmp/libvirt-bpfcg-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src=$work/libvirt-bpfcg-$VERSION
copy_tree "$src"
cp -r "$ROOT/packaging/debian" "$src/debian"
(cd "$src" && dpkg-buildpackage -us -uc -b) > "$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "dpkg-buildpackage failed (log above)" >&2
    exit 1
}
mkdir -p "$DIST"
rm -f "$DIST"/libvirt-bpfcg_*_all.deb "$DIST"/libvirt-bpfcg_*.changes "$DIST"/libvirt-bpfcg_*.buildinfo
cp "$work"/libvirt-bpfcg_"$VERSION"_all.deb "$work"/libvirt-bpfcg_"$VERSION"_*.changes \
   "$work"/libvirt-bpfcg_"$VERSION"_*.buildinfo "$DIST"/
echo "$DIST/libvirt-bpfcg_${VERSION}_all.deb"
