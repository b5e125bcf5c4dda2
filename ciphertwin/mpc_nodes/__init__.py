"""ciphertwin.mpc_nodes — three-party replicated secret sharing over Z_2^64 (see docs/mpc.md).

Entry points for the node service:

* :func:`ciphertwin.mpc_nodes.engine.load_inputs` / :func:`~ciphertwin.mpc_nodes.engine.run_function`
* :func:`ciphertwin.mpc_nodes.output.seal_output` (and ``open_output`` / ``combine_outputs``
  for receivers)
* :func:`ciphertwin.mpc_nodes.transport.mqtt.mqtt_party` (a :class:`Party` over MQTT) and
  :class:`ciphertwin.mpc_nodes.roster.Roster` / ``NodeIdentity``
"""
