"""The demo: fine-tune the shipped MiniLM on the shipped tweets, optimize it, and canary it through real
servers on loopback.

It sits above flows and servers (it wires both, as an operator would); nothing in Kiln imports it except
the CLI and the Prefect deployments.
"""
