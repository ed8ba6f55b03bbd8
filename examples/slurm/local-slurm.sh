#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying examples/slurm/train.sbatch.
#
#   sudo apt-get install -y slurm-wlm munge      # Debian / Ubuntu
#   sudo examples/slurm/local-slurm.sh start /tmp/slurm
#   export SLURM_CONF=/tmp/slurm/slurm.conf      # the start command prints this line
#   sinfo                                        # one node, state idle
#   ...
#   sudo examples/slurm/local-slurm.sh stop /tmp/slurm
#
# Everything lives in DIR: its own munge key and socket, slurm.conf, spool, logs and
# pid files, on ports of its own. Nothing under /etc is touched, and a Slurm already
# installed on the machine keeps its configuration. Needs root (slurmd runs jobs as
# their users).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

start() {
    [ "$(id -u)" -eq 0 ] || { echo "local-slurm.sh: run as root" >&2; exit 1; }
    for tool in munged slurmctld slurmd srun; do
        command -v "$tool" >/dev/null || {
            echo "local-slurm.sh: $tool not found; install slurm-wlm and munge" >&2; exit 1; }
    done
    mkdir -p "$dir"/{munge,log,spool/slurmctld,spool/slurmd}
    chmod 700 "$dir/munge"

    # 1. munge: the credential service Slurm's daemons and clients authenticate with.
    #    A fresh random key; munged runs as root here, hence --force.
    if [ ! -f "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"

    # 2. slurm.conf: this host as the controller and the only compute node. CPUs must
    #    match what `slurmd -C` reports, or the node is marked invalid.
    host=$(hostname -s)
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
    cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SlurmUser=root
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmdSpoolDir=$dir/spool/slurmd
StateSaveLocation=$dir/spool/slurmctld
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

    # 3. the controller and the node daemon (both fork into the background).
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"

    # 4. wait until the node takes jobs.
    for _ in $(seq 100); do
        state=$(sinfo -h -o %t 2>/dev/null || true)
        case "$state" in idle*|mix*|alloc*) echo "export SLURM_CONF=$SLURM_CONF"; return 0;; esac
        sleep 0.2
    done
    echo "local-slurm.sh: the node did not become idle (state: ${state:-none}); see $dir/log" >&2
    exit 1
}

stop() {
    # The daemons by their pid files, node first; each waited for.
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

case "$action" in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
