#!/usr/bin/env bash
# A real single-node SLURM on this machine, on loopback only, for testing train_hier.sh and the
# submitit launcher.
#
#   scripts/slurm_local.sh up       install (Debian/Ubuntu packages, as root) and start munged,
#                                   slurmctld and slurmd; wait until the node is idle. Idempotent.
#   scripts/slurm_local.sh down     cancel the jobs, stop exactly the daemons that `up` started
#   scripts/slurm_local.sh status   daemons, partition and node state; exit 0 only when usable
#
# Environment:
#   SLURM_LOCAL_DIR        state, spool, logs and pid files (default /var/lib/dino_hier-slurm)
#   SLURM_LOCAL_PARTITION  name of the one (default) partition (default "debug")
#
# The configuration goes to /etc/slurm/slurm.conf, where every SLURM command looks for it. A
# slurm.conf that this script did not write (a real cluster's) is never touched: `up` stops.
# Every address is 127.0.0.1; slurmd and srun bind to it (NoInAddrAny). slurmctld 22.05 still
# listens on all interfaces, but answers only requests signed with this machine's munge key.
set -euo pipefail

STATE_DIR=${SLURM_LOCAL_DIR:-/var/lib/dino_hier-slurm}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by dino_hier scripts/slurm_local.sh"
NODE=$(uname -n | cut -d. -f1)   # the short host name, as slurmd finds its own node name
STARTED="$STATE_DIR/run/started"   # one line per daemon that `up` started: munged, slurmctld, slurmd
PACKAGES=(slurmctld slurmd slurm-client munge)

mark_started() { grep -qx "$1" "$STARTED" 2>/dev/null || echo "$1" >>"$STARTED"; }
log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "'$1' needs root (it installs packages and starts daemons)"; }

# A live process (not a zombie that nobody has reaped yet) whose pid is in file $1.
pid_alive() {
    local pid
    [ -s "$1" ] && pid=$(cat "$1") && [ -r "/proc/$pid/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]}"
    # Keep the packages' init scripts from starting daemons: this script starts (and stops) them.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2 || {
            [ "$made_policy" -eq 0 ] || rm -f "$policy"
            die "apt-get could not install ${PACKAGES[*]}"
        }
    fi
    [ "$made_policy" -eq 0 ] || rm -f "$policy"
}

munge_works() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then return; fi
    local key=/etc/munge/munge.key
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s "$key" ]; then
        log "creating the munge key $key"
        (umask 077 && dd if=/dev/urandom of="$key" bs=1024 count=1 status=none)
    fi
    chown munge:munge "$key" && chmod 0400 "$key"
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged 9>&-
    mark_started munged
    for _ in $(seq 50); do munge_works && return; sleep 0.2; done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's configuration"
    fi
    local cpus memory
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys those variables: the cores, not a thread setting
    # slurmd drains a node that reports less memory than configured: stay a little below the total.
    memory=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)
    mkdir -p /etc/slurm
    cat >"$CONF.tmp" <<EOF
$MARKER: a single-node cluster on 127.0.0.1.
ClusterName=dinohier
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after cred_expire seconds (default 120, minimum 5).
AuthInfo=cred_expire=5
CredType=cred/munge
CommunicationParameters=NoInAddrAny
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=30
MinJobAge=4
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$CONF.tmp" "$CONF"; then rm "$CONF.tmp"; return 1; fi
    mv "$CONF.tmp" "$CONF"
    return 0
}

# Node state as sinfo prints it (idle, mixed, down*, drained, ...), empty when slurmctld is away.
node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }

wait_node_ready() {
    local state=""
    for _ in $(seq 120); do
        state=$(node_state)
        case "$state" in
        idle | mixed | allocated | completing) return 0 ;;
        down* | drain* | fail*)
            # Left down or drained by an earlier run (e.g. slurmd stopped under it): bring it back.
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE is '${state:-unknown}', not idle; see $STATE_DIR/log/slurmctld.log and slurmd.log"
}

up() {
    if [ "$(id -u)" -ne 0 ] && status >/dev/null 2>&1; then
        log "already up"
        return 0
    fi
    need_root up
    mkdir -p "$STATE_DIR"/{state,spool,log,run}
    # One `up` or `down` at a time (the daemons must not inherit the lock: they get 9>&-).
    exec 9>"$STATE_DIR/run/lock"
    flock 9
    install_packages
    touch "$STARTED"
    start_munge
    if write_conf; then
        # Some settings (cred_expire, ports) are read only at start: restart rather than reconfigure.
        # Running jobs survive: slurmctld keeps its state on disk, job steps do not depend on slurmd.
        stop_pidfile slurmd "$STATE_DIR/run/slurmd.pid"
        stop_pidfile slurmctld "$STATE_DIR/run/slurmctld.pid"
    fi
    if ! pid_alive "$STATE_DIR/run/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld 9>&-
        mark_started slurmctld
    fi
    if ! pid_alive "$STATE_DIR/run/slurmd.pid"; then
        log "starting slurmd"
        slurmd 9>&-
        mark_started slurmd
    fi
    wait_node_ready
    log "up: node $NODE ($(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs) in partition $PARTITION is $(node_state)"
}

stop_pidfile() {
    local name=$1 pidfile=$2 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 50); do pid_alive "$pidfile" || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    need_root down
    [ -d "$STATE_DIR/run" ] || { log "nothing to stop"; return 0; }
    exec 9>"$STATE_DIR/run/lock"
    flock 9
    if grep -qx slurmctld "$STARTED" 2>/dev/null && pid_alive "$STATE_DIR/run/slurmctld.pid"; then
        # Cancel the jobs first, so that no job step outlives the daemons.
        scancel --partition="$PARTITION" >/dev/null 2>&1 || true
        for _ in $(seq 60); do
            [ -z "$(squeue -h -p "$PARTITION" -o %i 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    grep -qx slurmd "$STARTED" 2>/dev/null && stop_pidfile slurmd "$STATE_DIR/run/slurmd.pid"
    grep -qx slurmctld "$STARTED" 2>/dev/null && stop_pidfile slurmctld "$STATE_DIR/run/slurmctld.pid"
    grep -qx munged "$STARTED" 2>/dev/null && stop_pidfile munged /run/munge/munged.pid
    rm -f "$STARTED"
    log "down"
}

status() {
    local ok=0 name pidfile
    for name in slurmctld slurmd; do
        pidfile="$STATE_DIR/run/$name.pid"
        if pid_alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: stopped"; ok=1; fi
    done
    if munge_works; then echo "munge: working"; else echo "munge: not working"; ok=1; fi
    if [ "$ok" -eq 0 ]; then
        sinfo
        case "$(node_state)" in idle | mixed | allocated | completing) ;; *) ok=1 ;; esac
    fi
    return "$ok"
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
