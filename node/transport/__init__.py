"""Transports (axis 3). The daemon's one seam is ``ControlPlane`` (control.py) with typed messages (messages.py);
implementations: gRPC coordinator (grpc_control.py), hivemind DHT (dht_control.py), in-process run
(inprocess_plane.py); the fault seam wraps any of them (faults.py). ``inprocess.InProcessHub`` is the single-threaded
relay of the simulator and the recipe oracles."""
