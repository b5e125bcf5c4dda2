#!/usr/bin/env bash
# Privacy-preserving processing (2+, 3+, 6+) with every party a separate `ciphertwin` process
# over MQTT, step by step as in docs/processing.md ("Separate services, step by step"):
# broker, cloud, operator, three MPC nodes, three owners whose phones upload secret-shared
# WGS84 positions with their own timestamps, and a receiver that submits a contact-tracing
# job, waits for it, and only then fetches the result (results are retained).
#   PORT=1885 WORKDIR=/tmp/ct-processing examples/processing.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
command -v ciphertwin >/dev/null || export PATH="$here/.venv/bin:$PATH"
WORKDIR=${WORKDIR:-$(mktemp -d)}
PORT=${PORT:-1885}
source "$here/examples/deployment-env.sh"
broker=""; pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true
         [ -z "$broker" ] || { kill "$broker"; wait "$broker"; } 2>/dev/null || true; }
trap stop EXIT
up() { for _ in $(seq 150); do grep -q listening "$WORKDIR/broker.log" 2>/dev/null && return
       sleep 0.1; done; echo "broker did not come up" >&2; exit 1; }
each() { local ps=() p; for x in "${@:2}"; do "$1" "$x" & ps+=($!); done   # one machine each:
         for p in "${ps[@]}"; do wait "$p"; done; }                          # run side by side

echo "== 1. broker, cloud, operator"
echo "$CIPHERTWIN_CLOUD_PASSWORD" | ciphertwin clients add cloud --role cloud --password-stdin
ciphertwin operator init --name operator                 # the key that signs the node roster
ciphertwin $q broker > "$WORKDIR/broker.log" & broker=$! # embedded amqtt: auth + ACLs
up
ciphertwin $q cloud & pids+=($!)                         # stores ciphertext only

echo "== 2. nodes and roster"
node_keys() {                                            # on node $1's machine
    ciphertwin node init --name node$1
    ciphertwin node entry --name node$1 --index $1 --out "$WORKDIR/node$1.entry"
}                                                        # entries are public (0644), node-signed
each node_keys 0 1 2
ciphertwin $q operator publish-roster --name operator \
    --entry "$WORKDIR/node0.entry" --entry "$WORKDIR/node1.entry" --entry "$WORKDIR/node2.entry"
for i in 0 1 2; do
    ciphertwin $q node --name node$i --index $i --workers 1 & pids+=($!)
done
ciphertwin receiver init --name bob                      # submits the job, reads the result

echo "== 3. owners, phones in share mode, permits"
# Every phone declares how it encodes its fields (the job must declare the same, or the nodes
# refuse the readings): WGS84 lat/lon projected on the phone to metres around an origin,
# in 1/16 m, within ±50 km — config/share-mode.example.toml.
modes=$here/config/share-mode.example.toml
# Readings carry their own time: 10 epochs of 10 s aligned to the clock, from a minute ago.
# dave (the reference) walks north from the origin, 11 m per epoch; alice is < 1 m east of
# him in epochs 2, 4, 5 and 6, has no reading in epoch 3 (no fix) and uploads newest first;
# carol stays 300 m west but for a second reading 1.5 m away in epoch 8 (counts once).
t0=$(( $(date +%s) / 10 * 10 - 60 ))
lat0=482082000 lon0=163738000                           # the origin in 1e-7 degrees
deg() { printf '%d.%07d' $(($1 / 10000000)) $(($1 % 10000000)); }
reading() {                                              # epoch k, second s, east/north offsets
    printf '{"type": "location", "time": %d, "values": {"lat": %s, "lon": %s}}\n' \
        $((t0 + 10 * $1 + $2)) "$(deg $((lat0 + 1000 * $1)))" "$(deg $((lon0 + $3)))"
}
for k in 0 1 2 3 4 5 6 7 8 9; do reading $k 1 0; done > "$WORKDIR/dave.jsonl"
for k in 9 8 7 6 5 4 2 1 0; do
    reading $k 3 $( [ $k -ge 2 ] && [ $k -le 6 ] && echo 100 || echo 50000 )
done > "$WORKDIR/alice.jsonl"
{ for k in 0 1 2 3 4 5 6 7 8 9; do reading $k 5 -40000; done; reading 8 7 200; } > "$WORKDIR/carol.jsonl"
owner_setup() {                                          # on owner $1's phone and laptop
    ciphertwin owner init --name $1
    ciphertwin $q owner register --name $1
    ciphertwin $q owner enroll-device --name $1 --twin $1-path --device $1-phone \
        --epoch hour --out "$WORKDIR/$1-phone.bundle"
    ciphertwin device enroll "$WORKDIR/$1-phone.bundle"  # on the phone
    # 2+: node i may process share i of this twin's locations, for bob only
    ciphertwin $q owner grant-processing --name $1 --twins $1-path \
        --subset 'type:location' --functions proximity --receiver-key "$WORKDIR/home/bob/public.key"
}
each owner_setup alice carol dave
for owner in alice carol dave; do                        # 3+: the phones upload shares
    ciphertwin $q device run --name $owner-phone --shares --share-config "$modes" \
        --source '{"kind": "stdin"}' < "$WORKDIR/$owner.jsonl" & pids+=($!)
done
stored() {                                               # until the cloud holds every share
    local want=$(( 3 * $(wc -l < "$WORKDIR/$1.jsonl") )) got=0
    for _ in $(seq 150); do
        got=$(ciphertwin $q owner history --name $1 $1-path --json | wc -l)
        [ "$got" -ge "$want" ] && break; sleep 0.2
    done
    echo "$1-path: $got of $want shares stored"
}
each stored alice carol dave

echo "== 4. job"                                        # radius 80 = 5 m in 1/16 m
ciphertwin $q job submit --name bob --job trace-1 --function contact_tracing \
    --params '{"radius": 80}' --fields "@$modes" \
    --epoch-s 10 --since "$t0" --until $((t0 + 100)) --points 11 \
    --input alice:alice-path:user --input carol:carol-path:user --input dave:dave-path:reference \
    --receiver-key "$WORKDIR/home/bob/public.key" --wait --timeout 60
echo "== 5. results"                                     # fetched after the job finished
ciphertwin $q receiver results --name bob --job trace-1 --timeout 20 --out "$WORKDIR/results.json"
cat "$WORKDIR/results.json"; echo

echo "== 6. a job the permits do not cover"                # they allow proximity, not sums
rc=0
ciphertwin $q job submit --name bob --job sum-1 --function sum \
    --input alice:alice-path:user --points 11 --since "$t0" --until $((t0 + 100)) \
    --receiver-key "$WORKDIR/home/bob/public.key" --wait --timeout 60 2>&1 || rc=$?
echo "exit code $rc"                                     # 1: the job failed, reason above
