#!/usr/bin/env bash
# Privacy-preserving processing (2+, 3+, 6+) as separate services, as docs/processing.md
# ("Separate services, step by step") describes: broker, cloud, operator, three MPC nodes,
# three owners whose phones upload secret-shared locations with their own timestamps, and a
# receiver that submits a contact-tracing job and fetches its result after it finished.
#   PORT=1885 WORKDIR=/tmp/ct-processing examples/processing.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
command -v ciphertwin >/dev/null || export PATH="$here/.venv/bin:$PATH"
WORKDIR=${WORKDIR:-$(mktemp -d)}
PORT=${PORT:-1885}
mkdir -p "$WORKDIR"
sed "s|\.\./var|$WORKDIR/var|; s|port = 1884|port = $PORT|" \
    "$here/config/quickstart.toml" > "$WORKDIR/deployment.toml"
export CIPHERTWIN_CONFIG=$WORKDIR/deployment.toml
export CIPHERTWIN_HOME=$WORKDIR/home                     # key folders of every principal
export CIPHERTWIN_PASSPHRASE=${CIPHERTWIN_PASSPHRASE:-'correct horse battery staple'}
export CIPHERTWIN_BUNDLE_PASSPHRASE=${CIPHERTWIN_BUNDLE_PASSPHRASE:-'tell the installer only'}
export CIPHERTWIN_CLOUD_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
# everyone pins the operator key that signs the node roster (config: [processing] operator_key)
export CIPHERTWIN_PROCESSING__OPERATOR_KEY=$WORKDIR/home/operator/public.key
q="--log-level WARNING"
pids=()
trap 'kill ${pids[@]} 2>/dev/null; wait 2>/dev/null' EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return; sleep 0.1; done; exit 1; }

echo "== services"
echo "$CIPHERTWIN_CLOUD_PASSWORD" | ciphertwin clients add cloud --role cloud --password-stdin
ciphertwin operator init --name operator                 # signs the node roster
ciphertwin $q broker & pids+=($!)
wait_port
ciphertwin $q cloud & pids+=($!)

echo "== nodes and roster"
for i in 0 1 2; do                                       # on each node's machine
    ciphertwin node init --name node$i
    ciphertwin node entry --name node$i --index $i --out "$WORKDIR/node$i.entry"  # public, 0644
done
ciphertwin $q operator publish-roster --name operator \
    --entry "$WORKDIR/node0.entry" --entry "$WORKDIR/node1.entry" --entry "$WORKDIR/node2.entry"
for i in 0 1 2; do
    ciphertwin $q node --name node$i --index $i --workers 1 & pids+=($!)
done
ciphertwin receiver init --name bob                      # will submit the job and read it

echo "== owners, phones in share mode"
# Readings carry their own time: 10 epochs of 10 s, aligned to the clock, starting a minute ago.
# The reference (a patient) walks along y = 0; alice is 1 m beside it in epochs 2, 4, 5, 6
# (no reading in epoch 3: no GPS fix) and uploads her points newest first; carol is near it
# only in epoch 8, where she has two readings (one near, one far: the epoch counts once).
t0=$(( $(date +%s) / 10 * 10 - 60 ))
point() { printf '{"type": "location", "time": %d, "values": {"x": %d, "y": %d}}\n' "$@"; }
for k in $(seq 0 9); do point $((t0 + 10 * k + 1)) $((10 * k)) 0; done > "$WORKDIR/dave.jsonl"
for k in 9 8 7 6 5 4 2 1 0; do
    near=$([ "$k" -ge 2 ] && [ "$k" -le 6 ] && echo 1 || echo 400)
    point $((t0 + 10 * k + 3)) $((10 * k + near)) 0
done > "$WORKDIR/alice.jsonl"
{ for k in $(seq 0 9); do point $((t0 + 10 * k + 5)) $((10 * k)) 300; done
  point $((t0 + 80 + 7)) 80 2; } > "$WORKDIR/carol.jsonl"
for owner in alice carol dave; do
    ciphertwin owner init --name $owner
    ciphertwin $q owner register --name $owner
    ciphertwin $q owner enroll-device --name $owner --twin $owner-path --device $owner-phone \
        --epoch hour --out "$WORKDIR/$owner-phone.bundle"
    ciphertwin device enroll "$WORKDIR/$owner-phone.bundle"
    ciphertwin $q device run --name $owner-phone --shares --source '{"kind": "stdin"}' \
        < "$WORKDIR/$owner.jsonl" & pids+=($!)
    # 2+: node i may process share i of this twin's locations, for bob only
    ciphertwin $q owner grant-processing --name $owner --twins $owner-path \
        --subset 'type:location' --functions proximity \
        --receiver-key "$WORKDIR/home/bob/public.key"
done
for owner in alice carol dave; do                        # wait until the cloud has every share
    want=$(( 3 * $(wc -l < "$WORKDIR/$owner.jsonl") ))
    for _ in $(seq 100); do
        got=$(ciphertwin $q owner history --name $owner $owner-path --json | wc -l)
        [ "$got" -ge "$want" ] && break; sleep 0.2
    done
    echo "$owner-path: $got shares stored"
done

echo "== job"
ciphertwin $q job submit --name bob --job trace-1 --function contact_tracing \
    --params '{"radius": 80}' --epoch-s 10 --since "$t0" --until $((t0 + 100)) --points 11 \
    --input alice:alice-path:user --input carol:carol-path:user --input dave:dave-path:reference \
    --receiver-key "$WORKDIR/home/bob/public.key" --wait --timeout 60
echo "== results"                                        # fetched after the job finished
ciphertwin $q receiver results --name bob --job trace-1 --timeout 20 --out "$WORKDIR/results.json"
cat "$WORKDIR/results.json"
