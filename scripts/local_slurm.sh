#!/usr/bin/env bash
# A real SLURM cluster of N nodes on this one host, for tests and CI: munge, slurmctld and one `slurmd -N nK` per
# node, from Debian's packages, without systemd. Needs root and apt (Debian 12 tested, Slurm 22.05).
#
#   scripts/local_slurm.sh up       install if missing, write the config, start the daemons, wait until all nodes idle
#   scripts/local_slurm.sh down     cancel jobs, stop the daemons this script started (munged too, if it did)
#   scripts/local_slurm.sh status   sinfo and the queue
#
# Knobs: SLURM_LOCAL_NODES (default 2), SLURM_LOCAL_CPUS (default nproc), SLURM_LOCAL_TIMEOUT (default 60 s).
# Nodes are n1..nN on 127.0.0.1 (ports 17001...); they share this host's CPUs, disk and network. `up` is a no-op
# when the same cluster is already healthy.
set -euo pipefail

NODES=${SLURM_LOCAL_NODES:-2}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
STATE=/run/slurm-local
MARK="# written by gan-dist scripts/local_slurm.sh"

say() { echo "[local_slurm] $*" >&2; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    say "SLURM is not installed and cannot be installed here (needs root and apt-get)"
    return 1
  fi
  say "installing slurmctld, slurmd, slurm-client and munge from Debian packages"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  local nodes="" i
  for ((i = 1; i <= NODES; i++)); do
    nodes+="NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS RealMemory=1000 State=UNKNOWN"$'\n'
  done
  cat <<EOF
$MARK
ClusterName=localci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
${nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

healthy() {
  [[ -f $CONF ]] && cmp -s <(write_conf) "$CONF" || return 1
  local idle
  idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true)
  [[ $idle -eq $NODES ]]
}

stop_daemons() {
  local pid
  if [[ -f $STATE/pids ]]; then
    while read -r pid; do
      [[ -d /proc/$pid ]] && grep -qE '^(slurmctld|slurmd)$' "/proc/$pid/comm" && kill "$pid" 2>/dev/null || true
    done <"$STATE/pids"
    for _ in $(seq 100); do
      local alive=0
      while read -r pid; do [[ -d /proc/$pid ]] && grep -qE '^(slurmctld|slurmd)$' "/proc/$pid/comm" && alive=1; done <"$STATE/pids"
      ((alive)) || break
      sleep 0.1
    done
    while read -r pid; do
      [[ -d /proc/$pid ]] && grep -qE '^(slurmctld|slurmd)$' "/proc/$pid/comm" && kill -9 "$pid" 2>/dev/null || true
    done <"$STATE/pids"
    rm -f "$STATE/pids"
  fi
}

up() {
  install
  if healthy; then
    say "cluster of $NODES nodes already up"
    return 0
  fi
  stop_daemons
  if [[ -f $CONF ]] && ! grep -q "^$MARK" "$CONF"; then
    cp "$CONF" "$CONF.before-local-slurm"
    say "kept the existing $CONF as $CONF.before-local-slurm"
  fi
  mkdir -p /etc/slurm "$STATE" /var/spool/slurmctld /var/log/slurm /run/munge
  write_conf >"$CONF"
  chown munge:munge /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$STATE/munged"  # a munged that was already running is not ours to stop
  fi
  slurmctld -c
  sleep 0.5
  cat /run/slurmctld.pid >"$STATE/pids"
  local i
  for ((i = 1; i <= NODES; i++)); do
    mkdir -p "/var/spool/slurmd/n$i"
    slurmd -N "n$i"
  done
  sleep 0.5
  for ((i = 1; i <= NODES; i++)); do cat "/run/slurmd-n$i.pid" >>"$STATE/pids"; done
  local waited=0
  until healthy; do
    if ((waited >= TIMEOUT * 10)); then
      say "nodes not idle after ${TIMEOUT}s:"; sinfo -N >&2 || true
      tail -n 20 /var/log/slurm/slurmctld.log >&2 || true
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  say "cluster of $NODES nodes up: $(sinfo -h -N -o '%N' | tr '\n' ' ')"
}

down() {
  if command -v scancel >/dev/null && [[ -f $STATE/pids ]]; then
    scancel --full "$(squeue -h -o %i | tr '\n' ',' | sed 's/,$//')" 2>/dev/null || true
    for _ in $(seq 150); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  stop_daemons
  # A restart with another config (in `up`) keeps munged; only `down` stops it, and only the one `up` started.
  local pid
  if [[ -f $STATE/munged ]]; then
    pid=$(<"$STATE/munged")
    if [[ -d /proc/$pid ]] && grep -qx munged "/proc/$pid/comm"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    fi
    rm -f "$STATE/munged"
  fi
  say "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo -N; squeue ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
