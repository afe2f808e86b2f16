"""The bus: what carries a frame and its results between processes, without torch.

``ring`` (the shared-memory FrameRing), ``wire`` (the message schema), ``topics``,
``transport`` (publisher / subscriber sockets), ``rpc``, ``rundir`` (where a sidecar's sockets
live), ``link`` (a remote worker's ports) and ``security`` (CurveZMQ keys).
"""
