"""ciphertwin.cloud_twin."""
