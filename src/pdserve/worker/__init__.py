"""The worker process: one EngineCore in a busy loop behind ZMQ (see process.py, protocol.py)."""
