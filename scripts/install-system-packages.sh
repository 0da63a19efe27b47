#!/usr/bin/env bash
# Debian/Ubuntu packages for the service tests and for running a local team
# stack: a single-node SLURM cluster (slurm-wlm, munge), PostgreSQL for the
# MLflow tracking server, and an Orthanc DICOM server with its DICOMweb plugin
# (orthanc, orthanc-dicomweb) for the DICOMweb pull/push tests. Needs root (or
# sudo) and apt-get. Idempotent.
set -euo pipefail
packages=(slurm-wlm munge postgresql orthanc orthanc-dicomweb)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null || true  # a stale index still works when the packages are cached
# Wait for another apt/dpkg run (e.g. a parallel test worker) instead of failing.
$SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
