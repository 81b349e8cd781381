# Sourced by train.sbatch and train_multinode.sbatch (not run on its own): one `accelerate launch` per node as an
# srun task, all nodes joined by torch's static rendezvous on the allocation's first node; a job of one process runs
# `python train.py` as the task itself.
#
# - machine rank: $SLURM_NODEID, expanded inside each task (in the batch shell it is always 0);
# - main process address: the first node's NodeAddr from scontrol (its name need not resolve), port derived from
#   the job id so that jobs sharing a node do not collide;
# - processes per node: GPUS_PER_NODE, else the GPUs nvidia-smi sees, else 1 CPU process (gloo);
# - signals: torchrun's agent forwards SIGUSR1/SIGUSR2 to the ranks only when told to (PET_SIGNALS_TO_HANDLE);
#   the ranks get TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds to checkpoint before the agent kills them;
# - one process: no launcher in between, since accelerate's simple launcher is not a signal-safe parent (1.16 dies
#   of SIGUSR1/SIGUSR2, so srun ends the step before the trainer has checkpointed, and gives a SIGTERM'd trainer
#   5 s); the trainer then gets SLURM's signal itself, and all of the node's cores (the launcher would set 1 thread);
# - --quiet: a run that fails ends with torchrun's short summary, without the launcher's traceback after it;
# - --kill-on-bad-exit: a task that fails (a rank killed, a node lost) ends the whole step instead of leaving the
#   other nodes waiting; dist.timeout_s bounds any collective still waiting on a dead rank.
set -euo pipefail
if [[ ! -f train.py || ! -f slurm/launch.sh ]]; then
  echo "error: submit from the gan-dist repository root (sbatch slurm/$(basename "$0") ...); $(pwd) is not it" >&2
  exit 2
fi
gpus=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
per_node=$((gpus > 0 ? gpus : 1))
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export GAN_DIST_MAIN_ADDR=${head_addr:-$head_node}
export GAN_DIST_MAIN_PORT=$((20000 + SLURM_JOB_ID % 20000))
export GAN_DIST_PROCS=$((SLURM_JOB_NUM_NODES * per_node))
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-75}
echo "[gan-dist] job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, $(date -Is): $SLURM_JOB_NUM_NODES node(s)" \
  "($SLURM_JOB_NODELIST) x $per_node process(es) ($([[ $gpus -gt 0 ]] && echo GPU || echo CPU)), main" \
  "$GAN_DIST_MAIN_ADDR:$GAN_DIST_MAIN_PORT; train.py $*"
# --multi_gpu: even CPU processes start through torchrun (gloo).
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
  if [[ $GAN_DIST_PROCS -eq 1 ]]; then
    echo "[gan-dist] node 0 of 1 ($SLURMD_NODENAME): python train.py, one process"
    exec python -u train.py "$@"
  fi
  echo "[gan-dist] node $SLURM_NODEID of $SLURM_JOB_NUM_NODES ($SLURMD_NODENAME): accelerate launch, machine rank $SLURM_NODEID"
  exec accelerate launch --quiet --multi_gpu --num_machines "$SLURM_JOB_NUM_NODES" --machine_rank "$SLURM_NODEID" \
    --num_processes "$GAN_DIST_PROCS" --main_process_ip "$GAN_DIST_MAIN_ADDR" \
    --main_process_port "$GAN_DIST_MAIN_PORT" --mixed_precision no --dynamo_backend no train.py "$@"' gan-dist "$@"
