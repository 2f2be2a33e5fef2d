#!/bin/bash
# The launch line of one machine, run by train.sbatch through srun on every machine.
# Reads SLURM_NODEID (machine rank) and SLURM_JOB_NUM_NODES (machines) from SLURM, and
# MAIN_ADDR, MAIN_PORT, DEVICES_PER_NODE, CONFIG, ACCELERATE_CONFIG from train.sbatch.
# Extra arguments are config overrides (key.sub=value).
set -euo pipefail
: "${SLURM_NODEID:?set by srun}" "${SLURM_JOB_NUM_NODES:?set by SLURM}" "${MAIN_ADDR:?}" "${MAIN_PORT:?}"
NUM_PROCESSES=$((SLURM_JOB_NUM_NODES * ${DEVICES_PER_NODE:-8}))
exec accelerate launch --config_file "${ACCELERATE_CONFIG}" \
    --num_machines "${SLURM_JOB_NUM_NODES}" --machine_rank "${SLURM_NODEID}" --num_processes "${NUM_PROCESSES}" \
    --main_process_ip "${MAIN_ADDR}" --main_process_port "${MAIN_PORT}" \
    -m trainer train --config "${CONFIG}" train.resume=auto "$@"
