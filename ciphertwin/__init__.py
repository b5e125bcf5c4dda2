"""ciphertwin: an MQTT platform for encrypted digital twins (KP-CPRE sharing, MPC processing)."""

__version__ = "0.1.0"
