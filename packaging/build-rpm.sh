#!/bin/bash
# make rpm: builds dist/libvirt-bpfcg-VERSION-1.noarch.rpm from this checkout with rpmbuild
# (Debian's "rpm" package provides it), from a source tarball of the checkout.
#
# On a non-RPM system the BuildRequires cannot be checked against an RPM database, hence
# --nodeps; the spec falls back to pip and Fedora's path layout where the %pyproject and
# systemd macros are missing. On Fedora/RHEL, "rpmbuild -ba packaging/rpm/libvirt-bpfcg.spec"
# with the tarball in SOURCES is the normal way.
set -euo pipefail
# shellcheck source=packaging/build-common.sh
source "$(dirname "$0")/build-common.sh"

SPEC=$ROOT/packaging/rpm/libvirt-bpfcg.spec
spec_version=$(sed -n 's/^Version:[[:space:]]*//p' "$SPEC")
if [ "$spec_version" != "$VERSION" ]; then
    echo "packaging/rpm/libvirt-bpfcg.spec says Version $spec_version, the package $VERSION" >&2
    exit 2
fi

# python3-pip: the fallback install; python3-lxml: the man page generator imports the CLI.
ensure_apt_packages rpm python3-pip python3-setuptools python3-lxml

work=$(mktemp -d /tmp/libvirt-bpfcg-rpm.XXXXXX)
trap 'rm -rf "$work"' EXIT
top=$work/rpmbuild
mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
copy_tree "$work/libvirt-bpfcg-$VERSION"
tar -C "$work" -czf "$top/SOURCES/libvirt-bpfcg-$VERSION.tar.gz" "libvirt-bpfcg-$VERSION"
# HOME: pip and rpm must not read or write the invoking user's configuration and caches.
HOME=$work rpmbuild -bb --nodeps \
    --define "_topdir $top" \
    --define "_build_id_links none" \
    "$SPEC" > "$work/build.log" 2>&1 || {
    tail -n 60 "$work/build.log" >&2
    echo "rpmbuild failed (log above)" >&2
    exit 1
}
mkdir -p "$DIST"
rm -f "$DIST"/libvirt-bpfcg-*.noarch.rpm
cp "$top"/RPMS/noarch/libvirt-bpfcg-"$VERSION"-*.noarch.rpm "$DIST"/
ls "$DIST"/libvirt-bpfcg-"$VERSION"-*.noarch.rpm
