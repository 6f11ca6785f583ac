"""What scripts/bench and scripts/instructions share: the release build of
the gateway and the load tool, and a free loopback port."""

import json
import socket
import subprocess


def release_binaries(root):
    """Build `tidegate` and the `load` bench in release mode; their paths."""
    out = subprocess.run(
        ["cargo", "build", "--release", "--bin", "tidegate", "--bench", "load", "--message-format=json"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    exe = {}
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            exe[msg["target"]["name"]] = msg["executable"]
    return exe["tidegate"], exe["load"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
