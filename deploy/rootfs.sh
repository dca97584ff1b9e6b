#!/usr/bin/env bash
# Assembles the runtime image's file system in DEST: the fhirflow binary, the
# shared libraries it links (as ldd lists them), the CA bundle its TLS client
# trusts, and a world-writable /tmp (dedup spills there). deploy/Dockerfile's
# build stage runs it; so can a machine without a registry, to build the
# runtime stage from a binary it already has.
#
#   deploy/rootfs.sh BINARY DEST
set -euo pipefail
bin=$1
dest=$2
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
mkdir -p "$dest/usr/local/bin" "$dest/etc/ssl/certs" "$dest/tmp"
chmod 1777 "$dest/tmp"
cp "$bin" "$dest/usr/local/bin/fhirflow"
# Each library at the path the dynamic loader looks for it.
ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    cp --parents -L "$lib" "$dest/"
done
cp -L "$ca" "$dest/etc/ssl/certs/ca-certificates.crt"
echo "rootfs.sh: $dest: fhirflow, $(ldd "$bin" | grep -c '/') libraries, the CA bundle"
