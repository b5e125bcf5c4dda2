"""ciphertwin.agents."""
