"""The request hand-off between processes as socket-free state machines (events in, actions out).

``frontend.FrontendFlow``: the frontend's view of every request (route, reserve, forward, fall back, retry);
``prefill.PrefillSide``: a prefill worker's requests (compute, hold, send, release);
``decode.DecodeSide``: a decode worker's requests whose prompt comes from elsewhere (reserve, receive, join,
or compute locally). The worker process, the frontend's client and the simulator carry out the actions
(send a message, start a save, free blocks); none of these modules does I/O or reads a clock.
"""
