#!/bin/sh
# The image's entrypoint: runs batchgen as the owner of the data directory, so what a job writes there belongs
# to the host user who put its inputs there. A data or output directory that Docker created for a bind mount
# (owned by root) goes to the image's user, uid 1000, who then runs batchgen; the cache volume is handed to
# whoever runs. Started with --user (not root), it only starts batchgen.
set -eu
data=${BATCHGEN_DATA_DIR:-/data}
out=${BATCHGEN_OUT_DIR:-/out}
cache=${BATCHGEN_CACHE_DIR:-/cache}

if [ "$(id -u)" != 0 ]; then
    exec batchgen "$@"
fi
uid=$(stat -c %u "$data")
gid=$(stat -c %g "$data")
if [ "$uid" = 0 ]; then
    uid=1000 gid=1000
fi
for dir in "$data" "$out"; do
    if [ "$(stat -c %u "$dir")" = 0 ]; then
        chown "$uid:$gid" "$dir"
    fi
done
if [ "$(stat -c %u "$cache")" != "$uid" ]; then
    chown -R "$uid:$gid" "$cache"
fi
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups batchgen "$@"
