#!/usr/bin/env bash
# Packages the fhirflow binary as the deployment package of a Lambda function
# on the custom runtime provided.al2023: a zip with the binary as `bootstrap`
# at its root, executable. Lambda runs `bootstrap` with no arguments and
# AWS_LAMBDA_RUNTIME_API set, which makes fhirflow serve invocations.
#
#   deploy/package-lambda.sh [BINARY] [ZIP]
#
# BINARY defaults to target/release/fhirflow (built with
# `cargo build --release -p fhirflow`), ZIP to target/lambda/fhirflow.zip.
# The binary must run on Amazon Linux 2023 (glibc 2.34): build it there, or
# in deploy/Dockerfile's build stage, not on a newer distribution.
set -euo pipefail
bin=${1:-target/release/fhirflow}
out=${2:-target/lambda/fhirflow.zip}
if [ ! -x "$bin" ]; then
    echo "package-lambda: no executable at $bin (cargo build --release -p fhirflow)" >&2
    exit 1
fi
mkdir -p "$(dirname "$out")"
# Python's zipfile is on every machine the test suite runs on; the zip's
# entry carries the executable mode (Lambda keeps it).
python3 - "$bin" "$out" <<'PY'
import os, sys, zipfile
src, out = sys.argv[1], sys.argv[2]
part = out + ".part"
with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
    info = zipfile.ZipInfo("bootstrap")
    info.external_attr = 0o100755 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    with open(src, "rb") as f, z.open(info, "w") as w:
        while chunk := f.read(1 << 20):
            w.write(chunk)
os.replace(part, out)
PY
echo "package-lambda: $out ($(stat -c %s "$out") bytes): bootstrap <- $bin"
