"""The twin protocol: message kinds on the bus and how each is built, signed and checked.

Shared by the device agent (builds items), the cloud (checks outer signatures and tokens,
never opens anything) and readers — owners and receivers (open items, check the device's
inner signature).
"""
