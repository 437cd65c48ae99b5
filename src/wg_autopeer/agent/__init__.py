"""The agent: reports this client's LAN to the hub and keeps its direct peers."""

import sys

# httpx imports its command-line tool (click, rich, pygments: some 80 modules and 6 MiB
# that stay resident) whenever those happen to be installed, and the agent never runs it.
# A None entry makes that one optional import fail, which httpx handles.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
