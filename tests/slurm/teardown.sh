#!/usr/bin/env bash
# Stops what tests/slurm/setup.sh started: running jobs, slurmd, slurmctld and munged.
#
#   bash tests/slurm/teardown.sh               # stop the daemons (setup.sh starts them again)
#   bash tests/slurm/teardown.sh --purge       # also purge the packages, slurm.conf and Slurm's state
#   bash tests/slurm/teardown.sh --keep-munge  # stop Slurm only (setup.sh uses it after a config change)
#
# Idempotent: with nothing running (or nothing installed) it does nothing and exits 0. Needs root.
set -euo pipefail

purge="" keep_munge=""
for arg in "$@"; do
    case "$arg" in
    --purge) purge=1 ;;
    --keep-munge) keep_munge=1 ;;
    *)
        echo "slurm-teardown: unknown option '$arg' (use --purge or --keep-munge)" >&2
        exit 2
        ;;
    esac
done
say() { echo "slurm-teardown: $*"; }
[ "$(id -u)" -eq 0 ] || {
    echo "slurm-teardown: error: needs root" >&2
    exit 1
}

# `alive PID NAME`: true while PID is a running NAME process (a zombie or a recycled pid does not count).
alive() {
    case "$(cat "/proc/$1/comm" 2>/dev/null)" in "$2" | "$2-wlm") ;; *) return 1 ;; esac
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# `stop NAME PIDFILE`: SIGTERM, wait up to 30 s for the process to go, then SIGKILL; remove the pid file.
stop() {
    local name="$1" pidfile="$2" pid
    pid="$(cat "$pidfile" 2>/dev/null)" || pid=""
    if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while alive "$pid" "$name" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        if alive "$pid" "$name"; then
            say "$name (pid $pid) ignored SIGTERM for 30s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name (pid $pid)"
    fi
    # A pid file left behind makes the next start, and slurmctld's prerm (scancel), trip over it.
    rm -f "$pidfile"
}

# Jobs first, while the controller still answers: their processes would outlive slurmd otherwise.
if command -v scancel >/dev/null && alive "$(cat /run/slurmctld.pid 2>/dev/null)" slurmctld; then
    timeout 20 scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true
    timeout 20 scancel --user=root >/dev/null 2>&1 || true
fi
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
[ -n "$keep_munge" ] || stop munged /run/munge/munged.pid

if [ -n "$purge" ]; then
    packages=()
    for p in slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge libmunge2; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok' && packages+=("$p")
    done
    if [ "${#packages[@]}" -gt 0 ]; then
        say "purging ${packages[*]}"
        # The maintainer scripts would stop daemons through invoke-rc.d; they are stopped already.
        own_policy=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            own_policy=1
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        DEBIAN_FRONTEND=noninteractive timeout 300 apt-get purge -y -q "${packages[@]}"
    fi
    rm -rf /etc/slurm/slurm.conf /var/lib/slurm /var/log/slurm /run/munge
fi
say "done"
