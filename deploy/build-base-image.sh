#!/usr/bin/env bash
# Build a slim Debian bookworm + Python 3.11 base image from Debian's packages, for machines that reach Debian's
# mirror but no container registry (the Dockerfile's default base, python:3.11-slim, comes from a registry).
#   deploy/build-base-image.sh [IMAGE_NAME]      (default localhost/ketamine-cds-base:bookworm; needs root)
# Then: podman build --build-arg BASE_IMAGE=localhost/ketamine-cds-base:bookworm -f deploy/Dockerfile .
set -euo pipefail
image="${1:-localhost/ketamine-cds-base:bookworm}"
engine="$(command -v podman || command -v docker)"
root="$(mktemp -d /var/tmp/ketamine-cds-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
  http://deb.debian.org/debian >/dev/null
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
tar -C "$root" -c . | "$engine" import --change 'CMD ["python3"]' - "$image" >/dev/null
echo "$image"
