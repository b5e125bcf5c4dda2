"""ciphertwin.demo."""
