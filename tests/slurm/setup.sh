#!/usr/bin/env bash
# A real one-node Slurm on this machine, for tests/integration/test_slurm.py (and the Dask
# `--cluster slurm` tests): Debian's slurmctld, slurmd, slurm-client and munge, started without systemd.
#
#   bash tests/slurm/setup.sh      # install if missing, configure, start, wait until the node is idle
#   bash tests/slurm/teardown.sh   # stop the daemons (--purge: also remove the packages and state)
#
# Idempotent: run it twice, or with the daemons already up, and it only checks. Needs root. Every wait
# is bounded (SLURM_SETUP_TIMEOUT seconds each, 60 by default); on failure it prints the daemons' logs
# and exits 1.
set -euo pipefail

TIMEOUT="${SLURM_SETUP_TIMEOUT:-60}"
CONF=/etc/slurm/slurm.conf
NODE="$(hostname -s)"
PACKAGES=(slurmctld slurmd slurm-client munge)
LOGS=(/var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log /var/log/munge/munged.log)

say() { echo "slurm-setup: $*"; }
die() {
    echo "slurm-setup: error: $*" >&2
    for log in "${LOGS[@]}"; do
        [ -f "$log" ] && { echo "--- tail of $log" >&2; tail -n 20 "$log" >&2; }
    done
    exit 1
}

# `wait_for SECONDS DESCRIPTION COMMAND...`: poll COMMAND until it succeeds, at most SECONDS.
wait_for() {
    local seconds="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${seconds}s waiting for $what"
        sleep 0.2
    done
}

# `alive PIDFILE NAME`: true when the pid file names a running NAME process. A zombie (a killed daemon
# that an init without a reaper keeps in the table) or a recycled pid does not count.
alive() {
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in "$2" | "$2-wlm") ;; *) return 1 ;; esac
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]
}

[ "$(id -u)" -eq 0 ] || die "needs root (it installs packages and starts system daemons)"
start=$SECONDS

# -- 1. install --------------------------------------------------------------------------------------
missing=()
for tool in slurmctld slurmd sinfo munged; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Keep the packages' maintainer scripts from starting daemons with no slurm.conf yet: a temporary
    # policy-rc.d refuses every start (only when the machine has none of its own).
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    # apt's chatter goes to a log, shown only when it fails.
    apt_log="$(mktemp /tmp/slurm-setup-apt.XXXXXX)"
    LOGS+=("$apt_log")
    install_packages() {
        timeout 600 apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$apt_log" 2>&1
    }
    installed=0
    # A fresh machine may have no package lists yet: update only when the first try fails.
    if install_packages || { timeout 300 apt-get update -q >>"$apt_log" 2>&1 && install_packages; }; then
        installed=1
    fi
    if [ -n "$own_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    [ "$installed" -eq 1 ] || die "apt-get could not install ${PACKAGES[*]}"
    rm -f "$apt_log"
    say "installed $(dpkg-query -W -f='${Version}' slurmctld) in $((SECONDS - start))s"
fi

# -- 2. munge ----------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 700 /etc/munge
    (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
if ! alive /run/munge/munged.pid munged; then
    say "starting munged as the munge user"
    rm -f /run/munge/munged.pid
    # Forks into the background once its socket is ready.
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
fi
wait_for "$TIMEOUT" "munge to encode and decode a credential" bash -c 'munge -n | unmunge'

# -- 3. slurm.conf -----------------------------------------------------------------------------------
# One node, this machine, reached on 127.0.0.1. config_overrides: the node has the CPUs and memory the
# file says whatever the hardware, so a 1-core runner does not drain it. Memory is not a consumable
# resource (CR_CPU), but RealMemory must cover a job's --mem (dask-jobqueue always sends one), or the
# job is refused. FORCE:4 lets four jobs share each CPU, so 4 array tasks and a few Dask workers run at
# once on 2 cores. No accounting: no slurmdbd, no sacct. cred_expire=15 and a scheduling pass every
# 2 s: a requeued job starts again after about 17 s instead of 120 s (a test requeues an array task).
wanted="$(
    cat <<EOF
# Written by tessmirror's tests/slurm/setup.sh: a one-node Slurm for the test suite.
ClusterName=tessmirror-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=15
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
)"
install -d -m 755 /etc/slurm /var/log/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$wanted" ]; then
    if alive /run/slurmctld.pid slurmctld || alive /run/slurmd.pid slurmd; then
        say "slurm.conf changed: restarting the daemons"
        bash "$(dirname "$0")/teardown.sh" --keep-munge
    fi
    say "writing $CONF (node $NODE, 2 CPUs, OverSubscribe=FORCE:4)"
    printf '%s\n' "$wanted" >"$CONF"
fi

# -- 4. the daemons ----------------------------------------------------------------------------------
if ! alive /run/slurmctld.pid slurmctld; then
    say "starting slurmctld"
    rm -f /run/slurmctld.pid
    slurmctld || die "slurmctld did not start"
fi
wait_for "$TIMEOUT" "slurmctld to answer" scontrol ping
if ! alive /run/slurmd.pid slurmd; then
    say "starting slurmd"
    rm -f /run/slurmd.pid
    slurmd || die "slurmd did not start"
fi

# -- 5. the node is idle -----------------------------------------------------------------------------
node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }
deadline=$((SECONDS + TIMEOUT))
while :; do
    state="$(node_state)"
    case "$state" in
    idle | mixed | allocated) break ;; # up and taking jobs (mixed/allocated: a job already runs)
    down* | drain* | drained*)
        # A node that went down with the last daemons (ReturnToService=2 resumes most cases itself).
        scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${TIMEOUT}s: node $NODE is '${state:-unknown}', not idle"
    sleep 0.2
done
say "ready in $((SECONDS - start))s: node $NODE is $state ($(sinfo --version))"
