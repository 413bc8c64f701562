"""KV data movement behind one seam: the connector (``base``: scheduler side; ``connector``: worker side),
the built-in connectors (``shm``, ``tcp``) and the registry that finds them by name."""
