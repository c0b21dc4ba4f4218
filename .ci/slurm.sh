#!/usr/bin/env bash
# Local single-node Slurm for tests (Debian 12, run as root).
#   .ci/slurm.sh install   install slurmctld, slurmd, slurm-client and munge (idempotent)
# The daemons are started and stopped by the pytest fixture in tests/slurm_cluster.py.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

installed() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || return 1
    done
}

restore_policy() {
    if [ -n "$saved" ]; then mv -f "$saved" "$policy"; saved=; else rm -f "$policy"; fi
}

install() {
    if installed; then
        echo "slurm: already installed ($(slurmctld -V))"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || { echo "slurm: install needs root" >&2; exit 1; }
    # No systemd here: stop the packages' post-install scripts from starting daemons.
    # The fixture starts them by hand with its own config.
    # An existing policy-rc.d (Docker images ship one) is kept aside and put back afterwards.
    policy=/usr/sbin/policy-rc.d
    saved=
    if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
    trap restore_policy EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    local start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    local log
    log=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "slurm: install failed" >&2
        exit 1
    fi
    rm -f "$log"
    restore_policy
    trap - EXIT
    echo "slurm: installed ${PACKAGES[*]} ($(slurmctld -V)) in $((SECONDS - start)) s"
}

case "${1:-}" in
    install) install ;;
    *) echo "usage: $0 install" >&2; exit 2 ;;
esac
