#!/bin/sh
# tests/small_disk.sh SIZE ACTION OUT CMD...: run CMD on a disk of its own: a fresh tmpfs of SIZE, mounted in a user
# and mount namespace of its own (no root needed, nothing outside sees it), whose path replaces `{DISK}` in CMD's
# arguments (CMD's run.dir is {DISK}/run). ACTION, once the run's first checkpoint is complete: `fill` writes zeros
# until the disk is full (ENOSPC), `readonly` remounts it read-only (EROFS), `none` nothing; `readonly-first` mounts
# it read-only from the start, `full-first` fills it before CMD starts. $SMALL_DISK_AFTER, a glob (`{DISK}` replaced),
# names another file whose appearing triggers ACTION in place of that checkpoint. Then the disk's files are copied
# to OUT, and the script exits with CMD's status.
set -u
size=$1 action=$2 out=$3
shift 3
exec unshare --user --map-root-user --mount sh -c '
  size=$1 action=$2 out=$3; shift 3
  DISK=$(mktemp -d); export DISK
  mount -t tmpfs -o size="$size" tmpfs "$DISK" || exit 90
  [ "$action" = readonly-first ] && mount -o remount,ro "$DISK"
  [ "$action" = full-first ] && cat /dev/zero > "$DISK/filler" 2>/dev/null
  for a in "$@"; do set -- "$@" "$(printf %s "$a" | sed "s|{DISK}|$DISK|g")"; shift; done
  after=${SMALL_DISK_AFTER:-}
  [ -n "$after" ] || after="{DISK}/run/checkpoints/step_*/meta.json"
  after=$(printf %s "$after" | sed "s|{DISK}|$DISK|g")
  "$@" &
  pid=$!
  if [ "$action" = fill ] || [ "$action" = readonly ]; then
    while kill -0 $pid 2>/dev/null && ! ls $after >/dev/null 2>&1; do sleep 0.05; done
    if [ "$action" = fill ]; then cat /dev/zero > "$DISK/filler" 2>/dev/null; else mount -o remount,ro "$DISK"; fi
  fi
  wait $pid
  rc=$?
  rm -f "$DISK/filler"
  cp -a "$DISK/." "$out/"
  exit $rc
' sh "$size" "$action" "$out" "$@"
