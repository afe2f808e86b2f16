"""Sidecar processes: capture (``workers.sources``, ``workers.capture``), the encoder worker,
the session recorder and the replay source.

Nothing is imported here on purpose: ``workers.encoder`` pulls in torch, and the capture
process must not pay for it. Import the module you need, e.g.::

    from workers.capture import CaptureConfig, run_capture
    from workers.sources import open_source
"""
