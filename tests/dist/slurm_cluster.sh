#!/usr/bin/env bash
# A private one-node Slurm cluster for one command (a launch test of `srun`): munged, slurmctld
# and slurmd on 127.0.0.1 with their own config, keys, ports and state in a temporary folder,
# stopped when the command ends. Usage: slurm_cluster.sh COMMAND...  (SLURM_CONF is set for it).
# Exit 77 (ctest: skipped) when Slurm or munge is not installed, or the daemons cannot start
# here (Slurm needs root or a slurm user for its daemons).
set -uo pipefail
for b in munged slurmctld slurmd srun sinfo; do
  command -v "$b" >/dev/null || { echo "slurm_cluster: SKIPPED: $b is not installed"; exit 77; }
done
dir=$(mktemp -d /tmp/lt_slurm.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
chmod 755 "$dir"
mkdir -p "$dir"/{state,spool,log}
# munge: a fresh key and its own socket.
dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge.key"
munged --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed" --force -F 2>"$dir/log/munged.out" &
pids+=($!)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
user=$(id -un)
cat > "$dir/slurm.conf" <<CONF
ClusterName=longtune
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(port)
SlurmdPort=$(port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmix
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -D -i > "$dir/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D > "$dir/log/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then break; fi
  sleep 0.5
done
if ! sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
  echo "slurm_cluster: SKIPPED: the daemons did not come up here"
  tail -n 5 "$dir"/log/*.log "$dir"/log/*.out 2>/dev/null
  exit 77
fi
"$@"
