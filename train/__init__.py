"""Training-side code: datasets (recorded sessions) and, later, augmentations and trainers.

``train.datasets`` reads ``(frame_t, action_t, frame_t+1)`` transitions straight from session
files written by the recorder (``iwm_bus.session``); it needs numpy only, and torch only when
its torch wrapper is asked for.
"""
