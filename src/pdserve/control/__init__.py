"""Resources allocated between the stages: objectives and their rolling attainment (``attainment``), and the
elastic controller that moves cores, roles and step time between prefill and decode (``controller``). Pure
Python (no torch, no sockets): the frontend runs it on live signals, the simulator on simulated ones."""
