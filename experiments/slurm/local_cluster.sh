#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests and for trying `dpo sweep --launcher slurm`.
#
#   experiments/slurm/local_cluster.sh start    # install (Debian: slurm-wlm, munge) if missing, configure, start
#   experiments/slurm/local_cluster.sh status   # sinfo
#   experiments/slurm/local_cluster.sh stop     # stop the daemons, remove the state folder
#
# What any Slurm cluster needs, in the smallest form (read top to bottom):
#   1. munge: every node shares one secret key; slurm signs its messages with it (here: one node, Debian's key).
#   2. slurmctld, the controller: holds the queue, decides where jobs run (here: SelectType=select/cons_tres).
#   3. slurmd on every compute node: starts the job steps (here: this machine, with its CPUs and memory).
#   4. slurm.conf, the same file on every node: the cluster's name, the controller's host, the nodes and the
#      partitions (queues) they form. A real cluster adds GPUs (Gres), accounting (slurmdbd) and cgroups for
#      isolation; none of that is needed to run a sweep's job array here.
#   5. A shared filesystem: every task runs `python -m dpo sweep FILE --only CELL` in the repository folder, with
#      its .venv, and writes into runs_dir; here that is simply this machine's disk.
# Everything lives in $SLURM_LOCAL_DIR (default /tmp/dpo-slurm) and listens on localhost only. Needs root (the
# daemons run as root here, as in CI); meant for a test machine or a container, never a shared server.
set -euo pipefail
dir=${SLURM_LOCAL_DIR:-/tmp/dpo-slurm}
conf=$dir/slurm.conf
export SLURM_CONF=$conf

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge (Debian packages)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  # (without the file sinfo retries for 60 s before it fails)
  if [ -f "$conf" ] && sinfo -h >/dev/null 2>&1; then echo "already running ($conf)"; return; fi
  mkdir -p "$dir"/{state,spool,log,munge}
  chmod 700 "$dir/munge"
  # munge: Debian's package made /etc/munge/munge.key; the daemon's socket goes into our folder
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
  chown root:root /etc/munge/munge.key
  munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat >"$conf" <<CONF
ClusterName=dpo-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# no cgroups in a container: track processes by their parent, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2048
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  slurmctld -f "$conf"
  slurmd -f "$conf"
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "slurm is up: $(sinfo -h -o '%P %D %t %c CPUs')"; return
    fi
    sleep 1
  done
  echo "error: slurm did not come up; logs in $dir/log" >&2
  tail -5 "$dir"/log/*.log >&2 || true
  exit 1
}

stop() {
  for pid in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  sleep 1
  rm -rf "$dir"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
