"""The docket-agent command (the agent stream arrives with the next issue)."""

from __future__ import annotations

import sys


def main() -> None:
    print("docket-agent: not available yet in this version", file=sys.stderr)
    sys.exit(2)
