"""The coordination server on the hub: who shares a LAN, told by the tunnel itself.

``matching`` (pure) decides who are LAN neighbours; ``registry`` holds the soft
state and wakes blocking queries; ``store`` persists it; ``identity`` maps a
tunnel source address to the hub peer; ``app`` is the HTTP face; ``command``
runs it under uvicorn.
"""
