#!/usr/bin/env bash
# Sourced by the torchrun launchers: run_preemptible CMD... runs CMD (torchrun) so that
# a clean preemption ends with exit code 0.
#
# On SIGTERM/SIGINT torchrun stops its workers and then exits 1 itself, even when every
# worker saved its checkpoint and exited 0.  The trainer's rank 0 writes the saved step
# to $NORMPILOT_PREEMPT_FILE after such a save; if that file is filled in, the launcher
# reports the preemption and exits 0 (SLURM/Kubernetes then requeue or rerun the same
# command, which resumes).  Any other failure keeps torchrun's exit code.
run_preemptible() {
  local marker child rc=0
  marker=$(mktemp)
  export NORMPILOT_PREEMPT_FILE=$marker
  "$@" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
  # wait returns early when a trapped signal arrives: wait until torchrun is gone.
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" || rc=$?
  done
  trap - TERM INT
  if [ "$rc" -ne 0 ] && [ -s "$marker" ]; then
    echo "preempted: checkpoint saved at step $(cat "$marker"); rerun the same command to resume" >&2
    rc=0
  fi
  rm -f "$marker"
  return "$rc"
}
