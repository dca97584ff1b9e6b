#!/usr/bin/env bash
# Builds deploy/Dockerfile's runtime stage with podman from a binary this
# machine already has (no registry: the build stage's Rust image cannot be
# pulled here), then runs `fhirflow --version` and one `fhirflow run` on
# the bundled sample data inside it, with no network.
#
#   tests/deploy/container.sh [BINARY]      (default target/debug/fhirflow)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/debug/fhirflow}
command -v podman >/dev/null || { echo "container.sh: podman is not installed (apt-get install podman)" >&2; exit 1; }
work=$(mktemp -d)
tag=localhost/fhirflow-check-$$
trap 'podman rmi -f "$tag" "$tag-rootfs" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
deploy/rootfs.sh "$bin" "$work/ctx/rootfs"
printf 'FROM scratch\nCOPY rootfs /rootfs\n' > "$work/ctx/Containerfile"
podman build -q -t "$tag-rootfs" "$work/ctx" >/dev/null
mkdir "$work/empty"
podman build -q -f deploy/Dockerfile --target runtime \
    --build-arg ROOTFS_FROM="$tag-rootfs" -t "$tag" "$work/empty" >/dev/null
echo "container.sh: built $tag"
podman image inspect "$tag" --format 'entrypoint {{.Config.Entrypoint}}, user {{.Config.User}}, {{.Size}} bytes'

# `podman run` cannot start containers on this machine (crun's setrlimit is
# refused inside the sandbox), so the image runs the way a runtime would,
# by hand: a container of it is created and mounted (its own writable
# layer over the image's), and its entrypoint started in that root with no
# network, as the image's user, with only the image's environment.
ctr=$(podman create "$tag")
trap 'podman rm -f "$ctr" >/dev/null 2>&1 || true; podman rmi -f "$tag" "$tag-rootfs" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
root=$(podman mount "$ctr")
user=$(podman image inspect "$tag" --format '{{.Config.User}}')
mapfile -t envs < <(podman image inspect "$tag" --format '{{range .Config.Env}}{{println .}}{{end}}' | grep .)
unshare=$(command -v unshare)
chroot=$(command -v chroot)
in_image() {
    env -i "${envs[@]}" "$unshare" --net --fork "$chroot" --userspec="$user" "$root" "$@"
}

version=$(in_image /usr/local/bin/fhirflow --version)
echo "container.sh: fhirflow --version in the image: $version"
[ "$version" = "$("$bin" --version)" ] || { echo "container.sh: the image's version differs from the binary's" >&2; exit 1; }

cp -r tests/data/synthea-10 "$root/sample"
mkdir -p "$root/lake" && chmod 777 "$root/lake"
in_image /usr/local/bin/fhirflow --lake /lake --quiet \
    run /sample --output json --tenant 0f8fad5b-d9cb-469f-a165-70867728950e --source-system synthea --date 2026-11-30 \
    > "$work/run.json"
python3 - "$work/run.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
assert doc.get("exit_code", 0) == 0, doc
print("container.sh: fhirflow run in the image:", json.dumps(doc)[:300])
PY
ls "$root/lake/curated/tenantGuid=0f8fad5b-d9cb-469f-a165-70867728950e/import_date=2026-11-30/"
echo "container.sh: ok"
