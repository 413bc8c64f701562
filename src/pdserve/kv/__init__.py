"""KV data movement: prefill -> decode transfer backends (shm, tcp) behind one interface."""
