# Sourced by the example scripts (needs $here, $WORKDIR, $PORT): a deployment file for a broker
# on $PORT with its state under $WORKDIR, every principal's key folder, the passphrases, the
# cloud's broker password and the operator key everybody pins.
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
