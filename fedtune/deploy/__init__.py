"""Deployment: real devices joining real rounds through Flower's SuperLink / SuperNode (TLS, node auth).

certs        a local CA, the SuperLink's TLS certificate, SuperNode auth keys (for tests and first trials)
eligibility  may this device train now? (a Protocol + registry of policies; the ClientApp asks it)
device       a real device's settings (node config), its own data, eligibility check, the task's batch cap
processes    start a Flower process with a log, stop it and its children by PID
superlink    the SuperLink command, its FLWR_HOME connection, registering SuperNode keys, `flwr run`
supernode    the SuperNode command and node config of `fedtune device join`
server       `fedtune server start`: SuperLink + the run, followed to its end, resumable after a crash

Only this package and fedtune/flower/ know Flower; this one only runs Flower's commands.
"""
