#!/usr/bin/env bash
# The README's quickstart as one script: broker, cloud, owner, device, receiver, grant,
# history, revoke — each a separate `ciphertwin` process talking over MQTT.
#   PORT=1884 WORKDIR=/tmp/ct-quickstart examples/quickstart.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
command -v ciphertwin >/dev/null || export PATH="$here/.venv/bin:$PATH"
WORKDIR=${WORKDIR:-$(mktemp -d)}
PORT=${PORT:-1884}
source "$here/examples/deployment-env.sh"
pids=()
trap 'kill ${pids[@]} 2>/dev/null; wait 2>/dev/null' EXIT

echo "$CIPHERTWIN_CLOUD_PASSWORD" | ciphertwin clients add cloud --role cloud --password-stdin
ciphertwin operator init --name operator                 # roster signing key, encrypted at rest
ciphertwin $q broker & pids+=($!)                        # embedded amqtt: auth + ACLs
sleep 1.5
ciphertwin $q cloud & pids+=($!)                         # stores ciphertext only
ciphertwin owner init --name alice                       # keys (passphrase) + broker login
sleep 1
ciphertwin $q owner register --name alice
ciphertwin $q owner enroll-device --name alice --twin kitchen --device thermo1 \
    --out "$WORKDIR/thermo1.bundle"                      # sealed with the bundle passphrase
ciphertwin device enroll "$WORKDIR/thermo1.bundle"       # on the device (a Raspberry Pi)
ciphertwin $q device run --name thermo1 \
    --source '{"kind": "simulated", "sensor": "temperature", "interval_s": 0.05, "count": 20}' &
pids+=($!)
ciphertwin receiver init --name bob
ciphertwin $q owner grant --name alice --receiver-key "$WORKDIR/home/bob/public.key" \
    --twins kitchen --policy 'type:temperature' --grant-id g-bob
sleep 3
echo "== owner history";        ciphertwin $q owner history --name alice kitchen | tail -n 3
alice_key="$WORKDIR/home/alice/public.key"              # bob checks data against alice's key
echo "== receiver history"
ciphertwin $q receiver history --name bob --owner-key "$alice_key" kitchen | wc -l
ciphertwin $q owner revoke --name alice g-bob
echo "== after revocation"
ciphertwin $q receiver history --name bob --owner-key "$alice_key" kitchen | wc -l
